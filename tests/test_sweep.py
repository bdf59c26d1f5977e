"""Sweeps end to end: kill a sweep mid-trial and rerun; vmapped seeds equal sequential seeds."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import serialization

import reparam
from experiments import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_CONFIG = '''
from configs import common, quickstart

def get_config(arg=None):
  c = quickstart.get_config("steps=30")
  c.train.update(checkpoint_every=10, progress=False, tensorboard=False, log_every=5, eval_every=10)
  return c

def get_sweep(arg=None):
  return common.product(common.sweep("reparam.transform", ["none", "chain(dora(rank=2), multipliers(row=True))"]),
                        common.sweep("seed", [0, 1, 2]))
'''


def sweep(tmp_path, workdir, *flags, env=None, check=True):
  config = tmp_path / "tiny_sweep.py"
  config.write_text(SWEEP_CONFIG)
  proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config", str(config), "--workdir",
                         str(workdir), *flags], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  if check and proc.returncode != 0:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def trial_dirs(workdir):
  return sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "trial.json")))


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_or_losing_trials(tmp_path):
  workdir = tmp_path / "sweep"
  proc = sweep(tmp_path, workdir, env={"REPARAM_FAULT": "step:20:3"}, check=False)   # dies in trial 3
  assert proc.returncode == -signal.SIGKILL
  finished = {d: os.stat(workdir / d / "result.json").st_mtime_ns for d in trial_dirs(workdir)
              if (workdir / d / "result.json").exists()}
  assert len(finished) == 2
  proc = sweep(tmp_path, workdir)
  assert "6 trials in this shard: 2 done, 4 to run" in proc.stdout
  dirs = trial_dirs(workdir)
  assert len(dirs) == 6
  for d in finished:      # not rerun: the result files are the very same
    assert os.stat(workdir / d / "result.json").st_mtime_ns == finished[d]
  for d in dirs:          # none lost, none logged twice
    steps = [r["step"] for r in results.read_jsonl(str(workdir / d / "metrics.jsonl"))]
    assert results.read_json(str(workdir / d / "result.json"))["done"] and steps == sorted(set(steps))
  text = open(workdir / "report" / "report.md").read()
  assert "6 of 6 trials finished" in text and text.count("| 3 |") == 2


@pytest.mark.slow
def test_vmapped_seeds_equal_sequential_seeds(tmp_path):
  seq, vm = tmp_path / "seq", tmp_path / "vmap"
  sweep(tmp_path, seq, "--report=false")
  proc = sweep(tmp_path, vm, "--vmap_seeds", "--report=false")
  assert "(+2 seeds)" in proc.stderr
  assert trial_dirs(seq) == trial_dirs(vm)
  for d in trial_dirs(seq):
    a = results.read_jsonl(str(seq / d / "metrics.jsonl"))
    b = results.read_jsonl(str(vm / d / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
      for k in ("train_loss", "eval_loss", "eval_accuracy"):
        if k in ra:
          np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=f"{d} {k} step {ra['step']}")
    # The vmapped group computes every seed's diagnostics in one program: each row must be its own seed's.
    a = results.read_jsonl(str(seq / d / "diagnostics.jsonl"))
    b = results.read_jsonl(str(vm / d / "diagnostics.jsonl"))
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and len(a) == 6, d
    for ra, rb in zip(a, b):
      for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-3, atol=1e-6, err_msg=f"{d} {k} step {ra['step']}")
    with open(seq / d / "params.msgpack", "rb") as f1, open(vm / d / "params.msgpack", "rb") as f2:
      pa, pb = serialization.msgpack_restore(f1.read()), serialization.msgpack_restore(f2.read())
    fa, fb = reparam.flatten(pa), reparam.flatten(pb)
    assert list(fa) == list(fb)
    for path in fa:
      np.testing.assert_allclose(fb[path], fa[path], rtol=1e-4, atol=1e-5, err_msg=f"{d} {path}")

  # Killed after step 20 of the first group and rerun. The kill races the seeds' saves of step 10 (some may be
  # complete, some not): either way the group resumes from a step all its seeds have and ends bit for bit where
  # the uninterrupted group did.
  killed = tmp_path / "killed"
  assert sweep(tmp_path, killed, "--vmap_seeds", "--report=false", env={"REPARAM_FAULT": "step:20"},
               check=False).returncode == -signal.SIGKILL
  sweep(tmp_path, killed, "--vmap_seeds", "--report=false")
  rows = lambda path: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in results.read_jsonl(str(path))]
  for d in trial_dirs(vm):
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
      assert rows(killed / d / name) == rows(vm / d / name), (d, name)
    with open(vm / d / "params.msgpack", "rb") as f1, open(killed / d / "params.msgpack", "rb") as f2:
      assert f1.read() == f2.read(), d


def test_dry_run_lists_trials_and_shards(tmp_path):
  out = sweep(tmp_path, tmp_path / "s", "--dry_run", "--shard=1/2").stdout
  assert "3 of 6 trials in shard 1/2" in out and out.count("todo") == 3
  assert not (tmp_path / "s").exists()
