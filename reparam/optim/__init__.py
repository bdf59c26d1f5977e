"""Optimizers routed by parameter role: AdamW or Muon per role, lr multipliers, weight decay, frozen leaves,
schedules, clipping, width scaling, and the Normalize-and-Project projection.

    tx = reparam.optim.make(dict(name="muon", learning_rate=0.02, weight_decay=0.1), rules, rparams)
    print(reparam.optim.describe(config, rules, rparams))     # which leaves Muon and AdamW own
    updates, state = tx.update(grads, state, rparams)         # params are required (decay, NaP)
    rparams = optax.apply_updates(rparams, updates)           # reparam.optim.apply_updates if projection="deferred"
    # projection="lazy": rparams hold NaP's unprojected q; the weights are reparam.optim.projected(rparams, state)

The config keys and defaults are in `reparam.optim.config`; the per-role routing, Muon axes and width scaling
in `reparam.optim.routing`; the projection in `reparam.optim.nap`.
"""
from reparam.optim.build import describe, make
from reparam.optim.config import DEFAULTS, check, schedule
from reparam.optim.nap import (PROJECTIONS, DeferredProjectionState, NormalizeAndProjectState, apply_updates,
                               normalize_and_project, projected, projection_scales)
from reparam.optim.routing import Route, labels, muon_dims, routing

__all__ = ["DEFAULTS", "PROJECTIONS", "DeferredProjectionState", "NormalizeAndProjectState", "Route", "apply_updates",
           "check", "describe", "labels", "make", "muon_dims", "normalize_and_project", "projected",
           "projection_scales", "routing", "schedule"]
