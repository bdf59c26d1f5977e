"""The extra tables of docs/results*.md, recomputed from a smoke sweep's trial files (metrics.jsonl,
diagnostics.jsonl, config.json); the report's own table comes from `python -m experiments.report`.

    python docs/runs/tables.py weight_norm runs/weight_norm_smoke
    python docs/runs/tables.py nap runs/nap_smoke
    python docs/runs/tables.py dora runs/dora
    python docs/runs/tables.py multipliers runs/multipliers

Every cell is mean ± sample std (ddof=1) over the seeds of a configuration, like the report's table.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402
from experiments.plots import _matrix_norms  # noqa: E402


def ms(values, fmt="{:.3f}") -> str:
  v = np.asarray([x for x in values], float)
  if len(v) < 2:
    return fmt.format(v.mean())
  return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def table(head, rows) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def groups(workdir):
  trials = [t for t in report.load_trials(workdir) if t["result"]]
  return report.group(trials, (report.SEED_KEY,))


def window_mean(metrics, key, lo, hi) -> float:
  """Mean of `key` over the logged rows with lo <= step <= hi."""
  return float(np.mean([r[key] for r in metrics if lo <= r["step"] <= hi and key in r]))


def at_step(metrics, key, step) -> float:
  return next(r[key] for r in metrics if r["step"] == step and key in r)


def kernel_mean(row, stat) -> float:
  """Mean over every kernel of a diagnostics row's `<kernel>/<stat>`."""
  return float(np.mean([v for k, v in row.items() if k.endswith("/" + stat)]))


def weight_norm(workdir):
  """Train loss averaged over the logged rows (every 3 steps) in a window around steps 30/60/90/150, test loss
  at step 60, and the final test error (%, 297 test images: one image = 0.34%)."""
  wins = ((24, 39), (54, 69), (84, 99), (144, 159))
  rows = []
  for label, ts in groups(workdir).items():
    m = [t["metrics"] for t in ts]
    rows.append([label] + [ms([window_mean(x, "train_loss", lo, hi) for x in m]) for lo, hi in wins]
                + [ms([at_step(x, "eval_loss", 60) for x in m]),
                   ms([100 * (1 - t["result"]["eval_accuracy"]) for t in ts], "{:.2f}")])
  head = ["config"] + [f"train loss, steps {lo}–{hi}" for lo, hi in wins] + ["test loss @60", "test error %"]
  return table(head, rows)


def nap(workdir, tasks_early=range(0, 5), tasks_late=range(15, 20)):
  """Per task: the accuracy of its last eval row (its end). ‖ΔW‖/‖W‖: the diagnostics' `<kernel>/update`
  averaged over the kernels, then over the diagnostics rows inside the task. ‖W‖_F: the mean over kernels of
  `<kernel>/norm`, at the first and at the last diagnostics row."""
  rows = []
  for label, ts in groups(workdir).items():
    acc, upd, first, last = [], [], [], []
    for t in ts:
      end = {}
      for r in t["metrics"]:
        if "task" in r:
          end[int(r["task"])] = r["eval_accuracy"]
      acc.append(end)
      spt = (t["metrics"][-1]["step"]) // (max(end) + 1)
      per_task = {}
      for r in t["diagnostics"]:
        per_task.setdefault((r["step"] - 1) // spt, []).append(kernel_mean(r, "update"))
      upd.append(per_task)
      first.append(kernel_mean(t["diagnostics"][0], "norm"))
      last.append(kernel_mean(t["diagnostics"][-1], "norm"))
    n = max(acc[0])
    early = [np.mean([a[k] for k in tasks_early]) for a in acc]
    late = [np.mean([a[k] for k in tasks_late]) for a in acc]
    rows.append([label, ms([a[0] for a in acc]), ms(early), ms(late), ms(np.subtract(early, late)),
                 ms([np.mean(u[0]) for u in upd], "{:.2e}"), ms([np.mean(u[n]) for u in upd], "{:.2e}"),
                 ms(first, "{:.2f}"), ms(last, "{:.2f}")])
  head = ["config", "task 0 acc", f"tasks {tasks_early[0]}–{tasks_early[-1]}", f"tasks {tasks_late[0]}–"
          f"{tasks_late[-1]}", "drop", "‖ΔW‖/‖W‖ task 0", "‖ΔW‖/‖W‖ last task", "‖W‖_F first diag",
          "‖W‖_F last diag"]
  return table(head, rows)


def dora(workdir):
  """Final eval accuracy and loss of the fine-tuned arms, and the change (pretrained → fine-tuned) of the
  fine-tuning text's eval loss; the pretrained model's own eval loss on that text is `eval_loss` at step 0,
  which the sweep does not log, so it is left out."""
  import json
  path = os.path.join(workdir, "report", "magnitude_direction.json")
  fits = json.load(open(path)) if os.path.exists(path) else {}
  rows = []
  for label, ts in groups(workdir).items():
    if "init_from" not in ts[0]["overrides"]:
      continue
    short = report._label(ts[0]["overrides"], (report.SEED_KEY, "init_from"))
    f = fits.get(label, {})
    mods = f.get("r_by_module", {})
    rows.append([short, ms([t["result"]["eval_accuracy"] for t in ts], "{:.4f}"),
                 ms([t["result"]["eval_loss"] for t in ts], "{:.4f}"),
                 f"{f.get('slope', math.nan):.3g}", f"{f.get('r', math.nan):.2f}",
                 f"{f.get('r_within_step', math.nan):.2f}"]
                + [f"{mods.get(k, math.nan):.2f}" for k in ("query", "key", "value", "out", "mlp_in", "mlp_out")])
  head = ["arm", "eval accuracy", "eval loss", "slope ΔM/ΔD", "r (all points)", "r within step", "r query",
          "r key", "r value", "r out", "r mlp_in", "r mlp_out"]
  return table(head, rows)


def multipliers(workdir):
  """Per (optimizer, η, λ, transform): the final eval loss above the source's entropy floor, the final stored
  matrix norm (mean over the 12 decayed kernels of `<kernel>/w_norm`, else `/norm`) and that norm divided by
  √(η/λ)."""
  import json
  rows = []
  for label, ts in groups(workdir).items():
    cfg = json.load(open(os.path.join(ts[0]["path"], "config.json")))
    opt = cfg["optimizer"]
    x = math.sqrt(opt["learning_rate"] / opt["weight_decay"])
    stored = [_matrix_norms(t["diagnostics"][-1])[0] for t in ts]
    eff = [_matrix_norms(t["diagnostics"][-1])[1] for t in ts]
    rows.append([opt["name"], opt["learning_rate"], f"{opt['weight_decay']:.3g}", cfg["reparam"]["transform"],
                 len(ts), ms([t["result"]["eval_loss_above_floor"] for t in ts], "{:.4f}"),
                 f"{x:.3f}", ms(stored, "{:.2f}"), ms(eff, "{:.2f}"), ms(np.divide(stored, x), "{:.2f}")])
  head = ["optimizer", "η", "λ", "transform", "seeds", "eval loss above floor", "√(η/λ)", "stored ‖W‖_F",
          "effective ‖W‖_F", "stored / √(η/λ)"]
  return table(head, rows)


if __name__ == "__main__":
  print(globals()[sys.argv[1]](sys.argv[2]))
