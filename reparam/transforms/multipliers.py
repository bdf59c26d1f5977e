"""Learnable multipliers (Velikanov et al. 2026, "Learnable Multipliers: Freeing the Scale of Language Model
Matrix Layers").

    K'ᵢⱼ = s · cᵢ · Kᵢⱼ · rⱼ      s a scalar, c one per input feature, r one per output unit; all ones at init.

With weight decay on `K`, the matrix norm settles at an equilibrium set by the learning rate and decay
(‖K‖ ∝ √(η/λ)) rather than by what the data needs; free multipliers (trained with Adam, no decay, even when `K`
uses Muon) let the scale move. Any subset of `s`, `c`, `r` may be used. `c` and `r` have a rescaling symmetry
(`c·a`, `r/a` give the same `K'`), which is harmless for training but worth knowing when reading their values.
For a conv kernel, `c` is per input channel and is shared across the window.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from reparam.core import ConfigError, Reparam, times
from reparam.layout import Axes, expand, resolve


def multipliers(scalar: bool = False, row: bool = False, col: bool = False,
                in_axes: Axes = -2, out_axes: Axes = -1) -> Reparam:
  """Learnable multipliers `K' = s · c ⊙ K ⊙ r` (choose any non-empty subset; all start at one).

  Args:
    scalar: a single multiplier `s` for the whole matrix.
    row: one multiplier per output unit (`r`, shaped like the output axes).
    col: one multiplier per input feature (`c`, shaped like the input axes).
    in_axes, out_axes: the kernel's input and output axes (see `reparam.layout`).
  """
  chosen = tuple(k for k, on in (("scalar", scalar), ("row", row), ("col", col)) if on)
  if not chosen:
    raise ConfigError("multipliers: choose at least one of scalar=True, row=True, col=True")

  def init(key, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    shapes = {"scalar": (), "row": layout.out_shape(w.shape), "col": layout.in_shape(w.shape)}
    return {k: jnp.ones(shapes[k], jnp.float32) for k in chosen}

  def apply(factors, w):
    layout = resolve(w.ndim, in_axes, out_axes)
    scale = factors.get("scalar", jnp.ones((), jnp.float32))
    if "row" in factors:
      scale = scale * expand(factors["row"], layout, layout.outputs)
    if "col" in factors:
      scale = scale * expand(factors["col"], layout, layout.inputs)
    return times(w, scale)

  def linear(factors, w, x, layer):
    """Activation space: `y = s · r ⊙ ((x ⊙ c) K)`, exact since `c` scales the contracted input features and
    `s·r` the output units; no pass over the weight beyond the layer's own (for a conv, `c` is per channel, as
    here). K's gradient is taken from x and scaled by c (`Layer.base_scaled_in`), a product XLA fuses into the
    optimizer's pass over that gradient."""
    layout = resolve(w.ndim, in_axes, out_axes)
    layer.check(layout)
    s, row, col = factors.get("scalar"), factors.get("row"), factors.get("col")
    per_row = (math.prod(layout.in_shape(w.shape)) if col is not None else 0) + (
        layout.fan_out(w.shape) if row is not None or s is not None else 0)
    layer.check_cost(per_row)
    # The scalar rides on a vector that scales the activations anyway: each pass over them costs as much as a
    # (tokens × features) matmul's epilogue, so one per side, not two.
    if s is not None and row is not None:
      s, row = None, s * row
    elif s is not None and col is not None:
      s, col = None, s * col
    y = layer.base(x) if col is None else layer.base_scaled_in(x, col)
    if row is not None:
      y = layer.scale_out(y, row)
    return y if s is None else y * s

  return Reparam(init, apply, roles={k: "multiplier" for k in chosen}, name="multipliers", linear=linear)
