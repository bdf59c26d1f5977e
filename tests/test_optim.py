"""reparam.optim on a small transformer LM: routing by role, Muon/AdamW updates against optax run on one leaf
alone, frozen leaves, weight decay, Normalize-and-Project, schedules, config errors, and jit behaviour."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import optax
import pytest

import reparam
from reparam import optim


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (nn.Dense(16, name=n)(h) for n in ("q", "k", "v"))
    x = x + nn.Dense(16, name="o")(jax.nn.softmax(q @ k.swapaxes(-1, -2) / 4.0) @ v)
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(16, name="down")(nn.gelu(nn.Dense(32, name="up")(h)))


class LM(nn.Module):
  """Embedding, two blocks (LayerNorm, Dense q/k/v/o, MLP), one DenseGeneral attention, final norm, head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 16, name="embed")(tokens)
    for i in range(2):
      x = Block(name=f"block_{i}")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=16, name="mha")(x)
    return nn.Dense(50, name="head")(nn.LayerNorm(name="ln_f")(x))


RULES = [(r"block_0/(q|k|v|o)/kernel", reparam.multipliers(row=True)),
         (r"block_1/(up|down)/kernel", reparam.dora(rank=2))]
MUON = dict(name="muon", learning_rate=0.02, weight_decay=0.1)
TOKENS = jnp.arange(10).reshape(2, 5) % 50


@pytest.fixture(scope="module")
def lm():
  params = LM().init(jax.random.key(0), TOKENS)["params"]
  return params, reparam.init(RULES, params, jax.random.key(1))


def leaf(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def random_grads(tree, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.tree.map(lambda x, k=k: jax.random.normal(jax.random.fold_in(k, x.size), x.shape), tree)
          for k in keys]


def run(tx, params, grads):
  """Applies `tx` to `params` for each gradient tree; returns the params after every step and the last state."""
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  state, history = tx.init(params), []
  for g in grads:
    params, state = step(params, state, g)
    history.append(params)
  return history, state


def run_leaf(tx, x, grads):
  """`tx` on one leaf alone, as a reference."""
  return run(tx, {"x": x}, [{"x": g} for g in grads])[0][-1]["x"]


def expected_role(path):
  """The role of a parameter from its name alone: the reference the routing is checked against."""
  if path.endswith("embedding"):
    return "embedding"
  if "/ln" in path or path.startswith("ln"):
    return "norm"
  if path.endswith("bias"):
    return "bias"
  return "head" if path.startswith("head/") else "matrix"


def describe_rows(text):
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| -")]
  header = rows[0]
  return {r[0]: dict(zip(header, r)) for r in rows[1:]}


# ----------------------------------------------------------------------------------------------- routing

def test_routing_of_a_wrapped_transformer(lm):
  _, rp = lm
  table = optim.routing(MUON, RULES, rp)
  labels = optim.labels(table, rp)
  assert jax.tree.structure(labels) == jax.tree.structure(rp)
  expect = {"embed/embedding": ("embedding", "adamw"), "head/kernel": ("head", "adamw"),
            "head/bias": ("bias", "adamw"), "ln_f/scale": ("norm", "adamw"),
            "block_0/q/kernel/w": ("matrix", "muon"), "block_0/q/kernel/row": ("multiplier", "adamw"),
            "block_0/up/kernel": ("matrix", "muon"), "block_1/q/kernel": ("matrix", "muon"),
            "block_1/up/kernel/w": ("frozen", "frozen"), "block_1/up/kernel/A": ("lowrank", "adamw"),
            "block_1/up/kernel/B": ("lowrank", "adamw"), "block_1/up/kernel/m": ("gain", "adamw"),
            "mha/query/kernel": ("matrix", "muon"), "mha/out/kernel": ("matrix", "muon"),
            "mha/query/bias": ("bias", "adamw")}
  for path, (role, opt) in expect.items():
    assert (table[path].role, table[path].optimizer) == (role, opt), path
    assert leaf(labels, path) == role
  for path, r in table.items():   # every leaf: hidden matrices to Muon, frozen to nothing, the rest to AdamW
    assert r.optimizer == {"matrix": "muon", "frozen": "frozen"}.get(r.role, "adamw"), path
    assert r.weight_decay == (0.1 if r.role == "matrix" else 0.0), path
    assert r.lr == pytest.approx({"muon": 0.02, "adamw": 3e-3, "frozen": 0.0}[r.optimizer]), path

  rows = describe_rows(optim.describe(MUON, RULES, rp))
  assert set(rows) == set(table)
  checks = {"mha/query/kernel": ("16x2x4", "matrix", "muon", "0 -> 1,2"),
            "mha/out/kernel": ("2x4x16", "matrix", "muon", "0,1 -> 2"),
            "block_0/q/kernel/w": ("16x16", "matrix", "muon", "0 -> 1"),
            "embed/embedding": ("50x16", "embedding", "adamw", ""),
            "block_1/down/kernel/w": ("32x16", "frozen", "frozen", "")}
  for path, (shape, role, opt, axes) in checks.items():
    assert (rows[path]["shape"], rows[path]["role"], rows[path]["optimizer"], rows[path]["muon axes"]) == (
        shape, role, opt, axes)
  assert rows["block_0/q/kernel/w"]["wd"] == "0.1" and rows["block_0/q/kernel/row"]["wd"] == "0"
  assert rows["block_1/down/kernel/w"]["lr"] == "-"


def test_unwrapped_tree_is_routed_the_same_by_role(lm):
  params, _ = lm
  table = optim.routing(MUON, [], params)
  assert len(table) == len(jax.tree.leaves(params))
  for path, r in table.items():
    assert r.role == expected_role(path), path
    assert r.optimizer == ("muon" if r.role == "matrix" else "adamw"), path
  # with name="adamw" the matrices use AdamW too, with the matrix learning rate everywhere
  for r in optim.routing(dict(name="adamw", learning_rate=1e-3), [], params).values():
    assert (r.optimizer, r.lr) == ("adamw", 1e-3)


def test_config_dict_and_role_overrides(lm):
  _, rp = lm
  cfg = ml_collections.ConfigDict(dict(MUON, roles={"head": {"optimizer": "muon", "lr_mult": 0.5},
                                                    "embedding": {"weight_decay": 0.01, "lr_mult": 2.0}},
                                       role_rules=[(r"mha/.*", "frozen")]))
  table = optim.routing(cfg, RULES, rp)
  assert (table["head/kernel"].optimizer, table["head/kernel"].lr) == ("muon", pytest.approx(0.01))
  assert table["embed/embedding"].weight_decay == 0.01 and table["embed/embedding"].lr == pytest.approx(6e-3)
  assert all(table[p].optimizer == "frozen" for p in table if p.startswith("mha/"))


def test_muon_dimension_numbers_and_overrides():
  dims = lambda path, shape, o=(): tuple(optim.muon_dims(path, shape, o))
  assert dims("Dense_0/kernel", (4, 8)) == ((0,), (1,))
  assert dims("Conv_0/kernel", (3, 3, 4, 8)) == ((0, 1, 2), (3,))
  assert dims("attn/value/kernel", (16, 2, 4)) == ((0,), (1, 2))
  assert dims("attn/out/kernel", (2, 4, 16)) == ((0, 1), (2,))
  assert dims("layout/kernel", (2, 4, 16)) == ((0, 1), (2,))        # "layout" is not an attention "out"
  assert dims("experts/kernel", (4, 8, 16), [(r"experts/.*", (1,), (2,))]) == ((1,), (2,))


# ----------------------------------------------------------------------------------- updates vs optax

def test_muon_and_adamw_updates_equal_optax_on_each_leaf(lm):
  _, rp = lm
  grads = random_grads(rp, 3)
  history, _ = run(optim.make(MUON, RULES, rp), rp, grads)
  final = history[-1]
  muon_ref = lambda dims=None: optax.contrib.muon(0.02, weight_decay=0.1, muon_weight_dimension_numbers=dims)
  dn = optax.contrib.MuonDimensionNumbers
  cases = {"block_1/q/kernel": muon_ref(), "block_0/q/kernel/w": muon_ref(),
           "mha/query/kernel": muon_ref({"x": dn((0,), (1, 2))}), "mha/out/kernel": muon_ref({"x": dn((0, 1), (2,))}),
           "embed/embedding": optax.adamw(3e-3, weight_decay=0.0), "head/kernel": optax.adamw(3e-3, weight_decay=0.0),
           "block_0/q/kernel/row": optax.adamw(3e-3, weight_decay=0.0),
           "block_1/up/kernel/A": optax.adamw(3e-3, weight_decay=0.0)}
  for path, tx in cases.items():
    ref = run_leaf(tx, leaf(rp, path), [leaf(g, path) for g in grads])
    np.testing.assert_allclose(leaf(final, path), ref, rtol=1e-5, atol=1e-7, err_msg=path)


def test_muon_update_is_orthogonal_up_to_optax_shape_factor(lm):
  _, rp = lm
  g = random_grads(rp, 1, seed=3)[0]
  tx = optim.make(dict(MUON, weight_decay=0.0), RULES, rp)
  updates, _ = jax.jit(tx.update)(g, tx.init(rp), rp)
  for path, matrix in (("block_0/up/kernel", lambda u: u), ("block_0/down/kernel", lambda u: u),
                       ("mha/query/kernel", lambda u: u.reshape(16, 8))):
    u = matrix(np.asarray(leaf(updates, path)))
    factor = math.sqrt(max(1.0, u.shape[1] / u.shape[0]))     # optax's scale_by_shape: √max(1, out/in)
    s = np.linalg.svd(-u / (0.02 * factor), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.2, (path, s)


def test_frozen_leaves_are_bit_identical_and_hold_no_state(lm):
  _, rp = lm
  cfg = dict(MUON, role_rules=[(r"head/kernel", "frozen")])
  history, state = run(optim.make(cfg, RULES, rp), rp, random_grads(rp, 10))
  table = optim.routing(cfg, RULES, rp)
  frozen = [p for p, r in table.items() if r.optimizer == "frozen"]
  assert set(frozen) == {"head/kernel", "block_1/up/kernel/w", "block_1/down/kernel/w",
                         "block_1/up/kernel/k0_sq", "block_1/down/kernel/k0_sq"}     # DoRA's cached ‖K₀‖₀²
  state_paths = [reparam.core.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  for path in frozen:
    assert np.array_equal(leaf(history[-1], path), leaf(rp, path)), path
    assert not any(s.endswith(path) for s in state_paths), path
  # Every state array is an Adam moment pair (mu, nu), a Muon momentum, or Muon's 3 Newton-Schulz coefficients.
  size = lambda opt: sum(math.prod(r.shape) for r in table.values() if r.optimizer == opt)
  arrays = sum(x.size for x in jax.tree.leaves(state) if x.ndim >= 1)
  assert arrays == 2 * size("adamw") + size("muon") + 3


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_weight_decay_touches_exactly_the_configured_roles(lm, name):
  _, rp = lm
  lr, steps = 0.1, 4
  cfg = dict(name=name, learning_rate=lr, adam_learning_rate=lr, weight_decay=0.5,
             roles={"gain": {"weight_decay": 0.2}})
  zeros = jax.tree.map(jnp.zeros_like, rp)
  final = run(optim.make(cfg, RULES, rp), rp, [zeros] * steps)[0][-1]
  for path, r in optim.routing(cfg, RULES, rp).items():
    decay = {"matrix": 0.5, "gain": 0.2}.get(r.role, 0.0)
    want = np.asarray(leaf(rp, path)) * (1 - lr * decay) ** steps
    if decay:
      np.testing.assert_allclose(leaf(final, path), want, rtol=1e-5, err_msg=path)
    else:
      assert np.array_equal(leaf(final, path), leaf(rp, path)), path


def test_width_scaling_rescales_adamw_matrices_by_fan_in(lm):
  _, rp = lm
  cfg = dict(name="adamw", learning_rate=1e-2, weight_decay=0.1, width_scaling={"base_width": 16})
  table = optim.routing(cfg, RULES, rp)
  for path, fan_in in (("block_0/q/kernel/w", 16), ("block_0/down/kernel", 32), ("mha/out/kernel", 8),
                       ("mha/query/kernel", 16)):
    r = table[path]
    assert r.fan_in == fan_in and r.label == f"matrix_fan_in_{fan_in}"
    assert r.lr == pytest.approx(1e-2 * 16 / fan_in) and r.weight_decay == pytest.approx(0.1 * (fan_in / 16) ** 0.5)
  assert table["head/kernel"].lr == pytest.approx(1e-2) and table["head/kernel"].fan_in is None
  grads = random_grads(rp, 2, seed=5)
  final = run(optim.make(cfg, RULES, rp), rp, grads)[0][-1]
  path = "block_0/down/kernel"
  ref = run_leaf(optax.adamw(5e-3, weight_decay=0.1 * 2 ** 0.5), leaf(rp, path), [leaf(g, path) for g in grads])
  np.testing.assert_allclose(leaf(final, path), ref, rtol=1e-5, atol=1e-7)


def test_clipping_uses_the_global_norm_of_trained_leaves_only(lm):
  _, rp = lm
  # A large Adam eps makes the step ~ lr·g/eps, so it sees the gradient's scale, hence the clipping.
  cfg = dict(name="adamw", learning_rate=100.0, eps=1e3, grad_clip_norm=0.5, role_rules=[(r"head/kernel", "frozen")])
  g = random_grads(rp, 1, seed=11)[0]
  g = {**g, "head": {**g["head"], "kernel": 1e3 * g["head"]["kernel"]}}    # a huge gradient on a frozen leaf
  final = run(optim.make(cfg, RULES, rp), rp, [g])[0][-1]
  table = optim.routing(cfg, RULES, rp)
  flat = reparam.flatten(g)
  norm = math.sqrt(sum(float(jnp.sum(flat[p] ** 2)) for p, r in table.items() if r.optimizer != "frozen"))
  for path in ("block_0/q/kernel/w", "embed/embedding", "head/bias"):
    ref = run_leaf(optax.adamw(100.0, eps=1e3, weight_decay=table[path].weight_decay), leaf(rp, path),
                   [leaf(g, path) * min(1.0, 0.5 / norm)])
    np.testing.assert_allclose(leaf(final, path), ref, rtol=1e-5, atol=1e-8, err_msg=path)
  assert np.array_equal(final["head"]["kernel"], rp["head"]["kernel"])


# ------------------------------------------------------------------------------------ Normalize-and-Project

def nap_norms(tree):
  """‖K‖_F of each matrix/head leaf and the joint ‖(scale, bias)‖ of each LayerNorm, by reference paths."""
  flat = reparam.flatten(tree)
  out = {p: np.linalg.norm(np.asarray(x)) for p, x in flat.items()
         if expected_role(p.removesuffix("/w")) in ("matrix", "head") and not p.endswith(("/row", "/A", "/B", "/m"))}
  for p in flat:
    if p.endswith("/scale"):
      module = p.rpartition("/")[0]
      out[module] = math.hypot(np.linalg.norm(flat[p]), np.linalg.norm(flat[module + "/bias"]))
  return out


@pytest.mark.parametrize("name,lr", [("adamw", 0.05), ("muon", 0.05)])
def test_nap_keeps_every_projected_norm_at_init(lm, name, lr):
  _, rp = lm
  cfg = dict(name=name, learning_rate=lr, adam_learning_rate=0.05, weight_decay=0.1, nap={"every": 1})
  grads = random_grads(rp, 20, seed=7)
  history, _ = run(optim.make(cfg, RULES, rp), rp, grads)
  init = nap_norms(rp)
  assert "block_0/q/kernel/w" in init and "block_1/ln1" in init and "block_1/up/kernel/w" in init
  for path, value in nap_norms(history[-1]).items():
    if path.startswith("block_1/") and path.endswith(("up/kernel/w", "down/kernel/w")):
      continue    # frozen DoRA base: not projected, and not moved either
    np.testing.assert_allclose(value, init[path], rtol=1e-5, err_msg=path)
  free = run(optim.make(dict(cfg, nap=None), RULES, rp), rp, grads)[0][-1]   # without NaP the norms drift
  assert abs(nap_norms(free)["block_0/q/kernel/w"] / init["block_0/q/kernel/w"] - 1) > 1e-3
  assert abs(nap_norms(free)["block_0/ln1"] / init["block_0/ln1"] - 1) > 1e-3


def test_nap_every_k_projects_only_every_kth_step(lm):
  _, rp = lm
  roles = reparam.roles(RULES, rp)
  tx = optax.chain(optax.adamw(0.05), optim.normalize_and_project(roles, every=3))
  history, state = run(tx, rp, random_grads(rp, 7, seed=9))
  assert int(state[-1].count) == 7
  init = nap_norms(rp)
  for step, params in enumerate(history, start=1):
    got = nap_norms(params)
    for path in ("block_0/q/kernel/w", "head/kernel", "mha/out/kernel", "ln_f"):
      on_norm = abs(got[path] / init[path] - 1) < 1e-5
      assert on_norm == (step % 3 == 0), (step, path, got[path], init[path])


def nap_reference(lm, name, every):
  """The LM's rparams, an optimizer config with NaP, 7 steps of gradients, and the parameters after each step
  with the projection as an optax transform (the reference form)."""
  _, rp = lm
  cfg = dict(name=name, learning_rate=0.05, adam_learning_rate=0.05, weight_decay=0.1, nap={"every": every})
  grads = random_grads(rp, 7, seed=13)
  return rp, cfg, grads, run(optim.make(cfg, RULES, rp), rp, grads)[0]


def assert_same_histories(got, want):
  """Step by step and leaf by leaf, `got`'s parameters are `want`'s (as many steps as `got` has)."""
  assert 0 < len(got) <= len(want)
  for a, b in zip(want, got):
    for (path, x), y in zip(reparam.flatten(a).items(), reparam.flatten(b).values()):
      np.testing.assert_allclose(y, x, rtol=2e-6, atol=1e-7, err_msg=path)


def run_deferred(tx, params, grads):
  """`run` with the training loop's update: `reparam.optim.apply_updates`, which projects deferred NaP states."""
  step = jax.jit(lambda p, s, g: (lambda u, s: (optim.apply_updates(p, u, s), s))(*tx.update(g, s, p)))
  state, history = tx.init(params), []
  for g in grads:
    params, state = step(params, state, g)
    history.append(params)
  return history, state


@pytest.mark.parametrize("name,every", [("adamw", 1), ("muon", 1), ("adamw", 3)])
def test_deferred_projection_gives_the_transforms_numbers(lm, name, every):
  rp, cfg, grads, now = nap_reference(lm, name, every)
  later, deferred = run_deferred(optim.make(cfg, RULES, rp, projection="deferred"), rp, grads)
  assert isinstance(deferred[-1], optim.DeferredProjectionState) and int(deferred[-1].count) == 7
  assert_same_histories(later, now)    # every step, projected or not (every=3): the same parameters
  # the projection really ran: the projected norms sit on their init values on the projected steps
  init, last = nap_norms(rp), nap_norms(later[5])       # step 6: projected for every=1 and every=3
  for path in ("block_0/q/kernel/w", "head/kernel", "ln_f"):
    np.testing.assert_allclose(last[path], init[path], rtol=1e-5, err_msg=path)
  # a deferred state under optax.apply_updates does not project: the loop must use optim.apply_updates
  skipped = run(optim.make(cfg, RULES, rp, projection="deferred"), rp, grads)[0][5]
  assert abs(nap_norms(skipped)["block_0/q/kernel/w"] / init["block_0/q/kernel/w"] - 1) > 1e-3


def run_lazy(tx, params, grads):
  """`run` as the training loop steps a lazy state: it keeps q and steps from the weights `projected(q)`."""
  def step(q, s, g):
    p = optim.projected(q, s)
    u, s = tx.update(g, s, p)
    return optim.apply_updates(p, u, s), s

  step, state, history = jax.jit(step), tx.init(params), []
  for g in grads:
    params, state = step(params, state, g)
    history.append(optim.projected(params, state))
  return history, state, params


@pytest.mark.parametrize("name,every", [("adamw", 1), ("muon", 1), ("adamw", 3)])
def test_lazy_projection_gives_the_eager_numbers(lm, name, every):
  """The stored q differs from the eager form's weights, but its projection is them, step after step."""
  rp, cfg, grads, now = nap_reference(lm, name, every)
  lazy, state, q = run_lazy(optim.make(cfg, RULES, rp, projection="lazy"), rp, grads[:6])
  assert state[-1].lazy and int(state[-1].count) == 6
  assert_same_histories(lazy, now)
  # step 6 is projected for every=1 and 3: the weights sit on the init norms, the stored q is off them
  init, stored, weights = nap_norms(rp), nap_norms(q), nap_norms(lazy[-1])
  for path in ("block_0/q/kernel/w", "head/kernel", "ln_f"):
    np.testing.assert_allclose(weights[path], init[path], rtol=1e-5, err_msg=path)
    assert abs(stored[path] / init[path] - 1) > 1e-3, path


def test_projection_scales_follow_the_count_and_guard_zero_norms():
  rp = {"w": jnp.arange(12.0).reshape(4, 3), "z": jnp.zeros((2, 2)), "ln": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
  roles = {"w": "matrix", "z": "matrix", "ln": {"scale": "norm", "bias": "norm"}}
  tx = optim.normalize_and_project(roles, every=2, projection="lazy")
  q = {"w": 2.0 * rp["w"], "z": rp["z"], "ln": {"scale": 3.0 * rp["ln"]["scale"], "bias": jnp.full(3, 4.0)}}
  _, state = tx.update(jax.tree.map(jnp.subtract, q, rp), tx.init(rp), rp)    # it records the norms of q
  np.testing.assert_allclose(float(state.norms["w"]), np.linalg.norm(np.asarray(q["w"], np.float64)), rtol=1e-6)
  ln0, ln = np.sqrt(3.0), np.sqrt(3 * 9.0 + 3 * 16.0)       # joint norms of (scale, bias): init, now
  for count, due in ((0, False), (1, False), (2, True), (3, False), (4, True)):
    c = optim.projection_scales(dataclasses.replace(state, count=jnp.int32(count)))
    want = {"w": 0.5, "z": 1.0, "ln/scale": ln0 / ln, "ln/bias": ln0 / ln} if due else dict.fromkeys(c, 1.0)
    assert set(c) == {"w", "z", "ln/scale", "ln/bias"}
    for path, v in want.items():
      np.testing.assert_allclose(float(c[path]), v, rtol=1e-6, err_msg=(count, path))
  due = dataclasses.replace(state, count=jnp.int32(2))
  p = optim.projected(q, due)
  np.testing.assert_allclose(p["w"], rp["w"], rtol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.sum(np.square(p["ln"]["scale"])) + np.sum(np.square(p["ln"]["bias"]))),
                             ln0, rtol=1e-6)
  assert optim.projected(q, optax.EmptyState()) is q          # no lazy state: the params are the weights


def test_apply_updates_without_a_deferred_state_is_optax_apply_updates():
  rp = {"w": jnp.arange(12.0).reshape(4, 3), "ln": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
  roles = {"w": "matrix", "ln": {"scale": "norm", "bias": "norm"}}
  tx = optax.chain(optax.adamw(0.05), optim.normalize_and_project(roles))     # projects inside `update`
  g = jax.tree.map(lambda x: jnp.sin(x + 1.0), rp)
  updates, state = tx.update(g, tx.init(rp), rp)
  got, want = optim.apply_updates(rp, updates, state), optax.apply_updates(rp, updates)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), got, want))


# --------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_closed_form(kind):
  peak, w, total, ratio = 0.1, 4, 20, 0.1
  cfg = optim.check(dict(learning_rate=peak, schedule=kind, warmup_steps=w, min_lr_ratio=ratio))
  fn = optim.schedule(cfg, peak, total)
  end = ratio * peak
  for t in (0, 2, 4, 7, 12, 19, 20, 30):
    frac = min(max(t - w, 0) / (total - w), 1.0)
    decayed = {"cosine": end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac)),
               "linear": peak + (end - peak) * frac, "constant": peak}[kind]
    want = peak * t / w if t < w else decayed
    assert float(fn(t)) == pytest.approx(want, rel=1e-5, abs=1e-8), (kind, t)


def test_schedule_drives_the_adamw_step():
  """With a constant gradient Adam's direction is sign(g), so each update's size is the learning rate."""
  params = {"Dense_0": {"kernel": jnp.zeros((2, 3))}}
  cfg = dict(name="adamw", learning_rate=0.1, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
  tx = optim.make(cfg, [], params, total_steps=6)
  ones = jax.tree.map(jnp.ones_like, params)
  history, _ = run(tx, params, [ones] * 6)
  fn = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 6)
  prev = params
  for t, p in enumerate(history):
    step = np.asarray(p["Dense_0"]["kernel"] - prev["Dense_0"]["kernel"])
    np.testing.assert_allclose(step, -float(fn(t)), rtol=1e-5, atol=1e-8)
    prev = p


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("config,total_steps,key", [
    (dict(MUON, learning_rte=0.1), None, "optimizer.learning_rte"),
    (dict(MUON, name="sgd"), None, "optimizer.name"),
    (dict(MUON, learning_rate=-0.1), None, "optimizer.learning_rate"),
    (dict(name="muon"), None, "optimizer.learning_rate"),
    (dict(MUON, roles={"gian": {"lr_mult": 2.0}}), None, "optimizer.roles.gian"),
    (dict(MUON, roles={"gain": {"optimizer": "sgd"}}), None, "optimizer.roles.gain.optimizer"),
    (dict(MUON, roles={"gain": {"lr": 2.0}}), None, "optimizer.roles.gain.lr"),
    (dict(MUON, roles={"gain": {"optimizer": "muon"}}), None, "optimizer.roles.gain.optimizer"),
    (dict(MUON, schedule="cosine"), None, "optimizer.schedule"),
    (dict(MUON, schedule="cosine", warmup_steps=50), 20, "optimizer.warmup_steps"),
    (dict(MUON, schedule="exp"), 20, "optimizer.schedule"),
    (dict(MUON, role_rules=[(r"nothing/.*", "frozen")]), None, "optimizer.role_rules"),
    (dict(MUON, role_rules=[(r"head/.*", "frozn")]), None, "optimizer.role_rules[0]"),
    (dict(MUON, width_scaling={"base": 64}), None, "optimizer.width_scaling.base"),
    (dict(MUON, nap={"every": 0}), None, "optimizer.nap.every"),
    (dict(MUON, muon_axes=[(r"mha/query/kernel", ((0,), (0,)))]), None, "optimizer.muon_axes[0]"),
    (dict(MUON, grad_clip_norm=0.0), None, "optimizer.grad_clip_norm"),
])
def test_bad_configs_raise_one_line_naming_the_key(lm, config, total_steps, key):
  _, rp = lm
  with pytest.raises(reparam.ConfigError) as e:
    optim.make(config, RULES, rp, total_steps=total_steps)
  message = str(e.value)
  assert message.startswith(key + ":") and "\n" not in message, message


# -------------------------------------------------------------------------------------------------- jit

def test_unknown_projection_is_refused_naming_the_choices(lm):
  for build in (lambda: optim.make(dict(MUON, nap={"every": 1}), RULES, lm[1], projection="lazzy"),
                lambda: optim.make(MUON, RULES, lm[1], projection=True),     # checked even without NaP
                lambda: optim.normalize_and_project({"w": "matrix"}, projection="written")):
    with pytest.raises(reparam.ConfigError) as e:
      build()
    message = str(e.value)
    assert "projection must be one of eager, deferred, lazy" in message and "\n" not in message, message


@pytest.mark.parametrize("projection", optim.PROJECTIONS)
def test_jitted_train_step_compiles_once_and_can_donate_its_state(lm, projection):
  rp = jax.tree.map(jnp.copy, lm[1])       # donated below: the fixture's arrays must survive
  cfg = dict(MUON, schedule="cosine", warmup_steps=2, grad_clip_norm=1.0, nap={"every": 2})
  tx = optim.make(cfg, RULES, rp, total_steps=10, projection=projection)
  model, traces = LM(), []

  def loss(rp, tokens):
    logits = model.apply({"params": reparam.materialize(RULES, rp)}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  # Donation fails if two state leaves share a buffer (NaP's joint norm-layer target once did).
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(rp, state, tokens):
    traces.append(1)
    value, grads = jax.value_and_grad(loss)(rp, tokens)
    updates, state = tx.update(grads, state, rp)
    return optim.apply_updates(rp, updates, state), state, value

  state = tx.init(rp)
  rp1, state, l1 = train_step(rp, state, TOKENS)
  rp2, state, l2 = train_step(rp1, state, TOKENS)
  assert len(traces) == 1 and np.isfinite(l1) and np.isfinite(l2)


@pytest.mark.parametrize("small", [0, 2 ** 16])
def test_small_leaf_groups_are_updated_as_one_vector_with_the_same_numbers(lm, monkeypatch, small):
  """AdamW labels of small leaves of one dtype run under optax.flatten (one state vector per moment), others
  per leaf; the parameters after 3 steps equal optax.adamw on each leaf alone either way, and a label with
  mixed dtypes is not flattened."""
  _, rp = lm
  rp = jax.tree_util.tree_map_with_path(      # one bias in bf16: the bias label mixes dtypes
      lambda p, x: x.astype(jnp.bfloat16) if reparam.core.path_str(p) == "block_0/up/bias" else x, rp)
  monkeypatch.setattr(optim.build, "SMALL", small)
  grads = random_grads(rp, 3)
  cfg = dict(name="adamw", learning_rate=3e-3, weight_decay=0.1)
  history, state = run(optim.make(cfg, RULES, rp), rp, grads)
  table = optim.routing(cfg, RULES, rp)
  sizes = {}
  for r in table.values():
    sizes.setdefault(r.label, []).append(math.prod(r.shape))
  vectors = {x.size for x in jax.tree.leaves(state) if x.ndim == 1}
  for label in ("multiplier", "norm", "lowrank", "gain"):
    flat = sum(sizes[label]) in vectors and len(sizes[label]) > 1
    assert flat == (small > 0), label
  assert sum(sizes["bias"]) not in vectors        # mixed dtypes: per leaf
  for path, r in table.items():
    if r.optimizer == "adamw":
      ref = run_leaf(optax.adamw(3e-3, weight_decay=r.weight_decay), leaf(rp, path), [leaf(g, path) for g in grads])
      np.testing.assert_allclose(np.asarray(leaf(history[-1], path), np.float32), np.asarray(ref, np.float32),
                                 rtol=1e-5, atol=1e-7, err_msg=path)
