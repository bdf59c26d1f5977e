"""The extra tables of docs/results*.md, recomputed from a smoke sweep's trial files (metrics.jsonl,
diagnostics.jsonl, config.json); the report's own table comes from `python -m experiments.report`.

    python docs/runs/tables.py weight_norm runs/weight_norm_smoke
    python docs/runs/tables.py nap runs/nap_smoke
    python docs/runs/tables.py dora runs/dora
    python docs/runs/tables.py zero_shot runs/dora
    python docs/runs/tables.py multipliers runs/multipliers
    python docs/runs/tables.py multiplier_values runs/multipliers
    python docs/runs/tables.py equilibrium runs/multipliers

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
  """Per fine-tuning arm, in sweep order: final eval accuracy, loss and loss above the source's entropy floor
  (result.json), and the magnitude/direction statistics of the report's magnitude_direction.json (fitted slope of
  ΔM on ΔD, Pearson r over every kernel, checkpoint and seed, the mean of r within a checkpoint, and r per
  module over its 2 layers × 6 checkpoints × 2 seeds)."""
  import json
  path = os.path.join(workdir, "report", "magnitude_direction.json")
  fits = json.load(open(path)) if os.path.exists(path) else {}
  rows = []
  tuned = [(label, ts) for label, ts in groups(workdir).items() if "init_from" in ts[0]["overrides"]]
  tuned.sort(key=lambda g: json.load(open(os.path.join(g[1][0]["path"], "trial.json")))["index"])
  for label, ts in tuned:
    short = ts[0]["name"].split(",")[0]          # the trial's name: full, lora_r4, ..., dora_r16
    f = fits.get(label, {})
    mods = f.get("r_by_module", {})
    rows.append([short, ms([t["result"]["eval_accuracy"] for t in ts], "{:.4f}"),
                 ms([t["result"]["eval_loss"] for t in ts], "{:.4f}"),
                 ms([t["result"]["eval_loss_above_floor"] for t in ts], "{:.4f}"),
                 f"{f.get('slope', math.nan):.3g}", f"{f.get('r', math.nan):.2f}",
                 f"{f.get('r_within_step', math.nan):.2f}"]
                + [f"{mods.get(k, math.nan):.2f}" for k in ("query", "key", "value", "out", "mlp_in", "mlp_out")])
  head = ["arm", "eval accuracy", "eval loss", "above floor", "slope ΔM/ΔD", "r (all points)", "r within step", "r query",
          "r key", "r value", "r out", "r mlp_in", "r mlp_out"]
  return table(head, rows)


def zero_shot(workdir):
  """The pretrained model (`<workdir>/pretrain`, no fine-tuning step) evaluated on the fine-tuning text of
  configs/dora.py:smoke: the starting point every fine-tuning arm shares."""
  import jax
  from configs import dora as dora_config
  from experiments import setup, train
  c = dora_config.get_config("smoke")
  c.init_from = os.path.join(os.path.abspath(workdir), "pretrain")
  s = setup.build(c)
  out = train.evaluate(s, jax.device_get(train.init_state(s)), train._mesh())
  return table(["model", "eval loss", "eval loss above floor", "eval accuracy"],
               [["pretrained, before fine-tuning", f"{out['eval_loss']:.4f}", f"{out['eval_loss_above_floor']:.4f}",
                 f"{out['eval_accuracy']:.4f}"]])


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


def multiplier_values(workdir):
  """Per multiplier configuration: the learned factors at the last diagnostics row (every factor starts at 1):
  the mean over the 12 wrapped kernels of `<kernel>/<factor>/mean`, the smallest `/min` and the largest `/max`
  of any kernel; and the ratio of the mean effective to the mean stored norm of the matrices."""
  rows = []
  for label, ts in groups(workdir).items():
    last = [t["diagnostics"][-1] for t in ts]
    factors = sorted({k.split("/")[-2] for k in last[0] if k.endswith(("/scalar/mean", "/row/mean", "/col/mean"))})
    if not factors:
      continue
    pick = {"mean": np.mean, "min": np.min, "max": np.max}
    stats = lambda f, s: ms([pick[s]([v for k, v in r.items() if k.endswith(f"/{f}/{s}")]) for r in last], "{:.2f}")
    ratio = ms([np.divide(*_matrix_norms(r)[::-1]) for r in last], "{:.3f}")
    rows.append([label, len(ts)] + ["; ".join(f"{f}: mean {stats(f, 'mean')}, min {stats(f, 'min')}, "
                                              f"max {stats(f, 'max')}" for f in factors), ratio])
  return table(["config", "seeds", "learned multipliers at the end", "effective / stored ‖W‖_F"], rows)


def equilibrium(workdir, step=200):
  """The `none` runs (stored = effective norm): per optimizer and √(η/λ), the mean matrix norm (mean over the 12
  decayed kernels) at `step` and at each run's last step, and the exponent p of ‖W‖ ∝ √(η/λ)^p fitted by least
  squares on the logs (seeds pooled; p = 1 is proportionality)."""
  import json
  by_opt = {}
  for label, ts in groups(workdir).items():
    for t in ts:
      cfg = json.load(open(os.path.join(t["path"], "config.json")))
      if cfg["reparam"]["transform"] != "none":
        continue
      opt = cfg["optimizer"]
      x = math.sqrt(opt["learning_rate"] / opt["weight_decay"])
      at = next(_matrix_norms(r)[0] for r in t["diagnostics"] if r["step"] == step)
      by_opt.setdefault(opt["name"], []).append((x, at, _matrix_norms(t["diagnostics"][-1])[0],
                                                 t["diagnostics"][-1]["step"]))
  rows = []
  for name, pts in by_opt.items():
    pts.sort()
    fit = lambda i: np.polyfit(np.log([p[0] for p in pts]), np.log([p[i] for p in pts]), 1)[0]
    for x in sorted({p[0] for p in pts}):
      sel = [p for p in pts if p[0] == x]
      rows.append([name, f"{x:.3f}", len(sel), ms([p[1] for p in sel], "{:.2f}"),
                   ms([p[2] for p in sel], "{:.2f}"), "/".join(str(p[3]) for p in sel)])
    rows.append([name, "exponent p", "", f"{fit(1):.2f}", f"{fit(2):.2f}", ""])
  return table(["optimizer", "√(η/λ)", "runs", f"‖W‖_F at step {step}", "‖W‖_F at the last step", "last step"],
               rows)


if __name__ == "__main__":
  print(globals()[sys.argv[1]](sys.argv[2]))
