"""Per-layer diagnostics a reparameterization study reads, computed every few steps in one jitted call.

For every effective kernel `W` (viewed as `(fan_in, fan_out)`, one column per output unit):
  norm       ‖W‖_F — with weight decay it settles near an equilibrium ∝ √(η/λ) (learnable-multipliers paper);
  update     ‖W_t − W_{t−1}‖_F / ‖W_{t−1}‖_F, the effective update size of the last step (NaP paper: the
             effective learning rate);
  sigma_max  the top singular value (the diagnostic of the layerwise-scaling rules);
  dM, dD     magnitude and direction change against the starting weights W₀ (DoRA paper §3.2):
             dM = mean_j |‖W_j‖ − ‖W₀_j‖|,   dD = mean_j (1 − cos(W_j, W₀_j)).
For a wrapped kernel, also `w_norm`: ‖K‖_F of the stored matrix (the `w` leaf, e.g. under multipliers), which is
what weight decay acts on, hence what the √(η/λ) equilibrium is about.
And for every gain, magnitude and multiplier factor: mean, std, min, max.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import reparam

FACTOR_NAMES = ("g", "m", "scalar", "row", "col")


def _kernels(params) -> dict[str, jax.Array]:
  return {p: x.reshape(-1, x.shape[-1]).astype(jnp.float32) for p, x in reparam.flatten(params).items()
          if x.ndim >= 2 and not p.endswith("embedding")}


def _kernel_stats(w: jax.Array, prev: jax.Array, base: jax.Array) -> dict[str, jax.Array]:
  cols, cols0 = jnp.linalg.norm(w, axis=0), jnp.linalg.norm(base, axis=0)
  cos = jnp.sum(w * base, axis=0) / jnp.maximum(cols * cols0, 1e-12)
  return {
      "norm": jnp.linalg.norm(w),
      "update": jnp.linalg.norm(w - prev) / jnp.maximum(jnp.linalg.norm(prev), 1e-12),
      "sigma_max": jnp.linalg.svd(w, compute_uv=False)[0],
      "dM": jnp.mean(jnp.abs(cols - cols0)),
      "dD": jnp.mean(1.0 - cos),
  }


def layer_stats(rules, rparams_prev, rparams, base_params) -> dict[str, jax.Array]:
  """Flat `{"<path>/<stat>": scalar}` for every kernel and every gain/multiplier factor."""
  now = _kernels(reparam.materialize(rules, rparams))
  prev = _kernels(reparam.materialize(rules, rparams_prev))
  base = _kernels(base_params)
  out = {}
  for path, w in now.items():
    for k, v in _kernel_stats(w, prev[path], base[path]).items():
      out[f"{path}/{k}"] = v
  for path, x in reparam.flatten(rparams).items():
    if path.endswith("/" + reparam.core.WEIGHT) and x.ndim >= 2:    # a wrapped kernel's stored matrix: the one
      out[f"{path.rpartition('/')[0]}/w_norm"] = jnp.linalg.norm(x.astype(jnp.float32))   # weight decay acts on
    if path.split("/")[-1] in FACTOR_NAMES and "/" in path:
      x = x.astype(jnp.float32)
      out.update({f"{path}/mean": x.mean(), f"{path}/std": x.std(), f"{path}/min": x.min(),
                  f"{path}/max": x.max()})
  return out
