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


def _palette(n: int) -> list:
  """Distinct colours for n configurations: tab10, or tab20 beyond 10 (the default cycle repeats after 10)."""
  import matplotlib
  return list(matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors)


def _plot_bands(ax, groups: dict, key: str, source: str = "metrics", colours: list | None = None) -> bool:
  drew = False
  colours = colours or _palette(len(groups))
  for i, (label, ts) in enumerate(groups.items()):
    band = _band(ts, key, source)
    if band is None:
      continue
    steps, mean, std = band
    line, = ax.plot(steps, mean, label=label, color=colours[i % len(colours)])
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    drew = True
  return drew


def _stages(trials) -> list[tuple[str, list[dict]]]:
  """One row of panels per stage: a sweep of pretraining and fine-tuning trials (`init_from`) gets a row for each,
  since their steps, data and losses are not on one scale; any other sweep gets one row."""
  tuned = [t for t in trials if "init_from" in t["overrides"]]
  if not tuned or len(tuned) == len(trials):
    return [("", trials)]
  return [("pretraining: ", [t for t in trials if "init_from" not in t["overrides"]]), ("fine-tuning: ", tuned)]


def _stage_colours(stages) -> list[list]:
  """Each stage's colours, continuing one palette across stages so that no two configurations share a colour."""
  sizes = [len(group(ts, (SEED_KEY,))) for _, ts in stages]
  palette = _palette(sum(sizes))
  starts = np.cumsum([0] + sizes[:-1])
  return [[palette[(int(k) + i) % len(palette)] for i in range(n)] for k, n in zip(starts, sizes)]


def curves(trials, out, metric) -> str | None:
  plt = _pyplot()
  stages = _stages(trials)
  keys = list(dict.fromkeys(["train_loss", metric]))
  fig, axes = plt.subplots(len(stages), len(keys), figsize=(6 * len(keys), 4 * len(stages)), squeeze=False)
  drew = False
  for row, (stage, ts), colours in zip(axes, stages, _stage_colours(stages)):
    groups = group(ts, (SEED_KEY,))
    for ax, key in zip(row, keys):
      drew |= _plot_bands(ax, groups, key, colours=colours)
      ax.set(xlabel="step", ylabel=key, title=f"{stage}{key} (mean ± std over seeds)")
      if key.endswith("loss"):
        ax.set_yscale("log")
  if not drew:
    plt.close(fig)
    return None
  return _save(plt, fig, out, "curves.png", legend_from=list(axes[:, 0]))


def metric_vs_lr(trials, out, metric) -> str | None:
  done = [t for t in trials if t["result"] and LR_KEY in t["overrides"]]
  arms = defaultdict(lambda: defaultdict(list))
  for t in done:
    value = math.nan if t["result"].get("diverged") else t["result"].get(metric, math.nan)
    arms[_label(t["overrides"], (SEED_KEY, LR_KEY))][t["overrides"][LR_KEY]].append(value)
  if all(len(by_lr) < 2 for by_lr in arms.values()):
    return None         # one lr per arm (e.g. lr set with the arm): a column of dots says nothing about the lr
  plt = _pyplot()
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
  stages = _stages(averaged)
  fig, axes = plt.subplots(len(stages), len(stats), figsize=(5 * len(stats), 3.6 * len(stages)), squeeze=False)
  for row, (stage, ts), colours in zip(axes, stages, _stage_colours(stages)):
    groups = group(ts, (SEED_KEY,))
    for ax, s in zip(row, stats):
      _plot_bands(ax, groups, s, "diag_avg", colours)
      ax.set(xlabel="step", yscale="log", title=stage + {"norm": "‖W‖_F (mean over layers)",
                                                        "update": "‖ΔW‖/‖W‖ per step",
                                                        "sigma_max": "top singular value"}[s])
  return _save(plt, fig, out, "diagnostics.png", legend_from=list(axes[:, 0]))


def magnitude_direction_points(trial) -> list[tuple[str, int, float, float]]:
  """`(kernel, step, ΔD, ΔM)` of every kernel that moved, from `<kernel>/dD`, `/dM`. A frozen kernel has ΔM = 0
  exactly, and ΔD = 1 − cos up to float32 rounding (~1e-7)."""
  points = []
  for row in trial["diagnostics"]:
    for key, dd in row.items():
      if key.endswith("/dD") and key[:-2] + "dM" in row:
        dm = row[key[:-2] + "dM"]
        if dm > 0 or dd > 1e-5:
          points.append((key[:-3], int(row["step"]), float(dd), float(dm)))
  return points


def _pearson(x, y) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return math.nan
  return float(np.corrcoef(x, y)[0, 1])


def _module(kernel: str) -> str:
  """`block_1/query/kernel` -> `query`: the module name shared by every layer."""
  return kernel.split("/")[-2] if "/" in kernel else kernel


def magnitude_direction_fit(trials) -> dict:
  """The DoRA paper's §3.2 statistics over the (ΔD, ΔM) points of `trials` (a configuration's seeds): the slope
  of the least-squares line ΔM = a + b·ΔD and Pearson's r over every (kernel, checkpoint), and `r_within_step`,
  the mean over (seed, checkpoint) of r across kernels (free of the common growth of both with training), and
  `r_by_module`, r over the points of each module name (`block_*/query/kernel` -> `query`)."""
  pts = [(t["name"], p) for t in trials for p in magnitude_direction_points(t)]
  if len(pts) < 3:
    return {}
  dd, dm = np.array([p[2] for _, p in pts]), np.array([p[3] for _, p in pts])
  slope = float(np.polyfit(dd, dm, 1)[0]) if dd.std() > 0 else math.nan
  by_step = defaultdict(list)
  for name, p in pts:
    by_step[name, p[1]].append(p)
  within = [_pearson([p[2] for p in ps], [p[3] for p in ps]) for ps in by_step.values()]
  within = [r for r in within if math.isfinite(r)]
  by_module = defaultdict(list)        # e.g. every layer's query kernel together (the paper's Fig. 2 is of these)
  for _, p in pts:
    by_module[_module(p[0])].append(p)
  return {"slope": slope, "r": _pearson(dd, dm), "r_within_step": float(np.mean(within)) if within else math.nan,
          "r_by_module": {k: _pearson([p[2] for p in ps], [p[3] for p in ps]) for k, ps in by_module.items()},
          "points": len(pts)}


def magnitude_direction(trials, out) -> str | None:
  """ΔM against ΔD of every moved kernel at every diagnostics step, one panel per fine-tuning configuration (trials
  with `init_from`: the change is measured from the pretrained weights), as in the DoRA paper's Fig. 2; the fitted
  slopes and correlations also go to `magnitude_direction.json`."""
  tuned = [t for t in trials if "init_from" in t["overrides"] and magnitude_direction_points(t)]
  if not tuned:
    return None
  from experiments import results
  tuned.sort(key=lambda t: (results.read_json(os.path.join(t["path"], "trial.json")) or {}).get("index", 0))
  plt = _pyplot()
  groups = group(tuned, (SEED_KEY,))
  ncol = min(4, len(groups))
  nrow = math.ceil(len(groups) / ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow), squeeze=False)
  stats, last = {}, max(p[1] for t in tuned for p in magnitude_direction_points(t))
  # One marker per module (query, mlp_in, ...): their norms differ in scale, so their points form separate clusters
  modules = list(dict.fromkeys(_module(p[0]) for t in tuned for p in magnitude_direction_points(t)))
  markers = dict(zip(modules, "os^vDPX*<>ph"))
  for ax, (label, ts) in zip(axes.flat, groups.items()):
    pts = [p for t in ts for p in magnitude_direction_points(t)]
    dd, dm = np.array([p[2] for p in pts]), np.array([p[3] for p in pts])
    for module, marker in markers.items():
      sel = [p for p in pts if _module(p[0]) == module]
      if sel:
        dots = ax.scatter([p[2] for p in sel], [p[3] for p in sel], c=[p[1] for p in sel], cmap="viridis",
                          vmin=0, vmax=last, s=12, marker=marker, label=module, edgecolors="none")
    fit = stats[label] = magnitude_direction_fit(ts)
    if fit and math.isfinite(fit["slope"]):
      xs = np.linspace(dd.min(), dd.max(), 2)
      ax.plot(xs, np.polyval(np.polyfit(dd, dm, 1), xs), "k--", lw=1)
    name = _label(ts[0]["overrides"], (SEED_KEY, "init_from"))
    ax.set_title(f"{name}\nslope {fit.get('slope', math.nan):.3g}, r {fit.get('r', math.nan):.2f}, "
                 f"r per step {fit.get('r_within_step', math.nan):.2f}", fontsize=7)
    ax.set(xlabel="ΔD (1 − cos, mean over units)", ylabel="ΔM (|Δ‖column‖|, mean)")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  results.write_json(os.path.join(out, "magnitude_direction.json"), stats)
  fig.suptitle("magnitude vs direction change from the pretrained weights (marker: module, colour: step; "
               "every layer, checkpoint and seed)", fontsize=9)
  handles = [plt.Line2D([], [], marker=m, ls="", color="0.3", label=k) for k, m in markers.items()]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.04, 0.94, 0.97))
  fig.colorbar(dots, cax=fig.add_axes((0.95, 0.15, 0.01, 0.7)), label="step")
  fig.savefig(os.path.join(out, "magnitude_direction.png"), dpi=110)
  plt.close(fig)
  return "magnitude_direction.png"


def _matrix_norms(row: dict) -> tuple[float, float]:
  """Mean over weight-decayed matrices (role `matrix`) of the stored norm (`w_norm`, else the effective one) and of
  the effective norm, from one diagnostics row."""
  from reparam.core import default_role
  kernels = [k[:-5] for k in row if k.endswith("/norm") and default_role(k[:-5], 2) == "matrix"]
  if not kernels:
    return math.nan, math.nan
  stored = [row.get(k + "/w_norm", row[k + "/norm"]) for k in kernels]
  return float(np.mean(stored)), float(np.mean([row[k + "/norm"] for k in kernels]))


def norm_equilibrium(trials, out) -> str | None:
  """The weight-decay equilibrium ‖W‖ ∝ √(η/λ) (learnable-multipliers paper): the stored matrices' norm divided by
  √(η/λ) over training (equal curves once in equilibrium), and the final stored and effective norms against
  √(η/λ); drawn when the sweep has two or more values of √(η/λ) with λ > 0."""
  from experiments import results
  rows = []
  for t in trials:
    config = results.read_json(os.path.join(t["path"], "config.json")) or {}
    opt = config.get("optimizer", {})
    if t["diagnostics"] and opt.get("weight_decay") and opt.get("learning_rate"):
      rows.append((t, math.sqrt(opt["learning_rate"] / opt["weight_decay"]),
                   (opt.get("name", "adamw"), config.get("reparam", {}).get("transform", "none"))))
  if len({round(x, 12) for _, x, _ in rows}) < 2:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), squeeze=False, gridspec_kw={"width_ratios": (1, 1.25)})
  ax0, ax1 = axes[0]
  scaled = [{**t, "diag_avg": [{"step": r["step"], "stored/x": _matrix_norms(r)[0] / x} for r in t["diagnostics"]]}
            for t, x, _ in rows]
  _plot_bands(ax0, group(scaled, (SEED_KEY,)), "stored/x", "diag_avg")
  ax0.set(xlabel="step", ylabel="‖W‖ / √(η/λ)", yscale="log",
          title="stored matrix norm / √(η/λ), mean over matrices")
  _final_norms(ax1, rows)
  return _save(plt, fig, out, "norm_equilibrium.png", legend_from=ax0)


def _final_norms(ax, rows) -> None:
  """The last diagnostics row's mean stored norm (filled) and effective norm (hollow, where they differ) against
  √(η/λ): colour per optimizer, marker per transform, every seed a point; per optimizer a dashed line ∝ √(η/λ)
  through the geometric mean of its stored norms (points on it: proportional)."""
  optimizers = list(dict.fromkeys(o for _, _, (o, _) in rows))
  transforms = list(dict.fromkeys(tr for _, _, (_, tr) in rows))
  colour = dict(zip(optimizers, _palette(len(optimizers))))
  marker = dict(zip(transforms, "os^vDPX*<>ph"))
  for t, x, (o, tr) in rows:
    stored, effective = _matrix_norms(t["diagnostics"][-1])
    ax.plot(x, stored, marker[tr], color=colour[o], ms=6, alpha=0.8)
    if not np.isclose(stored, effective):
      ax.plot(x, effective, marker[tr], mfc="none", color=colour[o], ms=6)
  for o in optimizers:
    xs = np.array(sorted({x for _, x, (oo, _) in rows if oo == o}))
    ref = np.exp(np.mean([np.log(_matrix_norms(t["diagnostics"][-1])[0] / x) for t, x, (oo, _) in rows if oo == o]))
    ax.plot(xs, ref * xs, "--", color=colour[o], lw=1)
  handles = ([_line(color=colour[o], ls="--", label=f"{o} (dashed: ∝ √(η/λ))") for o in optimizers]
             + [_line(marker=marker[tr], ls="", color="0.3", label=tr) for tr in transforms]
             + [_line(marker="o", ls="", color="0.3", label="filled: stored ‖W‖"),
                _line(marker="o", ls="", mfc="none", color="0.3", label="hollow: effective ‖W‖")])
  ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  ax.set(xscale="log", yscale="log", xlabel="√(η/λ)", ylabel="final ‖W‖_F (mean over matrices)",
         title="final matrix norm against √(η/λ) (every seed)")


def _line(**kwargs):
  from matplotlib.lines import Line2D
  return Line2D([], [], **kwargs)


def per_task(trials, out, metric) -> str | None:
  """Task sequences (eval rows with a `task` field): each task's last evaluation against the task's index, per
  configuration, mean ± std over seeds (plasticity loss shows as a downward trend)."""
  ends = []
  for t in trials:
    last = {}
    for r in t["metrics"]:
      if "task" in r:
        last[int(r["task"])] = r          # rows are in step order: the last one of a task is its end
    ends.append({**t, "task_end": [{**r, "step": task} for task, r in sorted(last.items())]})
  if not any(t["task_end"] for t in ends):
    return None
  plt = _pyplot()
  from matplotlib.ticker import MaxNLocator
  keys = list(dict.fromkeys(["eval_accuracy", metric]))
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    _plot_bands(ax, group(ends, (SEED_KEY,)), key, "task_end")
    ax.set(xlabel="task", ylabel=f"{key} at the task's end", title=f"{key} at the end of each task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # task indices: no ticks at 2.5, 7.5
  return _save(plt, fig, out, "tasks.png", legend_from=axes[0][0])


def _save(plt, fig, out, name, legend_from=None) -> str:
  """Saves `fig` with one legend below the panels (configuration labels are long)."""
  handles, labels = [], []
  for ax in (legend_from if isinstance(legend_from, list) else [legend_from] if legend_from is not None else []):
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in labels:
        handles.append(h)
        labels.append(label)
  if handles:
    # Two columns when two of the longest label fit the width (~0.06 in per character at font size 7)
    fits = fig.get_size_inches()[0] >= 2 * (0.06 * max(map(len, labels)) + 0.6)
    ncol = 2 if len(labels) > 3 and fits else 1
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
          ("Diagnostics over training", diagnostics(trials, out)),
          ("Each task's final metric (task sequences)", per_task(trials, out, metric)),
          ("Magnitude vs direction change (DoRA §3.2)", magnitude_direction(trials, out)),
          ("Weight-decay norm equilibrium", norm_equilibrium(trials, out))]
  return [(title, file) for title, file in made if file]
