"""The weight-norm and NaP paper configs: each full variant trains 2 steps of its full model on mock TFDS data
(shapes and the data path), and each sweep expands into the arms its docstring lists."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import fake_prepared

from configs import nap, weight_norm
from experiments import results, sweep, train


def short(config, tmp_path, dataset):
  """Only step counts and batch sizes shrink; the data dir holds mock records."""
  config.train.update(log_every=1, checkpoint_every=2, diagnostics_every=1, progress=False, tensorboard=False)
  config.data.update(batch_size=8, eval_batch_size=16, dir=str(tmp_path / "tfds"))
  fake_prepared(dataset, config.data.dir)
  return config


def test_weight_norm_full_variant_trains_on_mock_cifar10(tmp_path):
  """The arm with the most machinery: weight norm on every kernel, data-dependent init, mean-only batch norm."""
  c = short(weight_norm.get_config("steps=2"), tmp_path, "cifar10")
  assert (c.model.name, c.model.width, c.model.depth, c.data.name) == ("cnn", 1.0, 3, "cifar10")
  c = sweep.apply_overrides(c, weight_norm.ARMS["wn_mobn"], "wn_mobn")
  with tfds.testing.mock_data(num_examples=16, data_dir=c.data.dir):
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["done"] and result["steps"] == 2 and np.isfinite(result["eval_loss"])
  routing = open(tmp_path / "run" / "routing.txt").read()
  wrapped = [line.split()[0] for line in routing.splitlines() if "weight_norm" in line]
  assert len(wrapped) == 10 and "head/kernel" in wrapped     # the 9 conv kernels and the head


@pytest.mark.parametrize("kind", ["random_labels", "permute"])
def test_nap_full_variant_trains_a_task_sequence_on_mock_mnist(tmp_path, kind):
  c = short(nap.get_config(f"kind={kind},tasks=2,steps_per_task=1"), tmp_path, "mnist")
  assert (c.model.hidden, c.data.name, c.data.task_kind) == ((256, 256, 256), "mnist", kind)
  c = sweep.apply_overrides(c, nap.ARMS["nap"], "nap")
  with tfds.testing.mock_data(num_examples=16, data_dir=c.data.dir):
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["done"] and result["steps"] == 2 and np.isfinite(result["eval_loss"])
  rows = results.read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl"))
  assert [r["task"] for r in rows if "eval_accuracy" in r] == [0, 1]     # each task evaluated at its end
  diag = results.read_jsonl(os.path.join(tmp_path, "run", "diagnostics.jsonl"))
  assert any(k.endswith("/update") for k in diag[0])                     # the effective learning rate


@pytest.mark.parametrize("module,arg,trials", [(weight_norm, "smoke", 10), (weight_norm, None, 10),
                                               (nap, "smoke", 6), (nap, None, 9)])
def test_sweeps_expand(module, arg, trials):
  expanded = sweep.expand(module.get_config(arg), module.get_sweep(arg))
  assert len(expanded) == trials and len({t["name"] for t in expanded}) == trials
  arms = {sweep.trial_name({k: v for k, v in t["overrides"].items() if k != "seed"}) for t in expanded}
  assert len(arms) == len(module.ARMS)


def test_smoke_variants_are_small_and_offline():
  wn = weight_norm.get_config("smoke")
  assert wn.data.name == "digits" and wn.train.steps <= 500 and wn.model.width < 1
  c = nap.get_config("smoke")
  assert c.data.name == "digits" and c.data.task_kind == "random_labels"
  assert c.train.eval_every == c.data.steps_per_task and c.train.steps % c.data.steps_per_task == 0


def test_report_plots_each_tasks_final_metric(tmp_path):
  """Eval rows with a `task` field get the per-task plot: the last evaluation of each task, per configuration."""
  from experiments import report
  for arm in ("none", "nap"):
    for seed in (0, 1):
      d = os.path.join(tmp_path, f"{arm}-{seed}")
      results.write_json(os.path.join(d, "trial.json"), {"index": 0, "overrides": {"arm": arm, "seed": seed}})
      results.write_json(os.path.join(d, "result.json"), {"done": True, "eval_accuracy": 0.5, "task": 2})
      results.append_jsonl(os.path.join(d, "metrics.jsonl"),
                           [{"step": s, "task": (s - 1) // 10, "eval_accuracy": 0.9 - 0.01 * s, "eval_loss": 1.0}
                            for s in (5, 10, 15, 20, 25, 30)])
  text = open(report.write(str(tmp_path), {"metric": "eval_accuracy", "mode": "max"})).read()
  assert "(tasks.png)" in text and os.path.getsize(os.path.join(tmp_path, "report", "tasks.png")) > 1000
