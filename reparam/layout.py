"""Which axes of a kernel are inputs, outputs, and (for convolutions) the window.

Flax stores kernels input-first: `Dense` is `(in, out)`, `Conv` is `(H, W, in, out)`, and `DenseGeneral`
(attention) is `(in..., out...)` with its own split, e.g. a query kernel `(D, heads, head_dim)` has input axis 0
and output axes (1, 2). Every transform needs the same three facts about a kernel:

* the **output axes**: one norm, gain, magnitude or row multiplier per output unit;
* the **input axes**: one column multiplier per input feature;
* the **window axes** (everything else, e.g. a conv's H and W): reduced over like inputs, never scaled alone.

The default (`in_axes=-2, out_axes=-1`) is right for Dense and Conv. For DenseGeneral pass the split: a query,
key or value kernel `(D, heads, head_dim)` takes `in_axes=0, out_axes=(1, 2)`; an attention output kernel
`(heads, head_dim, D)` takes `in_axes=(0, 1), out_axes=2` (with the default its heads axis would count as a window
axis: norms and LoRA are unchanged, only the column multiplier would be shared across heads).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import jax.numpy as jnp

Axes = Union[int, Sequence[int]]


class Layout(NamedTuple):
  """Resolved, non-negative axes of one kernel; `window` holds the axes that are neither in nor out."""
  window: tuple[int, ...]
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]
  ndim: int

  @property
  def reduce(self) -> tuple[int, ...]:
    """Axes a per-output-unit norm sums over: everything but the outputs."""
    return tuple(a for a in range(self.ndim) if a not in self.outputs)

  def out_shape(self, shape) -> tuple[int, ...]:
    return tuple(shape[a] for a in self.outputs)

  def in_shape(self, shape) -> tuple[int, ...]:
    return tuple(shape[a] for a in self.inputs)

  def fan_in(self, shape) -> int:
    """Rows of the kernel viewed as a matrix: window and input axes together."""
    return math.prod(shape[a] for a in self.reduce)

  def fan_out(self, shape) -> int:
    return math.prod(self.out_shape(shape))


def _as_tuple(axes: Axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def resolve(ndim: int, in_axes: Axes = -2, out_axes: Axes = -1) -> Layout:
  """Resolves possibly negative axes for a kernel of rank `ndim`; raises ValueError on a bad split."""
  if ndim < 2:
    raise ValueError(f"needs a kernel of rank >= 2 (a matrix or a conv kernel), got rank {ndim}")
  outs = tuple(sorted(a % ndim for a in _as_tuple(out_axes) if -ndim <= a < ndim))
  ins = tuple(sorted(a % ndim for a in _as_tuple(in_axes) if -ndim <= a < ndim))
  if len(outs) != len(_as_tuple(out_axes)) or len(ins) != len(_as_tuple(in_axes)):
    raise ValueError(f"in_axes={in_axes} / out_axes={out_axes} are out of range for a rank-{ndim} kernel")
  if not outs or not ins or set(outs) & set(ins):
    raise ValueError(f"in_axes={in_axes} and out_axes={out_axes} must be non-empty and disjoint")
  window = tuple(a for a in range(ndim) if a not in outs and a not in ins)
  return Layout(window, ins, outs, ndim)


def expand(v: jnp.ndarray, layout: Layout, axes: tuple[int, ...]) -> jnp.ndarray:
  """Reshapes a vector indexed by `axes` (in order) so it broadcasts against the full kernel."""
  return jnp.expand_dims(v, tuple(a for a in range(layout.ndim) if a not in axes))


def sq_norm(w: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Per-output-unit squared L2 norm in float32, shaped like the output axes."""
  w32 = w.astype(jnp.float32)
  return jnp.sum(w32 * w32, axis=layout.reduce)


def norm(w: jnp.ndarray, layout: Layout, eps: float) -> jnp.ndarray:
  """`sqrt(‖w‖₀² + eps²)` in float32: finite value and gradient for an all-zero output unit."""
  return jnp.sqrt(sq_norm(w, layout) + eps * eps)
