"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

    K' = K₀ + s·A B,    s = α / r,    A: (in, r) Kaiming-uniform,  B: (r, out) zeros,  K₀ frozen.

`A B = 0` at init, so the wrapped model starts exactly where the pretrained one is. For a conv kernel
`(H, W, in, out)` the window axes belong to A (`(H, W, in, r)`): a kernel-sized down-projection followed by a
1×1 up-projection, as peft does for Conv2d. `A`'s bound `1/√fan_in` is PyTorch's `kaiming_uniform_(a=√5)`, the
init of the reference implementation.
"""
from __future__ import annotations

import functools
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
                   remat: bool = False, scale_kernel: bool = False, y0: Optional[jax.Array] = None) -> jax.Array:
  """`(x K₀ + s (x A) B) ⊙ out_scale` with the layer's own contraction (see `Reparam.linear`); `K₀` frozen.

  `x A` runs the layer with A as its kernel (a conv's window, padding and strides included), then B contracts the
  trailing rank axis (a 1×1 projection). A per-output-unit `out_scale` (DoRA's m/n) scales both terms, in the
  fusion that adds them. The rank projection is a 2-D (rows, rank)·(rank, units) `dot`: XLA's CPU
  backend ran the 3-D `tensordot` far slower (the LoRA step measured 0.82-0.86x plain before, 0.70x after,
  benchmarks/train_step.py).

  `out_scale`'s gradient is a sum over rows of `x K₀ + s (x A) B` times the output's gradient. The backward
  pass gets that sum back from the layer's output (`_scaled_lowrank`), which the next layer may keep anyway (a
  GELU's input), or, with `remat`, computes `x K₀` again (one more rows × in × out matmul, nothing kept).
  With `scale_kernel` (and not `remat`), `out_scale` scales K₀'s output units instead of the output
  (`_kernel_scaled_lowrank`): cheaper where the layer's rows outnumber its input features. `y0`: `x K₀` where
  the caller has it already (DoRA's `Layer.matmul_stacked`), for the forms that take it as it is (neither
  `remat` nor `scale_kernel`).
  """
  w = jax.lax.stop_gradient(w)
  xa = layer.matmul(x, factors["A"])
  b = scale * factors["B"].astype(jnp.float32)
  if y0 is None and not (remat or scale_kernel):
    y0 = layer.matmul(x, w)
  if out_scale is None:
    return _plus_rank_product(y0, xa, b)
  if remat:
    scaled_base = lambda x, v: layer.scale_out(layer.matmul(x, w), v)
    return _plus_rank_product(jax.checkpoint(scaled_base)(x, out_scale), xa, b * out_scale)
  if scale_kernel:
    return _kernel_scaled_lowrank(layer.matmul, x, w, xa, b, out_scale)
  return _scaled_lowrank(y0, xa, b, out_scale)


def _rank_product(xa: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`(x A) b` shaped `shape`, the rank axis contracted as a 2-D (rows, rank)·(rank, units) `dot`."""
  rank, units = b.shape[0], b.size // b.shape[0]
  return jnp.dot(xa.reshape(-1, rank), b.reshape(rank, units).astype(xa.dtype)).reshape(shape)


def _plus_rank_product(y0: jax.Array, xa: jax.Array, b: jax.Array) -> jax.Array:
  """`y0 + (x A) b`."""
  return y0 + _rank_product(xa, b, y0.shape)


# A scale this small in magnitude is applied as ±TINY, so that `x K₀ + s (x A) B` can be read back from the
# output (below).
TINY = 1e-30


def _safe(v: jax.Array) -> jax.Array:
  """v with every entry of magnitude under TINY set to ±TINY: the output can then be divided by it."""
  return jnp.where(jnp.abs(v) < TINY, jnp.where(v < 0, -TINY, TINY).astype(v.dtype), v)


def _views(g: jax.Array, xa: jax.Array, b: jax.Array, v: jax.Array):
  """The backward passes' operands on 2-D views: g (rows, units), `x A` (rows, rank), b (rank, units), and v as
  float32 (units,), whatever the layer's output axes."""
  rank, units = b.shape[0], b.size // b.shape[0]
  return g.reshape(-1, units), xa.reshape(-1, rank), b.reshape(rank, units), v.reshape(units).astype(jnp.float32)


def _gain_gradient(g2: jax.Array, y: jax.Array, v1: jax.Array) -> jax.Array:
  """`(Σ_rows g ⊙ y) / v` in float32, g on its (rows, units) view: the scale's gradient read off the kept output
  `y = v ⊙ u`, both forms' (`_scaled_lowrank`, `_kernel_scaled_lowrank`)."""
  return jnp.sum(g2.astype(jnp.float32) * y.reshape(g2.shape).astype(jnp.float32), axis=0) / v1


@jax.custom_vjp
def _scaled_lowrank(y0: jax.Array, xa: jax.Array, b: jax.Array, v: jax.Array) -> jax.Array:
  """`y = v ⊙ u`, `u = y0 + (x A) b` (`y0 = x K₀`, `b = s·B`), whose backward pass keeps y, not u or `y0`:

      ∂v = Σ_rows g ⊙ u = (Σ_rows g ⊙ y) / v,   g' = g ⊙ v,   ∂y0 = g',   ∂b = (x A)ᵀ g',   ∂(x A) = g' bᵀ.

  So the backward keeps y (rows × out) where autodiff would keep `y0` (as large), and where the next layer
  keeps y itself (a GELU's input) XLA holds one buffer for both: DoRA's peak memory on the benchmark LM went
  from 1.077x / 1.108x LoRA's to 1.036x / 1.041x (128 / 4096 tokens), at the same time (1.030x at 128 tokens
  with the form below).

  The forward computes `y0 ⊙ v + ((x A) b) ⊙ v`, one fusion after the rank product. Written as
  `(y0 + (x A) b) ⊙ v`, XLA kept one more (rows × out) buffer per layer beside a GELU (`tests/test_fast.py`);
  as `y0 ⊙ v + (x A)(b ⊙ v)` (the earlier form) it spent a kernel per layer on `b ⊙ v`. The backward treats u
  as a whole. Autodiff through the earlier form's `b ⊙ v` gave v's gradient as y0's share plus B's,
  `Σ_k b_k ⊙ ((x A)ᵀ g)_k`, and the read-back from y had first to subtract that same share: small kernels in
  every layer that cancel in exact arithmetic. With both changes the benchmark LM's step has 492 kernels
  instead of 564 (`benchmarks/hlo_traffic.py`).

  Dividing by v needs v ≠ 0: a unit with |m/n| < TINY (m = 0 set by hand) is scaled by ±TINY instead of v, a
  change of TINY times its output u, and its m still gets its gradient. The output is in y0's dtype (what the
  layer returns), the sums in float32.
  """
  return _scaled_lowrank_fwd(y0, xa, b, v)[0]


def _scaled_lowrank_fwd(y0, xa, b, v):
  v_safe = _safe(v)
  v32 = v_safe.astype(jnp.float32)
  y = (y0 * v32 + _rank_product(xa, b, y0.shape) * v32).astype(y0.dtype)
  return y, (xa, b, v_safe, y)


def _scaled_lowrank_bwd(res, g):
  xa, b, v_safe, y = res
  g2, xa2, b2, v1 = _views(g, xa, b, v_safe)
  gv = (g2.astype(jnp.float32) * v1).astype(g.dtype)                                   # g' = g ⊙ v
  g_b = jnp.dot(xa2.T, gv.astype(xa2.dtype), preferred_element_type=jnp.float32)
  g_xa = jnp.dot(gv, b2.T.astype(gv.dtype))
  g_v = _gain_gradient(g2, y, v1)
  return (gv.reshape(g.shape), g_xa.reshape(xa.shape).astype(xa.dtype),
          g_b.reshape(b.shape).astype(b.dtype), g_v.reshape(v_safe.shape).astype(v_safe.dtype))


_scaled_lowrank.defvjp(_scaled_lowrank_fwd, _scaled_lowrank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_scaled_lowrank(matmul, x: jax.Array, w: jax.Array, xa: jax.Array, b: jax.Array,
                           v: jax.Array) -> jax.Array:
  """`_scaled_lowrank`'s `y = v ⊙ (x K₀ + (x A) b)` computed as `x (K₀ ⊙ v) + (x A)(b ⊙ v)`, K₀ frozen:

      ∂x = g (K₀ ⊙ v)ᵀ (the layer's transposed contraction),   ∂(x A) = g (b ⊙ v)ᵀ,   ∂b = ((x A)ᵀ g) ⊙ v,
      ∂v = (Σ_rows g ⊙ y) / v    (x's share through `x A` comes from autodiff of `x A`).

  The activation form scales the (rows × out) output forward and its gradient g backward; this one scales the
  (in × out) kernel once and keeps it for the backward's `g (K₀ ⊙ v)ᵀ`, and g's products need no scaling. It
  pays where rows > in: on the benchmark LM at 4096 tokens of d_model 256 (2 CPU cores) DoRA's step measured
  0.946x the activation form's (1.005x LoRA's against 1.058x), its peak memory 493.5 against 502.9 MiB; at 128
  tokens of d_model 512 it measured 1.29x. As there, y is kept for v's gradient (a GELU after it keeps it
  anyway), and a unit with |v| < TINY is scaled by ±TINY. K₀'s gradient is zero: DoRA freezes it.
  """
  return _kernel_scaled_lowrank_fwd(matmul, x, w, xa, b, v)[0]


def _kernel_scaled_lowrank_fwd(matmul, x, w, xa, b, v):
  v32 = _safe(v).astype(jnp.float32)
  wv = (w.astype(jnp.float32) * v32).astype(w.dtype)          # v over the kernel's trailing output axes
  y0, x_cotangent = jax.vjp(lambda x: matmul(x, wv), x)         # linear in x: it keeps K₀ ⊙ v, not x
  y = (y0 + _rank_product(xa, b * v32, y0.shape)).astype(y0.dtype)
  return y, (x_cotangent, xa, b, v32, y)


def _kernel_scaled_lowrank_bwd(matmul, res, g):
  x_cotangent, xa, b, v32, y = res
  g2, xa2, b2, v1 = _views(g, xa, b, v32)
  (g_x,) = x_cotangent(g)                                                      # g (K₀ ⊙ v)ᵀ
  g_b = jnp.dot(xa2.T, g2.astype(xa2.dtype), preferred_element_type=jnp.float32) * v1
  g_xa = jnp.dot(g2, (b2 * v1).T.astype(g2.dtype))
  g_v = _gain_gradient(g2, y, v1)
  return (g_x, None, g_xa.reshape(xa.shape).astype(xa.dtype),      # None for K₀: frozen, a symbolic zero
          g_b.reshape(b.shape).astype(b.dtype), g_v.reshape(v32.shape).astype(v32.dtype))


_kernel_scaled_lowrank.defvjp(_kernel_scaled_lowrank_fwd, _kernel_scaled_lowrank_bwd)


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
