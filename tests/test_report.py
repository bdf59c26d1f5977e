"""The report's numbers against a recomputation from the trials' own files (synthetic trials, no training)."""
import json
import math
import os

import numpy as np
import pytest

from experiments import report, results


def make_trials(root, rng):
  """3 transforms × 2 learning rates × 3 seeds with known final metrics and curves."""
  expected = {}
  for t in ["none", "weight_norm", "multipliers"]:
    for lr in [0.001, 0.01]:
      for seed in range(3):
        overrides = {"reparam.transform": t, "optimizer.learning_rate": lr, "seed": seed}
        d = os.path.join(root, f"{t}-{lr}-{seed}")
        final = float(rng.uniform(0.1, 1.0))
        curve = [{"step": s, "train_loss": float(final + 2.0 / s)} for s in (10, 20, 40, 80)]
        curve[-1]["eval_loss"] = final
        results.write_json(os.path.join(d, "trial.json"), {"index": 0, "overrides": overrides})
        results.write_json(os.path.join(d, "result.json"), {"done": True, "eval_loss": final,
                                                            "eval_accuracy": 1 - final, "train_loss": final})
        results.append_jsonl(os.path.join(d, "metrics.jsonl"), curve)
        results.append_jsonl(os.path.join(d, "diagnostics.jsonl"),
                             [{"step": 80, "Dense_0/kernel/norm": 2.0, "Dense_0/kernel/update": 0.01,
                               "Dense_0/kernel/sigma_max": 1.5}])
        expected.setdefault((t, lr), []).append((final, curve))
  return expected


def test_report_numbers_equal_recomputation(tmp_path):
  expected = make_trials(str(tmp_path), np.random.default_rng(0))
  path = report.write(str(tmp_path), {"metric": "eval_loss", "mode": "min", "target": 0.6,
                                      "target_metric": "train_loss"})
  text = open(path).read()
  rows = {(r["overrides"]["reparam.transform"], r["overrides"]["optimizer.learning_rate"]): r
          for r in json.load(open(os.path.join(tmp_path, "report", "summary.json")))}
  for key, runs in expected.items():
    finals = np.array([f for f, _ in runs])
    mean, std = rows[key]["eval_loss"]
    assert mean == pytest.approx(finals.mean(), rel=1e-12) and std == pytest.approx(finals.std(ddof=1), rel=1e-12)
    assert f"{finals.mean():.4g} ± {finals.std(ddof=1):.2g}" in text
    # steps to train_loss <= 0.6: the first logged step whose loss reaches it, per seed
    firsts = [next((c["step"] for c in curve if c["train_loss"] <= 0.6), math.inf) for _, curve in runs]
    got = rows[key]["steps_to_target"][0]
    assert got == (np.mean(firsts) if all(map(math.isfinite, firsts)) else math.inf)
  for t in ["none", "weight_norm", "multipliers"]:   # best lr per arm = argmin of the mean
    best_lr = min([0.001, 0.01], key=lambda lr: np.mean([f for f, _ in expected[(t, lr)]]))
    assert f"| transform={t} | {best_lr} |" in text
  for png in ("curves.png", "lr.png", "diagnostics.png"):
    assert os.path.getsize(os.path.join(tmp_path, "report", png)) > 1000 and f"({png})" in text


def test_report_marks_unfinished_and_diverged_trials(tmp_path):
  results.write_json(os.path.join(tmp_path, "a", "trial.json"), {"overrides": {"seed": 0, "x": 1}})
  results.write_json(os.path.join(tmp_path, "a", "result.json"), {"done": True, "diverged": True,
                                                                  "eval_loss": math.nan})
  results.write_json(os.path.join(tmp_path, "b", "trial.json"), {"overrides": {"seed": 0, "x": 2}})
  text = open(report.write(str(tmp_path), {})).read()
  assert "1 of 2 trials finished" in text and "| x=1 | 1 | diverged" in text
