"""The data layer: determinism and resumption, digits, the Markov source's entropy, TFDS through mock_data."""
import os
import time

import numpy as np
import pytest

from conftest import fake_prepared

from experiments import data
from reparam.core import ConfigError

SMALL_MARKOV = dict(name="markov", vocab_size=4, order=2, seq_len=16, train_tokens=4096, eval_examples=64)


def same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def digits():
  return data.load({"name": "digits"})


def test_digits_shapes_and_split(digits):
  assert (digits.kind, digits.num_classes, digits.input_shape) == ("classification", 10, (8, 8, 1))
  assert (digits.train_size, digits.eval_size) == (1500, 297)
  b = digits.batch(0, 32, 0)
  assert b["x"].shape == (32, 8, 8, 1) and b["x"].dtype == np.float32 and b["y"].dtype == np.int32
  assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0
  sizes = [len(e["y"]) for e in digits.eval_batches(128)]
  assert sizes == [128, 128, 41] and sum(len(e["y"]) for e in digits.eval_batches(128, max_examples=50)) == 50


@pytest.mark.parametrize("config", [{"name": "digits"}, SMALL_MARKOV])
def test_batches_are_pure_functions_of_seed_and_step(config):
  ds, again = data.load(config), data.load(config)
  run = [ds.batch(s, 8, 3) for s in range(30)]
  resumed = [again.batch(s, 8, 3) for s in range(12, 30)]       # a fresh process resuming at step 12
  assert all(same(a, b) for a, b in zip(run[12:], resumed))
  assert not np.array_equal(run[0]["x"], run[1]["x"])
  assert not np.array_equal(run[0]["x"], ds.batch(0, 8, 4)["x"])  # seeds differ


def test_classification_epochs_are_permutations(digits):
  bs = 100                                                         # 1500 / 100: an epoch is 15 batches
  idx = np.concatenate([data.epoch_indices(1500, s, bs, 0) for s in range(15)])
  assert np.array_equal(np.sort(idx), np.arange(1500))
  straddle = data.epoch_indices(1500, 7, 199, 0)                   # positions 1393..1591 cross epochs 0 and 1
  assert np.array_equal(straddle[:107], data._permutation(0, 0, 1500)[1393:])
  assert np.array_equal(straddle[107:], data._permutation(0, 1, 1500)[:92])


def test_task_sequences(digits):
  t0, t1, t2 = (data.load({"name": "digits", "task_kind": "permute", "task": t}) for t in (0, 1, 2))
  b0, b1, b2 = (t.batch(0, 16, 0) for t in (t0, t1, t2))
  assert same(b0, digits.batch(0, 16, 0))                          # task 0 is the original data
  assert np.array_equal(b0["y"], b1["y"]) and not np.array_equal(b1["x"], b2["x"])
  assert np.allclose(np.sort(b0["x"].reshape(16, -1)), np.sort(b1["x"].reshape(16, -1)))  # same pixels, moved
  r = data.load({"name": "digits", "task_kind": "random_labels", "task": 1, "train_size": 200})
  assert (r.train_size, r.eval_size, r.info["eval_split"]) == (200, 200, "train")
  e = next(r.eval_batches(200))
  from sklearn.datasets import load_digits
  assert np.allclose(e["x"][..., 0], load_digits().images[:200] / 16)   # eval = the (relabelled) train set
  assert np.mean(e["y"] == next(digits.eval_batches(200))["y"]) < 0.5


def test_markov_two_state_closed_form():
  p, q = 0.1, 0.3
  table = np.array([[1 - p, p], [q, 1 - q]])
  pi = data.stationary(table, 2)
  h2 = lambda a: -a * np.log(a) - (1 - a) * np.log(1 - a)
  assert np.allclose(pi, [q / (p + q), p / (p + q)], atol=1e-12)
  assert data.entropy_rate(table, pi) == pytest.approx(pi[0] * h2(p) + pi[1] * h2(q), abs=1e-12)
  assert data.window_floor(table, pi, 2, 1, 10) == pytest.approx(data.entropy_rate(table, pi), abs=1e-12)


def test_markov_entropy_rate_matches_empirical_conditional_entropy():
  v, k = 4, 2
  table = data.markov_table(v, k, 0.5, np.random.default_rng(0))
  pi = data.stationary(table, v)
  tokens = data.sample_markov(table, pi, k, 64, 4096, np.random.default_rng(1)).astype(np.int64)
  ctx = tokens[:, :-2] * v + tokens[:, 1:-1]
  counts = np.zeros((v ** k, v))
  np.add.at(counts, (ctx.ravel(), tokens[:, 2:].ravel()), 1)
  joint = counts / counts.sum()
  cond = counts / counts.sum(1, keepdims=True)
  empirical = -np.sum(joint * np.log(cond))
  assert empirical == pytest.approx(data.entropy_rate(table, pi), abs=0.01)


def test_markov_floor_is_the_true_models_loss_on_eval_windows():
  ds = data.load(dict(SMALL_MARKOV, eval_examples=4000))
  table, v = ds.info["table"], 4
  pi = data.stationary(table, v).reshape(v, v)
  nll = []
  for b in ds.eval_batches(4000):
    x, y = b["x"], b["y"]
    first = np.log(pi[x[:, 0], y[:, 0]] / pi[x[:, 0]].sum(1))   # p(x1 | x0) from the stationary pair
    rest = np.log(table[x[:, :-1] * v + x[:, 1:], y[:, 1:]])     # p(x_t | x_{t-2}, x_{t-1})
    nll.append(-(first.sum() + rest.sum()) / y.size)
  assert ds.entropy_floor == pytest.approx(np.mean(nll), abs=0.02)
  assert ds.entropy_floor > ds.info["entropy_rate"]
  assert ds.input_shape == (16,) and ds.num_classes == 4


def test_markov_lm_batches():
  ds = data.load(SMALL_MARKOV)
  b = ds.batch(5, 8, 0)
  assert b["x"].shape == b["y"].shape == (8, 16) and b["x"].dtype == np.int32
  assert np.array_equal(b["x"][:, 1:], b["y"][:, :-1])


@pytest.mark.parametrize("vocab,order,top", [(1, 2, 161), (1000, 3, 45), (2049, 1, 2048)])
def test_markov_vocab_size_outside_its_range_names_the_range(vocab, order, top):
  """vocab_size=1 used to be accepted: a one-token language, nothing to predict (loss 0 from the first step)."""
  with pytest.raises(ConfigError) as e:
    data.load({"name": "markov", "vocab_size": vocab, "order": order})
  assert str(e.value).startswith(f"data.vocab_size={vocab} must be an integer in [2, {top}] for the markov source "
                                 f"with data.order={order}")


@pytest.mark.parametrize("config, key", [
    ({"name": "imagenet"}, "data.name"), ({"name": "markov", "order": 0}, "data.order"),
    ({"name": "markov", "task_kind": "permute"}, "data.task_kind"), ({"name": "digits", "task_kind": "x"},
                                                                     "data.task_kind"),
    ({"name": "markov", "vocab_size": 1000, "order": 3}, "data.vocab_size")])
def test_config_errors_name_the_key(config, key):
  with pytest.raises(ConfigError, match=key) as e:
    data.load(config)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- TFDS

tfds = pytest.importorskip("tensorflow_datasets")


def test_unprepared_tfds_fails_fast_with_one_line(tmp_path):
  start = time.time()
  with pytest.raises(ConfigError, match=r"data.name='mnist': not prepared under .*data.dir") as e:
    data.load({"name": "mnist", "dir": str(tmp_path)})
  assert time.time() - start < 5 and "\n" not in str(e.value)
  fake_prepared("cifar10", str(tmp_path), file_format="tfrecord")
  with pytest.raises(ConfigError, match="no random access"):
    data.load({"name": "cifar10", "dir": str(tmp_path)})


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_images_through_mock_data(tmp_path, name, shape):
  fake_prepared(name, str(tmp_path))
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    ds = data.load({"name": name, "dir": str(tmp_path)})
    b, again = ds.batch(2, 5, 0), ds.batch(2, 5, 0)
    evals = list(ds.eval_batches(5))
  assert (ds.input_shape, ds.num_classes, ds.train_size, ds.eval_size) == (shape, 10, 12, 12)
  assert b["x"].shape == (5,) + shape and b["x"].dtype == np.float32 and b["y"].dtype == np.int32
  assert 0 <= b["x"].min() and b["x"].max() <= 1 and same(b, again)
  assert [len(e["y"]) for e in evals] == [5, 5, 2]


@pytest.mark.parametrize("name", ["tiny_shakespeare", "lm1b"])
def test_tfds_text_through_mock_data(tmp_path, name):
  fake_prepared(name, str(tmp_path))
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    ds = data.load({"name": name, "dir": str(tmp_path), "seq_len": 8})
    b = ds.batch(0, 4, 0)
    assert same(b, ds.batch(0, 4, 0))
    e = next(ds.eval_batches(100))
  assert ds.kind == "lm" and ds.input_shape == (8,) and b["x"].shape == (4, 8) and b["x"].dtype == np.int32
  assert np.array_equal(b["x"][:, 1:], b["y"][:, :-1]) and b["x"].max() < ds.num_classes
  assert e["x"].shape[1] == 8 and np.array_equal(e["x"][1:, 0], e["y"][:-1, -1])   # windows tile the stream
  if name == "tiny_shakespeare":
    assert len(ds.info["vocab"]) == ds.num_classes < 256
  else:
    assert ds.num_classes == 256


def test_task_sequence_switches_tasks_and_evaluates_the_current_one():
  seq = data.load({"name": "digits", "task_kind": "random_labels", "steps_per_task": 10})
  tasks = [data.load({"name": "digits", "task_kind": "random_labels", "task": t}) for t in range(3)]
  for step in (0, 9, 10, 25):
    assert same(seq.batch(step, 8, 1), tasks[step // 10].batch(step, 8, 1))
  assert not same(tasks[0].batch(3, 8, 1), tasks[1].batch(3, 8, 1))
  for step, t in ((10, 0), (11, 1), (30, 2)):    # after step s, the task trained last is (s - 1) // 10
    assert same(next(seq.eval_batches(16, step=step)), next(tasks[t].eval_batches(16)))
  with pytest.raises(ConfigError, match="data.steps_per_task=10 needs data.task_kind"):
    data.load({"name": "digits", "steps_per_task": 10})


def test_digits_read_without_sklearn_equal_sklearns_load_digits():
  """The bundled CSV read directly (no scikit-learn import) gives exactly scikit-learn's `load_digits`."""
  from sklearn.datasets import load_digits
  images, labels = data._digits_arrays()
  ref = load_digits()
  np.testing.assert_array_equal(images, ref.images)
  np.testing.assert_array_equal(labels, ref.target)
  assert labels.dtype == np.int32 and images.shape == (1797, 8, 8)
