"""From a config to everything a run needs: data, model, rules, wrapped parameters, optimizer, forward.

All validation happens here, before a run writes anything: a bad name, option or rule raises one
`ConfigError` naming the config key and the valid choices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import reparam
from experiments import data, models
from reparam.transforms.weight_norm import data_dependent_init

# The model's init runs once per run, yet at XLA's default optimization level its unrolled random-number
# kernels took ~1 s to compile on CPU (a fifth of a vmapped 8-seed quickstart run). At level 1 every config's
# model compiled 1.4-3x faster here, to the same bits (tests/test_train.py checks the quickstart MLP and a CNN).
# Measured on CPU only: on an accelerator the init keeps XLA's defaults.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


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
  forward: Callable       # (rparams, collections, x, train, rng, scales=None) -> (logits, collections)
  eval_step: Callable     # (params, collections, batch) -> (loss, accuracy, weight)
  init_fn: Callable = None  # jitted (key, x) -> the model's variables


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
  for key in ("exclude", "targets"):     # named by their config key, not as rules[i]
    try:
      re.compile(cfg.get(key) or "")
    except re.error as e:
      raise reparam.ConfigError(f"reparam.{key}={cfg.get(key)!r} is not a valid regex: {e}") from None
  return ([(cfg.exclude, None)] if cfg.get("exclude") else []) + [(cfg.targets, t)]


def _init_rparams(cfg, rules, params, key):
  """`reparam.init`, its errors (a rule matching nothing, a rank too large for a leaf) prefixed with the keys
  that made the rules."""
  try:
    return reparam.init(rules, params, key)
  except reparam.ConfigError as e:
    where = ("reparam.rules" if cfg.get("rules") else
             f"reparam.transform={cfg.transform!r} on reparam.targets={cfg.targets!r}")
    raise reparam.ConfigError(f"{where}: {e}") from None


def _check_positive(config, keys, zero_ok: bool = False) -> None:
  """Integers >= 1 (or >= 0, and None, for the intervals where 0 or None means never)."""
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    if zero_ok and node is None:
      continue
    if not isinstance(node, (int, np.integer)) or isinstance(node, bool) or node < (0 if zero_ok else 1):
      raise reparam.ConfigError(f"{key}={node!r} must be a " +
                                ("non-negative integer (0: never)" if zero_ok else "positive integer"))


def _validate(config) -> None:
  """The checks of plain values, before any data or model."""
  _check_positive(config, ["train.steps", "train.log_every", "data.batch_size", "data.eval_batch_size"])
  _check_positive(config, ["train.eval_every", "train.checkpoint_every", "train.diagnostics_every"], zero_ok=True)
  if config.train.get("keep_checkpoints") is not None:      # None: orbax keeps every checkpoint
    _check_positive(config, ["train.keep_checkpoints"])
  space = config.train.get("space", "auto")
  if space not in reparam.fast.SPACES:
    raise reparam.ConfigError(f"train.space={space!r} is not one of: {', '.join(reparam.fast.SPACES)}")
  seed = config.get("seed")      # numpy's generators refuse a negative seed, deep inside the first batch
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise reparam.ConfigError(f"seed={seed!r} must be a non-negative integer")
  devices = jax.device_count()
  if config.data.batch_size % devices:
    raise reparam.ConfigError(f"data.batch_size={config.data.batch_size} must be a multiple of the "
                              f"{devices} devices it is split over")


class _DropNotPrepared(logging.Filter):
  """tfds warns that a dataset folder has no dataset_info.json right before data.load raises its own error
  about unprepared data: a second line on stderr saying less."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tfds():
  log, drop = logging.getLogger("absl"), _DropNotPrepared()
  log.addFilter(drop)
  try:
    yield
  finally:
    log.removeFilter(drop)


def _check_data_init(cfg, rules) -> None:
  """`data_init` acts on plain `weight_norm()` rules only; without one it would do nothing, silently."""
  if cfg.get("data_init") and not any(t is not None and t.name == "weight_norm" for _, t in rules):
    raise reparam.ConfigError(f"reparam.data_init=True needs a plain weight_norm transform to initialize; "
                              f"reparam.transform={cfg.transform!r}" + (" with reparam.rules" if cfg.get("rules")
                                                                       else ""))


def _load_pretrained(params: dict, path: str) -> dict:
  """`params` with every leaf replaced by the same-path leaf of a finished run's params.msgpack (in the model's
  dtype).

  The file must hold this model's whole tree, every leaf with the model's shape: a leaf whose shape differs, a
  leaf missing from the file and a leaf the model lacks are one ConfigError naming the first of each. Any of them
  means `init_from` names a run of another model (another width, depth or vocabulary), and these leaves used to
  stay at their random init without a word. Skipping leaves missing from the file is not intended anywhere:
  `init_from` starts from a whole pretrained model (configs/dora.py fine-tunes the very model its `pretrain`
  trial trained and freezes its embedding, head and norms, which would be frozen noise if left unloaded), and
  a model with a new part (e.g. another head) would first need a config key naming what may stay at init.
  """
  file = os.path.join(path, "params.msgpack") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise reparam.ConfigError(f"init_from={path!r}: no params.msgpack there (is the pretraining run finished?)")
  try:
    with open(file, "rb") as f:
      loaded = reparam.flatten(serialization.msgpack_restore(f.read()))
  except Exception as e:  # noqa: BLE001  msgpack raises its own types for a file that is not a parameter tree
    raise reparam.ConfigError(f"init_from={path!r}: " + (f"{file!r}: " if file != path else "") +
                              f"not the params.msgpack of a finished run ({type(e).__name__}: {str(e)[:100]})"
                              ) from None
  _check_same_tree(path, loaded, reparam.flatten(params))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.numpy.asarray(loaded[reparam.core.path_str(p)], x.dtype), params)


def _check_same_tree(path: str, loaded: dict, model: dict) -> None:
  """One line naming the first leaves (up to three of each kind) where a pretrained tree and the model differ."""
  def first(items: list[str], sep: str = ", ") -> str:
    return sep.join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

  shapes = [f"{p} is {tuple(loaded[p].shape)} there, {tuple(x.shape)} here" for p, x in model.items()
            if p in loaded and tuple(loaded[p].shape) != tuple(x.shape)]
  missing = [p for p in model if p not in loaded]
  extra = [p for p in loaded if p not in model]
  parts = ([first(shapes, "; ")] if shapes else []) + ([f"missing there: {first(missing)}"] if missing else []
                                                       ) + ([f"not in this model: {first(extra)}"] if extra else [])
  if parts:
    raise reparam.ConfigError(f"init_from={path!r} holds another model's parameters: {'; '.join(parts)}; use the "
                              f"model config of the run it names")


def build(config, like: Setup | None = None) -> Setup:
  """Everything a run of `config` needs. `like` is the Setup of a run whose config differs only in `seed` (the
  seeds of a vmapped group): its data, model, rules, optimizer and compiled init are reused, and only this
  seed's parameters are initialized."""
  if like is None:
    _validate(config)
    rules = rules_from_config(config.reparam)
    _check_data_init(config.reparam, rules)
    with _quiet_tfds():
      dataset = data.load(config.data)
    model = models.make(config.model, dataset)
    def init_variables(k, x):
      return model.init({"params": k, "dropout": k}, x, train=False)
    on_cpu = jax.default_backend() == "cpu"
    init_fn = jax.jit(init_variables, compiler_options=INIT_COMPILER_OPTIONS if on_cpu else None)
  else:
    rules, dataset, model, init_fn = like.rules, like.dataset, like.model, like.init_fn
  key = jax.random.key(config.seed)
  x = dataset.batch(0, 2, config.seed)["x"]
  variables = init_fn(key, x)
  params, collections = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  if config.get("init_from"):
    params = _load_pretrained(params, config.init_from)
  rparams = _init_rparams(config.reparam, rules, params, jax.random.fold_in(key, 1))
  if config.reparam.get("data_init"):
    batch = dataset.batch(0, config.data.batch_size, config.seed)["x"]
    # In train mode, as the paper's code: the statistics are those training sees (dropout, input noise, batch
    # statistics); in eval mode a CNN with dropout 0.5 started with ~8x too large logits.
    rparams = data_dependent_init(rules, model, rparams, batch, train=True, collections=collections,
                                  rngs={"dropout": jax.random.fold_in(key, 2)}, mutable=list(collections))
  if like is not None:
    return dataclasses.replace(like, config=config, params=params, collections=collections, rparams=rparams)
  # NaP projects lazily: the state holds the unprojected q and the step computes with c·q in activation space
  # (`train.make_train_step`); three passes over every projected weight fewer than writing the projection.
  tx = reparam.optim.make(config.optimizer, rules, rparams, total_steps=config.train.steps, projection="lazy")
  return Setup(config, dataset, model, rules, params, collections, rparams, tx,
               forward_fn(model, rules, config.train.get("fast_path", True), config.train.get("space", "auto")),
               _eval_fn(model), init_fn)


def check(config, datasets: dict | None = None) -> None:
  """Every check of `build` except `init_from`, computing nothing (shapes come from `jax.eval_shape`): a sweep
  checks all its trials before it starts the first, so a bad value in its last trial fails in seconds, not
  hours in. `init_from` is left out: it may name a trial of the same sweep that has not run yet.
  `datasets` caches loaded datasets by their config across calls."""
  _validate(config)
  rules = rules_from_config(config.reparam)
  _check_data_init(config.reparam, rules)
  cache_key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
  if datasets is None or cache_key not in datasets:
    with _quiet_tfds():
      dataset = data.load(config.data)
    if datasets is not None:
      datasets[cache_key] = dataset
  dataset = datasets[cache_key] if datasets is not None else dataset
  model = models.make(config.model, dataset)
  x = dataset.batch(0, 2, config.seed)["x"]
  key = jax.random.key(config.seed)
  params = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, x, train=False), key)["params"]
  rparams = jax.eval_shape(lambda p, k: _init_rparams(config.reparam, rules, p, k), params, key)
  reparam.optim.make(config.optimizer, rules, rparams, total_steps=config.train.steps)


def forward_fn(model, rules, fast: bool, space: str = "auto"):
  def forward(rp, collections, x, train, rng, scales=None):
    """`scales`: NaP's lazy projection (`reparam.optim.projection_scales`): the model computes with c·q."""
    mutable = list(collections) if (train and collections) else False
    kwargs = dict(train=train, rngs={"dropout": rng}, mutable=mutable)
    if fast and hasattr(reparam, "apply"):
      out = reparam.apply(rules, model, rp, x, collections=collections, space=space, scales=scales, **kwargs)
    else:
      params = reparam.materialize(rules, reparam.core.scaled(rp, scales or {}))
      out = model.apply({"params": params, **collections}, x, **kwargs)
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
