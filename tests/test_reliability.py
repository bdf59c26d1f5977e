"""Reliability: nothing is lost under faults, every bad input is a clear error (docs/reliability.md: the table).

Faults are real: a SIGKILL from the `REPARAM_FAULT` hook of experiments/train.py (right after a step, or while
a checkpoint is being written), damaged checkpoint files, NaN/inf losses. Kill points come from a seeded RNG and
are checked against the lists in the docstrings, so a run of these tests is reproducible.
"""
import dataclasses
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reparam
from configs import quickstart
from experiments import checkpoint, results, setup, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The precision conftest sets in-process, so a subprocess's numbers can be compared bit for bit with a reference
# trained in this process.
ENV = {"JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
QUIET = ["--config.train.progress=False", "--config.train.tensorboard=False"]


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """The subprocesses compile the same programs over and over (~40 per run): a persistent cache shared by
  them takes a third off each run. The same executables, so the same bits."""
  ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cli(module, args, env=None, timeout=300, prefix=()):
  base = {k: v for k, v in os.environ.items() if k != "REPARAM_FAULT"}
  return subprocess.run([*prefix, sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env={**base, **ENV, **(env or {})})


def set_keys(config, overrides):
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = value
  return config


def load_params(workdir):
  with open(os.path.join(workdir, "params.msgpack"), "rb") as f:
    return reparam.flatten(__import__("flax").serialization.msgpack_restore(f.read()))


def rows(workdir, name="metrics.jsonl"):
  """The rows of a JSONL file without the wall-clock column."""
  return [{k: v for k, v in r.items() if k != "steps_per_sec"}
          for r in results.read_jsonl(os.path.join(workdir, name))]


def assert_same_run(expected, got):
  """Bit-identical parameters, equal metrics and diagnostics rows (but for steps/s), equal result.json."""
  a, b = load_params(expected), load_params(got)
  assert list(a) == list(b)
  for path in a:
    np.testing.assert_array_equal(b[path], a[path], err_msg=path)
  for name in ("metrics.jsonl", "diagnostics.jsonl"):
    assert rows(got, name) == rows(expected, name), name
    steps = [r["step"] for r in rows(got, name)]
    assert steps == sorted(set(steps)), f"{name}: a step lost or logged twice: {steps}"
  assert results.read_json(os.path.join(got, "result.json")) == results.read_json(
      os.path.join(expected, "result.json"))


def assert_nothing_half_written(workdir):
  """Every JSON file parses; every JSONL line but a last one cut by the kill parses."""
  for path in glob.glob(os.path.join(workdir, "**", "*.json"), recursive=True):
    if "checkpoints" not in path:
      with open(path) as f:
        json.load(f)
  for path in glob.glob(os.path.join(workdir, "*.jsonl")):
    with open(path) as f:
      lines = f.read().split("\n")
    for line in lines[:-1]:
      json.loads(line)


def ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def snapshot(path):
  """Every file and directory under `path` with its size and mtime: what "untouched" means."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(path):
    for name in dirnames + filenames:
      p = os.path.join(dirpath, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


# ------------------------------------------------------------------------------------------- kill and resume

TRAIN_ARGS = ["--config", "configs/quickstart.py:steps=30", "--config.train.checkpoint_every=5",
              "--config.reparam.transform=dora(rank=2)", *QUIET]


def train_config():
  """The config of TRAIN_ARGS, built in this process."""
  c = quickstart.get_config("steps=30")
  c.train.update(checkpoint_every=5, progress=False, tensorboard=False)
  c.reparam.transform = "dora(rank=2)"
  return c


def train_kill_points(seed=2024):
  """Two step kills and two save kills from a seeded RNG, the first step kill repeated (killed twice in a row)."""
  rng = random.Random(seed)
  a, b = sorted(rng.sample(range(1, 30), 2))
  s1, s2 = sorted(rng.sample(range(5, 30, 5), 2))
  # Sorted by step, a step kill before a save kill of the same step: each point lies past the checkpoint the
  # previous kill leaves, so every one of them fires.
  points = sorted([("step", a), ("step", a), ("step", b), ("save", s1), ("save", s2)],
                  key=lambda p: (p[1], p[0] == "save"))
  return [f"{kind}:{step}" for kind, step in points]


@pytest.mark.slow
def test_train_killed_five_times_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
  """One 30-step DoRA run (checkpoints every 5 steps) SIGKILLed at step:6, again at step:6 (twice in a row),
  while the checkpoint of step 15 is written (save:15), at step:16 and while the checkpoint of step 25 is
  written (save:25), each time resumed by rerunning the same command; after the third kill a metrics row cut
  mid-line is appended, as a kill inside write() would leave it. The end equals an uninterrupted run."""
  points = train_kill_points()
  assert points == ["step:6", "step:6", "save:15", "step:16", "save:25"]
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(train_config(), ref)
  killed = str(tmp_path / "killed")
  for i, point in enumerate(points):
    proc = cli("train", TRAIN_ARGS + ["--workdir", killed], env={"REPARAM_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
    assert not os.path.exists(os.path.join(killed, "result.json"))
    assert_nothing_half_written(killed)
    assert all(s <= int(point.split(":")[1]) for s in ckpt_steps(killed))
    if i == 2:
      with open(os.path.join(killed, "metrics.jsonl"), "a") as f:
        f.write('{"step": 17, "train_loss": 0.4')
  proc = cli("train", TRAIN_ARGS + ["--workdir", killed])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert results.read_json(os.path.join(killed, "config.json")) == results.read_json(
      os.path.join(ref, "config.json"))
  assert_same_run(ref, killed)


SWEEP_CONFIG = '''
from configs import common, quickstart

def get_config(arg=None):
  c = quickstart.get_config("steps=20")
  c.train.update(checkpoint_every=5, log_every=5, eval_every=10, diagnostics_every=10, progress=False,
                 tensorboard=False)
  return c

def get_sweep(arg=None):
  return common.sweep("reparam.transform", ["none", "weight_norm", "multipliers(row=True)"])
'''


def sweep_kill_points(seed=2024):
  """Three points from a seeded RNG: a step in trial 0, a later step in trial 1, a save after both in trial 2.

  `step:N:2` is the second time a process reaches step N: the trial killed last resumes below N and reaches it
  once, so the second time is in the next trial."""
  rng = random.Random(seed)
  a, b, c = sorted(rng.sample(range(1, 16), 3))
  return [f"step:{a}", f"step:{b}:2", f"save:{5 * math.ceil((c + 1) / 5)}:2"]


@pytest.mark.slow
def test_sweep_killed_in_three_different_trials_loses_and_repeats_nothing(tmp_path):
  """A 3-trial sweep (20 steps each, checkpoints every 5) SIGKILLed at step:3 of trial 0, at step 8 of trial 1
  (step:8:2) and while trial 2 writes its checkpoint of step 15 (save:15:2), rerun after each kill; a metrics row
  of trial 1 is cut mid-line after the second kill. No trial is lost, repeated or rerun once finished, and each
  ends bit-identical to the same trial trained without interruption."""
  points = sweep_kill_points()
  assert points == ["step:3", "step:8:2", "save:15:2"]
  config_file = tmp_path / "tiny_sweep.py"
  config_file.write_text(SWEEP_CONFIG)
  spec = __import__("importlib").util.spec_from_file_location("tiny_sweep", config_file)
  module = __import__("importlib").util.module_from_spec(spec)
  spec.loader.exec_module(module)
  trials = sweep.expand(module.get_config(), sweep.load_sweep(str(config_file)))
  ref = tmp_path / "ref"
  for t in trials:
    train.train_and_evaluate(t["config"], str(ref / t["name"]))
  workdir = tmp_path / "sweep"
  args = ["--config", str(config_file), "--workdir", str(workdir), "--report=false"]
  finished = {}
  for i, point in enumerate(points):
    proc = cli("sweep", args, env={"REPARAM_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
    done = {t["name"] for t in trials if (workdir / t["name"] / "result.json").exists()}
    assert done == {t["name"] for t in trials[:i]}, (point, done)      # killed in trial i, as planned
    for name in done:               # a finished trial is never run again: its result file is the same file
      mtime = os.stat(workdir / name / "result.json").st_mtime_ns
      assert finished.setdefault(name, mtime) == mtime
    assert_nothing_half_written(str(workdir / trials[i]["name"]))
    if i == 1:
      with open(workdir / trials[1]["name"] / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "eval_lo')
  proc = cli("sweep", args + ["--report=true"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "3 trials in this shard: 2 done, 1 to run" in proc.stdout
  assert sorted(os.listdir(workdir)) == sorted([t["name"] for t in trials] + ["report", "sweep.json"])
  for t in trials:
    assert_same_run(str(ref / t["name"]), str(workdir / t["name"]))
  assert "3 of 3 trials finished" in (workdir / "report" / "report.md").read_text()


def test_seed_group_resumes_behind_one_seeds_newest_checkpoint(tmp_path):
  """A vmapped group killed while its seeds' saves of step 10 were still being written: seed 0's checkpoint of
  step 10 is complete, seed 1 has none. The rerun starts both from the step they share (0), keeps seed 0's
  checkpoint of step 10 as it is when it gets there (orbax refuses to overwrite a step), and ends bit-identical
  to an uninterrupted group."""
  def config(seed):
    c = quickstart.get_config("steps=20")
    c.train.update(checkpoint_every=10, log_every=5, eval_every=10, diagnostics_every=10, progress=False,
                   tensorboard=False)
    c.seed = seed
    return c

  configs = [config(0), config(1)]
  ref, got = [str(tmp_path / "ref" / str(i)) for i in (0, 1)], [str(tmp_path / "got" / str(i)) for i in (0, 1)]
  train.train_seeds(configs, ref)
  shutil.copytree(ref[0], got[0])           # seed 0 as the kill left it: up to its checkpoint of step 10
  shutil.rmtree(os.path.join(got[0], "checkpoints", "20"))
  for name in ("result.json", "params.msgpack"):
    os.remove(os.path.join(got[0], name))
  kept = snapshot(os.path.join(got[0], "checkpoints", "10"))
  train.train_seeds(configs, got)
  assert snapshot(os.path.join(got[0], "checkpoints", "10")) == kept
  for r, g in zip(ref, got):
    assert ckpt_steps(g) == [10, 20]
    assert_same_run(r, g)


# ------------------------------------------------------------------------------------------ damaged checkpoints

def ref_config():
  c = quickstart.get_config("steps=30")
  c.train.update(checkpoint_every=10, keep_checkpoints=3, progress=False, tensorboard=False)
  return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 30-step run with checkpoints at steps 10, 20 and 30."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(ref_config(), workdir)
  assert ckpt_steps(workdir) == [10, 20, 30]
  return workdir


def _data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=lambda f: (-os.path.getsize(f), f))


def _truncate(step_dir, rng):
  f = _data_files(step_dir)[0]
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)


def _delete_file(step_dir, rng):
  os.remove(_data_files(step_dir)[0])


def _garbage_metadata(step_dir, rng):
  with open(os.path.join(step_dir, "default", "_METADATA"), "wb") as f:
    f.write(rng.randbytes(200))


def _flip_byte(step_dir, rng):
  """One flipped bit pattern in the largest data file: orbax decodes it without an error; only the per-leaf
  CRC-32 that experiments/checkpoint.py stores with each step notices."""
  f = _data_files(step_dir)[0]
  with open(f, "r+b") as fh:
    at = rng.randrange(os.path.getsize(f))
    fh.seek(at)
    byte = fh.read(1)[0]
    fh.seek(at)
    fh.write(bytes([byte ^ 0xFF]))


def _delete_item_dir(step_dir, rng):
  shutil.rmtree(os.path.join(step_dir, "default"))


def _garbage_step_metadata(step_dir, rng):
  with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "wb") as f:
    f.write(rng.randbytes(100))


DAMAGE = {"truncated data file": _truncate, "deleted data file": _delete_file,
          "garbage bytes in _METADATA": _garbage_metadata, "one flipped byte": _flip_byte,
          "deleted item directory": _delete_item_dir, "garbage _CHECKPOINT_METADATA": _garbage_step_metadata}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE) + ["every step damaged"])
def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_resumed(finished_run, tmp_path, caplog, damage):
  """A run killed after its last checkpoint (30) whose checkpoint is then damaged: the rerun warns naming the
  step, moves it aside (nothing deleted), resumes from 20 and ends equal to the uninterrupted run. With every
  step damaged it starts over, and still ends equal."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  for name in ("result.json", "params.msgpack"):
    os.remove(os.path.join(workdir, name))
  rng = random.Random(damage)
  steps = [10, 20, 30] if damage == "every step damaged" else [30]
  for step in steps:
    DAMAGE[damage if len(steps) == 1 else list(DAMAGE)[step // 10 - 1]](
        os.path.join(workdir, "checkpoints", str(step)), rng)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(ref_config(), workdir)
  for step in steps:
    assert re.search(rf"checkpoint step {step} is unreadable \(.+\); moved to .*{step}\.unreadable", caplog.text)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{step}.unreadable"))
  assert "checkpoint step 20 is unreadable" not in caplog.text or len(steps) == 3
  ours = [line for line in caplog.text.splitlines() if "is unreadable (" in line]
  assert ours and not any("See full TensorStore details" in line for line in ours), ours   # its first sentence
  assert ckpt_steps(workdir) == [10, 20, 30]
  assert_same_run(finished_run, workdir)


@pytest.mark.slow
def test_checkpoint_of_another_state_tree_is_refused_and_nothing_moved(finished_run, tmp_path, monkeypatch):
  """A checkpoint saved by another version of the code (here: this code's state gains a leaf, as DoRA's states
  gained `k0_sq`) is intact, not damaged: a one-line error naming the leaves, and every step left where it is
  (taken for damage, every step would be moved aside and the run started over)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  for name in ("result.json", "params.msgpack"):
    os.remove(os.path.join(workdir, name))
  before = snapshot(os.path.join(workdir, "checkpoints"))
  init_state = train.init_state
  monkeypatch.setattr(train, "init_state", lambda s: {**init_state(s), "newer": jnp.zeros(3)})
  with pytest.raises(reparam.ConfigError, match=r"^checkpoint .*/checkpoints/30 holds another training state than "
                     r"this code builds \(leaves only there: none; only here: newer\): it was saved by another "
                     r"version of reparam or of the model; resume it with that version, or use a new workdir$"):
    train.train_and_evaluate(ref_config(), workdir)
  assert snapshot(os.path.join(workdir, "checkpoints")) == before


def test_checkpoint_warning_cuts_a_long_message_at_a_sentence_or_a_word():
  """TensorStore's message used to be cut at 120 characters, mid-word: `... See full TensorStore details: <bound m`.
  Now its first sentence is kept, and a long sentence is cut after a whole word, with "…"."""
  tensorstore = ("Encountered error while reading array index: (slice(0, 128, 1), slice(0, 10, 1)). See full "
                 "TensorStore details: <bound method Spec.to_json of Spec({'driver': 'zarr3', 'kvstore': {}})>")
  assert checkpoint.brief(tensorstore) == ("Encountered error while reading array index: (slice(0, 128, 1), "
                                           "slice(0, 10, 1)).")
  words = " ".join(f"word{i}" for i in range(40))
  cut = checkpoint.brief(words)
  assert cut.endswith("…") and len(cut) <= 121 and words.startswith(cut[:-1]) and words[len(cut) - 1] == " "
  assert checkpoint.brief("checksum mismatch in Dense_0/kernel\nsecond line") == "checksum mismatch in Dense_0/kernel"


# --------------------------------------------------------------------------------------------------- determinism

def test_same_config_and_seed_give_bit_identical_runs(finished_run, tmp_path):
  """Two runs of one config and seed on CPU: the same bytes of parameters, the same metrics and diagnostics."""
  again = str(tmp_path / "again")
  train.train_and_evaluate(ref_config(), again)
  assert_same_run(finished_run, again)
  with open(os.path.join(finished_run, "params.msgpack"), "rb") as a, open(
      os.path.join(again, "params.msgpack"), "rb") as b:
    assert a.read() == b.read()


# ------------------------------------------------------------------------------------------- numerical faults

NONFINITE = re.compile(r"error: non-finite loss, gradient or update at step (\d+); non-finite updated values in: "
                       r"(.+); "
                       r"last good state: checkpoint of step (\d+) in (.+)/checkpoints\. Lower the learning rate, "
                       r"or set --config\.train\.skip_nonfinite=True to skip such steps")
HUGE_LR = ["--config", "configs/quickstart.py:steps=10", "--config.optimizer.learning_rate=1e30",
           "--config.optimizer.warmup_steps=0", "--config.train.checkpoint_every=1", *QUIET]


def _state_at(config, workdir, step):
  s = train.build(config)                    # monkeypatched where a test poisons the data
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  state, got = checkpoint.restore_latest(mgr, train.init_state(s), max_step=step)
  assert got == step
  return s, state


def _nonfinite_grads(s, state, step):
  """Which gradients are NaN/inf at `step`, computed here from the restored state, not by the training step."""
  batch = s.dataset.batch(step - 1, s.config.data.batch_size, s.config.seed)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def loss_fn(rp):
    logits, _ = s.forward(rp, state["collections"], jnp.asarray(batch["x"]), True, rng)
    return setup.loss_and_accuracy(logits, jnp.asarray(batch["y"]))[0]

  grads = jax.grad(loss_fn)(state["rparams"])
  return {p for p, g in reparam.flatten(grads).items() if not np.all(np.isfinite(g))}


@pytest.mark.slow
def test_huge_learning_rate_stops_with_step_leaves_and_last_good_checkpoint(tmp_path):
  """lr = 1e30: step 1 moves every weight by ~1e30, step 2's loss overflows. The CLI exits 3 with one line naming
  step 2, the leaves whose gradients are non-finite (the same ones a gradient computed here from the
  checkpoint finds) and the checkpoint of step 1, which is committed, finite and the newest: nothing
  non-finite overwrote it."""
  workdir = str(tmp_path / "run")
  proc = cli("train", HUGE_LR + ["--workdir", workdir])
  assert proc.returncode == 3, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  m = NONFINITE.fullmatch(lines[0])
  assert m, lines[0]
  bad_step, leaves, good, where = int(m.group(1)), m.group(2).split(", "), int(m.group(3)), m.group(4)
  assert (bad_step, good, where) == (2, 1, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]      # committed, nothing newer
  config = set_keys(quickstart.get_config("steps=10"), {"optimizer.learning_rate": 1e30,
                                                        "optimizer.warmup_steps": 0})
  s, state = _state_at(config, workdir, 1)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["rparams"]))
  assert set(leaves) == _nonfinite_grads(s, state, 2) == set(reparam.flatten(s.rparams))


@pytest.mark.slow
def test_skip_nonfinite_finishes_the_run_and_logs_skipped_steps(tmp_path):
  """The same lr = 1e30 run with --config.train.skip_nonfinite=True: every step from 2 on is skipped (the huge
  weights of step 1 overflow every loss), the run finishes, the rows count the skipped steps, and a log
  interval whose steps were all skipped has no train loss (NaN, not 0)."""
  workdir = str(tmp_path / "run")
  proc = cli("train", HUGE_LR + ["--workdir", workdir, "--config.train.skip_nonfinite=True"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert results.read_json(os.path.join(workdir, "result.json"))["done"]
  logged = {r["step"]: r for r in rows(workdir) if "skipped_steps" in r}
  assert sorted(logged) == list(range(1, 11))
  assert [logged[s]["skipped_steps"] for s in logged] == [0] + [1] * 9
  assert math.isfinite(logged[1]["train_loss"]) and all(math.isnan(logged[s]["train_loss"]) for s in range(2, 11))


def _poison_step(monkeypatch, step):
  """NaN inputs in the batch of `step`: a corrupt record in the data."""
  real = train.build

  def build(config):
    s = real(config)
    sample = s.dataset.sample

    def poisoned(i, bs, seed):
      batch = sample(i, bs, seed)
      return {**batch, "x": np.full_like(batch["x"], np.nan)} if i == step - 1 else batch

    s.dataset = dataclasses.replace(s.dataset, sample=poisoned)
    return s

  monkeypatch.setattr(train, "build", build)


def nan_config(**train_keys):
  c = quickstart.get_config("steps=10")
  c.train.update(log_every=1, checkpoint_every=2, progress=False, tensorboard=False, **train_keys)
  return c


def test_nan_batch_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """NaN inputs at step 5: NonFiniteError names step 5, the kernels (not the hidden biases: ReLU's gradient at a
  NaN input is 0, so they stay finite; a gradient computed here from the checkpoint agrees), and the checkpoint
  of step 4, which restores to a finite state; no checkpoint of a later step exists."""
  _poison_step(monkeypatch, 5)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(nan_config(), workdir)
  msg = str(e.value)
  assert msg.startswith("non-finite loss, gradient or update at step 5; non-finite updated values in: ")
  assert "\n" not in msg
  assert f"last good state: checkpoint of step 4 in {workdir}/checkpoints" in msg
  assert ckpt_steps(workdir) == [2, 4]
  s, state = _state_at(nan_config(), workdir, 4)
  named = set(msg.split("in: ")[1].split("; ")[0].split(", "))
  assert named == _nonfinite_grads(s, state, 5) == {"Dense_0/kernel", "Dense_1/kernel", "head/kernel", "head/bias"}
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["rparams"]))


def test_nan_batch_is_skipped_with_skip_nonfinite(tmp_path, monkeypatch):
  """The same NaN batch with skip_nonfinite: step 5 is skipped (its row says so, and has no train loss), every
  other step trains, and the run ends finite."""
  _poison_step(monkeypatch, 5)
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(nan_config(skip_nonfinite=True), workdir)
  assert result["done"] and math.isfinite(result["eval_loss"])
  logged = {r["step"]: r for r in rows(workdir) if "skipped_steps" in r}
  assert [s for s, r in logged.items() if r["skipped_steps"]] == [5]
  assert math.isnan(logged[5]["train_loss"]) and all(math.isfinite(r["train_loss"]) for s, r in logged.items()
                                                     if s != 5)
  assert all(np.all(np.isfinite(x)) for x in load_params(workdir).values())


# -------------------------------------------------------------------------------------------------- bad input

BAD_CONFIGS = [   # (overrides of quickstart, the message must contain this)
    ({"data.name": "mnist2"}, "data.name='mnist2' is not one of: digits, markov, mnist"),
    ({"model.name": "resnet"}, "model.name='resnet' is not one of: mlp"),
    ({"reparam.transform": "lora(rnk=4)"}, "reparam.transform: lora() has no option 'rnk'; valid: rank"),
    ({"reparam.transform": "lora(rank=1000)"},
     "reparam.transform='lora(rank=1000)' on reparam.targets='.*kernel': Dense_0/kernel (shape (64, 128)): "
     "lora: rank=1000 must be an integer in [1, min(in, out) = 64]"),
    ({"reparam.transform": "dora(rank=0)"}, "dora: rank=0 must be an integer in [1, min(in, out) = 64]"),
    ({"reparam.transform": "chain(weight_norm,"}, "reparam.transform: cannot parse 'chain(weight_norm,'"),
    ({"reparam.rules": ((r"encoder/.*", "weight_norm"),)},
     "reparam.rules: rule 'encoder/.*' matches no parameter; parameter paths are: Dense_0/bias"),
    ({"reparam.transform": "weight_norm", "reparam.targets": "conv.*"},
     "reparam.targets='conv.*': rule 'conv.*' matches no parameter"),
    ({"reparam.transform": "weight_norm", "reparam.targets": "(("}, "reparam.targets='((' is not a valid regex"),
    ({"reparam.transform": "weight_norm", "reparam.exclude": "[a"}, "reparam.exclude='[a' is not a valid regex"),
    ({"optimizer.schedule": "exp"}, "optimizer.schedule: 'exp' is not valid; valid: constant, cosine, linear"),
    ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate: must be a number > 0.0, got -1.0"),
    ({"optimizer.warmup_steps": -3}, "optimizer.warmup_steps: must be an integer >= 0"),
    ({"optimizer.b1": 1.5}, "optimizer.b1: must be a number >= 0.0 and <= 1.0, got 1.5"),
    ({"optimizer.grad_clip_norm": -1.0}, "optimizer.grad_clip_norm: must be a number > 0.0 or None"),
    ({"train.steps": 0}, "train.steps=0 must be a positive integer"),
    ({"train.log_every": 0}, "train.log_every=0 must be a positive integer"),
    ({"train.eval_every": -1}, "train.eval_every=-1 must be a non-negative integer (0: never)"),
    ({"train.checkpoint_every": -5}, "train.checkpoint_every=-5 must be a non-negative integer (0: never)"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0 must be a positive integer"),
    ({"data.batch_size": -8}, "data.batch_size=-8 must be a positive integer"),
    ({"data.eval_batch_size": 0}, "data.eval_batch_size=0 must be a positive integer"),
    ({"model.hidden": (0, 64)}, "model.hidden=(0, 64) must be a tuple of positive integers"),
    ({"model.act": "swishy"}, "model.act='swishy' is not one of: relu, gelu"),
    ({"model.name": "transformer"}, "model.name='transformer' needs a lm dataset; data.name='digits'"),
    ({"data.name": "markov"}, "model.name='mlp' needs a classification dataset; data.name='markov' is lm"),
    ({"data.steps_per_task": 10}, "data.steps_per_task=10 needs data.task_kind: one of permute, random_labels"),
    ({"data.task_kind": "shuffle"}, "data.task_kind='shuffle' is not one of: None, permute, random_labels"),
    ({"init_from": "/nonexistent/pretrain"}, "init_from='/nonexistent/pretrain': no params.msgpack there"),
    ({"init_from": os.path.join(ROOT, "README.md")},
     "README.md': not the params.msgpack of a finished run (ExtraData"),
    ({"seed": -1}, "seed=-1 must be a non-negative integer"),
    ({"train.space": "weights"}, "train.space='weights' is not one of: auto, activation"),
    ({"reparam.data_init": True}, "reparam.data_init=True needs a plain weight_norm transform to initialize; "
                                  "reparam.transform='none'"),
    ({"optimizer.warmup_steps": 100}, "optimizer.warmup_steps: 100 must be < total_steps=6"),
    ({"reparam.rules": (("((", "weight_norm"),)}, "reparam.rules: rules[0]: '((' is not a valid regex"),
    ({"reparam.rules": ("weight_norm",)}, "reparam.rules[0]: expected a (regex, transform) pair, got 'weight_norm'"),
    ({"reparam.rules": ((".*kernel", "fancy_norm"),)},
     "reparam.rules[0]: unknown transform 'fancy_norm'; valid: dora, identity, lora, multipliers, weight_norm"),
    ({"reparam.rules": ((".*kernel", "weight_norm"), ("Dense_0/kernel", "lora(rank=2)"))},
     "rule 'Dense_0/kernel' matches no parameter (every leaf it matches is taken by an earlier rule)"),
    ({"data.name": "markov", "data.task_kind": "permute"},
     "data.task_kind='permute' needs a classification dataset; data.name='markov' is a language model"),
    ({"data.name": "markov", "model.name": "transformer", "reparam.transform": "dora(rank=1000)",
      "reparam.targets": r"block_.*/kernel"},
     "block_0/key/kernel (shape (128, 128)): dora: rank=1000 must be an integer in [1, min(in, out) = 128]"),
    ({"data.name": "markov", "model.name": "transformer", "model.d_model": 64, "model.num_heads": 5},
     "model.d_model=64 must be divisible by model.num_heads=5"),
    # Accepted before: an empty chain ran as the identity, and a one-token language trained to loss 0.
    ({"reparam.transform": "chain()"}, "reparam.transform: chain needs at least one transform, e.g. "
                                       "'chain(weight_norm, multipliers(row=True))', or 'none' for no transform"),
    ({"data.name": "markov", "model.name": "transformer", "data.vocab_size": 1},
     "data.vocab_size=1 must be an integer in [2, 161] for the markov source with data.order=2"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[",".join(o) + f"-{i}" for i, (o, _) in
                                                                 enumerate(BAD_CONFIGS)])
def test_bad_config_is_one_config_error_before_anything_is_written(tmp_path, overrides, message):
  config = set_keys(quickstart.get_config("steps=6"), overrides)
  workdir = tmp_path / "run"
  with pytest.raises(reparam.ConfigError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not workdir.exists()
  if "init_from" not in overrides:           # a sweep finds the same error before it writes anything
    with pytest.raises(reparam.ConfigError) as e2:
      setup.check(config)
    assert str(e2.value) == str(e.value)


@pytest.mark.parametrize("hidden,message", [
    ((64,), "Dense_0/bias is (128,) there, (64,) here; Dense_0/kernel is (64, 128) there, (64, 64) here; head/kernel "
            "is (128, 10) there, (64, 10) here; not in this model: Dense_1/bias, Dense_1/kernel"),
    ((128, 128, 128), "missing there: Dense_2/bias, Dense_2/kernel")], ids=["other-width", "deeper"])
def test_init_from_a_run_of_another_model_is_refused_naming_the_leaves(finished_run, tmp_path, hidden, message):
  """`init_from` a run of another width or depth: one ConfigError naming the first leaves and both shapes, before
  anything is written. Before, those leaves silently stayed at their random init."""
  config = set_keys(quickstart.get_config("steps=6"), {"init_from": finished_run, "model.hidden": hidden})
  workdir = tmp_path / "run"
  with pytest.raises(reparam.ConfigError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert str(e.value) == (f"init_from={finished_run!r} holds another model's parameters: {message}; use the model "
                          f"config of the run it names")
  assert not workdir.exists()


@pytest.mark.parametrize("call,message", [
    (lambda: sweep.parse_shard("3/2"), "--shard='3/2' must be k/N with 0 <= k < N"),
    (lambda: sweep.parse_shard("1/0"), "--shard='1/0' must be k/N"),
    (lambda: sweep.apply_overrides(quickstart.get_config(), {"optimizer.lr": 0.1}, "get_sweep()[2]"),
     "get_sweep()[2]: cannot set optimizer.lr=0.1: no such config key; optimizer has: adam_learning_rate, b1"),
    (lambda: sweep.apply_overrides(quickstart.get_config(), {"seed.value": 1}, "get_sweep()[0]"),
     "get_sweep()[0]: cannot set seed.value=1: seed is a value, not a group"),
    (lambda: sweep.apply_overrides(quickstart.get_config(), {"train.steps": "ten"}, "get_sweep()[1]"),
     "get_sweep()[1]: cannot set train.steps='ten'"),
    (lambda: sweep.expand(quickstart.get_config(), [{"seed": 0}, {"seed": 0}]),
     "get_sweep()[1] repeats trial 'seed=0'"),
], ids=["shard-3/2", "shard-1/0", "unknown-key", "key-under-a-value", "wrong-type", "duplicate-trial"])
def test_bad_sweep_is_one_config_error(call, message):
  with pytest.raises(reparam.ConfigError) as e:
    call()
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_rerun_with_another_config_is_refused_and_a_changed_display_flag_is_not(finished_run, tmp_path):
  """Resuming a workdir with another config used to move its good checkpoints aside as unreadable and retrain
  over its results; now it is refused before anything is written. Display and logging keys may change."""
  before = snapshot(finished_run)
  config = set_keys(ref_config(), {"model.hidden": (64,), "optimizer.learning_rate": 0.01})
  with pytest.raises(reparam.ConfigError, match=r"holds a run of another config \(model\.hidden=\[128, 128\] "
                                                r"there, \[64\] now, optimizer\.learning_rate=0\.003 there"):
    train.train_and_evaluate(config, finished_run)
  assert snapshot(finished_run) == before
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  result = train.train_and_evaluate(set_keys(ref_config(), {"train.verbose": True, "name": "renamed"}), workdir)
  assert result == results.read_json(os.path.join(finished_run, "result.json"))


def test_a_run_from_before_train_space_and_another_space_resume(finished_run, tmp_path):
  """`train.space` came after runs that have no such key in their config.json: they resume, and so does a run
  under the other space (it picks among exact forms of the same math)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  path = os.path.join(workdir, "config.json")
  old = results.read_json(path)
  del old["train"]["space"]
  results.write_json(path, old)
  for space in ("auto", "activation"):
    assert train.train_and_evaluate(set_keys(ref_config(), {"train.space": space}), workdir) == results.read_json(
        os.path.join(finished_run, "result.json"))


def test_moved_data_resumes_a_run_and_a_finished_sweep_and_real_changes_are_still_refused(finished_run, tmp_path):
  """Another `data.dir` (prepared TFDS data moved elsewhere) does not change what a run computes: a run and a
  finished sweep's trial resume. It used to be refused as "another config". A real change beside it is still
  refused, and the message names that key only."""
  moved, changed = {"data.dir": str(tmp_path / "elsewhere")}, {"data.train_size": 100}
  refused = r"holds a run of another config \(data\.train_size=None there, 100 now\); rerun"
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  assert train.train_and_evaluate(set_keys(ref_config(), moved), workdir) == results.read_json(
      os.path.join(finished_run, "result.json"))
  with pytest.raises(reparam.ConfigError, match=refused):
    train.train_and_evaluate(set_keys(ref_config(), {**moved, **changed}), workdir)
  sweep_dir = tmp_path / "sweep"
  shutil.copytree(finished_run, sweep_dir / "seed=0")
  sweep.check_trials(str(sweep_dir), sweep.expand(set_keys(ref_config(), moved), [{"seed": 0}], str(sweep_dir)))
  with pytest.raises(reparam.ConfigError, match=r"get_sweep\(\)\[0\] \(trial seed=0\): .*" + refused):
    sweep.check_trials(str(sweep_dir), sweep.expand(set_keys(ref_config(), {**moved, **changed}), [{"seed": 0}],
                                                    str(sweep_dir)))


@pytest.mark.parametrize("content,error", [("garbage", "JSONDecodeError: Expecting value: line 1 column 1"),
                                           ("[1, 2]", "ValueError: a JSON list, not an object")])
def test_in_process_run_over_an_unreadable_config_json_is_refused(tmp_path, content, error):
  """`train.train_and_evaluate` called from Python, not only the command lines, refuses a workdir whose
  config.json it cannot read: it used to count it as absent and train over the run."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(content)
  before = snapshot(workdir)
  with pytest.raises(reparam.ConfigError) as e:
    train.train_and_evaluate(set_keys(quickstart.get_config("steps=6"), {"train.progress": False,
                                                                         "train.tensorboard": False}), str(workdir))
  assert str(e.value).startswith(f"'{workdir}/config.json' is unreadable ({error}") and "\n" not in str(e.value)
  assert "so a rerun cannot check it holds a run of this config" in str(e.value)
  assert snapshot(workdir) == before


BAD_SWEEP = '''
from configs import quickstart

def get_config(arg=None):
  return quickstart.get_config("steps=6")

def get_sweep(arg=None):
  return [{"seed": 0}, {"seed": 1}, {"seed": 2, "%s": %s}]
'''


def _sweep_file(tmp_path, key, value):
  path = tmp_path / "bad_sweep.py"
  path.write_text(BAD_SWEEP % (key, value))
  return str(path)


def _train(*args):
  """The arguments of the finished run (`finished_run`), then `args`: absl lets a later flag win."""
  return ["--config=configs/quickstart.py:steps=30", *QUIET, "--config.train.checkpoint_every=10",
          "--config.train.keep_checkpoints=3", "--workdir={run}", *args]


CLI_CASES = [   # (module, arguments: {run} is a finished run, {tmp} an empty directory), the message must contain
    ("train", _train("--config.train.steps=ten"),
     "flag --config.train.steps=ten: invalid literal for int() with base 10: 'ten'"),
    ("train", _train("--config.train.skip_nonfinite=maybe"),
     "flag --config.train.skip_nonfinite=maybe: ('Non-boolean argument to boolean flag', 'maybe')"),
    ("train", _train("--config.reparam.transform=lora(rank=1000)"),
     "lora: rank=1000 must be an integer in [1, min(in, out) = 64]"),
    ("train", _train("--config.model.hidden=(64,)"),
     "holds a run of another config (model.hidden=[128, 128] there, [64] now); rerun with its config"),
    ("train", _train("--config.data.name=mnist", "--config.data.dir={tmp}"),
     "data.name='mnist': not prepared under {tmp}; run `tfds build mnist --file_format=array_record`"),
    ("train", ["--config=configs/missing.py", "--workdir={run}"],
     "--config: cannot load the config file: [Errno 2] No such file or directory: 'configs/missing.py'"),
    ("train", ["--config=configs/quickstart.py:stepz=5", "--workdir={run}"],
     "flag --config=configs/quickstart.py:stepz=5: ValueError: config arg 'stepz' is not one of: steps"),
    ("train", _train("--workdir_typo=x"), "Unknown command line flag 'workdir_typo'"),
    ("train", _train("--workdir={run}/config.json"), "--workdir='{run}/config.json' is a file, not a directory"),
    ("train", _train("--workdir={run}/config.json/sub"),
     "--workdir='{run}/config.json/sub' cannot be created: '{run}/config.json' is a file, not a directory"),
    ("train", _train("--workdir="), "--workdir is required"),
    ("sweep", ["--config=configs/quickstart.py", "--workdir={run}", "--shard=3/2"],
     "--shard='3/2' must be k/N with 0 <= k < N, e.g. --shard=0/4"),
    ("sweep", ["--config={sweep:optimizer.lr:0.1}", "--workdir={run}"],
     "get_sweep()[2]: cannot set optimizer.lr=0.1: no such config key; optimizer has: adam_learning_rate"),
    ("sweep", ["--config={sweep:model.act:'swishy'}", "--workdir={run}"],
     "get_sweep()[2] (trial seed=2,act=swishy): model.act='swishy' is not one of: relu"),
    ("train", _train("--config.optimizer.lr=0.1"),
     "--config.optimizer.lr: no such config key 'lr'; optimizer has: adam_learning_rate, b1, b2, grad_clip_norm, "
     "learning_rate"),
    ("train", _train("--config.seed=-1"), "seed=-1 must be a non-negative integer"),
    ("train", _train("--config.init_from={run}/config.json"),
     "init_from='{run}/config.json': not the params.msgpack of a finished run"),
    ("sweep", ["--config=configs/weight_norm.py", "--workdir={tmp}/new"],
     "get_sweep()[0] (trial transform=none,seed=0): data.name='cifar10': not prepared under tfds' default data_dir"),
    ("sweep", ["--config={sweep:seed:int('two')}", "--workdir={tmp}/new"],
     "bad_sweep.py: get_sweep(None) failed: ValueError: invalid literal for int() with base 10: 'two'"),
    ("sweep", ["--config=configs/quickstart.py", "--workdir={tmp}/new", "--shard=abc"],
     "--shard='abc' must be k/N with 0 <= k < N"),
    ("report", ["{tmp}/missing"], "'{tmp}/missing' is not a directory (expected a sweep's --workdir)"),
    ("report", ["{run}/config.json"], "'{run}/config.json' is not a directory (expected a sweep's --workdir)"),
    # A run's workdir is no sweep: the report used to exit 0 after writing report/ ("0 of 0 trials") into it.
    ("report", ["{run}"], "'{run}' is not a sweep's directory: no sub-directory holds a trial.json"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module,args,message", CLI_CASES,
                         ids=[f"{m}-{i}-{a[-1][:40]}" for i, (m, a, _) in enumerate(CLI_CASES)])
def test_bad_input_on_the_command_line_is_one_line_and_touches_nothing(finished_run, tmp_path, module, args,
                                                                       message):
  """Through the real entry points: exit status 2, one line on stderr naming the key or path and what is valid,
  and the finished run given as (or beside) --workdir keeps every file and mtime."""
  def fill(text):
    m = re.fullmatch(r"--config=\{sweep:(.+):(.+)\}", text)
    if m:
      return f"--config={_sweep_file(tmp_path, m.group(1), m.group(2))}"
    return text.replace("{run}", finished_run).replace("{tmp}", str(tmp_path))

  before = snapshot(os.path.dirname(finished_run))
  # An empty TFDS data_dir: "offline, nothing prepared" whatever this machine's ~/tensorflow_datasets holds.
  proc = cli(module, [fill(a) for a in args], env={"TFDS_DATA_DIR": str(tmp_path / "no_tfds")})
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and fill(message) in lines[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert snapshot(os.path.dirname(finished_run)) == before
  assert not (tmp_path / "new").exists()


def without_root_powers() -> list[str]:
  """A command prefix under which permissions bind: as root, `setpriv` drops the capabilities that let root
  read and write through them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); nothing needed otherwise."""
  if os.geteuid() != 0:
    return []
  caps = "-dac_override,-dac_read_search"
  prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
  if not shutil.which("setpriv") or subprocess.run(prefix + ["true"], capture_output=True).returncode:
    pytest.skip("running as root, and setpriv cannot drop root's permission overrides here")
  return prefix


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "sweep"])
def test_unwritable_or_unreadable_workdir_is_one_line(finished_run, tmp_path, module):
  """A new workdir under a directory without write permission, and an existing run whose directory has no
  permissions at all (mode 000): one line each, nothing created or changed."""
  prefix = without_root_powers()
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o555)
  sealed = tmp_path / "sealed"
  shutil.copytree(finished_run, sealed)
  before = snapshot(sealed)
  sealed.chmod(0o000)
  try:
    for workdir, message in [(f"{locked}/run", f"--workdir='{locked}/run' is not writable: no write permission on "
                                                f"'{locked}'"),
                             (str(sealed), f"--workdir='{sealed}' is not writable: no write permission on "
                                           f"'{sealed}'")]:
      proc = cli(module, ["--config=configs/quickstart.py:steps=30", f"--workdir={workdir}", *QUIET], prefix=prefix)
      lines = proc.stderr.strip().splitlines()
      assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
      assert lines[0] == f"error: {message}"
  finally:
    sealed.chmod(0o755)
  assert snapshot(sealed) == before and os.listdir(locked) == []


@pytest.mark.slow
def test_report_of_an_unreadable_directory_is_one_line(finished_run, tmp_path):
  """A sweep directory without permissions (mode 000): one line, exit 2, nothing written. Before, a
  PermissionError traceback (exit 1)."""
  prefix = without_root_powers()
  sealed = tmp_path / "sealed"
  shutil.copytree(finished_run, sealed / "seed=0")
  (sealed / "seed=0" / "trial.json").write_text('{"index": 0, "overrides": {"seed": 0}}')
  before = snapshot(sealed)
  sealed.chmod(0o000)
  try:
    proc = cli("report", [str(sealed)], prefix=prefix)
  finally:
    sealed.chmod(0o755)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (f"error: '{sealed}' cannot be read (Permission denied): give read permission on it, or run "
                      f"the report as its owner")
  assert snapshot(sealed) == before


DAMAGED_RUN_DIR = {   # damage done to a run directory outside any run -> what the rerun must say
    "garbage config.json": (lambda d: open(os.path.join(d, "config.json"), "w").write("garbage"),
                            "config.json' is unreadable (JSONDecodeError: Expecting value: line 1 column 1 (char 0)), "
                            "so a rerun cannot check it holds a run of this config"),
    "checkpoints is a file": (lambda d: (shutil.rmtree(os.path.join(d, "checkpoints")),
                                         open(os.path.join(d, "checkpoints"), "w").write("x")),
                              "checkpoints' is a file, not the run's checkpoint directory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGED_RUN_DIR))
@pytest.mark.parametrize("module", ["train", "sweep"])
def test_damaged_run_directory_is_refused_and_left_as_it_is(finished_run, tmp_path, damage, module):
  """An unfinished run (no result.json) whose config.json is garbage or whose checkpoints directory is a file,
  rerun with another config: refused with one line naming the file. Before, the garbage config.json let the
  rerun resume over the run (every checkpoint moved aside as unreadable, the metrics retrained), and the file
  made orbax print a traceback from its background thread. In a sweep the damaged directory is a trial's."""
  sweep_dir = tmp_path / "sweep"
  name = "seed=0" if module == "sweep" else "run"
  run = sweep_dir / name
  shutil.copytree(finished_run, run)
  os.remove(run / "result.json")
  do, message = DAMAGED_RUN_DIR[damage]
  do(str(run))
  before = snapshot(sweep_dir)
  if module == "train":
    args = ["--config=configs/quickstart.py:steps=30", f"--workdir={run}", "--config.model.hidden=(64,)", *QUIET]
  else:
    args = ["--config=" + _sweep_file(tmp_path, "seed", "3"), f"--workdir={sweep_dir}"]   # trials seed=0, 1, 2
  proc = cli(module, args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert f"'{run}/" + message in lines[0], lines[0]
  assert snapshot(sweep_dir) == before


@pytest.mark.slow
def test_sweep_rerun_with_another_config_is_refused_before_writing(tmp_path):
  """A finished sweep rerun with a changed learning rate: refused with one line naming the first trial, before
  sweep.json or any trial.json is rewritten. Before, finished trials were skipped unchecked (their results
  reported as the new config's) and the first unfinished one failed only after the sweep's files were
  rewritten. A changed display flag still resumes."""
  config, workdir = _sweep_file(tmp_path, "seed", "2"), tmp_path / "sweep"
  args = [f"--config={config}", f"--workdir={workdir}", "--report=false", *QUIET]
  assert cli("sweep", args).returncode == 0
  before = snapshot(workdir)
  proc = cli("sweep", args + ["--config.optimizer.learning_rate=0.01"])
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (f"error: get_sweep()[0] (trial seed=0): workdir '{workdir}/seed=0' holds a run of another "
                      f"config (optimizer.learning_rate=0.003 there, 0.01 now); rerun with its config to resume it, "
                      f"or use a new workdir")
  assert snapshot(workdir) == before
  proc = cli("sweep", args + ["--config.train.verbose=True"])
  assert proc.returncode == 0 and "3 trials in this shard: 3 done, 0 to run" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_debug_brings_the_traceback_back(tmp_path):
  proc = cli("train", ["--config=configs/quickstart.py", f"--workdir={tmp_path}/run", "--config.model.act=swishy",
                       "--debug"])
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].endswith("model.act='swishy' is not one of: relu, gelu, tanh, "
                                                       "silu, leaky_relu")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "sweep"])
def test_config_file_without_get_config_is_named(tmp_path, module):
  """config_flags says only "module 'config_config' has no attribute 'get_config'": the line names the file."""
  path = tmp_path / "no_get_config.py"
  path.write_text("STEPS = 6\n")
  proc = cli(module, [f"--config={path}", f"--workdir={tmp_path}/new"])
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines == [f"error: --config={path}: the file defines no get_config(arg=None)"], \
      proc.stderr[-3000:]
  assert not (tmp_path / "new").exists()
