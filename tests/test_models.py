"""The experiment models: one training step each, causal masking, mean-only batch norm, norm placement, names."""
from types import SimpleNamespace

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
import pytest

import reparam
from experiments import models
from reparam.core import ConfigError

DIGITS = SimpleNamespace(name="digits", kind="classification", num_classes=10, input_shape=(8, 8, 1))
MARKOV = SimpleNamespace(name="markov", kind="lm", num_classes=11, input_shape=(12,))
TINY_LM = dict(name="transformer", d_model=16, num_heads=2, num_layers=2, mlp_ratio=2)


def inputs(dataset, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  if dataset.kind == "lm":
    x = rng.integers(dataset.num_classes, size=(batch,) + dataset.input_shape).astype(np.int32)
    return x, np.roll(x, -1, axis=1)
  return rng.random((batch,) + dataset.input_shape, np.float32), rng.integers(10, size=batch).astype(np.int32)


def one_step(config, dataset):
  """Init, then loss and gradient of one training step (batch_stats mutable, dropout rng given)."""
  model = models.make(config, dataset)
  x, y = inputs(dataset)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p):
    logits, new = model.apply({"params": p, **rest}, x, train=True, mutable=list(rest),
                              rngs={"dropout": jax.random.key(2)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  (loss, new), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)   # one compile, not per op
  return model, params, rest, new, loss, grads


@pytest.mark.parametrize("config, dataset", [
    (dict(name="mlp", hidden=(8, 8)), DIGITS),
    *[(dict(name="mlp", hidden=(8,), norm=n, act="gelu"), DIGITS) for n in models.NORMS[1:]],
    (dict(name="cnn", width=0.0625, depth=1, norm="mean_only_batch"), DIGITS),
    (TINY_LM, MARKOV), (dict(TINY_LM, norm="rms", use_bias=True), MARKOV)])
def test_one_training_step(config, dataset):
  _, params, rest, new, loss, grads = one_step(config, dataset)
  assert np.isfinite(float(loss))
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if "batch" in str(config.get("norm")):
    assert set(new) == {"batch_stats"} and jax.tree.structure(new) == jax.tree.structure(rest)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.make(dict(TINY_LM, dtype="bfloat16"), MARKOV)
  x, _ = inputs(MARKOV)
  params = model.init(jax.random.key(0), x)
  logits = model.apply(params, x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  assert logits.dtype == jnp.float32 and logits.shape == (4, 12, 11) and np.all(np.isfinite(logits))


def test_attention_is_causal():
  model = models.make(TINY_LM, MARKOV)
  x, _ = inputs(MARKOV)
  params = model.init(jax.random.key(0), x)
  t = 5
  changed = x.copy()
  changed[:, t] = (changed[:, t] + 1) % MARKOV.num_classes
  a, b = model.apply(params, x), model.apply(params, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
  assert np.all(np.abs(a[:, t:] - b[:, t:]).max(-1) > 1e-4)   # and every later position sees it


def test_mean_only_batch_norm_train_and_eval():
  bn = models.MeanOnlyBatchNorm()
  x = np.random.default_rng(0).normal(3.0, 2.0, (16, 5, 7)).astype(np.float32)
  variables = bn.init(jax.random.key(0), x)
  variables = {"params": {"bias": jnp.arange(7.0)}, **{k: v for k, v in variables.items() if k != "params"}}
  y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  mean = x.mean((0, 1))
  np.testing.assert_allclose(y, x - mean + np.arange(7.0), atol=1e-5)          # no variance division
  np.testing.assert_allclose(new["batch_stats"]["mean"], (1 - models.BN_MOMENTUM) * mean, rtol=1e-5)
  running = np.full(7, 0.5, np.float32)
  y_eval = bn.apply({**variables, "batch_stats": {"mean": running}}, x, train=False)
  np.testing.assert_allclose(y_eval, x - running + np.arange(7.0), atol=1e-5)


def test_norm_before_each_nonlinearity_and_no_redundant_bias():
  model = models.make(dict(name="mlp", hidden=(6, 5), norm="layer"), DIGITS)
  x, _ = inputs(DIGITS)
  params = model.init(jax.random.key(0), x)["params"]
  assert set(params) == {"Dense_0", "norm_0", "Dense_1", "norm_1", "head"}
  assert set(params["Dense_0"]) == {"kernel"} and set(params["norm_0"]) == {"scale", "bias"}
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name:
      calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    logits, inter = model.apply({"params": params}, x, capture_intermediates=True)
  assert calls == ["Dense_0", "norm_0", "Dense_1", "norm_1", "head"]
  normed = inter["intermediates"]["norm_1"]["__call__"][0]
  head = params["head"]
  np.testing.assert_allclose(logits, nn.relu(normed) @ head["kernel"] + head["bias"], atol=1e-5)
  rms = models.make(dict(name="mlp", hidden=(6,), norm="rms"), DIGITS).init(jax.random.key(0), x)["params"]
  assert set(rms["Dense_0"]) == {"kernel", "bias"} and set(rms["norm_0"]) == {"scale"}   # no offset: keep bias


def test_parameter_names_and_roles():
  model = models.make(dict(TINY_LM, num_layers=1), MARKOV)
  params = model.init(jax.random.key(0), inputs(MARKOV)[0])["params"]
  paths = set(reparam.flatten(params))
  block = {f"block_0/{m}/kernel" for m in ("query", "key", "value", "out", "mlp_in", "mlp_out")}
  norms = {f"{n}/{p}" for n in ("block_0/attn_norm", "block_0/mlp_norm", "final_norm") for p in ("scale", "bias")}
  assert paths == {"embed/embedding", "head/kernel"} | block | norms
  assert all(params["block_0"][m]["kernel"].shape == (16, 16) for m in ("query", "key", "value", "out"))
  roles = reparam.flatten(reparam.roles([], params))
  assert (roles["embed/embedding"], roles["head/kernel"], roles["block_0/query/kernel"],
          roles["final_norm/scale"]) == ("embedding", "head", "matrix", "norm")
  cnn = models.make(dict(name="cnn", width=0.0625, depth=1, norm="batch"), DIGITS)
  variables = cnn.init(jax.random.key(0), inputs(DIGITS)[0])
  assert set(variables["params"]) == {f"Conv_{i}" for i in range(5)} | {f"norm_{i}" for i in range(5)} | {"head"}
  assert "bias" not in variables["params"]["Conv_0"] and set(variables["batch_stats"]) == {f"norm_{i}"
                                                                                              for i in range(5)}


def test_full_size_cnn_shapes():
  cifar = SimpleNamespace(name="cifar10", kind="classification", num_classes=10, input_shape=(32, 32, 3))
  shapes = jax.eval_shape(lambda: models.make({"name": "cnn"}, cifar).init(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3))))["params"]
  assert shapes["Conv_0"]["kernel"].shape == (3, 3, 3, 96) and shapes["Conv_6"]["kernel"].shape == (3, 3, 192, 192)
  assert shapes["Conv_8"]["kernel"].shape == (1, 1, 192, 192) and shapes["head"]["kernel"].shape == (192, 10)


@pytest.mark.parametrize("config, dataset, key", [
    ({"name": "resnet"}, DIGITS, "model.name"), ({"name": "mlp", "norm": "group"}, DIGITS, "model.norm"),
    ({"name": "mlp", "act": "swish2"}, DIGITS, "model.act"), ({"name": "transformer"}, DIGITS, "model.name"),
    ({"name": "mlp"}, MARKOV, "model.name"), (dict(TINY_LM, num_heads=3), MARKOV, "model.d_model"),
    (dict(TINY_LM, dtype="float64"), MARKOV, "model.dtype"), ({"name": "cnn", "depth": 0}, DIGITS, "model.depth")])
def test_config_errors_name_the_key(config, dataset, key):
  with pytest.raises(ConfigError, match=key) as e:
    models.make(config, dataset)
  assert "\n" not in str(e.value)
