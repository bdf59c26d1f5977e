"""The rules API on real Flax models (linen and NNX): init, materialize, merge, roles, errors, jit behaviour."""
import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
import pytest
from flax import nnx

import reparam
from reparam.transforms.weight_norm import data_dependent_init


class Net(nn.Module):
  """Conv, Dense, LayerNorm, attention (DenseGeneral kernels) and a head: every kernel layout Flax has."""

  @nn.compact
  def __call__(self, x):                                   # x: (B, 8, 8, 1)
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], 16, 16)                      # 16 tokens of width 16
    x = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=16)(x)
    x = nn.relu(nn.Dense(12)(x.mean(1)))
    return nn.Dense(3, name="head")(x)


QKV = dict(in_axes=0, out_axes=(1, 2))
RULES = [
    (r"head/.*", None),
    (r".*/(query|key|value)/kernel", reparam.dora(rank=2, **QKV)),
    (r".*/out/kernel", reparam.multipliers(row=True, col=True, in_axes=(0, 1), out_axes=2)),
    (r"Conv_0/kernel", reparam.weight_norm()),
    (r"Dense_0/kernel", reparam.chain(reparam.dora(rank=4), reparam.multipliers(row=True))),
]


@pytest.fixture(scope="module")
def setup():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  params = model.init(jax.random.key(1), x)["params"]
  return model, x, params


def test_init_materialize_is_identity_on_a_real_model(setup):
  model, x, params = setup
  rp = reparam.init(RULES, params, jax.random.key(2))
  assert set(rp["Dense_0"]["kernel"]) == {"w", "dora", "multipliers"}
  assert rp["MultiHeadDotProductAttention_0"]["query"]["kernel"]["B"].shape == (2, 2, 4)
  assert rp["MultiHeadDotProductAttention_0"]["out"]["kernel"]["col"].shape == (2, 4)
  assert rp["head"]["kernel"] is params["head"]["kernel"]
  mat = reparam.materialize(RULES, rp)
  assert jax.tree.structure(mat) == jax.tree.structure(params)
  np.testing.assert_allclose(model.apply({"params": mat}, x), model.apply({"params": params}, x), atol=1e-5)


def perturbed(rp, key):
  """Every trainable-looking factor moved away from its init, so merge/grad checks are not trivial."""
  leaves, tree = jax.tree.flatten(rp)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_merge_equals_materialize(setup):
  model, x, params = setup
  rp = perturbed(reparam.init(RULES, params, jax.random.key(2)), jax.random.key(3))
  merged = reparam.merge(RULES, rp)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(reparam.materialize(RULES, rp))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.apply({"params": merged}, x),
                             model.apply({"params": reparam.materialize(RULES, rp)}, x), rtol=1e-5, atol=1e-5)


def test_merge_compiles_once_per_rules_and_tells_transforms_apart():
  """Evaluation merges at every eval: it must not recompile each time; but rules with another transform object
  (another computation) must not hit the first one's cache."""
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  rules = [(r"kernel", reparam.multipliers(row=True))]
  rp = reparam.init(rules, params, jax.random.key(1))
  rp["kernel"]["row"] = jnp.array([1.0, 2.0, 3.0])
  before = reparam.core._merge._cache_size()
  for _ in range(3):
    merged = reparam.merge(list(rules), rp)             # a new list of the same rules: the same entry
  assert reparam.core._merge._cache_size() == before + 1
  np.testing.assert_allclose(merged["kernel"], params["kernel"] * np.array([1.0, 2.0, 3.0]), rtol=1e-6)
  # Same regex, same factor shapes, another computation: LoRA's scale α/r is 1 in one, 2 in the other.
  lora1, lora2 = ([(r"kernel", reparam.lora(rank=1, alpha=a))] for a in (1.0, 2.0))
  rp2 = reparam.init(lora1, params, jax.random.key(1))
  rp2["kernel"]["B"] = jnp.ones((1, 3))
  ab = np.asarray(rp2["kernel"]["A"]) @ np.ones((1, 3))
  np.testing.assert_allclose(reparam.merge(lora1, rp2)["kernel"], params["kernel"] + ab, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reparam.merge(lora2, rp2)["kernel"], params["kernel"] + 2 * ab, rtol=1e-5, atol=1e-6)
  assert reparam.core._merge._cache_size() == before + 3


def test_roles_tree(setup):
  _, _, params = setup
  rp = reparam.init(RULES, params, jax.random.key(2))
  r = reparam.roles(RULES, rp)
  assert jax.tree.structure(r) == jax.tree.structure(rp)
  assert r["Dense_0"]["kernel"] == {"w": "frozen", "multipliers": {"row": "multiplier"},
                                    "dora": {"A": "lowrank", "B": "lowrank", "m": "gain", "k0_sq": "frozen"}}
  assert r["Conv_0"] == {"kernel": {"w": "matrix", "g": "gain"}, "bias": "bias"}
  assert r["LayerNorm_0"] == {"scale": "norm", "bias": "norm"}
  assert r["head"] == {"kernel": "head", "bias": "bias"}
  mha = r["MultiHeadDotProductAttention_0"]
  assert mha["out"]["kernel"] == {"w": "matrix", "row": "multiplier", "col": "multiplier"}
  r2 = reparam.roles(RULES, rp, role_rules=[(r"head/.*", "frozen"), (r"Conv_0/kernel/g", "multiplier")])
  assert r2["head"] == {"kernel": "frozen", "bias": "frozen"} and r2["Conv_0"]["kernel"]["g"] == "multiplier"
  assert set(jax.tree.leaves(r)) <= set(reparam.ROLES)


def test_embedding_and_head_are_recognized():
  class LM(nn.Module):
    @nn.compact
    def __call__(self, t):
      h = nn.Embed(11, 8)(t)
      h = nn.Dense(8)(h)
      return nn.Dense(11, name="lm_head")(nn.RMSNorm()(h))
  p = LM().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]
  r = reparam.roles([], p)
  assert r["Embed_0"]["embedding"] == "embedding" and r["lm_head"]["kernel"] == "head"
  assert r["Dense_0"]["kernel"] == "matrix" and r["RMSNorm_0"]["scale"] == "norm"


def test_gradients_reach_exactly_the_trainable_leaves(setup):
  model, x, params = setup
  rp = perturbed(reparam.init(RULES, params, jax.random.key(2)), jax.random.key(3))
  roles = reparam.roles(RULES, rp)

  def loss(rp):
    return jnp.sum(model.apply({"params": reparam.materialize(RULES, rp)}, x) ** 2)

  grads = jax.grad(loss)(rp)
  for (path, g), role in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(roles)):
    name = reparam.core.path_str(path)
    if role == "frozen":
      assert not np.any(g), f"frozen {name} got a gradient"
    else:
      assert np.any(g), f"trainable {name} ({role}) got no gradient"


def test_jitted_loss_does_not_recompile(setup):
  model, x, params = setup
  rp = reparam.init(RULES, params, jax.random.key(2))
  traces = []

  @jax.jit
  def step(rp, opt_state):
    traces.append(1)
    loss, g = jax.value_and_grad(lambda rp: jnp.mean(model.apply({"params": reparam.materialize(RULES, rp)}, x)
                                                      ** 2))(rp)
    upd, opt_state = opt.update(g, opt_state, rp)
    return optax.apply_updates(rp, upd), opt_state, loss

  opt = optax.adam(1e-2)
  state = opt.init(rp)
  for _ in range(3):
    rp, state, _ = step(rp, state)
  assert len(traces) == 1 and step._cache_size() == 1


def test_nnx_model_through_split_and_merge():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(5, 7, rngs=rngs), nnx.Linear(7, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5))
  graphdef, state = nnx.split(model, nnx.Param)
  rules = [(r"l1/kernel", reparam.weight_norm()), (r"l2/kernel", reparam.lora(rank=2))]
  rp = reparam.init(rules, nnx.to_pure_dict(state), jax.random.key(2))
  rp["l1"]["kernel"]["g"] = rp["l1"]["kernel"]["g"] * 2.0          # double every hidden unit's scale

  def forward(rp):
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, reparam.materialize(rules, rp))
    return nnx.merge(graphdef, s)(x)

  ref = model.l2(nnx.relu(2.0 * model.l1(x) - model.l1.bias[...]))
  np.testing.assert_allclose(forward(rp), ref, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda rp: jnp.sum(forward(rp)))(rp)
  assert np.any(g["l1"]["kernel"]["g"]) and not np.any(g["l2"]["kernel"]["w"])


def test_data_dependent_init_standardizes_preactivations():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(6, (3, 3))(x))
      return nn.Dense(5)(x.reshape(x.shape[0], -1))

  model = CNN()
  x = 3.0 * jax.random.normal(jax.random.key(0), (32, 6, 6, 2)) + 1.0
  params = model.init(jax.random.key(1), x)["params"]
  rules = [(r".*kernel", reparam.weight_norm())]
  rp = data_dependent_init(rules, model, reparam.init(rules, params, jax.random.key(2)), x)
  p = reparam.materialize(rules, rp)
  # Independent float64 recomputation of each layer's pre-activations with the new parameters.
  X = np.asarray(x, np.float64)
  K = np.asarray(p["Conv_0"]["kernel"], np.float64)
  pre1 = np.asarray(jax.lax.conv_general_dilated(X, K, (1, 1), "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"))) + np.asarray(p["Conv_0"]["bias"])
  pre2 = np.maximum(pre1, 0).reshape(32, -1) @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(
      p["Dense_0"]["bias"])
  for pre in (pre1.reshape(-1, 6), pre2):
    np.testing.assert_allclose(pre.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(pre.std(0), 1, atol=1e-3)


def test_clear_errors_before_compute(setup):
  _, _, params = setup
  with pytest.raises(reparam.ConfigError, match=r"rule '.\*/nope' matches no parameter; parameter paths are"):
    reparam.init([(r".*/nope", reparam.weight_norm())], params, jax.random.key(0))
  with pytest.raises(reparam.ConfigError, match=r"Dense_0/bias \(shape \(12,\)\): weight_norm: needs a kernel"):
    reparam.init([(r"Dense_0/.*", reparam.weight_norm())], params, jax.random.key(0))
  with pytest.raises(reparam.ConfigError, match=r"head/kernel \(shape \(12, 3\)\): lora: rank=8 must be"):
    reparam.init([(r"head/kernel", reparam.lora(rank=8))], params, jax.random.key(0))
  with pytest.raises(reparam.ConfigError, match="taken by an earlier rule"):
    reparam.init([(r".*kernel", None), (r"head/kernel", reparam.lora(rank=1))], params, jax.random.key(0))
  with pytest.raises(reparam.ConfigError, match="not a valid regex"):
    reparam.init([(r"(", None)], params, jax.random.key(0))
  with pytest.raises(reparam.ConfigError, match="not a role; valid roles: matrix, frozen"):
    reparam.roles([], params, role_rules=[("head/.*", "frozn")])


def test_transforms_from_config_data():
  t = reparam.from_spec("chain(dora(rank=4, alpha=8), multipliers(row=True))")
  assert t.name == "chain" and t.roles["dora"]["m"] == "gain"
  assert reparam.from_spec({"name": "lora", "rank": 2}).name == "lora"
  assert reparam.from_spec(["weight_norm", {"name": "multipliers", "scalar": True}]).roles == {
      "weight_norm": {"g": "gain"}, "multipliers": {"scalar": "multiplier"}}
  assert reparam.from_spec("none") is None
  rules = reparam.rules_from_spec([(".*kernel", "weight_norm"), ("head/.*", None)])
  assert rules[0][1].name == "weight_norm" and rules[1][1] is None
  for bad, msg in [("drop", r"model.rules\[0\]: unknown transform 'drop'; valid: dora, identity, lora"),
                   ("lora", r"lora\(\) needs rank"),
                   ("lora(rank=2, alhpa=3)", r"lora\(\) has no option 'alhpa'; valid: rank, alpha"),
                   ("lora(2)", "pass lora\\(\\) options by name"),
                   ("multipliers()", "choose at least one")]:
    with pytest.raises(reparam.ConfigError, match=msg):
      reparam.rules_from_spec([(".*", bad)], where="model.rules")


def test_an_empty_chain_is_refused():
  """`chain()` used to be accepted as the identity: most often a list of stages that came out empty by mistake."""
  with pytest.raises(reparam.ConfigError, match=r"^chain needs at least one transform, e.g. chain\(weight_norm\(\)"):
    reparam.chain()
  for spec in ("chain()", " chain( ) ", [], ()):
    with pytest.raises(reparam.ConfigError, match=r"^model.rules\[0\]: chain needs at least one transform, e.g. "
                                                  r"'chain\(weight_norm, multipliers\(row=True\)\)'"):
      reparam.rules_from_spec([(".*", spec)], where="model.rules")
