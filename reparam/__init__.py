"""reparam: composable weight reparameterizations for any Flax model.

    rules = [(r".*Dense_\\d+/kernel", reparam.chain(reparam.dora(rank=4), reparam.multipliers(row=True)))]
    rparams = reparam.init(rules, params, key)                  # plain dict: optax- and orbax-ready
    loss = lambda rp, x: f(model.apply({"params": reparam.materialize(rules, rp)}, x))
    loss = lambda rp, x: f(reparam.apply(rules, model, rp, x))  # the same, in activation space (linen, under jit)
    params = reparam.merge(rules, rparams)                      # plain tree for inference
"""
from reparam.core import (ROLES, ConfigError, Reparam, chain, default_role, flatten, identity, init, matches,
                          materialize, merge, roles)
from reparam.transforms import dora, from_spec, lora, multipliers, rules_from_spec, weight_norm
from reparam import optim
from reparam.fast import apply

__all__ = ["ROLES", "ConfigError", "Reparam", "apply", "chain", "default_role", "dora", "flatten", "from_spec",
           "identity", "init", "lora", "matches", "materialize", "merge", "multipliers", "optim", "roles", "rules_from_spec",
           "weight_norm"]
