"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353).

    V = K₀ + s·A B,    n = ‖V‖₀,    K' = m ⊙ V / n,    m = ‖K₀‖₀ at init,  K₀ frozen.

The pretrained weight is split into a magnitude `m` (one per output unit) and a direction, which LoRA adapts.
`n` is treated as a constant in the backward pass by default (the paper's §4.3: it saves memory and barely
changes accuracy); `detach_norm=False` keeps its gradient. Norms are float32 with an epsilon: an all-zero output
unit gives a finite result (peft's fp16 DoRA returned NaN there). Merge is `(m/n) ⊙ (K₀ + sAB)`, which is
exactly what `apply` computes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from reparam.core import Reparam
from reparam.layout import Axes, expand, norm, resolve
from reparam.transforms.lora import lowrank_delta, lowrank_init


def dora(rank: int, alpha: Optional[float] = None, detach_norm: bool = True, eps: float = 1e-6,
         in_axes: Axes = -2, out_axes: Axes = -1) -> Reparam:
  """DoRA: `K' = m ⊙ (K₀ + (α/r)·A B) / ‖K₀ + (α/r)·A B‖₀`, identity at init.

  Args:
    rank, alpha: as for `lora` (`alpha=None` means scale 1).
    detach_norm: stop the gradient through the column norm `n` (paper §4.3).
    eps: added in quadrature to every norm.
    in_axes, out_axes: the kernel's input and output axes (see `reparam.layout`).
  """
  scale = 1.0 if alpha is None else alpha / rank

  def init(key, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    return {"m": norm(w, layout, eps), **lowrank_init(key, w, rank, layout)}

  def apply(factors, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    w = jax.lax.stop_gradient(w)    # frozen: no gradient is even computed for K₀ (nor for stages before it)
    v = w.astype(jnp.float32) + lowrank_delta(factors, layout, scale).astype(jnp.float32)
    n = norm(v, layout, eps)
    if detach_norm:
      n = jax.lax.stop_gradient(n)
    return (v * expand(factors["m"] / n, layout, layout.outputs)).astype(w.dtype)

  return Reparam(init, apply, roles={"m": "gain", "A": "lowrank", "B": "lowrank"}, freezes_base=True,
                 name="dora")
