"""Activation-space reparameterization of Flax linen models: `reparam.apply(rules, model, rparams, *args)`.

`materialize` forms every effective kernel each step: O(in·out) work (and as much again in the backward pass) on
top of the layer's O(tokens·in·out) matmul, which shows at small batches. Most transforms have an exact form in
activation space instead (x the layer's input, y its output before the bias, K the stored kernel):

    multipliers   y = s · r ⊙ ((x ⊙ c) K)                     no O(in·out) work beyond the plain layer
    weight norm   y = (x V) ⊙ g/‖V‖₀                           reads V once more, for its norm
    LoRA          y = x K₀ + s (x A) B
    DoRA          y = (m/n) ⊙ (x K₀ + s (x A) B)               n from ‖K₀‖₀², K₀ᵀA and AᵀA, in O(in·out·r)
    chain         stage by stage, each stage on the previous stages' activation-space form

`apply` runs the unchanged model under `flax.linen.intercept_methods`: each call of an `nn.Dense`,
`nn.DenseGeneral` or `nn.Conv` (exactly these classes, not subclasses) whose kernel a rule wraps runs the
transform's `Reparam.linear` form instead, with the layer's own contraction (a clone of the module with other
features and no bias: padding, strides, dilation, axes, dtype and precision stay the layer's). Everything else
runs on the materialized kernel, which is the reference: other layer types, masked or grouped convolutions,
DenseGeneral with `batch_dims`, a rule whose axes are not the layer's, a transform without `linear`, a kernel
the layer sees through a lifted transform (`nn.scan`, `nn.remat`, `nn.map_variables`) or variable mapping, and a
layer where the weight-space form is cheaper (`Layer.activation_space_pays`: off CPU only, for multipliers,
weight norm and DoRA).
`explain` says which path each wrapped kernel took. `apply(..., scales={path: c})` multiplies leaves by
constants with the scaled leaf's gradient (NaP's lazy projection, `reparam.core.scaled`); a plain layer whose
kernel is scaled runs as `c·(x·q)`, never forming `c·q`.

The model still receives the full materialized tree, so any other read of a kernel (a tied embedding, custom
code) sees the effective weight; under `jit` the materializations nobody reads are dead code that XLA removes.
So call `apply` inside `jit` (run eagerly it is correct, but every kernel is also materialized).

NNX: `apply` is for linen. An NNX model uses `materialize` through `nnx.split`/`nnx.merge` (see `reparam.core`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from reparam.core import ConfigError, NoFastForm, Rules, _compile, _map_wrapped, flatten, scaled, times
from reparam.layout import Layout, expand, resolve

LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


class Layer(NamedTuple):
  """What a `Reparam.linear` form may do with the layer it runs in (the contract is in `Reparam`'s docstring).

    layout: the kernel's axes as the layer contracts them (window..., in..., out...);
    base: `x -> x·w` (no bias), linear in x; a previous chain stage's activation-space form inside a chain;
    matmul: `(x, k) -> x·k`, the layer's own contraction (no bias) with any kernel shaped (window..., in..., out'...);
    scale_in: `(x, v) -> x ⊙ v`, v shaped like the kernel's input axes (for a conv: per channel, over the window);
      `base_scaled_in(x, v)` is `base(scale_in(x, v))` with a cheaper backward pass where it can;
    rows: x's rows (its size over the contracted features: tokens for a Dense); weight_size: in·out (·window);
    by_cost: whether a form that scales activations should first ask `activation_space_pays` (`check_cost`):
      apply's space="auto" off CPU (on XLA:CPU every activation form won at every size measured);
    auto: apply's space="auto", on any backend: a form with a cheaper variant for the layer's shape may take it
      (`scales_kernel`);
    notes: where a chain records the stages it ran materialized (`explain` reports them), or None;
    x_axes: the axes of x that `matmul` contracts.
  """
  layout: Layout
  base: Callable[[jax.Array], jax.Array]
  matmul: Callable[[jax.Array, jax.Array], jax.Array]
  scale_in: Callable[[jax.Array, jax.Array], jax.Array]
  rows: int = 0
  weight_size: int = 0
  by_cost: bool = False
  auto: bool = False
  notes: Optional[list] = None
  x_axes: tuple[int, ...] = ()       # x's axes that `matmul` contracts, in the order of the kernel's input axes

  def activation_space_pays(self, per_row: int) -> bool:
    """Whether scaling `per_row` activations in each of the `rows` rows costs no more than a pass over the weight.

    Multipliers and weight norm do the same matmuls in both spaces; they differ only in where the elementwise
    scaling (and, backward, its sums) happens: `rows·per_row` activations or `in·out` weights. DoRA's activation
    form also skips the frozen weight's gradient, a matmul, but scales and adds (rows × out) activations. On a
    GPU the activation forms lost wherever activations outnumber the weight: at 4096 tokens of d_model 256 on an
    H100 multipliers cost 1.59x plain (1.14x materialized) and DoRA 1.38x LoRA (0.95x), at 8192 tokens of
    d_model 1024 in bf16 1.14x (1.06x) and 1.15x (1.01x). On CPU the activation forms won at every size
    measured (benchmarks/train_step.py with huge pages): weight norm and DoRA with 16 activations a weight
    (0.910x plain against 0.982x materialized; 1.10x LoRA against 1.47x), the multipliers at d_model 256 with 32
    (4096 tokens: 0.972x plain against 1.016x, six processes) and 128 (16384 tokens: 0.967x against 1.024x, one
    process), measured after their column's backward stopped writing `x ⊙ c` (`base_scaled_in`; before that
    change 1.097x against 1.007x at 4096 tokens): docs/performance.md. Where this is False on CPU, DoRA scales
    its kernel instead (`scales_kernel`)."""
    return self.rows * per_row <= self.weight_size

  def check_cost(self, per_row: int) -> None:
    """With `by_cost`, raises NoFastForm (the layer then runs materialized) unless
    `activation_space_pays(per_row)`."""
    if self.by_cost and not self.activation_space_pays(per_row):
      raise NoFastForm(f"weight space is cheaper here ({self.rows} rows x {per_row} activations to scale > "
                       f"{self.weight_size} weights)")

  def scales_kernel(self, per_row: int) -> bool:
    """Whether a form that can scale the kernel instead of its output (DoRA's `x (K₀ ⊙ m/n)`) should: with
    space="auto" on CPU, where the `rows · per_row` activations it would scale outnumber the weights (off CPU
    `check_cost` has sent such a layer to weight space already). Measured for DoRA on the benchmark LM (2 CPU
    cores, side by side): 0.946x the activation form's step at 4096 tokens of d_model 256, 1.29x at 128 tokens of
    d_model 512 (docs/performance.md)."""
    return self.auto and not self.by_cost and not self.activation_space_pays(per_row)

  def stacks(self, x: jax.Array, w: jax.Array, extra_rows: int) -> bool:
    """Whether `matmul_stacked` should run `extra_rows` more rows through the layer's matmul with x's: with
    space="auto" on CPU, where the layer contracts x's trailing features with w's leading axes (a Dense, or a
    DenseGeneral over trailing axes; not a conv) in float32, and where the concatenation it writes, (rows +
    extra) × in, moves less than the pass over w it saves: 2·(rows + extra) ≤ out.

    For DoRA's `Aᵀ K₀` (8 rows) beside `x K₀` at 128 tokens of d_model 512 (the benchmark LM, 2 CPU cores) the
    step measured 0.985-0.999x (median 0.992) the step with a separate `Aᵀ K₀`, in six processes that each built
    both twice (docs/performance.md): alone, that product reads the whole kernel for 16 flops a weight."""
    lead = x.ndim - len(self.x_axes)
    if not (self.auto and not self.by_cost) or self.layout.window or lead < 1 or not _trailing(self.x_axes, x.ndim):
      return False
    if 2 * (self.rows + extra_rows) > self.weight_size // math.prod(x.shape[lead:]):
      return False
    # Last, as it traces the layer once more (abstractly): its compute dtype (a module's `dtype` may be bfloat16).
    return x.dtype == w.dtype == jax.eval_shape(self.matmul, x, w).dtype == jnp.float32

  def matmul_stacked(self, x: jax.Array, extra: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(matmul(x, w), matmul(extra, w))` as one matmul of x's rows with `extra`'s appended, so that w is read
    once for both (where `stacks` says so); `extra` is shaped (rows', in...). Differentiable in x only: w and
    `extra` are held constant (DoRA's frozen K₀, and the A of its detached norm)."""
    lead = x.ndim - len(self.x_axes)
    in_shape = x.shape[lead:]
    ones = (1,) * (lead - 1)       # x keeps its number of axes: a DenseGeneral may name them by position
    y, e = _stacked(self.matmul, lead - 1, x.reshape(ones + (-1,) + in_shape),
                    jax.lax.stop_gradient(extra).astype(x.dtype).reshape(ones + extra.shape),
                    jax.lax.stop_gradient(w))
    return y.reshape(x.shape[:lead] + y.shape[lead:]), e.reshape(extra.shape[:1] + e.shape[lead:])

  def base_scaled_in(self, x: jax.Array, v: jax.Array) -> jax.Array:
    """`base(scale_in(x, v))`: the input scaled per feature (a column multiplier), then the base.

    Where the base is the layer's own contraction with its kernel w (a single transform, or a chain's first
    stage), the backward pass does without the scaled input. The product is linear in each input feature, so

        ∂w = v ⊙ (xᵀ ∂y) over w's input axes,   ∂x = v ⊙ (∂y wᵀ),   ∂v = Σ_rows x ⊙ (∂y wᵀ):

    the weight gradient is taken from x itself and scaled after, which XLA fuses into its consumers (AdamW's
    moments), instead of autodiff's `(x ⊙ v)ᵀ ∂y`, which writes `x ⊙ v` again in the backward pass beside the x
    that ∂v reads. On the benchmark LM at 128 tokens (full multipliers, 2 CPU cores) the step's peak memory is
    99.6 MiB against autodiff's 102.3 (plain 98.8); its time 0.965-0.975x autodiff's in three processes side by
    side, while six more on a busier machine could not tell the two apart (docs/performance_history.md).
    A later chain stage's base is not a contraction with a kernel: it gets autodiff's form."""
    base = self.base
    if not isinstance(base, _Contraction):
      return base(self.scale_in(x, v))
    return _input_scaled(base.matmul, base.x_axes, self.layout, x, base.w, v)

  @staticmethod
  def scale_out(y: jax.Array, v: jax.Array) -> jax.Array:
    """`y ⊙ v`, v shaped like the kernel's output axes (y's trailing axes), e.g. a gain or row multiplier."""
    return scale_trailing(y, v)

  def check(self, layout: Layout) -> None:
    """Raises NoFastForm unless a transform's axes are the layer's (its vectors then line up with x and y)."""
    if layout != self.layout:
      raise NoFastForm(f"the rule's axes (window {layout.window}, in {layout.inputs}, out {layout.outputs}) are "
                       f"not the layer's (window {self.layout.window}, in {self.layout.inputs}, "
                       f"out {self.layout.outputs}): pass in_axes/out_axes")


def scale_trailing(y: jax.Array, v: jax.Array) -> jax.Array:
  """`y ⊙ v` for v shaped like y's trailing axes, whose gradient for v sums over y's rows on a 2-D view.

  The numbers are those of broadcasting; the reason is speed. v's gradient is a sum over y's rows of a product,
  and XLA's CPU backend (its YNNPACK fusions) runs that sum over the middle axis of a (batch, sequence, features)
  array about 10x slower than over the leading axis of (rows, features): 1.25 ms against 0.10 ms for 1 × 128 ×
  2048 float32 on this project's 2-core test machine, most of the 1.7 ms of the 128 × 512 × 2048 matmul before
  it (benchmarks/train_step.py: multipliers 1.19 -> 1.04x plain). Only the backward's sum takes the 2-D view:
  scaling the forward on it too made XLA keep more activations (+20 MiB for weight norm at 4096 tokens).
  """
  if v.ndim == 0 or y.ndim == v.ndim:
    return y * v
  return _scale_trailing(y, v)


@jax.custom_vjp
def _scale_trailing(y, v):
  return y * v


def _scale_trailing_fwd(y, v):
  return y * v, (y, v)


def _scale_trailing_bwd(res, g):
  y, v = res
  return (g * v).astype(y.dtype), _sum_over_rows(g, y, v.shape).astype(v.dtype)


def _sum_over_rows(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`Σ a ⊙ b` over every axis but the trailing ones, shaped `shape`, taken on the 2-D (rows, features) view."""
  size = math.prod(shape)
  return jnp.sum(a.reshape(-1, size) * b.reshape(-1, size), axis=0).reshape(shape)


_scale_trailing.defvjp(_scale_trailing_fwd, _scale_trailing_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stacked(matmul, axis: int, x: jax.Array, extra: jax.Array, w: jax.Array):
  """`matmul([x; extra], w)` split back into x's rows and extra's, `axis` the rows' (`Layer.matmul_stacked`)."""
  out = matmul(jnp.concatenate([x, extra], axis=axis), w)
  rows = x.shape[axis]
  return (jax.lax.slice_in_dim(out, 0, rows, axis=axis),
          jax.lax.slice_in_dim(out, rows, out.shape[axis], axis=axis))


def _stacked_fwd(matmul, axis, x, extra, w):
  _, x_cotangent = jax.vjp(lambda x: matmul(x, w), x)      # linear in x: it keeps w; its product is dead code
  return _stacked(matmul, axis, x, extra, w), x_cotangent


def _stacked_bwd(matmul, axis, x_cotangent, cotangents):
  return x_cotangent(cotangents[0])[0], None, None           # extra and w: constants (symbolic zeros)


_stacked.defvjp(_stacked_fwd, _stacked_bwd)


class _Contraction(NamedTuple):
  """A layer's own `x -> x·w` as `Layer.base`: the plain layer with its kernel, not a chain stage's form."""
  matmul: Callable[[jax.Array, jax.Array], jax.Array]
  w: jax.Array
  x_axes: tuple[int, ...]       # x's contracted feature axes, in the order of w's input axes

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.matmul(x, self.w)


def _trailing(axes: tuple[int, ...], ndim: int) -> bool:
  return axes == tuple(range(ndim - len(axes), ndim))


def _other_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in axes)


def _times_features(x: jax.Array, v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """`x ⊙ v` for v shaped like x's `axes`."""
  if _trailing(axes, x.ndim):
    return x * v
  return x * jnp.expand_dims(v, _other_axes(axes, x.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _input_scaled(matmul, x_axes, layout, x, w, v):
  """`matmul(x ⊙ v, w)`, v per input feature, differentiated from x itself (`Layer.base_scaled_in`)."""
  return matmul(_times_features(x, v, x_axes), w)


def _input_scaled_fwd(matmul, x_axes, layout, x, w, v):
  return _input_scaled(matmul, x_axes, layout, x, w, v), (x, w, v)


def _input_scaled_bwd(matmul, x_axes, layout, res, g):
  x, w, v = res
  xv = x.astype(jnp.result_type(x, v))                 # the dtype x ⊙ v had in the forward pass
  dxv, dw_of_x = jax.vjp(matmul, xv, w)[1](g)          # the product itself is dead code here: XLA drops it
  if _trailing(x_axes, x.ndim):           # on the 2-D view, as `scale_trailing`
    dv = _sum_over_rows(xv, dxv, v.shape)
  else:
    dv = jnp.sum(xv * dxv, axis=_other_axes(x_axes, x.ndim))
  dw = dw_of_x * expand(v, layout, layout.inputs)
  return _times_features(dxv, v, x_axes).astype(x.dtype), dw.astype(w.dtype), dv.astype(v.dtype)


_input_scaled.defvjp(_input_scaled_fwd, _input_scaled_bwd)


def layer_of(module: nn.Module, x: jax.Array, w: jax.Array, by_cost: bool = False, auto: bool = False,
             notes: Optional[list] = None) -> Layer:
  """The `Layer` of a bound Dense, DenseGeneral or Conv about to be called on `x`, with stored kernel `w`."""
  if type(module) is nn.Conv:
    if module.mask is not None or module.feature_group_count != 1:
      raise NoFastForm("masked or grouped convolution")
    layout, x_axes = resolve(w.ndim), (x.ndim - 1,)
  elif type(module) is nn.DenseGeneral:
    if module.batch_dims:
      raise NoFastForm("DenseGeneral with batch_dims")
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    x_axes = tuple(sorted(a % x.ndim for a in axis))    # flax's order of the kernel's input axes
    k = len(x_axes)
    layout = resolve(w.ndim, tuple(range(k)), tuple(range(k, w.ndim)))
  else:
    layout, x_axes = resolve(w.ndim), (x.ndim - 1,)
  general = type(module) is nn.DenseGeneral

  def matmul(x, kernel):
    out = tuple(kernel.shape[len(layout.reduce):])
    layer = module.clone(parent=None, features=out if general else out[0], use_bias=False)
    return layer.apply({"params": {"kernel": kernel}}, x)

  def scale_in(x, v):
    return scale_trailing(x, v) if _trailing(x_axes, x.ndim) else _times_features(x, v, x_axes)

  rows = x.size // max(1, math.prod(x.shape[a] for a in x_axes))
  return Layer(layout, _Contraction(matmul, w, x_axes), matmul, scale_in, rows, w.size, by_cost, auto, notes,
               x_axes)


def _fast_call(module, entry, call_args, call_kwargs, busy, by_cost: bool, auto: bool, notes: list):
  t, factors, w, kernel = entry
  if t.linear is None:
    raise NoFastForm(f"{t.name} has no activation-space form")
  # Identity, not equality: the layer must read the very array materialize made for this path, not a slice of
  # it (nn.scan) or a mapped copy (nn.map_variables), else the stored weight is not what it multiplies by.
  if module.get_variable("params", "kernel") is not kernel:
    raise NoFastForm("the layer does not see the wrapped kernel as is (lifted transform or variable mapping)")
  x = _x_of(call_args, call_kwargs)
  layer = layer_of(module, x, w, by_cost, auto, notes)
  busy.append(module)      # the clones `layer.matmul` applies are our own calls: not to be intercepted
  try:
    y = t.linear(factors, w, x, layer)
  finally:
    busy.pop()
  return _with_bias(module, x, kernel, y)


def _with_bias(module, x, kernel, y):
  """The layer's output from its bias-free product `y`: plus the bias, in the dtype the layer would return."""
  bias = module.get_variable("params", "bias") if module.use_bias else None
  dtype = module.dtype or jnp.result_type(x, kernel, *([] if bias is None else [bias]))
  if bias is not None:     # bias shape == the output units, trailing in y
    y = y.astype(dtype) + bias.astype(dtype)
  return y.astype(dtype)


def _x_of(call_args, call_kwargs) -> jax.Array:
  if len(call_args) + len(call_kwargs) != 1:
    raise NoFastForm("unexpected call arguments")
  return jnp.asarray(call_args[0] if call_args else next(iter(call_kwargs.values())))


def _scaled_call(module, entry, call_args, call_kwargs, busy):
  """A plain layer whose kernel is scaled (`apply(..., scales=)`): `c·(x·q)`, with the cotangent of `c·q` for q."""
  q, c, kernel = entry
  if module.get_variable("params", "kernel") is not kernel:
    raise NoFastForm("the layer does not see the scaled kernel as is (lifted transform or variable mapping)")
  x = _x_of(call_args, call_kwargs)
  layer = layer_of(module, x, q)
  busy.append(module)
  try:
    y = _output_scaled(layer.matmul, x, q, c)
  finally:
    busy.pop()
  return _with_bias(module, x, kernel, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _output_scaled(matmul, x, q, c):
  """`c·matmul(x, q)` (= `matmul(x, c·q)`), differentiated as `matmul(x, p)` at `p = c·q`: x gets `c·(∂y·qᵀ)`,
  q gets `∂p = xᵀ·∂y` (what `reparam.core.scaled` promises), c nothing. Never forms `c·q`: at 128 tokens of
  d_model 512 a weight-sized product costs four times the activation-sized one."""
  return times(matmul(x, q), c)


def _output_scaled_fwd(matmul, x, q, c):
  return _output_scaled(matmul, x, q, c), (x, q, c)


def _output_scaled_bwd(matmul, res, g):
  x, q, c = res
  dx, dq = jax.vjp(matmul, x, q)[1](g)      # the product itself is dead code here: XLA drops it
  return times(dx, c), dq, jnp.zeros_like(c)


_output_scaled.defvjp(_output_scaled_fwd, _output_scaled_bwd)


SPACES = ("auto", "activation")


def _run(rules: Rules, model: nn.Module, rparams, args, collections, kwargs, space: str,
         log: Optional[dict] = None, scales: Optional[dict] = None):
  if space not in SPACES:
    raise ConfigError(f"space={space!r} is not one of: {', '.join(SPACES)}")
  auto = space == "auto"
  by_cost = auto and jax.default_backend() != "cpu"      # `Layer.activation_space_pays`, `Layer.scales_kernel`
  entries = {}
  # A scaled leaf enters every other read as c·q (dead code under jit where its plain layer runs `_scaled_call`).
  stored, rparams = flatten(rparams), scaled(rparams, scales or {})
  given = flatten(rparams)
  lazily = {path: (stored[path], c, given[path]) for path, c in (scales or {}).items()}

  def on_wrapped(path, t, factors, w):
    kernel = t.apply(factors, w)      # still passed to the model; dead code under jit where the fast form runs
    entries[path] = (t, factors, w, kernel)
    return kernel

  params = _map_wrapped(_compile(rules), rparams, on_wrapped, lambda path, x: x)
  if log is not None:
    log.update({p: "materialized: not called through nn.Dense, nn.DenseGeneral or nn.Conv" for p in entries})
    log.update({p: "scaled: c·q (not the kernel of an nn.Dense, nn.DenseGeneral or nn.Conv call)" for p in lazily})
  busy = []

  def intercept(next_fun, call_args, call_kwargs, context):
    module = context.module
    if busy or context.method_name != "__call__" or type(module) not in LAYERS:
      return next_fun(*call_args, **call_kwargs)
    path = "/".join((*module.path, "kernel"))
    if path in lazily:
      try:
        y = _scaled_call(module, lazily[path], call_args, call_kwargs, busy)
      except NoFastForm as e:
        if log is not None:
          log[path] = f"scaled: c·q ({e})"
        return next_fun(*call_args, **call_kwargs)
      if log is not None:
        log[path] = "scaled: c·(x·q)"
      return y
    if path not in entries:
      return next_fun(*call_args, **call_kwargs)
    notes = []
    try:
      y = _fast_call(module, entries[path], call_args, call_kwargs, busy, by_cost, auto, notes)
    except NoFastForm as e:
      if log is not None:
        log[path] = f"materialized: {e}"
      return next_fun(*call_args, **call_kwargs)
    if log is not None:
      log[path] = "; ".join(["fast", *dict.fromkeys(notes)])      # a stage's base may be called twice
    return y

  with nn.intercept_methods(intercept):
    return model.apply({"params": params, **(collections or {})}, *args, **kwargs)


def apply(rules: Rules, model: nn.Module, rparams, *args, collections: Optional[dict] = None, space: str = "auto",
          scales: Optional[dict] = None, **kwargs) -> Any:
  """`model.apply({"params": materialize(rules, rparams), **collections}, *args, **kwargs)`, in activation space.

  Returns exactly what that call returns (including `mutable=` outputs) and has the same gradients with respect
  to `rparams`, but runs each wrapped Dense, DenseGeneral or Conv through its transform's `linear` form where it
  has one (see the module docstring). `collections` holds the model's other variables (e.g. `batch_stats`).
  `space`: "auto" runs multipliers, weight norm and DoRA materialized on a layer whose activations outnumber its
  weight (`Layer.activation_space_pays`), off CPU only; on CPU, DoRA scales its frozen kernel instead of its
  output there (`Layer.scales_kernel`). "activation" uses every activation form there is, everywhere.
  `scales` (`{rparams path: scalar}`) runs the model on `reparam.core.scaled(rparams, scales)`: each such leaf is
  multiplied by its scalar and differentiated as the product; an unwrapped Dense, DenseGeneral or Conv kernel
  among them runs as `c·(x·q)`, in activation space (`reparam.optim`'s lazy NaP projection). Meant to be called
  inside `jit` (e.g. at the top of the loss); linen models only.
  """
  return _run(rules, model, rparams, args, collections, kwargs, space, scales=scales)


def explain(rules: Rules, model: nn.Module, rparams, *args, collections: Optional[dict] = None, space: str = "auto",
            scales: Optional[dict] = None, **kwargs) -> dict[str, str]:
  """`{kernel path: "fast" | "materialized: <why>"}` for every wrapped leaf, from one abstract trace (no compute);
  a chain with a stage that ran on the materialized weight of itself and the stages before it reads
  "fast; stage <name> materialized, with any stages before it: <why>". With `scales` (as for `apply`), every
  scaled leaf too: "scaled: c·(x·q)" where its plain layer ran in activation space, "scaled: c·q (<why>)"
  where the model read the product."""
  log = {}
  jax.eval_shape(lambda rp: _run(rules, model, rp, args, collections, kwargs, space, log, scales), rparams)
  return log


__all__ = ["LAYERS", "Layer", "NoFastForm", "apply", "explain", "layer_of"]
