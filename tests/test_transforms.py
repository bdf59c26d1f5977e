"""Each transform against numpy float64 formulas: identity at init, effective weights, gradients, edge cases."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import reparam
from reparam.layout import resolve

# (shape, in_axes, out_axes): Dense, Conv, DenseGeneral query kernel, DenseGeneral attention output kernel.
LAYOUTS = {
    "dense": ((6, 5), -2, -1),
    "conv": ((3, 3, 4, 5), -2, -1),
    "qkv": ((8, 2, 3), 0, (1, 2)),
    "attn_out": ((2, 3, 8), (0, 1), 2),
}


def factories(in_axes, out_axes):
  ax = dict(in_axes=in_axes, out_axes=out_axes)
  return {
      "identity": reparam.identity(),
      "weight_norm": reparam.weight_norm(**ax),
      "lora": reparam.lora(rank=2, alpha=4.0, **ax),
      "dora": reparam.dora(rank=2, alpha=4.0, **ax),
      "dora_full_grad": reparam.dora(rank=2, detach_norm=False, **ax),
      "multipliers": reparam.multipliers(scalar=True, row=True, col=True, **ax),
      "chain_dora_mult": reparam.chain(reparam.dora(rank=2, **ax), reparam.multipliers(row=True, **ax)),
      "chain_wn_mult": reparam.chain(reparam.weight_norm(**ax), reparam.multipliers(scalar=True, col=True, **ax)),
      "chain_mult_lora_wn": reparam.chain(reparam.multipliers(row=True, **ax), reparam.lora(rank=1, **ax),
                                          reparam.weight_norm(**ax)),
  }


def as_matrix(w, shape, in_axes, out_axes):
  """float64 (rows, cols) view: rows = every non-output axis, cols = output axes (independent of reparam.layout)."""
  nd = len(shape)
  outs = [a % nd for a in np.atleast_1d(out_axes)]
  rest = [a for a in range(nd) if a not in outs]
  return np.transpose(np.asarray(w, np.float64), rest + outs).reshape(
      int(np.prod([shape[a] for a in rest])), -1), rest + outs


def from_matrix(m, shape, perm):
  return np.transpose(m.reshape([shape[a] for a in perm]), np.argsort(perm))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(factories(-2, -1)))
def test_identity_at_init(layout, name):
  shape, ia, oa = LAYOUTS[layout]
  t = factories(ia, oa)[name]
  w = jax.random.normal(jax.random.key(0), shape)
  f = t.init(jax.random.key(1), w)
  np.testing.assert_allclose(t.apply(f, w), w, rtol=2e-6, atol=2e-6)


def random_like(tree, key, positive=False):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  new = [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
  if positive:
    new = [jnp.abs(x) + 0.5 for x in new]
  return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_effective_weights_match_float64_formulas(layout):
  shape, ia, oa = LAYOUTS[layout]
  ts = factories(ia, oa)
  w = jax.random.normal(jax.random.key(0), shape)
  K, perm = as_matrix(w, shape, ia, oa)
  rows, cols = K.shape
  lay = resolve(len(shape), ia, oa)

  def check(t, factors, expected_matrix):
    got = np.asarray(t.apply(factors, w), np.float64)
    np.testing.assert_allclose(got, from_matrix(expected_matrix, shape, perm), rtol=1e-5, atol=1e-5)

  # weight norm: g ⊙ V / ‖V‖ per output column
  g = np.random.default_rng(0).normal(size=cols)
  check(ts["weight_norm"], {"g": jnp.asarray(g.reshape(lay.out_shape(shape)), jnp.float32)},
        g * K / np.linalg.norm(K, axis=0))

  # LoRA and DoRA: A, B random; s = alpha / r = 2
  rng = np.random.default_rng(1)
  A, B = rng.normal(size=(rows, 2)), rng.normal(size=(2, cols))
  lr_f = {"A": jnp.asarray(A.reshape(tuple(shape[a] for a in lay.reduce) + (2,)), jnp.float32),
          "B": jnp.asarray(B.reshape((2,) + lay.out_shape(shape)), jnp.float32)}
  check(ts["lora"], lr_f, K + 2.0 * A @ B)
  m = rng.normal(size=cols)
  V = K + 2.0 * A @ B
  check(ts["dora"], {**lr_f, "m": jnp.asarray(m.reshape(lay.out_shape(shape)), jnp.float32)},
        m * V / np.linalg.norm(V, axis=0))
  # DoRA's init: m = ‖K₀‖₀ and the cached k0_sq = ‖K₀‖₀², per output unit
  f = ts["dora"].init(jax.random.key(3), w)
  np.testing.assert_allclose(np.ravel(f["k0_sq"]), np.sum(K * K, axis=0), rtol=1e-5)
  np.testing.assert_allclose(np.ravel(f["m"]), np.linalg.norm(K, axis=0), rtol=1e-5)

  # multipliers: s · c_i · K_ij · r_j, with c per input feature (shared over a conv window)
  s, r = 1.7, rng.normal(size=lay.out_shape(shape))
  c = rng.normal(size=lay.in_shape(shape))
  full = np.asarray(w, np.float64) * s
  full = full * np.expand_dims(r, tuple(a for a in range(len(shape)) if a not in lay.outputs))
  full = full * np.expand_dims(c, tuple(a for a in range(len(shape)) if a not in lay.inputs))
  got = ts["multipliers"].apply({"scalar": jnp.float32(s), "row": jnp.asarray(r, jnp.float32),
                                 "col": jnp.asarray(c, jnp.float32)}, w)
  np.testing.assert_allclose(np.asarray(got, np.float64), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["chain_dora_mult", "chain_wn_mult", "chain_mult_lora_wn"])
def test_chain_equals_manual_nesting(name):
  ts = factories(-2, -1)
  t = ts[name]
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  f = random_like(t.init(jax.random.key(1), w), jax.random.key(2), positive=True)
  stages = {"chain_dora_mult": [reparam.dora(rank=2), reparam.multipliers(row=True)],
            "chain_wn_mult": [reparam.weight_norm(), reparam.multipliers(scalar=True, col=True)],
            "chain_mult_lora_wn": [reparam.multipliers(row=True), reparam.lora(rank=1), reparam.weight_norm()]}[name]
  manual = w
  for stage in stages:     # factors are stored under each stage's name
    manual = stage.apply(f[stage.name], manual)
  np.testing.assert_allclose(t.apply(f, w), manual, rtol=1e-6)
  assert list(t.init(jax.random.key(1), w)) == [s.name for s in stages]


def test_chain_names_repeat_and_freeze_earlier_stages():
  t = reparam.chain(reparam.multipliers(row=True), reparam.lora(rank=1), reparam.lora(rank=2))
  assert list(t.init(jax.random.key(0), jnp.ones((4, 4)))) == ["multipliers", "lora", "lora_1"]
  assert t.freezes_base
  assert t.roles["multipliers"] == {"row": "frozen"}
  assert t.roles["lora_1"] == {"A": "lowrank", "B": "lowrank"}


def dora_grads_float64(K, A, B, m, R, s, detach):
  """Analytic gradients of L = Σ R ⊙ m ⊙ V/n, V = K + sAB, n = ‖V‖₀ (columns)."""
  V = K + s * A @ B
  n = np.linalg.norm(V, axis=0)
  dV = R * m / n
  if not detach:   # d(V/n)/dV includes -V (V·R) / n³ per column
    dV = dV - V * (m * np.sum(R * V, axis=0) / n**3)
  return {"m": np.sum(R * V, axis=0) / n, "A": s * dV @ B.T, "B": s * A.T @ dV}


@pytest.mark.parametrize("detach", [True, False])
def test_dora_gradients_match_formula(detach):
  rng = np.random.default_rng(0)
  K, A, B, m, R = (rng.normal(size=s) for s in [(6, 5), (6, 2), (2, 5), (5,), (6, 5)])
  t = reparam.dora(rank=2, alpha=4.0, detach_norm=detach)
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def loss(f, w):
    return jnp.sum(f32(R) * t.apply(f, w))

  gf, gw = jax.grad(loss, argnums=(0, 1))(dict(A=f32(A), B=f32(B), m=f32(m)), f32(K))
  ref = dora_grads_float64(K, A, B, m, R, 2.0, detach)
  for k in ref:
    np.testing.assert_allclose(gf[k], ref[k], rtol=1e-4, atol=1e-5)
  assert not np.any(gw), "the frozen base must get no gradient"
  if detach:   # the two formulas really differ here, so each test checks its own
    full = dora_grads_float64(K, A, B, m, R, 2.0, False)
    assert not np.allclose(ref["A"], full["A"], rtol=1e-3)


@pytest.mark.parametrize("name", list(factories(-2, -1)))
def test_gradients_reach_trainable_factors_only(name):
  t = factories(-2, -1)[name]
  w = jax.random.normal(jax.random.key(0), (6, 5))
  # Random (non-init) factors so that e.g. LoRA's A, which gets no gradient while B == 0, is exercised.
  f = random_like(t.init(jax.random.key(1), w), jax.random.key(2), positive=True)
  R = jax.random.normal(jax.random.key(3), (6, 5))
  gf, gw = jax.grad(lambda f, w: jnp.sum(R * t.apply(f, w)), argnums=(0, 1))(f, w)
  roles = jax.tree.map(lambda r, sub: jax.tree.map(lambda _: r, sub), dict(t.roles), f)
  for (path, g), role in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(roles)):
    if role == "frozen":
      assert not np.any(g), f"{name}: frozen factor {path} got a gradient"
    else:
      assert np.all(np.isfinite(g)) and np.any(g), f"{name}: trainable factor {path} got no gradient"
  assert np.any(gw) != t.freezes_base or name == "identity"


def test_weight_norm_is_invariant_to_scaling_v():
  t = reparam.weight_norm()
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  f = random_like(t.init(jax.random.key(1), w), jax.random.key(2))
  np.testing.assert_allclose(t.apply(f, 37.5 * w), t.apply(f, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["weight_norm", "dora", "dora_full_grad", "chain_wn_mult"])
def test_zero_norm_units_give_finite_values_and_gradients(name):
  t = factories(-2, -1)[name]
  w = jax.random.normal(jax.random.key(0), (6, 5)).at[:, 2].set(0.0).at[3, :].set(0.0)
  f = t.init(jax.random.key(1), w)
  out = t.apply(f, w)
  assert np.all(np.isfinite(out)) and not np.any(out[:, 2])
  g = jax.grad(lambda f, w: jnp.sum(t.apply(f, w) ** 2), argnums=(0, 1))(f, w)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name", ["weight_norm", "dora", "multipliers", "chain_dora_mult"])
def test_bf16_weights_keep_float32_norms(name):
  t = factories(-2, -1)[name]
  w32 = jax.random.normal(jax.random.key(0), (64, 48)) * 1e-2
  w = w32.astype(jnp.bfloat16)
  f = t.init(jax.random.key(1), w)
  for k, x in reparam.flatten(f).items():
    if k.split("/")[-1] in ("g", "m", "scalar", "row", "col"):
      assert x.dtype == jnp.float32, f"{k} should be float32, is {x.dtype}"
  out = t.apply(f, w)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  # identity at init up to one bf16 rounding of each entry
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(w, np.float32), rtol=8e-3, atol=1e-6)


def test_lora_rank_and_rank_errors():
  with pytest.raises(ValueError, match=r"rank=9 must be an integer in \[1, min\(in, out\) = 5\]"):
    reparam.lora(rank=9).init(jax.random.key(0), jnp.ones((6, 5)))
  f = reparam.lora(rank=3).init(jax.random.key(0), jnp.ones((3, 3, 4, 5)))
  assert f["A"].shape == (3, 3, 4, 3) and f["B"].shape == (3, 5) and not np.any(f["B"])
  bound = 1 / np.sqrt(36)
  assert np.all(np.abs(f["A"]) <= bound) and np.abs(f["A"]).max() > 0.5 * bound


def test_multipliers_need_a_choice():
  with pytest.raises(reparam.ConfigError, match="choose at least one"):
    reparam.multipliers()
