"""Shared config pieces: the base config every experiment extends, `parse_arg`, and the sweep helpers.

Sweeps are lists of override dicts, built like big_vision's `get_hyper`:

    product(sweep("reparam.transform", ["none", "weight_norm"]), sweep("seed", [0, 1]))
    == [{"reparam.transform": "none", "seed": 0}, {"reparam.transform": "none", "seed": 1}, ...]
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

Overrides = list[dict[str, Any]]


def sweep(key: str, values: Sequence[Any]) -> Overrides:
  """One axis: `[{key: v} for v in values]`."""
  return [{key: v} for v in values]


def product(*axes: Overrides) -> Overrides:
  """Every combination, the first axis varying slowest."""
  return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*axes)]


def zip_(*axes: Overrides) -> Overrides:
  """Axes taken together, element by element (they must have the same length)."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"zip_ needs axes of one length, got lengths {sorted(lengths)}")
  return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*axes)]


def concat(*sweeps: Overrides) -> Overrides:
  """Sweeps one after another (e.g. arms with different hyper-parameter grids)."""
  return [d for s in sweeps for d in s]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"smoke,steps=100"` -> ConfigDict(smoke=True, steps=100), typed by `defaults` (big_vision style)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not one of: {', '.join(defaults)}")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes", "")) if kind is bool else kind(value) if value else True
  return out


def base(name: str) -> ml_collections.ConfigDict:
  """The keys every run has (a locked config rejects unknown overrides, so all keys live here)."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0
  c.init_from = config_dict.placeholder(str)    # a finished run's workdir: fine-tune its parameters
  c.data = data_config()
  c.model = model_config()
  c.reparam = ml_collections.ConfigDict(dict(
      transform="none",            # a transform spec: "weight_norm", "dora(rank=4)", "chain(...)"
      targets=r".*kernel",         # which leaves it wraps (re.fullmatch on "/"-joined paths)
      exclude=r"head/.*",          # wrapped by nothing (a first rule mapping to None); "" for none
      rules=(),                    # full rules ((regex, spec), ...): when set, replaces the three above
      data_init=False,             # weight norm's data-dependent init on the first batch
  ))
  ph = config_dict.placeholder
  c.optimizer = ml_collections.ConfigDict(dict(      # reparam/optim/config.py documents every key
      name="adamw", learning_rate=3e-3, adam_learning_rate=3e-3, weight_decay=0.0, b1=0.9, b2=0.999,
      schedule="cosine", warmup_steps=20, min_lr_ratio=0.0, grad_clip_norm=ph(float), nap=ph(bool),
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=200, log_every=20, eval_every=100, checkpoint_every=100, diagnostics_every=50,
      keep_checkpoints=2, skip_nonfinite=False, fast_path=True, progress=True, tensorboard=True,
      verbose=False,
      space="auto",      # fast path per layer: "auto" (off CPU, weight space where cheaper) or "activation"
  ))
  c.report = ml_collections.ConfigDict(dict(
      metric="eval_loss", mode="min",                    # what ranks configurations and picks the best lr
      metrics=("eval_loss", "eval_accuracy", "train_loss"),
      target=config_dict.placeholder(float), target_metric="train_loss",   # "steps to target" column
  ))
  return c


def data_config() -> ml_collections.ConfigDict:
  """Every data key (experiments/data.py); `None` means the dataset's default."""
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      name="digits", batch_size=64, eval_batch_size=512,
      dir=ph(str),                 # TFDS data_dir with prepared (array_record) data
      seq_len=ph(int), eval_examples=ph(int),                          # language models
      vocab_size=ph(int), order=ph(int), concentration=ph(float), train_tokens=ph(int),   # markov source
      train_size=ph(int), task=ph(int), task_kind=ph(str), steps_per_task=ph(int),   # task sequences
      source_seed=ph(int),         # fixes the Markov table / task permutations across seeds
  ))


def model_config() -> ml_collections.ConfigDict:
  """Every model key (experiments/models.py); `None` means the model's default."""
  ph = config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      name="mlp", hidden=ph(tuple), act=ph(str), norm=ph(str),        # mlp (norm also cnn, transformer)
      width=ph(float), depth=ph(int), dropout=ph(float), input_noise=ph(float),   # cnn
      d_model=ph(int), num_heads=ph(int), num_layers=ph(int), mlp_ratio=ph(int), use_bias=ph(bool),
      dtype=ph(str),                                                     # transformer
  ))
