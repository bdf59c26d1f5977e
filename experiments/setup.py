"""From a config to everything a run needs: data, model, rules, wrapped parameters, optimizer, forward.

All validation happens here, before a run writes anything: a bad name, option or rule raises one
`ConfigError` naming the config key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import reparam
from experiments import data, models
from reparam.transforms.weight_norm import data_dependent_init


@dataclasses.dataclass
class Setup:
  config: Any
  dataset: Any
  model: Any
  rules: list
  params: dict            # the model's own parameters (pretrained ones with `init_from`)
  collections: dict       # other variable collections, e.g. batch_stats
  rparams: dict
  tx: Any
  forward: Callable       # (rparams, collections, x, train, rng) -> (logits, collections)
  eval_step: Callable     # (params, collections, batch) -> (loss, accuracy, weight)


def loss_and_accuracy(logits, labels, mask=None):
  """Mean cross-entropy (nats) and accuracy; for an LM, per token. `mask` weights examples (eval padding)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  w = jnp.ones_like(ce) if mask is None else jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (ce.ndim - 1)),
                                                              ce.shape)
  return jnp.sum(ce * w) / jnp.sum(w), jnp.sum(correct * w) / jnp.sum(w), jnp.sum(w)


def rules_from_config(cfg) -> list:
  """`reparam.rules` if given, else `[(exclude, None), (targets, transform)]` from the shorthand keys."""
  if cfg.get("rules"):
    return reparam.rules_from_spec(cfg.rules, "reparam.rules")
  t = reparam.from_spec(cfg.transform, "reparam.transform")
  if t is None:
    return []
  return ([(cfg.exclude, None)] if cfg.get("exclude") else []) + [(cfg.targets, t)]


def _check_positive(config, keys) -> None:
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    if not isinstance(node, (int, np.integer)) or isinstance(node, bool) or node <= 0:
      raise reparam.ConfigError(f"{key}={node!r} must be a positive integer")


def _load_pretrained(params: dict, path: str) -> dict:
  """Leaves of `params` replaced by the same-path, same-shape leaves of a finished run's params.msgpack."""
  file = os.path.join(path, "params.msgpack") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise reparam.ConfigError(f"init_from={path!r}: no params.msgpack there (is the pretraining run finished?)")
  with open(file, "rb") as f:
    loaded = reparam.flatten(serialization.msgpack_restore(f.read()))

  def pick(p, x):
    y = loaded.get(reparam.core.path_str(p))
    return x if y is None or y.shape != x.shape else jax.numpy.asarray(y, x.dtype)

  return jax.tree_util.tree_map_with_path(pick, params)


def build(config) -> Setup:
  _check_positive(config, ["train.steps", "train.log_every", "data.batch_size", "data.eval_batch_size"])
  devices = jax.device_count()
  if config.data.batch_size % devices:
    raise reparam.ConfigError(f"data.batch_size={config.data.batch_size} must be a multiple of the "
                              f"{devices} devices it is split over")
  rules = rules_from_config(config.reparam)
  dataset = data.load(config.data)
  model = models.make(config.model, dataset)
  key = jax.random.key(config.seed)
  x = dataset.batch(0, 2, config.seed)["x"]
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x, train=False))(key)
  params, collections = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  if config.get("init_from"):
    params = _load_pretrained(params, config.init_from)
  rparams = reparam.init(rules, params, jax.random.fold_in(key, 1))
  if config.reparam.get("data_init"):
    batch = dataset.batch(0, config.data.batch_size, config.seed)["x"]
    rparams = data_dependent_init(rules, model, rparams, batch, train=False, collections=collections)
  tx = reparam.optim.make(config.optimizer, rules, rparams, total_steps=config.train.steps)
  return Setup(config, dataset, model, rules, params, collections, rparams, tx,
               _forward_fn(model, rules, config.train.get("fast_path", True)), _eval_fn(model))


def _forward_fn(model, rules, fast: bool):
  def forward(rp, collections, x, train, rng):
    mutable = list(collections) if (train and collections) else False
    kwargs = dict(train=train, rngs={"dropout": rng}, mutable=mutable)
    if fast and hasattr(reparam, "apply"):
      out = reparam.apply(rules, model, rp, x, collections=collections, **kwargs)
    else:
      out = model.apply({"params": reparam.materialize(rules, rp), **collections}, x, **kwargs)
    return (out[0], {**collections, **out[1]}) if mutable else (out, collections)
  return forward


def _eval_fn(model):
  @jax.jit
  def eval_step(params, collections, batch):
    logits = model.apply({"params": params, **collections}, batch["x"], train=False)
    return loss_and_accuracy(logits, batch["y"], batch["mask"])
  return eval_step


def format_matches(rules, params) -> str:
  """What matched what, as the aligned table a run writes to routing.txt."""
  rows = [("path", "shape", "rule", "transform")] + [
      (p, str(s), r, t) for p, s, r, t in reparam.matches(rules, params)]
  if len(rows) == 1:
    return "no reparameterization rules: every parameter is trained as is"
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
