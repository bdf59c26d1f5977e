"""Run a config's sweep: every trial in its own sub-workdir, resumable, shardable across machines.

    python -m experiments.sweep --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.sweep --config configs/nap.py:smoke --workdir runs/nap --shard 1/4   # machine 2 of 4
    python -m experiments.sweep --config configs/quickstart.py --workdir runs/q --dry_run     # list the trials

The config module's `get_sweep(arg)` returns override dicts (see configs/common.py); each trial's directory is
named from its overrides. A rerun skips finished trials (those with result.json) and resumes an interrupted
one from its checkpoint. `--shard k/N` (k = 0..N-1) runs every N-th trial, so N machines or a scheduler's job
array can split one sweep over a shared directory. `--vmap_seeds` trains the seeds of each configuration as one
jitted program. When this shard is done, the report is written and its table printed.
"""
from __future__ import annotations

if __name__ == "__main__":     # glibc reads its tunables only when a process starts: first, before JAX loads
  from experiments import hugepages
  hugepages.rerun_with_huge_pages()

import copy
import hashlib
import importlib.util
import math
import os
import re
from typing import Any

from absl import flags
from ml_collections import config_flags

import reparam
from experiments import report, results

def load_sweep(config_arg: str) -> list[dict[str, Any]]:
  """The override dicts of the config file's `get_sweep(arg)`, or one empty trial if it has none."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    return [{}]
  try:
    sweep = module.get_sweep(arg or None)
  except Exception as e:  # noqa: BLE001  a failing get_sweep is bad input, as a failing get_config is
    raise reparam.ConfigError(f"{path}: get_sweep({arg or None!r}) failed: {type(e).__name__}: {e}") from e
  if not isinstance(sweep, list) or not all(isinstance(d, dict) for d in sweep) or not sweep:
    raise reparam.ConfigError(f"{path}: get_sweep() must return a non-empty list of override dicts")
  return sweep


def _slug(value: Any) -> str:
  text = str(value)
  text = re.sub(r"[\s'\"]", "", text)
  return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def trial_name(overrides: dict[str, Any]) -> str:
  """A readable, filesystem-safe directory name: `transform=weight_norm,optimizer=muon,seed=0`."""
  parts = []
  for key, value in overrides.items():
    parts.append(f"{results.short_key(key)}={_slug(value)}")
  name = ",".join(parts) or "base"
  if len(name) > 120:
    name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def apply_overrides(config, overrides: dict[str, Any], where: str):
  """A copy of `config` with the dotted-key overrides applied; an unknown key or a wrong type is a ConfigError."""
  trial = copy.deepcopy(config)
  for key, value in overrides.items():
    node, parts = trial, key.split(".")
    try:
      for i, part in enumerate(parts):
        level = ".".join(parts[:i]) or "the config"     # name the key and what its level does have
        if not hasattr(node, "keys"):
          raise reparam.ConfigError(f"{where}: cannot set {key}={value!r}: {level} is a value, not a group")
        if part not in node:
          raise reparam.ConfigError(f"{where}: cannot set {key}={value!r}: no such config key; {level} has: "
                                    f"{', '.join(sorted(node))}")
        if i < len(parts) - 1:
          node = node[part]
      node[parts[-1]] = value
    except reparam.ConfigError:
      raise
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise reparam.ConfigError(f"{where}: cannot set {key}={value!r} ({type(e).__name__}: {e})") from None
  return trial


def expand(config, sweep: list[dict], workdir: str = "") -> list[dict[str, Any]]:
  """Trials `{index, name, overrides, config}`, every override checked before anything runs.

  An override `"trial": "pretrain"` names the trial's directory. A string value may name the sweep's directory
  as `{workdir}`: e.g. `init_from="{workdir}/pretrain"` fine-tunes
  from the trial `pretrain` of the same sweep (list it first: trials run in order).
  """
  trials, names = [], set()
  for i, overrides in enumerate(sweep):
    overrides = {k: v.replace("{workdir}", os.path.abspath(workdir)) if isinstance(v, str) and "{workdir}" in v
                 else v for k, v in overrides.items()}
    name = overrides.pop("trial", None) or trial_name(overrides)     # an explicit directory name
    if name in names:
      raise reparam.ConfigError(f"get_sweep()[{i}] repeats trial {name!r}")
    names.add(name)
    trials.append({"index": i, "name": name, "overrides": overrides,
                   "config": apply_overrides(config, overrides, f"get_sweep()[{i}]")})
  return trials


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)/(\d+)", text or "")
  if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
    raise reparam.ConfigError(f"--shard={text!r} must be k/N with 0 <= k < N, e.g. --shard=0/4")
  return int(m.group(1)), int(m.group(2))


def shard(trials: list[dict], k: int, n: int) -> list[dict]:
  return [t for t in trials if t["index"] % n == k]


def is_done(workdir: str, trial: dict) -> bool:
  return bool(results.read_json(os.path.join(workdir, trial["name"], "result.json"), {}).get("done"))


def seed_groups(trials: list[dict]) -> list[list[dict]]:
  """Trials that differ only in `seed`, together (in sweep order)."""
  groups: dict[str, list[dict]] = {}
  for t in trials:
    key = trial_name({k: v for k, v in t["overrides"].items() if k != "seed"})
    groups.setdefault(key, []).append(t)
  return list(groups.values())


def check_trials(workdir: str, trials: list[dict]) -> None:
  """Builds nothing but checks every trial still to run, as `train` would, before the sweep writes anything:
  a bad value in the last trial must not surface after the first ones have run for hours. A finished trial's
  directory must hold a run of its config too: a rerun with a changed config would otherwise report the old
  results as the new config's."""
  from experiments import cli, setup, train
  datasets: dict = {}
  for t in trials:
    run_dir = os.path.join(workdir, t["name"])
    try:
      cli.check_run_dir(run_dir)
      train._check_resumable(t["config"], run_dir)
      if not is_done(workdir, t):
        setup.check(t["config"], datasets)
    except reparam.ConfigError as e:
      raise reparam.ConfigError(f"get_sweep()[{t['index']}] (trial {t['name']}): {e}") from None


def run_trials(workdir: str, trials: list[dict], vmap_seeds: bool) -> None:
  from tqdm.auto import tqdm

  from experiments import train
  todo = [t for t in trials if not is_done(workdir, t)]
  print(f"{len(trials)} trials in this shard: {len(trials) - len(todo)} done, {len(todo)} to run")
  bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc="sweep", unit="trial", dynamic_ncols=True)
  for group in (seed_groups(todo) if vmap_seeds else [[t] for t in todo]):
    for t in group:
      results.write_json(os.path.join(workdir, t["name"], "trial.json"),     # keeps the sweep's key order
                         {"index": t["index"], "overrides": t["overrides"]}, sort_keys=False)
    bar.set_postfix_str(group[0]["name"] + (f" (+{len(group) - 1} seeds)" if len(group) > 1 else ""))
    dirs = [os.path.join(workdir, t["name"]) for t in group]
    try:
      finals = train.train_seeds([t["config"] for t in group], dirs)
    except train.NonFiniteError as e:      # a diverged trial is a result (e.g. a too-large learning rate)
      finals = [_diverged(d, str(e)) for d in dirs]
    for t, final in zip(group, finals):
      bar.write(f"{t['name']}: " + " ".join(f"{k}={v:.4g}" for k, v in final.items()
                                           if isinstance(v, float) and k.startswith(("eval", "train"))))
    bar.update(len(group))
  bar.close()


def _diverged(workdir: str, message: str) -> dict:
  result = {"done": True, "diverged": True, "error": message, "eval_loss": math.nan}
  results.write_json(os.path.join(workdir, "result.json"), result)
  return result


def main(argv) -> int:
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise reparam.ConfigError("--workdir is required: the sweep's directory")
  if FLAGS.config is None:
    raise reparam.ConfigError("--config is required, e.g. --config configs/quickstart.py")
  k, n = parse_shard(FLAGS.shard)
  from experiments import cli
  cli.check_workdir(FLAGS.workdir)
  cli.compilation_cache()
  config_arg = config_flags.get_config_filename(FLAGS["config"])     # "path[:arg]", as given
  trials = expand(FLAGS.config, load_sweep(config_arg), FLAGS.workdir)
  mine = shard(trials, k, n)
  if FLAGS.dry_run:
    for t in mine:
      print(f"[{t['index']:3d}] {'done' if is_done(FLAGS.workdir, t) else 'todo'}  {t['name']}")
    print(f"{len(mine)} of {len(trials)} trials in shard {k}/{n}")
    return 0
  check_trials(FLAGS.workdir, mine)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  results.write_json(os.path.join(FLAGS.workdir, "sweep.json"),
                     {"config": config_arg, "trials": [t["name"] for t in trials],
                      "report": FLAGS.config.report.to_dict() if "report" in FLAGS.config else {}})
  run_trials(FLAGS.workdir, mine, FLAGS.vmap_seeds)
  if FLAGS.report:
    path = report.write(FLAGS.workdir)
    with open(path) as f:
      print(f.read().split("\n## ")[0])
    print(f"report: {path}")
  return 0


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to a config file with get_sweep(), optionally `path:arg`.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per trial, plus report/.")
  flags.DEFINE_string("shard", "0/1", "k/N: run the trials whose index is k modulo N (k = 0..N-1).")
  flags.DEFINE_bool("dry_run", False, "List the trials (and whether each is done) without running anything.")
  flags.DEFINE_bool("vmap_seeds", False, "Train all seeds of a configuration together in one vmapped program.")
  flags.DEFINE_bool("report", True, "Write the report when this shard is done.")


if __name__ == "__main__":
  from experiments import cli
  define_flags()
  cli.run(main)
