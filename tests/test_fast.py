"""`reparam.apply` (activation space) against the reference `model.apply({"params": materialize(...)})`: values and
gradients for every transform on Dense, Conv, attention and a small transformer, the path each layer takes,
fallbacks, mutable collections, dtypes, and that DoRA never forms a weight-sized K₀ + sAB."""
import importlib
import re
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
import pytest

import reparam
from reparam import fast
from reparam.core import Reparam


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(7)(nn.relu(nn.Dense(12)(x)))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):                                           # x: (B, 9, 9, 3)
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(5, (2, 3), strides=(1, 2), padding="VALID")(x))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):                                           # x: (B, T, 6)
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)(x)


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):                                      # tokens: (B, T) ints
    x = nn.Embed(11, 8)(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x), mask=nn.make_causal_mask(tokens))
    x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
    return nn.Dense(11, name="head")(x)


MODELS = {
    "dense": (MLP, lambda k: jax.random.normal(k, (5, 9))),
    "conv": (CNN, lambda k: jax.random.normal(k, (2, 9, 9, 3))),
    "attention": (Attention, lambda k: jax.random.normal(k, (2, 5, 6))),
    "transformer": (Transformer, lambda k: jax.random.randint(k, (2, 6), 0, 11)),
}
M = reparam.multipliers
TRANSFORMS = {
    "identity": lambda **ax: reparam.identity(),
    "weight_norm": lambda **ax: reparam.weight_norm(**ax),
    "lora": lambda **ax: reparam.lora(rank=2, alpha=3.0, **ax),
    "dora": lambda **ax: reparam.dora(rank=2, alpha=3.0, **ax),
    "dora_full_grad": lambda **ax: reparam.dora(rank=2, detach_norm=False, **ax),
    "dora_remat": lambda **ax: reparam.dora(rank=2, alpha=3.0, remat=True, **ax),
    **{f"mult_{s}": (lambda s: lambda **ax: M(scalar="s" in s, row="r" in s, col="c" in s, **ax))(s)
       for s in ("s", "r", "c", "sr", "sc", "rc", "src")},     # each subset of scalar, row, col
    "dora+mult": lambda **ax: reparam.chain(reparam.dora(rank=2, **ax), M(row=True, col=True, **ax)),
    "weight_norm+mult": lambda **ax: reparam.chain(reparam.weight_norm(**ax), M(scalar=True, col=True, **ax)),
    "mult+weight_norm": lambda **ax: reparam.chain(M(row=True, col=True, **ax), reparam.weight_norm(**ax)),
    "mult+dora": lambda **ax: reparam.chain(M(row=True, **ax), reparam.dora(rank=2, detach_norm=False, **ax)),
}
MULT_SUBSETS = [k for k in TRANSFORMS if k.startswith("mult_")]


def rules_for(model_name, make):
  """Every kernel wrapped; attention kernels with their DenseGeneral axes."""
  rules = []
  if model_name in ("attention", "transformer"):
    rules += [(r".*/(query|key|value)/kernel", make(in_axes=0, out_axes=(1, 2))),
              (r".*/out/kernel", make(in_axes=(0, 1), out_axes=2))]
  return rules + ([] if model_name == "attention" else [(r".*kernel", make())])


def key(seed):
  # "rbg" keys: XLA compiles their random bits far faster than threefry's, which dominated these tests' time.
  return jax.random.key(seed, impl="rbg")


def setup(model_name, rules, seed=0):
  """Model, input, and rparams moved away from init (LoRA's B = 0 would hide most of the math).

  The weights are moved before `reparam.init` and the trained leaves after it (`moved`)."""
  cls, make_x = MODELS[model_name]
  model, x = cls(), make_x(key(seed))
  rng = np.random.default_rng(seed)
  move = lambda v: v + 0.3 * rng.standard_normal(v.shape, np.float32)
  params = jax.tree.map(move, model.init(key(seed + 1), x)["params"])
  rp = reparam.init(rules, params, key(seed + 2))
  return model, x, moved(rules, rp, move)


def moved(rules, rp, f):
  """`f` applied to every leaf but the frozen ones: a frozen K₀ (and the stages before a LoRA/DoRA) stays what
  `reparam.init` saw, as in training, where DoRA's cached ‖K₀‖₀² (`k0_sq`) depends on it."""
  return jax.tree.map(lambda v, role: v if role == "frozen" else f(v), rp, reparam.roles(rules, rp))


def loss_of(out):
  # A fixed pseudo-random weighting, so that every output unit gets its own gradient.
  r = jnp.cos(1.7 * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  return jnp.sum(r * out) + 0.1 * jnp.sum(out * out)


def compare(rules, model, rp, x, rtol=1e-5, collections=None, space="activation", **kwargs):
  """`reparam.apply` against materialization, values and gradients; by default with every activation-space form,
  which the tiny shapes here would otherwise partly send to weight space (`Layer.activation_space_pays`)."""
  def fast_fn(rp):
    return reparam.apply(rules, model, rp, x, collections=collections, space=space, **kwargs)

  def ref_fn(rp):
    return model.apply({"params": reparam.materialize(rules, rp), **(collections or {})}, x, **kwargs)

  def out_and_grad(f):   # one compile for both
    return jax.jit(jax.grad(lambda rp: (loss_of(f(rp)), f(rp)), has_aux=True))(rp)

  (g_fast, fast_out), (g_ref, ref_out) = out_and_grad(fast_fn), out_and_grad(ref_fn)
  np.testing.assert_allclose(fast_out, ref_out, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(ref_out))))
  assert_grads_close(g_fast, g_ref, rtol)


def assert_grads_close(g_fast, g_ref, rtol):
  """Leaf by leaf, with an absolute tolerance relative to the largest reference gradient."""
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=reparam.core.path_str(path))


CASES = [(m, t) for m in ("dense", "conv", "attention") for t in TRANSFORMS
         if m != "attention" or t not in MULT_SUBSETS[:-1]]


@pytest.mark.parametrize("model_name,name", CASES)
def test_fast_path_equals_materialize(model_name, name):
  rules = rules_for(model_name, TRANSFORMS[name])
  model, x, rp = setup(model_name, rules)
  taken = fast.explain(rules, model, rp, x, space="activation")
  assert taken and all(v == "fast" for v in taken.values()), taken     # really the fast path, on every layer
  compare(rules, model, rp, x)


QKV, OUT = dict(in_axes=0, out_axes=(1, 2)), dict(in_axes=(0, 1), out_axes=2)


@pytest.mark.parametrize("names", [("dora_full_grad", "mult_src", "dora+mult", "mult+weight_norm", "weight_norm"),
                                   ("weight_norm+mult", "dora", "lora", "mult+dora", "mult_rc")])
def test_transformer_with_a_transform_per_layer(names):
  t = [TRANSFORMS[n] for n in names]
  rules = [(r".*/(query|key|value)/kernel", t[0](**QKV)), (r".*/out/kernel", t[1](**OUT)),
           (r"Dense_0/kernel", t[2]()), (r"Dense_1/kernel", t[3]()), (r"head/kernel", t[4]())]
  model, x, rp = setup("transformer", rules)
  taken = fast.explain(rules, model, rp, x, space="activation")
  assert len(taken) == 7 and all(v == "fast" for v in taken.values()), taken
  compare(rules, model, rp, x)


def test_rules_with_none_and_untouched_layers():
  rules = [(r"head/kernel", None), (r".*/(query|key|value)/kernel", reparam.dora(rank=2, in_axes=0, out_axes=(1, 2))),
           (r"Dense_0/kernel", reparam.weight_norm())]
  model, x, rp = setup("transformer", rules)
  assert set(fast.explain(rules, model, rp, x)) == {f"MultiHeadDotProductAttention_0/{n}/kernel"
                                                    for n in ("query", "key", "value")} | {"Dense_0/kernel"}
  compare(rules, model, rp, x)


@pytest.mark.parametrize("y_shape, v_shape", [((5,), (5,)), ((3, 5), (5,)), ((2, 3, 5), (5,)),
                                              ((2, 3, 4, 5), (4, 5)), ((2, 3), ())])
def test_scale_trailing_is_broadcasting(y_shape, v_shape):
  """The 2-D view changes how XLA runs it, not the numbers: value and both gradients against numpy float64."""
  rng = np.random.default_rng(0)
  y, v, dz = (rng.standard_normal(s).astype(np.float32) for s in (y_shape, v_shape, y_shape))
  out, vjp = jax.vjp(fast.scale_trailing, jnp.asarray(y), jnp.asarray(v))
  dy, dv = vjp(jnp.asarray(dz))
  y64, v64, dz64 = (a.astype(np.float64) for a in (y, v, dz))
  np.testing.assert_allclose(out, y64 * v64, rtol=1e-6)
  np.testing.assert_allclose(dy, dz64 * v64, rtol=1e-6)
  rows = tuple(range(len(y_shape) - len(v_shape)))
  np.testing.assert_allclose(dv, np.sum(dz64 * y64, axis=rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, x_shape, w_shape", [
    (nn.Dense(5), (2, 3, 4), (4, 5)),
    (nn.DenseGeneral(6, axis=1), (2, 4, 3), (4, 6)),                  # features in the middle of x
    (nn.Conv(4, (3, 3), padding="VALID"), (2, 5, 5, 3), (3, 3, 3, 4)),   # per channel, over the window
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_base_scaled_in_takes_the_weight_gradient_from_the_unscaled_input(module, x_shape, w_shape, dtype):
  """`Layer.base_scaled_in(x, v)` (a column multiplier before the layer's own contraction, whose backward pass
  scales `xᵀ ∂y` by v instead of forming `x ⊙ v` again) against autodiff of `matmul(x ⊙ v, w)`: value and the
  gradients of x, w and v, with one v exactly 0; for the Dense, against numpy float64 formulas too."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  v = jnp.asarray(rng.standard_normal(w_shape[-2]), jnp.float32).at[1].set(0.0)
  loss = lambda y: jnp.sum(jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)) * y)

  def ours_fn(x, w, v):          # the layer holds w: built inside, as `reparam.apply` does for every call
    return loss(fast.layer_of(module, x, w).base_scaled_in(x, v))

  def autodiff_fn(x, w, v):
    layer = fast.layer_of(module, x, w)
    return loss(layer.matmul(layer.scale_in(x, v), w))

  ours, autodiff = (jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, v) for f in (ours_fn, autodiff_fn))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(autodiff)):
    assert a.dtype == b.dtype
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * scale)
  if isinstance(module, nn.Dense) and dtype == jnp.float32:
    x64, w64, v64 = (np.asarray(a, np.float64) for a in (x, w, v))
    r = np.cos(np.arange(2 * 3 * 5, dtype=np.float64).reshape(2, 3, 5))
    dxv = r @ w64.T
    np.testing.assert_allclose(ours[0], np.sum(r * ((x64 * v64) @ w64)), rtol=1e-5)
    np.testing.assert_allclose(ours[1][0], dxv * v64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1][1], np.einsum("bti,bto->io", x64 * v64, r), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1][2], np.sum(x64 * dxv, axis=(0, 1)), rtol=1e-5, atol=1e-5)


def test_base_scaled_in_after_a_chain_stage_is_autodiffs_form():
  """A later chain stage's base is that stage's function, not the layer's contraction with its kernel: there
  `base_scaled_in` is `base(scale_in(x, v))` (whose numbers `test_fast_path_equals_materialize` checks)."""
  x, w = jnp.ones((3, 4)), jnp.ones((4, 2))
  layer = fast.layer_of(nn.Dense(2), x, w)
  assert isinstance(layer.base, fast._Contraction)
  seen = []
  stage = layer._replace(base=lambda x: seen.append(x) or layer.matmul(x, 2 * w))
  v = jnp.arange(4.0)
  np.testing.assert_allclose(stage.base_scaled_in(x, v), (x * v) @ (2 * w))
  np.testing.assert_allclose(seen[0], x * v)


class MiddleAxis(nn.Module):
  @nn.compact
  def __call__(self, x):                                           # x: (B, 4, 3): contracts the 4, not trailing
    return nn.DenseGeneral(6, axis=1)(x)


@pytest.mark.parametrize("name", ["mult_src", "weight_norm", "dora", "mult+dora"])
def test_dense_general_contracting_a_middle_axis(name):
  rules = [(r".*kernel", TRANSFORMS[name]())]
  model, x = MiddleAxis(), jax.random.normal(key(0), (2, 4, 3))
  rp = reparam.init(rules, model.init(key(1), x)["params"], key(2))
  rp = moved(rules, rp, lambda v: v + 0.3 * jnp.cos(jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)))
  assert fast.explain(rules, model, rp, x, space="activation") == {"DenseGeneral_0/kernel": "fast"}
  compare(rules, model, rp, x)


class Odd(nn.Module):
  """Kernels the fast path must leave to materialization."""

  @nn.compact
  def __call__(self, x):                                           # x: (B, 6, 6, 4)
    x = nn.Conv(4, (3, 3), feature_group_count=2)(x)               # grouped conv
    x = type("MyDense", (nn.Dense,), {})(5)(x)                     # a subclass may override __call__
    x = nn.Einsum((5, 3), "...i,ij->...j")(x)                      # not an intercepted layer
    return nn.Dense(4)(nn.DenseGeneral((2, 3))(x))


def test_fallbacks_are_exact_and_explained():
  unknown = Reparam(init=lambda key, w: {"t": jnp.ones(())}, apply=lambda f, w: w * f["t"] ** 2, name="square")
  rules = [(r"Conv_0/kernel", reparam.dora(rank=2)), (r"MyDense_0/kernel", reparam.weight_norm()),
           (r"Einsum_0/kernel", reparam.multipliers(row=True)), (r"Dense_0/kernel", unknown),
           # a stage without a fast form is materialized inside an otherwise activation-space chain
           (r"DenseGeneral_0/kernel", reparam.chain(unknown, M(row=True, in_axes=0, out_axes=(1, 2))))]
  model = Odd()
  x = jax.random.normal(key(0), (2, 6, 6, 4))
  rp = reparam.init(rules, model.init(key(1), x)["params"], key(2))
  rp = jax.tree.map(lambda v: v + 0.3, rp)   # Conv_0's DoRA runs materialized: its k0_sq is not read
  taken = fast.explain(rules, model, rp, x, space="activation")
  assert taken["Conv_0/kernel"] == "materialized: masked or grouped convolution"
  assert taken["MyDense_0/kernel"].startswith("materialized: not called through")
  assert taken["Einsum_0/kernel"].startswith("materialized: not called through")
  assert taken["Dense_0/kernel"] == "materialized: square has no activation-space form"
  assert taken["DenseGeneral_0/kernel"] == ("fast; stage square materialized, with any stages before it: square has "
                                           "no activation-space form")
  compare(rules, model, rp, x)


MLP_LAYERS = {"Dense_0/kernel": (12, 7), "Dense_1/kernel": (9, 12)}    # (in, out); Dense(7) is constructed first


@pytest.mark.parametrize("rows", [4, 5, 6, 12, 13])
@pytest.mark.parametrize("name, per_row", [("mult_src", lambda i, o: i + o), ("mult_c", lambda i, o: i),
                                           ("mult_s", lambda i, o: o), ("weight_norm", lambda i, o: o),
                                           ("dora", lambda i, o: o), ("dora_full_grad", lambda i, o: o)])
def test_auto_space_takes_the_cheaper_side_per_layer(name, per_row, rows, monkeypatch):
  """Off CPU, space="auto" runs multipliers, weight norm and DoRA in activation space only where scaling the
  activations (rows × the features it scales) costs no more than the weight (in·out): at the boundary (mult_src
  on the 9 → 12 layer at 5 rows: 5·21 = 105 ≤ 108; at 6: 126 > 108) and on both sides, each layer on its own; exact
  either way. On CPU every layer keeps activation space."""
  rules = rules_for("dense", TRANSFORMS[name])
  model, _, rp = setup("dense", rules)
  x = jax.random.normal(key(3), (rows, 9))
  for backend in ("gpu", "cpu"):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    taken = fast.explain(rules, model, rp, x)
    for path, (i, o) in MLP_LAYERS.items():
      if rows * per_row(i, o) <= i * o or backend == "cpu":
        assert taken[path] == "fast", (backend, path, taken)
      else:
        assert taken[path] == (f"materialized: weight space is cheaper here ({rows} rows x {per_row(i, o)} "
                               f"activations to scale > {i * o} weights)"), (backend, path, taken)
    compare(rules, model, rp, x, space="auto")
    assert set(fast.explain(rules, model, rp, x, space="activation").values()) == {"fast"}


@pytest.mark.parametrize("name", ["lora", "dora+mult", "mult+dora", "weight_norm+mult", "mult+weight_norm"])
def test_auto_space_in_chains_is_per_stage(name, monkeypatch):
  """LoRA keeps its activation form at any batch. In a chain, a stage that prefers weight space is materialized
  on its own (from the stages before it) while the chain stays in activation space: values and gradients
  still those of materialization."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rules = rules_for("dense", TRANSFORMS[name])
  model, _, rp = setup("dense", rules)
  x = jax.random.normal(key(3), (64, 9))            # far past every crossover: 64 rows of 9 + 12 features
  # The last stage falls back here, on the weight the stages before it materialized: explain names it.
  last = {"lora": [], "dora+mult": ["multipliers"], "mult+dora": ["dora"], "weight_norm+mult": ["multipliers"],
          "mult+weight_norm": ["weight_norm"]}[name]
  for path, taken in fast.explain(rules, model, rp, x).items():
    assert taken.split("; ")[0] == "fast", (path, taken)
    assert re.findall(r"stage (\w+) materialized, with any stages before it: weight space is cheaper", taken) == last
  compare(rules, model, rp, x, space="auto")
  # On CPU no stage falls back.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert set(fast.explain(rules, model, rp, x).values()) == {"fast"}


def test_unknown_space_is_refused_before_any_compute():
  rules = rules_for("dense", TRANSFORMS["weight_norm"])
  model, x, rp = setup("dense", rules)
  with pytest.raises(reparam.ConfigError, match=r"space='weights' is not one of: auto, activation"):
    reparam.apply(rules, model, rp, x, space="weights")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    return nn.tanh(nn.Dense(6)(x)), None


class Lifted(nn.Module):
  """Layers inside flax's lifted transforms see sliced or re-traced kernels: they must fall back."""

  @nn.compact
  def __call__(self, x):
    x = nn.remat(Block)()(x)[0]
    return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)[0]


def test_lifted_transforms_fall_back():
  model, x = Lifted(), jax.random.normal(key(0), (4, 6))
  rules = [(r".*kernel", reparam.chain(reparam.dora(rank=2), reparam.multipliers(row=True)))]
  rp = moved(rules, reparam.init(rules, model.init(key(1), x)["params"], key(2)), lambda v: v + 0.2)
  taken = fast.explain(rules, model, rp, x)
  assert len(taken) == 2 and all("lifted transform" in v for v in taken.values()), taken
  compare(rules, model, rp, x)


def test_wrong_axes_fall_back_per_layer():
  # Default axes on a (D, heads, head_dim) kernel: its output units are not the layer's, so it is materialized.
  rules = [(r".*/query/kernel", reparam.dora(rank=2)), (r".*kernel", reparam.weight_norm())]
  model, x, rp = setup("transformer", rules)
  taken = fast.explain(rules, model, rp, x)
  assert "pass in_axes/out_axes" in taken["MultiHeadDotProductAttention_0/query/kernel"]
  assert taken["Dense_0/kernel"] == taken["head/kernel"] == "fast"
  compare(rules, model, rp, x)


class BN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(6)(x))
    return nn.Dense(3)(nn.relu(x))


def test_mutable_collections_and_kwargs_pass_through():
  model, x = BN(), jax.random.normal(key(0), (8, 5))
  variables = model.init(key(1), x)
  rules = [(r".*kernel", reparam.chain(reparam.dora(rank=2), reparam.multipliers(row=True)))]
  rp = moved(rules, reparam.init(rules, variables["params"], key(2)), lambda v: v + 0.2)
  stats = {"batch_stats": variables["batch_stats"]}
  y, new = reparam.apply(rules, model, rp, x, collections=stats, mutable=["batch_stats"])
  y_ref, new_ref = model.apply({"params": reparam.materialize(rules, rp), **stats}, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(new) == jax.tree.structure(new_ref)
  compare(rules, model, rp, x, collections=stats, train=False)


@pytest.mark.parametrize("name", ["weight_norm", "dora", "mult_src", "dora+mult"])
def test_bf16_inputs_and_compute_dtype(name):
  rules = rules_for("conv", TRANSFORMS[name])
  model, x, rp = setup("conv", rules)
  xb = x.astype(jnp.bfloat16)
  out = reparam.apply(rules, model, rp, xb)
  ref = model.apply({"params": reparam.materialize(rules, rp)}, xb)
  assert out.dtype == ref.dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)      # params float32: float32 math after promotion
  dense = nn.Dense(6, dtype=jnp.bfloat16)                          # bfloat16 compute
  p = dense.init(key(0), xb[:, 0, 0])["params"]
  r2 = [(r"kernel", TRANSFORMS[name]())]
  rp2 = moved(r2, reparam.init(r2, p, key(1)), lambda v: v + 0.1)
  out, ref = reparam.apply(r2, dense, rp2, xb[:, 0, 0]), dense.apply({"params": reparam.materialize(r2, rp2)},
                                                                      xb[:, 0, 0])
  assert out.dtype == ref.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", ["weight_norm", "dora", "dora_full_grad", "weight_norm+mult"])
def test_zero_norm_units_are_finite(name):
  model, x = MLP(), jax.random.normal(key(0), (5, 9))
  params = model.init(key(1), x)["params"]
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, 3].set(0.0)   # a dead unit, B = 0 at init
  rules = [(r".*kernel", TRANSFORMS[name]())]
  rp = reparam.init(rules, params, key(2))
  out = jax.jit(lambda rp: reparam.apply(rules, model, rp, x))(rp)
  grads = jax.jit(jax.grad(lambda rp: loss_of(reparam.apply(rules, model, rp, x))))(rp)
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  compare(rules, model, rp, x)


@pytest.mark.parametrize("name", ["dora+mult", "weight_norm"])
def test_vmapped_over_seeds(name):
  rules = rules_for("transformer", TRANSFORMS[name])
  model, x, rp = setup("transformer", rules)
  stacked = jax.tree.map(lambda v, w: jnp.stack([v, w]), rp, moved(rules, rp, lambda v: 1.1 * v))
  f = jax.vmap(lambda rp: reparam.apply(rules, model, rp, x))
  g = jax.vmap(lambda rp: model.apply({"params": reparam.materialize(rules, rp)}, x))
  np.testing.assert_allclose(jax.jit(f)(stacked), jax.jit(g)(stacked), rtol=1e-5, atol=1e-5)
  # and the gradients (--vmap_seeds trains this way; the backward passes of DoRA, weight norm and the
  # scalings are custom VJPs)
  grad_of = lambda apply: jax.jit(jax.vmap(jax.grad(lambda rp: loss_of(apply(rp)))))
  g_fast = grad_of(lambda rp: reparam.apply(rules, model, rp, x))(stacked)
  g_ref = grad_of(lambda rp: model.apply({"params": reparam.materialize(rules, rp)}, x))(stacked)
  assert_grads_close(g_fast, g_ref, rtol=1e-5)


# ----------------------------------------------------------------------------- DoRA never forms K₀ + sAB

def tainted_values(hlo: str, sources: set, shapes: set) -> list:
  """Instructions of compiled HLO text, in any computation, shaped as one of `shapes` and computed from an entry
  parameter shaped as one of `sources` (data flow followed into fusions and called computations)."""
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line.rstrip())
    if head:
      name, comps[head.group(2)] = head.group(2), []
      entry = name if head.group(1) else entry
    elif name and (m := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\((.*)", line)):
      args, _, attrs = m.group(4).partition(")")
      comps[name].append((m.group(1), m.group(2), m.group(3), re.findall(r"%([\w.\-]+)", args),
                          re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs), re.search(r"parameter\((\d+)", line)))
  found = []

  def walk(comp, tainted_param):
    taint = {}
    for inst, shape, op, operands, called, param in comps[comp]:
      t = tainted_param(int(param.group(1)), shape) if op == "parameter" else any(taint.get(o) for o in operands)
      for c in called:
        t = walk(c, lambda i, _, ops=operands: i < len(ops) and bool(taint.get(ops[i]))) or t
      taint[inst] = t
      if t and shape in shapes:
        found.append(f"{comp}/{inst} = {op} {shape}")
    return taint[comps[comp][-1][0]]

  walk(entry, lambda i, shape: shape in sources)
  return found


def test_dora_fast_path_never_forms_the_adapted_weight():
  d_in, d_out, rank = 48, 40, 4
  model, x = nn.Dense(d_out), jax.random.normal(key(0), (16, d_in))
  params = model.init(key(1), x)["params"]
  sources = {f"f32[{d_in},{rank}]", f"f32[{rank},{d_out}]"}           # A and B
  weight = {f"f32[{d_in},{d_out}]", f"f32[{d_out},{d_in}]"}
  for detach, remat in ((True, False), (False, False), (True, True)):
    rules = [(r"kernel", reparam.dora(rank=rank, detach_norm=detach, remat=remat))]
    rp = moved(rules, reparam.init(rules, params, key(2)), lambda v: v + 0.1)
    fwd = lambda rp: jnp.sum(reparam.apply(rules, model, rp, x) ** 2)
    ref = lambda rp: jnp.sum(model.apply({"params": reparam.materialize(rules, rp)}, x) ** 2)
    for f in (fwd, jax.grad(fwd)):
      hlo = jax.jit(f).lower(rp).compile().as_text()
      assert not tainted_values(hlo, sources, weight), tainted_values(hlo, sources, weight)
    # The check can fail: the reference path does form K₀ + sAB (and its gradient).
    assert tainted_values(jax.jit(ref).lower(rp).compile().as_text(), sources, weight)
    assert tainted_values(jax.jit(jax.grad(ref)).lower(rp).compile().as_text(), sources, weight)


class DenseStack(nn.Module):
  activation: Callable = jnp.tanh

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = self.activation(nn.Dense(64)(x))
    return x


def kept_buffers(model, t, rows=512, width=64):
  """Temporary memory of the jitted gradient, in units of one (rows × width) float32 buffer: XLA's buffer
  assignment (no timing, no noise)."""
  x = jax.random.normal(key(0), (rows, width))
  rules = [(r".*kernel", t)]
  rp = reparam.init(rules, model.init(key(1), x)["params"], key(2))
  grad = jax.jit(jax.grad(lambda rp: jnp.sum(reparam.apply(rules, model, rp, x) ** 2)))
  return grad.lower(rp).compile().memory_analysis().temp_size_in_bytes / (rows * width * 4)


@pytest.mark.parametrize("detach", [True, False])
def test_dora_keeps_its_output_for_m_and_remat_keeps_nothing(detach):
  # m's gradient needs x K₀: DoRA reads it back from the layer's output y, which it keeps, one (rows × out)
  # buffer per layer. tanh's backward keeps tanh's output, not y, so here y is kept for DoRA alone; with remat
  # x K₀ is computed again and nothing is kept.
  lora = kept_buffers(DenseStack(), reparam.lora(rank=4))
  kept = kept_buffers(DenseStack(), reparam.dora(rank=4, detach_norm=detach))
  remat = kept_buffers(DenseStack(), reparam.dora(rank=4, detach_norm=detach, remat=True))
  assert kept - lora >= 3.5              # the 4 layers' outputs (the check can fail: it measures them)
  assert kept - remat >= 3 and remat - lora <= 1.5, (lora, kept, remat)   # at most one, live in the backward


@pytest.mark.parametrize("detach", [True, False])
def test_dora_shares_its_kept_output_with_the_next_layer(detach):
  # GELU's backward keeps its input, which is DoRA's output y: one buffer serves both, and DoRA keeps no more
  # than LoRA. Keeping x K₀ instead (autodiff's choice) held one buffer more than LoRA here.
  model = DenseStack(nn.gelu)
  lora = kept_buffers(model, reparam.lora(rank=4))
  dora = kept_buffers(model, reparam.dora(rank=4, detach_norm=detach))
  assert dora - lora <= 0.5, (lora, dora)


@pytest.mark.parametrize("rows", [5, 40])        # 40 rows: on CPU both layers scale their kernels
@pytest.mark.parametrize("name", ["dora", "dora_full_grad"])
def test_dora_unit_with_zero_magnitude_still_gets_its_gradient(name, rows, monkeypatch):
  # The backward pass reads x K₀ off the output, y = (m/n)·(...): at m = 0 exactly a unit's output holds nothing
  # of it, so the fast forms scale such a unit by reparam.transforms.lora.TINY instead of 0.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  model, x = MLP(), jax.random.normal(key(0), (rows, 9))
  rules = [(r".*kernel", TRANSFORMS[name]())]
  rp = moved(rules, reparam.init(rules, model.init(key(1), x)["params"], key(2)), lambda v: v + 0.1)
  rp["Dense_0"]["kernel"]["m"] = rp["Dense_0"]["kernel"]["m"].at[3].set(0.0).at[5].set(-0.0)
  compare(rules, model, rp, x, space="auto")
  g = jax.grad(lambda rp: loss_of(reparam.apply(rules, model, rp, x)))(rp)["Dense_0"]["kernel"]["m"]
  assert abs(float(g[3])) > 1e-3 and abs(float(g[5])) > 1e-3, g


def kernel_scaled_calls(monkeypatch) -> list:
  """Records the kernel shape of every call of DoRA's kernel-scaled form from now on."""
  lora = importlib.import_module("reparam.transforms.lora")
  calls, form = [], lora._kernel_scaled_lowrank
  monkeypatch.setattr(lora, "_kernel_scaled_lowrank", lambda matmul, x, w, *rest: calls.append(w.shape) or
                      form(matmul, x, w, *rest))
  return calls


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ["dora", "dora_full_grad", "dora+mult", "mult+dora"])
def test_dora_on_cpu_scales_its_kernel_where_rows_outnumber_its_inputs(model_name, name, monkeypatch):
  """On CPU, space="auto" runs DoRA as `x (K₀ ⊙ m/n) + s (x A)(B ⊙ m/n)` on a layer whose output (rows × out)
  outnumbers its weight (in × out), and its activation form elsewhere; values and gradients are
  materialization's either way. space="activation" never takes it, nor does any backend but CPU."""
  rules = rules_for(model_name, TRANSFORMS[name])
  model, x, rp = setup(model_name, rules)
  if model_name == "dense":
    x = jnp.concatenate([x, x + 1.0])          # 10 rows: more than Dense_1's 9 inputs, fewer than Dense_0's 12
  calls = kernel_scaled_calls(monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  compare(rules, model, rp, x, space="auto")
  assert calls, calls
  if model_name == "dense":
    assert set(calls) == {(9, 12)}, calls      # Dense_1's kernel only
  calls.clear()
  compare(rules, model, rp, x, space="activation")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fast.explain(rules, model, rp, x)
  assert not calls, calls


def test_dora_kernel_scaled_form_computes_no_weight_gradient(monkeypatch):
  # The point of both DoRA forms: the frozen K₀ gets no (in × out) gradient, a matmul as large as the layer's.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  model, x = nn.Dense(12), jax.random.normal(key(0), (40, 9))     # 40 rows > 9 inputs: the kernel-scaled form
  rules = [(r"kernel", reparam.dora(rank=2))]
  rp = moved(rules, reparam.init(rules, model.init(key(1), x)["params"], key(2)), lambda v: v + 0.1)
  weight_dot = re.compile(r"= f32\[9,12\]\{[0-9,]*\} dot\(")
  grad_hlo = lambda f: jax.jit(jax.grad(lambda rp: loss_of(f(rp)))).lower(rp).compile().as_text()
  calls = kernel_scaled_calls(monkeypatch)
  assert not weight_dot.search(grad_hlo(lambda rp: reparam.apply(rules, model, rp, x)))
  assert calls == [(9, 12)], calls
  # The check can fail: materialization computes that gradient.
  assert weight_dot.search(grad_hlo(lambda rp: model.apply({"params": reparam.materialize(rules, rp)}, x)))


# ----------------------------------------------------------------------------- DoRA's Aᵀ K₀ beside x K₀

@pytest.mark.parametrize("module, x_shape", [(nn.Dense(10), (2, 3, 6)), (nn.DenseGeneral((2, 5)), (4, 6)),
                                             (nn.DenseGeneral(10, axis=(1, 2)), (4, 2, 3)),
                                             (nn.DenseGeneral(10, axis=(-2, -1)), (2, 2, 2, 3))])
def test_matmul_stacked_is_both_products_differentiated_in_x_only(module, x_shape):
  """`Layer.matmul_stacked(x, e, w)` = (x·w, e·w) (numpy float64), with x's gradient that of `x·w` and none for
  e or w, for a Dense and for DenseGeneral over trailing axes named either way."""
  x = jax.random.normal(key(0), x_shape)
  w = module.init(key(1), x)["params"]["kernel"]
  layer = fast.layer_of(module, x, w)
  n_in = len(layer.x_axes)
  e = jax.random.normal(key(2), (3,) + x.shape[x.ndim - n_in:])
  y, ew = layer.matmul_stacked(x, e, w)
  flat = lambda a: np.asarray(a, np.float64).reshape(-1, int(np.prod(x.shape[x.ndim - n_in:])))
  w64 = np.asarray(w, np.float64).reshape(flat(x).shape[1], -1)
  np.testing.assert_allclose(np.asarray(y).reshape(flat(x).shape[0], -1), flat(x) @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ew).reshape(3, -1), flat(e) @ w64, rtol=1e-5, atol=1e-5)
  assert y.shape == layer.matmul(x, w).shape and ew.shape == (3,) + y.shape[x.ndim - n_in:]
  r = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  loss = lambda x, e, w: jnp.sum(r * layer.matmul_stacked(x, e, w)[0]) + jnp.sum(layer.matmul_stacked(x, e, w)[1])
  gx, ge, gw = jax.grad(loss, argnums=(0, 1, 2))(x, e, w)
  np.testing.assert_allclose(gx, jax.grad(lambda x: jnp.sum(r * layer.matmul(x, w)))(x), rtol=1e-5, atol=1e-6)
  assert not np.any(ge) and not np.any(gw)


@pytest.mark.parametrize("case", ["taken", "gpu", "activation", "conv", "bf16 input", "bf16 compute",
                                  "middle axis", "many rows"])
def test_stacks_only_float32_trailing_contractions_with_auto_space_on_cpu(case, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if case == "gpu" else "cpu")
  module, x = nn.Dense(40), jax.random.normal(key(0), (2, 8, 24))           # 16 rows: 2·(16 + 4) ≤ 40 outputs
  if case == "conv":
    module, x = nn.Conv(40, (3, 3)), jax.random.normal(key(0), (1, 4, 4, 3))
  elif case == "bf16 input":
    x = x.astype(jnp.bfloat16)
  elif case == "bf16 compute":
    module = nn.Dense(40, dtype=jnp.bfloat16)
  elif case == "middle axis":
    module = nn.DenseGeneral(40, axis=1)
  elif case == "many rows":
    x = jax.random.normal(key(0), (2, 9, 24))                                # 18 rows: 2·(18 + 4) > 40
  w = module.init(key(1), x)["params"]["kernel"]
  auto = case != "activation"
  layer = fast.layer_of(module, x, w, by_cost=auto and jax.default_backend() != "cpu", auto=auto)
  assert layer.stacks(x, w, 4) == (case == "taken")


def stacked_calls(monkeypatch) -> list:
  """Records the kernel shape of every call of `Layer.matmul_stacked` from now on."""
  calls, form = [], fast.Layer.matmul_stacked
  monkeypatch.setattr(fast.Layer, "matmul_stacked", lambda self, x, e, w: calls.append(w.shape) or form(self, x, e, w))
  return calls


@pytest.mark.parametrize("name", ["dora", "dora+mult", "dora_full_grad", "dora_remat"])
def test_dora_on_cpu_takes_its_norms_product_from_the_layers_matmul(name, monkeypatch):
  """With n detached and nothing recomputed, DoRA on CPU (space="auto") gets `Aᵀ K₀` from the layer's own matmul
  of `[x; Aᵀ]` where `Layer.stacks`: here on the 9 → 12 layer (2·(2 rows + rank 2) ≤ 12) and not the 12 → 7
  one, exact either way; that layer's forward then reads K₀ once (one instruction of the compiled forward takes
  it, two without). Not with `detach_norm=False` (n's gradient needs `Aᵀ K₀`'s), with remat, with
  space="activation", or off CPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  rules = rules_for("dense", TRANSFORMS[name])
  model, _, rp = setup("dense", rules)
  x = jax.random.normal(key(3), (2, 9))        # rows < in: the activation form on both layers
  calls = stacked_calls(monkeypatch)
  compare(rules, model, rp, x, space="auto")
  taken = name in ("dora", "dora+mult")
  assert calls == ([(9, 12)] * 2 if taken else []), calls      # traced for the value and for the gradient
  readers = lambda space: kernel_readers(jax.jit(lambda rp: reparam.apply(rules, model, rp, x, space=space))
                                         .lower(rp).compile().as_text(), "f32[9,12]")
  if taken:
    assert readers("auto") == 1 and readers("activation") == 2, (readers("auto"), readers("activation"))
  calls.clear()
  compare(rules, model, rp, x, space="activation")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fast.explain(rules, model, rp, x)
  assert not calls, calls


def kernel_readers(hlo: str, shape: str) -> int:
  """How many instructions of the compiled entry computation take its one parameter shaped `shape`."""
  entry = hlo[hlo.index("\nENTRY "):]
  params = re.findall(rf"%([\w.\-]+) = {re.escape(shape)}\S* parameter\(", entry)
  assert len(params) == 1, params
  return len(re.findall(rf"[(,] ?%{re.escape(params[0])}[,)]", entry))


def test_jitted_step_does_not_recompile():
  rules = rules_for("transformer", TRANSFORMS["dora+mult"])
  model, x, rp = setup("transformer", rules)
  opt, traces = optax.adam(1e-2), []

  @jax.jit
  def step(rp, state):
    traces.append(1)
    loss, g = jax.value_and_grad(lambda rp: loss_of(reparam.apply(rules, model, rp, x)))(rp)
    upd, state = opt.update(g, state, rp)
    return optax.apply_updates(rp, upd), state, loss

  state = opt.init(rp)
  for _ in range(3):
    rp, state, loss = step(rp, state)
  assert len(traces) == 1 and step._cache_size() == 1 and np.isfinite(loss)


# ------------------------------------------------------------------------- scaled leaves (NaP's lazy projection)

def scaled_reference(rp, scales):
  """`rp` with each leaf at a path of `scales` multiplied by it, in numpy float64 (then float32)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(np.asarray(x, np.float64) * float(scales[reparam.core.path_str(p)]), x.dtype)
      if reparam.core.path_str(p) in scales else x, rp)


@pytest.mark.parametrize("model_name", ["dense", "conv", "attention", "transformer"])
def test_scaled_leaves_compute_with_and_are_differentiated_as_the_scaled_weights(model_name):
  """`apply(..., scales=)` on q is `model.apply` on p = c·q, and the gradient it returns for q is ∂L/∂p: plain
  kernels (run as c·(x·q)), a wrapped leaf's weight, an embedding, a LayerNorm's scale and bias."""
  make = TRANSFORMS["mult_src"]
  rules = ([(r".*/query/kernel", make(in_axes=0, out_axes=(1, 2)))] if model_name in ("attention", "transformer")
           else [(r"Dense_0/kernel|Conv_0/kernel", make())])
  model, x, q = setup(model_name, rules)
  leaves = reparam.flatten(q)
  # every other leaf scaled, the wrapped weight and every kernel, by factors away from 1
  chosen = [p for i, p in enumerate(leaves) if p.endswith(("kernel", "/w")) or i % 2 == 0]
  scales = {p: jnp.float32(0.5 + 0.25 * i) for i, p in enumerate(chosen)}
  assert any(p.endswith("/w") for p in scales) and any(p.endswith("kernel") for p in scales)

  fast_fn = lambda q: loss_of(reparam.apply(rules, model, q, x, scales=scales))
  ref_fn = lambda p: loss_of(model.apply({"params": reparam.materialize(rules, p)}, x))
  p = scaled_reference(q, scales)
  (got, g_fast), (want, g_ref) = (jax.jit(jax.value_and_grad(fast_fn))(q),
                                  jax.jit(jax.value_and_grad(ref_fn))(p))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert_grads_close(g_fast, g_ref, 1e-5)
  # the check can fail: the gradient with respect to q itself (c is a constant) is c·∂L/∂p, not ∂L/∂p
  scale_traced = lambda q: jax.tree_util.tree_map_with_path(
      lambda p, x: x * scales.get(reparam.core.path_str(p), 1.0), q)
  g_q = jax.grad(lambda q: ref_fn(scale_traced(q)))(q)
  path = next(p for p in scales if p.endswith("kernel"))
  assert not np.allclose(reparam.flatten(g_q)[path], reparam.flatten(g_ref)[path], rtol=1e-3)


def test_a_scaled_plain_kernel_is_never_multiplied_by_its_scale():
  """`c·(x·q)`, never `c·q`: no weight-shaped value computed from q, forward or backward (the loss is linear in
  the output, so ∂L/∂p = xᵀ·r does not depend on q either); the reference `x·(c·q)` has one."""
  d_in, d_out = 48, 40
  model, x = nn.Dense(d_out), jax.random.normal(key(0), (16, d_in))
  q = model.init(key(1), x)["params"]
  scales = {"kernel": jnp.float32(0.7)}
  r = jnp.cos(jnp.arange(16 * d_out, dtype=jnp.float32).reshape(16, d_out))
  fast_fn = lambda q: jnp.sum(r * reparam.apply([], model, q, x, scales=scales))
  ref_fn = lambda q: jnp.sum(r * model.apply({"params": reparam.core.scaled(q, scales)}, x))
  weight = {f"f32[{d_in},{d_out}]", f"f32[{d_out},{d_in}]"}
  computed = lambda f: [v for v in tainted_values(jax.jit(f).lower(q).compile().as_text(), weight, weight)
                        if " = parameter " not in v]      # q itself, where it is passed (to a fusion, too)
  assert not computed(fast_fn) and not computed(jax.grad(fast_fn)), (computed(fast_fn), computed(jax.grad(fast_fn)))
  assert computed(ref_fn)         # the check can fail: the reference's forward forms c·q


def test_explain_says_how_each_scaled_leaf_was_read():
  rules = [(r".*/query/kernel", TRANSFORMS["mult_src"](in_axes=0, out_axes=(1, 2)))]
  model, x, q = setup("transformer", rules)
  scales = {p: jnp.float32(2.0) for p in reparam.flatten(q)}
  taken = fast.explain(rules, model, q, x, scales=scales)
  assert set(taken) == set(scales) | {p for p in taken if not taken[p].startswith("scaled")}
  plain_kernels = {p for p in scales if p.endswith("/kernel")}      # query's is wrapped: its leaves end in /w etc.
  assert plain_kernels and all(taken[p] == "scaled: c·(x·q)" for p in plain_kernels), taken
  others = set(scales) - plain_kernels
  assert others and all(taken[p].startswith("scaled: c·q (") for p in others), taken
  assert fast.explain(rules, model, q, x) == {p: v for p, v in taken.items() if not v.startswith("scaled")}


def test_scales_naming_no_leaf_are_refused():
  model, x, q = setup("dense", [])
  with pytest.raises(reparam.ConfigError, match="'Dense_9/kernel' is not a leaf of rparams; leaves are: Dense_0"):
    reparam.apply([], model, q, x, scales={"Dense_9/kernel": jnp.float32(2.0)})
