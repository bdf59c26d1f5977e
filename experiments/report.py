"""A sweep's report: markdown tables (mean ± std over seeds, best learning rate per arm, steps to a target) and
PNG plots (loss curves with seed bands, final metric against learning rate, diagnostics over time).

    python -m experiments.report runs/quickstart            # writes runs/quickstart/report/report.md

Everything is recomputed from the trials' own files (trial.json, result.json, metrics.jsonl,
diagnostics.jsonl), so a report can be rebuilt at any time, also while a sweep is still running.
"""
from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from typing import Any

import numpy as np

from experiments import results
from reparam.core import ConfigError

SEED_KEY = "seed"
LR_KEY = "optimizer.learning_rate"


def load_trials(workdir: str) -> list[dict[str, Any]]:
  """Every trial directory under `workdir`: its overrides, result (if finished) and metric rows."""
  trials = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    spec = results.read_json(os.path.join(path, "trial.json")) if os.path.isdir(path) else None
    if spec is None:
      continue
    trials.append({"name": name, "path": path, "overrides": spec["overrides"],
                   "result": results.read_json(os.path.join(path, "result.json")),
                   "metrics": results.read_jsonl(os.path.join(path, "metrics.jsonl")),
                   "diagnostics": results.read_jsonl(os.path.join(path, "diagnostics.jsonl"))})
  return trials


def _label(overrides: dict, drop: tuple[str, ...]) -> str:
  # An absolute path (e.g. init_from="{workdir}/pretrain") by its last part: labels name no machine's directories.
  short = lambda v: os.path.basename(v.rstrip("/")) if isinstance(v, str) and os.path.isabs(v) else v
  return ", ".join(f"{results.short_key(k)}={short(v)}" for k, v in overrides.items() if k not in drop) or "base"


def group(trials: list[dict], drop: tuple[str, ...]) -> dict[str, list[dict]]:
  """Trials keyed by their overrides without the `drop` keys (e.g. without the seed: one group per config)."""
  groups = defaultdict(list)
  for t in trials:
    groups[_label(t["overrides"], drop)].append(t)
  return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def steps_to_target(metrics: list[dict], key: str, target: float, mode: str) -> float:
  """First logged step at which `key` reaches `target` (≤ for min, ≥ for max); inf if never."""
  for row in metrics:
    v = row.get(key)
    if v is not None and (v <= target if mode == "min" else v >= target):
      return float(row["step"])
  return math.inf


def _fmt(mean: float, std: float, n: int) -> str:
  if not math.isfinite(mean):
    return "diverged" if math.isnan(mean) else "never"
  return f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g}"


def summarize(trials: list[dict], metrics: list[str], target: dict | None) -> list[dict]:
  """One row per configuration (seeds pooled): mean and std of each final metric, steps to target."""
  rows = []
  for label, ts in group([t for t in trials if t["result"]], (SEED_KEY,)).items():
    row = {"config": label, "seeds": len(ts), "overrides": {k: v for k, v in ts[0]["overrides"].items()
                                                            if k != SEED_KEY}}
    for m in metrics:
      vals = [t["result"].get(m, math.nan) if not t["result"].get("diverged") else math.nan for t in ts]
      row[m] = mean_std(vals)
    if target:
      steps = [steps_to_target(t["metrics"], target["metric"], target["value"], target["mode"]) for t in ts]
      row["steps_to_target"] = mean_std(steps) if all(map(math.isfinite, steps)) else (math.inf, 0.0)
    rows.append(row)
  return rows


def best_learning_rates(rows: list[dict], metric: str, mode: str) -> list[tuple[str, Any, float, float]]:
  """Per arm (a configuration without its learning rate): the learning rate with the best mean metric."""
  arms = defaultdict(list)
  for row in rows:
    if LR_KEY in row["overrides"]:
      arms[_label(row["overrides"], (LR_KEY,))].append(row)
  best = []
  if all(len(rs) < 2 for rs in arms.values()):
    return best         # every arm has a single learning rate: nothing was chosen
  for arm, rs in arms.items():
    finite = [r for r in rs if math.isfinite(r[metric][0])]
    if finite:
      pick = (min if mode == "min" else max)(finite, key=lambda r: r[metric][0])
      best.append((arm, pick["overrides"][LR_KEY], *pick[metric]))
  return best


def markdown_table(rows: list[dict], metrics: list[str], target: dict | None) -> str:
  head = ["config", "seeds"] + metrics + ([f"steps to {target['metric']} {'≤' if target['mode'] == 'min' else '≥'} "
                                          f"{target['value']}"] if target else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["config"], str(r["seeds"])] + [_fmt(*r[m], r["seeds"]) for m in metrics]
    if target:
      cells.append(_fmt(*r["steps_to_target"], r["seeds"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write(workdir: str, settings: dict | None = None) -> str:
  """Writes `workdir/report/report.md` and its plots; returns the path of report.md."""
  settings = settings or results.read_json(os.path.join(workdir, "sweep.json"), {}).get("report", {})
  metric, mode = settings.get("metric", "eval_loss"), settings.get("mode", "min")
  metrics = list(dict.fromkeys([metric] + settings.get("metrics", ["eval_loss", "eval_accuracy", "train_loss"])))
  target = None if settings.get("target") is None else {
      "metric": settings.get("target_metric", "train_loss"), "value": settings["target"], "mode": mode}
  trials = load_trials(workdir)
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  rows = summarize(trials, metrics, target)
  rows.sort(key=lambda r: (r[metric][0] if mode == "min" else -r[metric][0]) if math.isfinite(r[metric][0])
            else math.inf)
  done = sum(1 for t in trials if t["result"])
  parts = [f"# Report: {os.path.basename(os.path.abspath(workdir))}", "",
           f"{done} of {len(trials)} trials finished. Mean ± std over seeds (sample std); sorted by {metric}.", "",
           markdown_table(rows, metrics, target)]
  best = best_learning_rates(rows, metric, mode)
  if best:
    parts += ["", f"## Best learning rate per arm (by {metric})", "", "| arm | learning rate | " + metric + " |",
              "|---|---|---|"] + [f"| {a} | {lr} | {_fmt(m, s, 2)} |" for a, lr, m, s in best]
  from experiments import plots
  for title, file in plots.write_all(trials, out, metric, settings):
    parts += ["", f"## {title}", "", f"![{title}]({file})"]
  path = os.path.join(out, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(parts) + "\n")
  os.replace(path + ".tmp", path)
  results.write_json(os.path.join(out, "summary.json"), rows)
  return path


def check_sweep_dir(workdir: str) -> None:
  """Refuses, before anything is written, a directory that cannot be read or that holds no trial: writing
  `report/` ("0 of 0 trials") into any directory, e.g. a single run's workdir, would only add a wrong file."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"{workdir!r} is not a directory (expected a sweep's --workdir)")
  try:
    names = os.listdir(workdir)
  except OSError as e:
    raise ConfigError(f"{workdir!r} cannot be read ({e.strerror}): give read permission on it, or run the report "
                      f"as its owner") from None
  if not any(os.path.isfile(os.path.join(workdir, n, "trial.json")) for n in names):
    raise ConfigError(f"{workdir!r} is not a sweep's directory: no sub-directory holds a trial.json (a sweep writes "
                      f"one per trial it starts); pass the --workdir of `python -m experiments.sweep`")


def main(argv: list[str]) -> int:
  """One line on stderr and exit status 2 for a bad directory, as train and sweep (`--debug`: the traceback)."""
  from experiments import cli
  debug = "--debug" in argv[1:]
  args = [a for a in argv[1:] if a != "--debug"]
  if len(args) != 1:
    print("usage: python -m experiments.report SWEEP_DIR [--debug]", file=sys.stderr)
    return 2
  try:
    check_sweep_dir(args[0])
    path = write(args[0])
  except cli.INPUT_ERRORS as e:       # also a trial directory or report/ without permissions
    if debug:
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  with open(path) as f:
    print(f.read())
  print(f"report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
