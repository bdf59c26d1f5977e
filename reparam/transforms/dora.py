"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353).

    V = K₀ + s·A B,    n = ‖V‖₀,    K' = m ⊙ V / n,    m = ‖K₀‖₀ at init,  K₀ frozen.

The pretrained weight is split into a magnitude `m` (one per output unit) and a direction, which LoRA adapts.
`n` is treated as a constant in the backward pass by default (the paper's §4.3: it saves memory and barely
changes accuracy); `detach_norm=False` keeps its gradient. Norms are float32 with an epsilon: an all-zero output
unit gives a finite result (peft's fp16 DoRA returned NaN there). Merge is `(m/n) ⊙ (K₀ + sAB)`, which is
exactly what `apply` computes.

Factors: `m` (gain), `A`, `B` (low-rank, as LoRA) and `k0_sq = ‖K₀‖₀²` (frozen), cached at init for the
activation-space form, which then reads K₀ once per step for its norm instead of twice (`lowrank_norm`). Like
`m`, it describes the K₀ given to `init`: replacing K₀ afterwards (loading other pretrained weights into `w`)
needs `reparam.init` again, or `apply` (materialized) and `reparam.apply` (activation space) disagree.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from reparam.core import Reparam
from reparam.layout import Axes, Layout, expand, norm, resolve, sq_norm
from reparam.transforms.lora import lowrank_delta, lowrank_init, lowrank_linear

HIGHEST = jax.lax.Precision.HIGHEST


def lowrank_norm(factors: dict, w: jax.Array, layout: Layout, scale: float, eps: float,
                 ak: Optional[jax.Array] = None) -> jax.Array:
  """`‖K₀ + sAB‖₀` (float32, with eps, as `layout.norm`) without forming `K₀ + sAB`, in O(in·out·r):

      n² = ‖K₀‖₀² + 2s·Σ_k (AᵀK₀)_kj B_kj + s²·Σ_kl B_kj (AᵀA)_kl B_lj

  with ‖K₀‖₀² read from the factor `k0_sq` (cached at init: K₀ is frozen), so K₀ is read once, by `AᵀK₀`, or
  not at all where the caller passes `ak = AᵀK₀` (r, out...), float32, from a matmul that reads K₀ anyway.
  Exact algebra; in float32 it loses accuracy only where n ≪ ‖K₀‖₀ (sAB cancelling K₀), hence the clamp at 0.
  """
  a, b, w32 = factors["A"].astype(jnp.float32), factors["B"].astype(jnp.float32), w.astype(jnp.float32)
  rank = a.shape[-1]
  # Aᵀ K₀, (r, out...), contracting A's (window..., in...) axes in place. Left to itself XLA's CPU backend runs
  # this as a standalone dot; an explicit transpose of A behind an optimization barrier (the earlier form) made
  # it fuse the dot with the sum below into one kernel of ~1 ms for a 512 × 2048 K₀: DoRA measured 1.15-1.19x
  # LoRA at 128 tokens with it and 1.12-1.14x without, side by side (no change at 4096 tokens).
  if ak is None:
    ak = jnp.tensordot(a, w32, axes=(tuple(range(len(layout.reduce))), layout.reduce), precision=HIGHEST)
  a2 = a.reshape(-1, rank)
  bb = jnp.tensordot(jnp.dot(a2.T, a2, precision=HIGHEST), b, axes=1, precision=HIGHEST)   # (AᵀA) B
  # One reduction over the rank axis: Σ_k B_kj (2s (AᵀK₀)_kj + s² ((AᵀA)B)_kj)
  n2 = jax.lax.stop_gradient(factors["k0_sq"]) + jnp.sum(b * (2.0 * scale * ak + scale * scale * bb), axis=0)
  return jnp.sqrt(jnp.maximum(n2, 0.0) + eps * eps)


def stacked_products(factors: dict, w: jax.Array, x: jax.Array, layer) -> tuple:
  """`(x K₀, AᵀK₀)` from one matmul of `[x; Aᵀ]` with K₀ where the layer says so (`Layer.stacks`), K₀ then read
  once for both; `(None, None)` elsewhere. A and K₀ get no gradient through it: for a detached norm only."""
  rank = factors["A"].shape[-1]
  if not layer.stacks(x, w, rank):
    return None, None
  return layer.matmul_stacked(x, jnp.moveaxis(factors["A"], -1, 0), w)


def dora(rank: int, alpha: Optional[float] = None, detach_norm: bool = True, eps: float = 1e-6,
         in_axes: Axes = -2, out_axes: Axes = -1, remat: bool = False) -> Reparam:
  """DoRA: `K' = m ⊙ (K₀ + (α/r)·A B) / ‖K₀ + (α/r)·A B‖₀`, identity at init.

  Args:
    rank, alpha: as for `lora` (`alpha=None` means scale 1).
    detach_norm: stop the gradient through the column norm `n` (paper §4.3).
    eps: added in quadrature to every norm.
    in_axes, out_axes: the kernel's input and output axes (see `reparam.layout`).
    remat: in activation space (`reparam.apply`), m's gradient needs `x K₀ + s (x A) B`. By default it is read
      back from the layer's output, which is then kept for the backward pass: free where the next layer keeps
      that output anyway (a GELU's input), (rows × out) per layer where it does not (attention's q, k, v, which
      XLA keeps in a layout of its own; before a residual add). With `remat=True`, `x K₀` is computed again in the
      backward pass instead (one more rows × in × out matmul) and nothing is kept. Same values and gradients
      either way; it can be chosen per layer through the rules. Measured on the benchmark LM, 2 CPU cores
      (docs/performance.md), DoRA's step against LoRA's at 128 / 4096 tokens: peak memory 1.030x / 1.041x by
      default, 0.998x / 0.984x with remat, which costs 1.39-1.48x / 1.14-1.17x LoRA's time where the default
      costs 1.08-1.12x / 0.96-1.07x (side-by-side runs).
  """
  scale = 1.0 if alpha is None else alpha / rank

  def init(key, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    return {"m": norm(w, layout, eps), "k0_sq": sq_norm(w, layout), **lowrank_init(key, w, rank, layout)}

  def apply(factors, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    w = jax.lax.stop_gradient(w)    # frozen: no gradient is even computed for K₀ (nor for stages before it)
    v = w.astype(jnp.float32) + lowrank_delta(factors, layout, scale).astype(jnp.float32)
    n = norm(v, layout, eps)
    if detach_norm:
      n = jax.lax.stop_gradient(n)
    return (v * expand(factors["m"] / n, layout, layout.outputs)).astype(w.dtype)

  def linear(factors, w, x, layer):
    """Activation space: `y = (m/n) ⊙ (x K₀ + s (x A) B)`, with n from `lowrank_norm`: never forms K₀ + sAB.
    It skips the frozen K₀'s weight gradient (a matmul) but adds passes over the (rows × out) activations: on a
    GPU those cost more once rows > in (`Layer.activation_space_pays`, measured in docs/performance.md), and
    there the layer runs materialized; on CPU it computes `x (K₀ ⊙ m/n) + s (x A)(B ⊙ m/n)` instead
    (`Layer.scales_kernel`), which still skips K₀'s gradient. On CPU, where n is detached and the layer has few
    rows (`Layer.stacks`), `AᵀK₀` comes out of the layer's own matmul, `[x; Aᵀ] K₀`: K₀ is read once forward."""
    layout = resolve(w.ndim, in_axes, out_axes)
    layer.check(layout)
    per_row = layout.fan_out(w.shape)         # the output units it scales
    layer.check_cost(per_row)
    w = jax.lax.stop_gradient(w)
    scale_kernel = layer.scales_kernel(per_row)
    y0, ak = stacked_products(factors, w, x, layer) if detach_norm and not (remat or scale_kernel) else (None, None)
    n = lowrank_norm(factors, w, layout, scale, eps, ak)
    if detach_norm:
      n = jax.lax.stop_gradient(n)
    return lowrank_linear(factors, w, x, layer, scale, out_scale=factors["m"] / n, remat=remat,
                          scale_kernel=scale_kernel, y0=y0)

  return Reparam(init, apply, roles={"m": "gain", "k0_sq": "frozen", "A": "lowrank", "B": "lowrank"},
                 freezes_base=True, name="dora", linear=linear)
