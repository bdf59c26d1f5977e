"""Issue [6/7]'s time targets across the saved multi-process runs of `train_step.py`, in one figure.

    python benchmarks/plot_targets.py                 # every benchmarks/results/*.json, to docs/figures/targets.png
    python benchmarks/plot_targets.py --out /tmp/targets.png benchmarks/results/cpu_2core_f9aec97_*.json

One panel per target and regime. A point is one run: the ratio its verdict is on (× plain, or × LoRA for DoRA;
the median over the run's processes of their median ratios) with the 95% interval over those processes, both
recomputed from the saved timings by `train_step.judge`, coloured by the verdict; the dashed line is the target.
Runs are in date order, labelled by the commit in their file name (`cpu_2core_<commit>_...json`); a hollow
marker is a run with glibc's huge pages on (recorded in the JSON since this script, or "huge_pages" in the file
name before); a grey cross, a run of code that was then not kept (`NOT_KEPT`). Single-process runs are left out:
their intervals miss the spread between processes (docs/performance.md, "Method and machine").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.train_step import REGIMES as SHAPES, judge, ratio_samples  # noqa: E402

REGIMES = tuple((d_model, batch * seq) for d_model, batch, seq in SHAPES)       # (d_model, tokens)
TARGETS = ("multipliers", "weight_norm", "nap", "dora r8")
COLOURS = {"met": "tab:green", "on the bound": "tab:orange", "missed": "tab:red"}
# Runs of code that was measured and then not kept (docs/performance_history.md): drawn apart, as grey crosses.
NOT_KEPT = {"0961ba8": "the norms on the 2-D view, reverted", "43dafd4": "an allocator setting, not adopted"}


def points(paths: list[str]) -> dict:
  """{(d_model, tokens, variant): [(date, label, ratio, (lo, hi), verdict, target, huge_pages), ...]}, date order,
  from the runs measured in more than one process."""
  found = {}
  for path in paths:
    with open(path) as f:
      run = json.load(f)
    name = os.path.basename(path)
    m = re.match(r"cpu_2core_([0-9a-f]{7})", name)
    label = m.group(1) if m else name.removesuffix(".json")
    huge = "hugetlb=1" in (run.get("glibc_tunables") or "") or "huge_pages" in name
    for r in run.get("regimes", []):
      if len(r.get("processes") or []) < 2:
        continue
      judge(r)
      for row in r["rows"]:
        if row["variant"] in TARGETS and row.get("target") and row.get("x_ci"):
          x = float(np.median(ratio_samples(r, row["variant"], row.get("target_of") or "plain")))
          found.setdefault((r["d_model"], r["tokens"], row["variant"]), []).append(
              (run["date"], label, x, tuple(row["x_ci"]), row["verdict"], row["target"], huge))
  return {k: sorted(v) for k, v in found.items()}


def plot(found: dict, out: str) -> None:
  fig, axes = plt.subplots(len(REGIMES), len(TARGETS), figsize=(4 * len(TARGETS), 3.6 * len(REGIMES)),
                           squeeze=False)
  for i, (d_model, tokens) in enumerate(REGIMES):
    for j, variant in enumerate(TARGETS):
      ax = axes[i][j]
      runs = found.get((d_model, tokens, variant), [])
      ax.set_title(f"{variant}, d_model {d_model}, {tokens} tokens", fontsize=9)
      if not runs:
        ax.text(0.5, 0.5, "no multi-process run", ha="center", va="center", transform=ax.transAxes)
        continue
      for k, (_, label, x, (lo, hi), verdict, _, huge) in enumerate(runs):
        colour = "grey" if label in NOT_KEPT else COLOURS[verdict]
        ax.errorbar(k, x, yerr=[[x - lo], [hi - x]], fmt="x" if label in NOT_KEPT else "o", color=colour,
                    capsize=3, markerfacecolor="white" if huge else colour)
      ax.axhline(runs[-1][5], ls="--", color="black", lw=1)
      ax.set_xticks(range(len(runs)), [r[1] for r in runs], rotation=60, fontsize=7)
      ax.set_ylabel("× LoRA" if variant.startswith("dora") else "× plain", fontsize=8)
      ax.tick_params(axis="y", labelsize=7)
  handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in COLOURS.items()]
  handles += [plt.Line2D([], [], marker="o", ls="", color="grey", markerfacecolor="white", label="huge pages"),
              plt.Line2D([], [], marker="x", ls="", color="grey", label="code not kept: " + ", ".join(
                  f"{c} ({what})" for c, what in NOT_KEPT.items())),
              plt.Line2D([], [], ls="--", color="black", label="target")]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
  fig.suptitle("Issue [6/7]'s time targets, every multi-process run (95% intervals over the processes)", fontsize=10)
  fig.tight_layout(rect=(0, 0.05, 1, 0.96))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="*", help="JSON files of train_step.py (default: every one in benchmarks/results)")
  ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "docs", "figures", "targets.png")))
  args = ap.parse_args()
  paths = args.runs or sorted(glob.glob(os.path.join(here, "results", "*.json")))
  found = points(paths)
  if not found:
    raise SystemExit(f"no multi-process run with a target among {len(paths)} files")
  plot(found, args.out)
  print(f"wrote {args.out}: " + ", ".join(f"{v} at {t} tokens: {len(p)} runs" for (_, t, v), p in found.items()))


if __name__ == "__main__":
  main()
