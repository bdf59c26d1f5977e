"""The report's PNG plots: curves with seed bands, final metric against learning rate, diagnostics over time."""
from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from experiments.report import LR_KEY, SEED_KEY, _label, group


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _curve(rows: list[dict], key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])}


def _band(trials: list[dict], key: str, source: str = "metrics"):
  """Steps logged by every seed, and the mean and std of `key` over seeds at those steps."""
  curves = [_curve(t[source], key) for t in trials]
  steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  values = np.array([[c[s] for s in steps] for c in curves])
  if not steps:
    return None
  return np.array(steps), values.mean(0), values.std(0)


def _plot_bands(ax, groups: dict, key: str, source: str = "metrics") -> bool:
  drew = False
  for label, ts in groups.items():
    band = _band(ts, key, source)
    if band is None:
      continue
    steps, mean, std = band
    line, = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    drew = True
  return drew


def curves(trials, out, metric) -> str | None:
  plt = _pyplot()
  groups = group(trials, (SEED_KEY,))
  keys = list(dict.fromkeys(["train_loss", metric]))
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
  drew = False
  for ax, key in zip(axes[0], keys):
    drew |= _plot_bands(ax, groups, key)
    ax.set(xlabel="step", ylabel=key, title=f"{key} (mean ± std over seeds)")
    if key.endswith("loss"):
      ax.set_yscale("log")
  if not drew:
    plt.close(fig)
    return None
  return _save(plt, fig, out, "curves.png", legend_from=axes[0][0])


def metric_vs_lr(trials, out, metric) -> str | None:
  done = [t for t in trials if t["result"] and LR_KEY in t["overrides"]]
  if not done:
    return None
  plt = _pyplot()
  arms = defaultdict(lambda: defaultdict(list))
  for t in done:
    value = math.nan if t["result"].get("diverged") else t["result"].get(metric, math.nan)
    arms[_label(t["overrides"], (SEED_KEY, LR_KEY))][t["overrides"][LR_KEY]].append(value)
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, by_lr in arms.items():
    lrs = sorted(by_lr)
    means = [np.mean(by_lr[lr]) for lr in lrs]
    stds = [np.std(by_lr[lr]) for lr in lrs]
    ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=arm)
  ax.set(xscale="log", xlabel="learning rate", ylabel=f"final {metric}", title=f"final {metric} vs learning rate")
  return _save(plt, fig, out, "lr.png", legend_from=ax)


def diagnostics(trials, out) -> str | None:
  """Mean over layers of each kernel statistic, per configuration, over training."""
  stats = ["norm", "update", "sigma_max"]
  averaged = []
  for t in trials:
    rows = [{"step": r["step"], **{s: float(np.mean([v for k, v in r.items() if k.endswith("/" + s)]))
                                   for s in stats if any(k.endswith("/" + s) for k in r)}}
            for r in t["diagnostics"]]
    averaged.append({**t, "diag_avg": rows})
  if not any(t["diag_avg"] for t in averaged):
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 3.6), squeeze=False)
  groups = group(averaged, (SEED_KEY,))
  for ax, s in zip(axes[0], stats):
    _plot_bands(ax, groups, s, "diag_avg")
    ax.set(xlabel="step", title={"norm": "‖W‖_F (mean over layers)", "update": "‖ΔW‖/‖W‖ per step",
                                 "sigma_max": "top singular value"}[s], yscale="log")
  return _save(plt, fig, out, "diagnostics.png", legend_from=axes[0][0])


def _save(plt, fig, out, name, legend_from=None) -> str:
  """Saves `fig` with one legend below the panels (configuration labels are long)."""
  handles, labels = legend_from.get_legend_handles_labels() if legend_from is not None else ([], [])
  if handles:
    ncol = 2 if len(labels) > 3 else 1
    rows = math.ceil(len(labels) / ncol)
    height = fig.get_size_inches()[1]
    fig.set_size_inches(fig.get_size_inches()[0], height + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * rows / (height + 0.22 * rows) + 0.01, 1, 1))
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=110)
  plt.close(fig)
  return name


def write_all(trials, out, metric, settings) -> list[tuple[str, str]]:
  made = [("Learning curves", curves(trials, out, metric)),
          ("Final metric against learning rate", metric_vs_lr(trials, out, metric)),
          ("Diagnostics over training", diagnostics(trials, out))]
  return [(title, file) for title, file in made if file]
