"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

    K' = K₀ + s·A B,    s = α / r,    A: (in, r) Kaiming-uniform,  B: (r, out) zeros,  K₀ frozen.

`A B = 0` at init, so the wrapped model starts exactly where the pretrained one is. For a conv kernel
`(H, W, in, out)` the window axes belong to A (`(H, W, in, r)`): a kernel-sized down-projection followed by a
1×1 up-projection, as peft does for Conv2d. `A`'s bound `1/√fan_in` is PyTorch's `kaiming_uniform_(a=√5)`, the
init of the reference implementation.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import Reparam
from reparam.layout import Axes, Layout, resolve


def check_rank(rank: int, shape, layout: Layout) -> None:
  limit = min(layout.fan_in(shape), layout.fan_out(shape))
  if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
    raise ValueError(f"rank={rank} must be an integer in [1, min(in, out) = {limit}]")


def lowrank_init(key: jax.Array, w: jax.Array, rank: int, layout: Layout) -> dict:
  """`A` Kaiming-uniform over the window and input axes, `B` zeros over the output axes."""
  check_rank(rank, w.shape, layout)
  bound = 1.0 / np.sqrt(layout.fan_in(w.shape))
  a_shape = tuple(w.shape[i] for i in layout.reduce) + (rank,)
  return {"A": jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(w.dtype),
          "B": jnp.zeros((rank,) + layout.out_shape(w.shape), w.dtype)}


def lowrank_delta(factors: dict, layout: Layout, scale: float) -> jax.Array:
  """`s·A B` laid out like the kernel (transposed back when its axes are not (window, in, out) ordered)."""
  delta = scale * jnp.tensordot(factors["A"], factors["B"], axes=1)
  order = layout.reduce + layout.outputs
  return delta if order == tuple(range(layout.ndim)) else jnp.transpose(delta, np.argsort(order))


def lowrank_linear(factors: dict, w: jax.Array, x: jax.Array, layer, scale: float, out_scale=None,
                   remat: bool = False) -> jax.Array:
  """`(x K₀ + s (x A) B) ⊙ out_scale` with the layer's own contraction (see `Reparam.linear`); `K₀` frozen.

  `x A` runs the layer with A as its kernel (a conv's window, padding and strides included), then B contracts the
  trailing rank axis (a 1×1 projection). A per-output-unit `out_scale` (DoRA's m/n) is folded into B, so that
  it costs one multiply on `x K₀` (`layer.scale_out`, whose gradient sums on a 2-D view). The rank projection is
  a 2-D (rows, rank)·(rank, units) `dot`: XLA's CPU backend ran the 3-D `tensordot` far slower (the LoRA step
  measured 0.82-0.86x plain before, 0.70x after, benchmarks/train_step.py).

  `out_scale`'s gradient is a sum over rows of `x K₀` times the output's gradient, so the backward pass needs
  `x K₀`: kept from the forward pass (rows × out per layer), or with `remat` computed again there (one more
  rows × in × out matmul, nothing kept).
  """
  w = jax.lax.stop_gradient(w)
  xa = layer.matmul(x, factors["A"])
  b = scale * factors["B"].astype(jnp.float32)
  if out_scale is None:
    y0 = layer.matmul(x, w)
  else:
    scaled_base = lambda x, v: layer.scale_out(layer.matmul(x, w), v)
    b, y0 = b * out_scale, (jax.checkpoint(scaled_base) if remat else scaled_base)(x, out_scale)
  rank, units = b.shape[0], b.size // b.shape[0]
  xab = jnp.dot(xa.reshape(-1, rank), b.reshape(rank, units).astype(xa.dtype))      # (rows, rank)·(rank, units)
  return y0 + xab.reshape(y0.shape)


def lora(rank: int, alpha: Optional[float] = None, in_axes: Axes = -2, out_axes: Axes = -1) -> Reparam:
  """LoRA: `K' = K₀ + (α/r)·A B` with `K₀` frozen; `alpha=None` means `α = r` (scale 1).

  Args:
    rank: r, at most `min(in, out)` of the kernel viewed as a matrix.
    alpha: α; the update is scaled by `α / r`.
    in_axes, out_axes: the kernel's input and output axes (see `reparam.layout`).
  """
  scale = 1.0 if alpha is None else alpha / rank

  def init(key, w):
    return lowrank_init(key, w, rank, resolve(w.ndim, in_axes, out_axes))

  def apply(factors, w):
    w = jax.lax.stop_gradient(w)    # frozen: no gradient is even computed for K₀ (nor for stages before it)
    return w + lowrank_delta(factors, resolve(w.ndim, in_axes, out_axes), scale).astype(w.dtype)

  def linear(factors, w, x, layer):
    """Activation space: `y = x K₀ + s (x A) B`, never forming `K₀ + sAB`."""
    layer.check(resolve(w.ndim, in_axes, out_axes))
    return lowrank_linear(factors, w, x, layer, scale)

  return Reparam(init, apply, roles={"A": "lowrank", "B": "lowrank"}, freezes_base=True, name="lora",
                 linear=linear)
