"""Datasets whose batches are pure functions of (seed, step): a resumed run sees exactly the batches an uninterrupted
run would, and a sweep gets each seed's batch by calling `batch` once per seed.

    ds = data.load(config.data)               # bad config -> ConfigError, before any compute or download
    b = ds.batch(step, batch_size, seed)      # {"x": ..., "y": int32}, numpy
    for b in ds.eval_batches(512): ...        # the eval split in order; the last batch may be short

Classification batches walk epoch-wise permutations (`default_rng([seed, epoch])`); LM batches are random windows
(`default_rng([seed, step])`) of a token stream: x = tokens[t:t+L], y = tokens[t+1:t+L+1], both int32 `(B, L)`.
Images are float32 in [0, 1], `(B, H, W, C)`; labels int32.

| name | kind | offline | notes |
|---|---|---|---|
| digits | classification, (8, 8, 1), 10 | yes | scikit-learn's 1797 bundled images; the last 297 are the test split |
| markov | lm, (seq_len,), vocab_size | yes | order-k Markov source with Dirichlet rows; `entropy_floor` is exact |
| mnist, cifar10 | classification | no | `tfds.data_source`, read by index (nothing loaded whole) |
| tiny_shakespeare | lm | no | characters (sorted, of train and test); with `vocab_size=256`, UTF-8 bytes as lm1b |
| lm1b | lm, vocab 256 | no | bytes of UTF-8 sentences joined by b"\\n", each window starts at a sentence |

Config keys (None means the default): `name` ("digits"), `dir` (TFDS data_dir; None: tfds' default),
`seq_len` (64), `eval_examples` (eval windows/examples: markov 256, lm1b 512, others all),
markov: `vocab_size` (16), `order` (2), `concentration` (0.2), `train_tokens` (2**20), `source_seed` (0);
classification: `train_size` (None: all), `task` (0), `task_kind` (None | "permute" | "random_labels"),
`source_seed` (0). `source_seed` fixes the data-generating randomness (Markov table, task permutations and
labels) independently of the run's seed, so the seeds of a sweep see the same task.

Task sequences (plasticity experiments): with `task_kind` and `steps_per_task` set, one run trains on task
`task`, then `task + 1`, ... switching every `steps_per_task` steps, and `eval_batches(..., step=s)` evaluates
the task trained at step `s`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from reparam.core import ConfigError

NAMES = ("digits", "markov", "mnist", "cifar10", "tiny_shakespeare", "lm1b")
LM_NAMES = ("markov", "tiny_shakespeare", "lm1b")
TASK_KINDS = ("permute", "random_labels")
DEFAULTS = dict(name="digits", dir=None, seq_len=64, eval_examples=None, train_size=None, task=0, task_kind=None,
                steps_per_task=None,
                source_seed=0, vocab_size=16, order=2, concentration=0.2, train_tokens=2**20)
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
DIGITS_TEST = 297


@dataclasses.dataclass
class Dataset:
  name: str
  kind: str                          # "classification" or "lm"
  num_classes: int                   # classes, or the vocabulary size of an LM
  input_shape: tuple                 # one example's x: (8, 8, 1) images, (seq_len,) tokens
  entropy_floor: float | None        # the lowest expected eval loss (nats/token) where known (markov)
  train_size: int                    # training examples; tokens (markov, tiny_shakespeare); sentences (lm1b)
  eval_size: int                     # examples (windows for an LM) that `eval_batches` yields
  sample: Callable[[int, int, int], dict] = dataclasses.field(repr=False)   # (step, batch_size, seed) -> batch
  eval_get: Callable[[np.ndarray], dict] = dataclasses.field(repr=False)    # eval indices -> batch
  info: dict = dataclasses.field(default_factory=dict)   # extras: entropy_rate, vocab, split names...
  task_at: Callable[[int], "Dataset"] | None = dataclasses.field(default=None, repr=False)  # task sequences

  def batch(self, step: int, batch_size: int, seed: int) -> dict:
    return self.sample(int(step), int(batch_size), int(seed))

  def eval_batches(self, batch_size: int, max_examples: int | None = None, step: int | None = None
                   ) -> Iterator[dict]:
    """The eval split in order; in a task sequence, that of the task trained at `step` (default: the first)."""
    if self.task_at is not None:
      yield from self.task_at(max(int(step or 1) - 1, 0)).eval_batches(batch_size, max_examples)
      return
    n = self.eval_size if max_examples is None else min(max_examples, self.eval_size)
    for start in range(0, n, batch_size):
      yield self.eval_get(np.arange(start, min(start + batch_size, n)))


def load(config) -> Dataset:
  """The dataset `config` (a ConfigDict or dict, keys in the module docstring) names."""
  opts = _options(config)
  if opts["steps_per_task"]:
    return _task_sequence(opts)
  return _LOADERS[opts["name"]](opts)


def _task_sequence(opts) -> Dataset:
  """Task `task + step // steps_per_task` at each step: one network meets a new task every `steps_per_task`."""
  spt = opts["steps_per_task"]

  @functools.lru_cache(maxsize=4)
  def task(t: int) -> Dataset:
    return _LOADERS[opts["name"]]({**opts, "task": opts["task"] + t, "steps_per_task": None})

  def task_at(step: int) -> Dataset:
    return task(step // spt)

  first = task(0)
  return dataclasses.replace(first, sample=lambda step, bs, seed: task_at(step).batch(step, bs, seed),
                             info={**first.info, "steps_per_task": spt}, task_at=task_at)


def _options(config) -> dict[str, Any]:
  opts = {k: v if config.get(k) is None else config.get(k) for k, v in DEFAULTS.items()}
  if opts["task_kind"] in ("none", ""):
    opts["task_kind"] = None
  if opts["name"] not in NAMES:
    raise ConfigError(f"data.name={opts['name']!r} is not one of: {', '.join(NAMES)}")
  for key in ("seq_len", "vocab_size", "order", "train_tokens", "eval_examples", "train_size", "steps_per_task"):
    if opts[key] is not None and not _is_int(opts[key], 1):
      raise ConfigError(f"data.{key}={opts[key]!r} must be a positive integer")
  for key in ("task", "source_seed"):
    if not _is_int(opts[key], 0):
      raise ConfigError(f"data.{key}={opts[key]!r} must be a non-negative integer")
  if not (isinstance(opts["concentration"], (int, float)) and opts["concentration"] > 0):
    raise ConfigError(f"data.concentration={opts['concentration']!r} must be a positive number")
  if opts["task_kind"] not in (None,) + TASK_KINDS:
    raise ConfigError(f"data.task_kind={opts['task_kind']!r} is not one of: None, {', '.join(TASK_KINDS)}")
  if opts["steps_per_task"] and not opts["task_kind"]:
    raise ConfigError(f"data.steps_per_task={opts['steps_per_task']} needs data.task_kind: one of "
                      f"{', '.join(TASK_KINDS)}")
  if opts["task_kind"] and opts["name"] in LM_NAMES:
    raise ConfigError(f"data.task_kind={opts['task_kind']!r} needs a classification dataset; "
                      f"data.name={opts['name']!r} is a language model")
  return opts


def _is_int(v, minimum: int) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum


def _rng(*words) -> np.random.Generator:
  """A generator seeded by ints and strings (hashed), so streams for different purposes never coincide."""
  return np.random.default_rng([zlib.crc32(w.encode()) if isinstance(w, str) else int(w) for w in words])


# ------------------------------------------------------------------------------------------ classification

@functools.lru_cache(maxsize=64)      # a few seeds x (current, next) epoch
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Example indices of batch `step`: positions step*B...(step+1)*B of the concatenated epoch permutations."""
  epochs, offsets = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64), n)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):       # a batch may straddle an epoch boundary
    out[epochs == e] = _permutation(seed, int(e), n)[offsets[epochs == e]]
  return out


def _classification(name, train_get, n_train, test_get, n_test, shape, classes, opts) -> Dataset:
  """Applies `train_size`, the task of a task sequence, and builds the Dataset."""
  n_train = min(n_train, opts["train_size"] or n_train)
  kind, task, seed = opts["task_kind"], opts["task"], opts["source_seed"]
  info = {"task": task, "task_kind": kind, "eval_split": "test"}
  if kind == "permute" and task > 0:        # task 0 is the original data; task t a fixed pixel permutation
    perm = _rng(seed, "permute", task).permutation(math.prod(shape))
    train_get, test_get = (_permuted(g, perm, shape) for g in (train_get, test_get))
  if kind == "random_labels":               # memorization: eval measures the fit of the (relabelled) train set
    labels = _rng(seed, "labels", task).integers(classes, size=n_train).astype(np.int32)
    base = train_get
    train_get = test_get = lambda idx: {"x": base(idx)["x"], "y": labels[idx]}
    n_test, info["eval_split"] = n_train, "train"
  n_eval = min(n_test, opts["eval_examples"] or n_test)
  return Dataset(name, "classification", classes, tuple(shape), None, n_train, n_eval,
                 lambda step, bs, seed: train_get(epoch_indices(n_train, step, bs, seed)), test_get, info)


def _permuted(get, perm, shape):
  def permuted_get(idx):
    b = get(idx)
    return {"x": b["x"].reshape(len(idx), -1)[:, perm].reshape((len(idx),) + tuple(shape)), "y": b["y"]}
  return permuted_get


def _arrays(x, y):
  return lambda idx: {"x": x[idx], "y": y[idx]}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits: (1797, 8, 8) pixel counts 0..16 and their labels.

  Read straight from the CSV that scikit-learn ships (what `load_digits` reads), without importing scikit-learn:
  its import (scipy.stats and more) took 2 s here, a third of a vmapped quickstart run's fixed cost. Falls back
  to `load_digits` if a scikit-learn release moves the file."""
  import gzip
  import importlib.util
  spec = importlib.util.find_spec("sklearn")      # finds the package without running it
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
  if os.path.exists(path):
    with gzip.open(path, "rt") as f:
      data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int32)
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images, d.target.astype(np.int32)


def _load_digits(opts) -> Dataset:
  images, y = _digits_arrays()
  x = (images / 16.0).astype(np.float32)[..., None]
  k = len(y) - DIGITS_TEST
  return _classification("digits", _arrays(x[:k], y[:k]), k, _arrays(x[k:], y[k:]), DIGITS_TEST,
                         x.shape[1:], 10, opts)


def _tfds_sources(name: str, splits, data_dir) -> tuple[Any, dict]:
  """Random-access sources of `splits`, after checking (in milliseconds, offline) that the data is there.

  Without the check, `tfds.data_source` on a machine without network retries a download for minutes.
  """
  import tensorflow_datasets as tfds
  where = data_dir or "tfds' default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise ConfigError(f"data.name={name!r}: not prepared under {where}; run `tfds build {name} "
                      f"--file_format=array_record` once on a machine with network, or pass --config.data.dir=...")
  formats = sorted(getattr(f, "value", str(f))
                   for f in builder.info.available_file_formats() or [builder.info.file_format])
  fmt = next((f for f in formats if f in RANDOM_ACCESS_FORMATS), None)
  if fmt is None:
    raise ConfigError(f"data.name={name!r}: prepared under {builder.data_dir} as {formats}, which has no random "
                      f"access; rebuild it with `tfds build {name} --file_format=array_record`")
  return builder.info, {s: builder.as_data_source(split=s, file_format=fmt) for s in splits}


def _image_getter(source):
  def get(idx):
    examples = [source[int(i)] for i in idx]
    return {"x": np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0,
            "y": np.array([e["label"] for e in examples], np.int32)}
  return get


def _load_tfds_images(name: str, opts) -> Dataset:
  info, src = _tfds_sources(name, ("train", "test"), opts["dir"])
  shape, classes = tuple(info.features["image"].shape), info.features["label"].num_classes
  return _classification(name, _image_getter(src["train"]), len(src["train"]), _image_getter(src["test"]),
                         len(src["test"]), shape, classes, opts)


# --------------------------------------------------------------------------------------------- language

def _windows(stream: np.ndarray, seq_len: int, max_n: int | None) -> np.ndarray:
  """Eval windows of seq_len + 1 tokens with stride seq_len: every token after the first is predicted once."""
  n = (len(stream) - 1) // seq_len
  n = n if max_n is None else min(n, max_n)
  return stream[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)]


def _window_sampler(tokens_RxT: np.ndarray, seq_len: int):
  rows, length = tokens_RxT.shape

  def sample(step, batch_size, seed):
    rng = np.random.default_rng([seed, step])
    r = rng.integers(rows, size=batch_size)
    t = rng.integers(length - seq_len, size=batch_size)
    w_BxL1 = tokens_RxT[r[:, None], t[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return {"x": w_BxL1[:, :-1], "y": w_BxL1[:, 1:]}
  return sample


def _lm(name, sample, eval_NxL1, vocab_size: int, opts, train_tokens: int, floor=None, **info) -> Dataset:
  if len(eval_NxL1) == 0:
    raise ConfigError(f"data.seq_len={opts['seq_len']} is longer than {name}'s eval split")
  eval_NxL1 = eval_NxL1.astype(np.int32)
  get = lambda idx: {"x": eval_NxL1[idx, :-1], "y": eval_NxL1[idx, 1:]}
  return Dataset(name, "lm", vocab_size, (opts["seq_len"],), floor, train_tokens, len(eval_NxL1), sample, get, info)


def _load_markov(opts) -> Dataset:
  vocab, order, seq_len, seed = opts["vocab_size"], opts["order"], opts["seq_len"], opts["source_seed"]
  _check_markov_size(vocab, order)
  p_SxV = markov_table(vocab, order, opts["concentration"], _rng(seed, "table"))
  pi_S = stationary(p_SxV, vocab)
  row_len = max(1024, 4 * (seq_len + 1))
  rows = -(-opts["train_tokens"] // row_len)
  train_RxT = sample_markov(p_SxV, pi_S, order, rows, row_len, _rng(seed, "train"))
  eval_NxL1 = sample_markov(p_SxV, pi_S, order, opts["eval_examples"] or 256, seq_len + 1, _rng(seed, "eval"))
  rate = entropy_rate(p_SxV, pi_S)
  return _lm("markov", _window_sampler(train_RxT, seq_len), eval_NxL1, vocab, opts, train_RxT.size,
             window_floor(p_SxV, pi_S, vocab, order, seq_len), entropy_rate=rate, table=p_SxV)


MARKOV_TABLE_MAX = 2**22       # entries of the transition table, vocab_size**(order + 1)


def _check_markov_size(vocab: int, order: int) -> None:
  """At least two tokens (a language of one has nothing to predict: loss 0 from step 0), and a transition table
  of at most MARKOV_TABLE_MAX entries."""
  top = 1
  while (top + 1) ** (order + 1) <= MARKOV_TABLE_MAX:
    top += 1
  if top < 2:
    raise ConfigError(f"data.order={order} is too large for the markov source: 2**(order+1) transition-table "
                      f"entries exceed 2**22 (order at most 21)")
  if not 2 <= vocab <= top:
    raise ConfigError(f"data.vocab_size={vocab} must be an integer in [2, {top}] for the markov source with "
                      f"data.order={order} (one token leaves nothing to predict; vocab_size**(order+1) transition "
                      f"entries must stay <= 2**22)")


def markov_table(vocab: int, order: int, concentration: float, rng) -> np.ndarray:
  """P[s, a] = p(next = a | last `order` tokens = s), state s = sum_i a_i V**(order-1-i); rows ~ Dirichlet."""
  return rng.dirichlet(np.full(vocab, float(concentration)), size=vocab ** order)


def stationary(p_SxV: np.ndarray, vocab: int, tol: float = 1e-13) -> np.ndarray:
  """The stationary distribution over states, by power iteration on the sparse state transition s -> sV mod S + a."""
  states = p_SxV.shape[0]
  next_SxV = (np.arange(states)[:, None] * vocab) % states + np.arange(vocab)
  pi = np.full(states, 1.0 / states)
  for _ in range(100_000):
    new = np.bincount(next_SxV.ravel(), weights=(pi[:, None] * p_SxV).ravel(), minlength=states)
    if np.abs(new - pi).sum() < tol:
      return new / new.sum()
    pi = new
  return pi / pi.sum()


def _entropy(p: np.ndarray, axis=None) -> np.ndarray:
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def entropy_rate(p_SxV: np.ndarray, pi_S: np.ndarray) -> float:
  """h = -sum_s pi(s) sum_a P(a|s) log P(a|s), nats/token: the loss of a perfect model given full context."""
  return float(pi_S @ _entropy(p_SxV, axis=1))


def window_floor(p_SxV, pi_S, vocab: int, order: int, seq_len: int) -> float:
  """The lowest expected loss on windows: predicting tokens 1..L of L+1 stationary tokens from their prefixes.

  Sum of the conditional entropies = H(X_0..X_L) - H(X_0) = H(pi) + (L + 1 - order) h - H(X_0), over L tokens.
  Above the entropy rate h (for order > 1) because the first tokens of a window lack a full context.
  """
  unigram = pi_S.reshape(vocab, -1).sum(1)
  total = _entropy(pi_S) + (seq_len + 1 - order) * entropy_rate(p_SxV, pi_S) - _entropy(unigram)
  return float(total / seq_len)


def sample_markov(p_SxV, pi_S, order: int, rows: int, length: int, rng) -> np.ndarray:
  """`rows` independent stationary sequences of `length` tokens, `(rows, length)` uint16 (rows in parallel)."""
  states, vocab = p_SxV.shape
  cdf_SxV = np.cumsum(p_SxV, axis=1)
  s = rng.choice(states, size=rows, p=pi_S)
  out = np.empty((rows, max(length, order)), np.uint16)
  out[:, :order] = (s[:, None] // vocab ** np.arange(order - 1, -1, -1)) % vocab
  for t in range(order, length):
    a = np.minimum((rng.random(rows)[:, None] > cdf_SxV[s]).sum(1), vocab - 1)
    out[:, t] = a
    s = (s * vocab) % states + a
  return out[:, :length]


def _text(example) -> str:
  t = example["text"]
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def _load_tiny_shakespeare(opts) -> Dataset:
  _, src = _tfds_sources("tiny_shakespeare", ("train", "test"), opts["dir"])
  texts = {s: "".join(_text(src[s][i]) for i in range(len(src[s]))) for s in src}
  if opts["vocab_size"] == 256:      # bytes, lm1b's vocabulary: an lm1b model fine-tunes on it (configs/dora.py)
    stream = {s: np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) for s, t in texts.items()}
    vocab = np.arange(256)
  else:
    codes = {s: np.frombuffer(t.encode("utf-32-le"), np.uint32) for s, t in texts.items()}
    vocab = np.unique(np.concatenate(list(codes.values())))
    stream = {s: np.searchsorted(vocab, c).astype(np.uint16) for s, c in codes.items()}
  if len(stream["train"]) < opts["seq_len"] + 1:
    raise ConfigError(f"data.seq_len={opts['seq_len']} is longer than tiny_shakespeare's train split")
  return _lm("tiny_shakespeare", _window_sampler(stream["train"][None], opts["seq_len"]),
             _windows(stream["test"], opts["seq_len"], opts["eval_examples"]), len(vocab), opts,
             len(stream["train"]), vocab="".join(map(chr, vocab)) if len(vocab) < 256 else "bytes")


def _utf8_bytes(source, start: int, n: int) -> np.ndarray:
  """The first n bytes of sentences start, start+1, ... (wrapping around), each followed by b"\\n"."""
  buf, i = bytearray(), start
  while len(buf) < n:
    buf += _text(source[i % len(source)]).encode("utf-8") + b"\n"
    i += 1
  return np.frombuffer(bytes(buf[:n]), np.uint8)


def _load_lm1b(opts) -> Dataset:
  _, src = _tfds_sources("lm1b", ("train", "test"), opts["dir"])
  train, seq_len, n_eval = src["train"], opts["seq_len"], opts["eval_examples"] or 512

  def sample(step, batch_size, seed):   # random access: a few sentences per window, never the whole corpus
    starts = np.random.default_rng([seed, step]).integers(len(train), size=batch_size)
    w_BxL1 = np.stack([_utf8_bytes(train, int(s), seq_len + 1) for s in starts]).astype(np.int32)
    return {"x": w_BxL1[:, :-1], "y": w_BxL1[:, 1:]}

  eval_stream = _utf8_bytes(src["test"], 0, n_eval * seq_len + 1)
  return _lm("lm1b", sample, _windows(eval_stream, seq_len, n_eval), 256, opts, len(train),
             train_sentences=len(train))


_LOADERS = {"digits": _load_digits, "markov": _load_markov, "tiny_shakespeare": _load_tiny_shakespeare,
            "lm1b": _load_lm1b, "mnist": functools.partial(_load_tfds_images, "mnist"),
            "cifar10": functools.partial(_load_tfds_images, "cifar10")}
