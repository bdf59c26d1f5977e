"""configs/dora.py and configs/multipliers.py: the full variants run a few steps on mock TFDS data (shapes, data path,
pretrain -> fine-tune through the sweep), the smoke sweeps expand, and the report's plots for them."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import serialization

from conftest import fake_prepared
from configs import dora, multipliers
from experiments import plots, report, results, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shorten(config, data_dir, steps=2):
  """A few steps of the full variant's model and sequence length, on a tiny batch and eval set."""
  config.train.update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps, diagnostics_every=1,
                      progress=False, tensorboard=False)
  config.optimizer.warmup_steps = 1
  config.data.update(dir=data_dir, batch_size=2, eval_batch_size=8,
                     eval_examples=8 if config.data.name == "lm1b" else None)


def run(workdir, trials, data_dir):
  for t in trials:
    shorten(t["config"], data_dir)
  with tfds.testing.mock_data(num_examples=40, data_dir=data_dir):   # 40 texts of ~17 characters: > 256 + 1
    sweep.run_trials(workdir, trials, vmap_seeds=False)


def params_of(path):
  with open(os.path.join(path, "params.msgpack"), "rb") as f:
    return serialization.msgpack_restore(f.read())


def test_dora_full_variant_pretrains_then_fine_tunes_on_mock_data(tmp_path):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "sweep")
  for name in ("lm1b", "tiny_shakespeare"):
    fake_prepared(name, data_dir)
  trials = sweep.expand(dora.get_config(), dora.get_sweep(), workdir)
  picked = [t for t in trials if t["name"] in ("pretrain", "dora_r16,seed=0")]
  assert [t["name"] for t in picked] == ["pretrain", "dora_r16,seed=0"]
  run(workdir, picked, data_dir)
  pre, tuned = (os.path.join(workdir, t["name"]) for t in picked)
  for path in (pre, tuned):
    assert results.read_json(os.path.join(path, "result.json"))["done"]
  assert "lm1b" in open(os.path.join(pre, "config.json")).read()
  # The fine-tune loaded the pretrained weights; embedding, head and norms stayed frozen, the kernels moved.
  p0, p1 = params_of(pre), params_of(tuned)
  assert p0["embed"]["embedding"].shape == (256, 384)
  np.testing.assert_array_equal(p0["embed"]["embedding"], p1["embed"]["embedding"])
  np.testing.assert_array_equal(p0["head"]["kernel"], p1["head"]["kernel"])
  np.testing.assert_array_equal(p0["block_5"]["mlp_norm"]["scale"], p1["block_5"]["mlp_norm"]["scale"])
  assert not np.array_equal(p0["block_0"]["query"]["kernel"], p1["block_0"]["query"]["kernel"])
  diag = results.read_jsonl(os.path.join(tuned, "diagnostics.jsonl"))
  # The frozen head did not move: ΔM is exactly 0, ΔD = 1 − cos is 0 up to float32 rounding.
  assert diag[-1]["block_0/query/kernel/dD"] > 1e-6
  assert diag[-1]["head/kernel/dM"] == 0 and abs(diag[-1]["head/kernel/dD"]) < 1e-6
  text = open(report.write(workdir, {})).read()
  assert "(magnitude_direction.png)" in text
  assert os.path.exists(os.path.join(workdir, "report", "magnitude_direction.json"))


def test_multipliers_full_variant_on_mock_data(tmp_path):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "sweep")
  fake_prepared("lm1b", data_dir)
  trials = sweep.expand(multipliers.get_config(), multipliers.get_sweep(), workdir)
  muon = [t for t in trials if t["config"].optimizer.name == "muon"
          and t["config"].reparam.transform == "multipliers(row=True, col=True)" and t["config"].seed == 0]
  muon.append(trials[-1])                   # Muon, `none`, another (η, λ): the equilibrium plot is drawn
  assert trials[-1]["config"].optimizer.name == "muon" and trials[-1]["config"].reparam.transform == "none"
  run(workdir, muon, data_dir)
  diag = results.read_jsonl(os.path.join(workdir, muon[0]["name"], "diagnostics.jsonl"))
  assert diag[-1]["block_5/mlp_out/kernel/w_norm"] > 0
  assert any(k.endswith("query/kernel/row/mean") for k in diag[-1])
  assert any(k.endswith("query/kernel/col/mean") for k in diag[-1])
  assert "(norm_equilibrium.png)" in open(report.write(workdir, {})).read()


@pytest.mark.parametrize("module, n_smoke, n_full", [(dora, 15, 15), (multipliers, 22, 24)])
def test_smoke_and_full_sweeps_expand(tmp_path, module, n_smoke, n_full):
  for arg, n in (("smoke", n_smoke), (None, n_full)):
    trials = sweep.expand(module.get_config(arg), module.get_sweep(arg), str(tmp_path))
    assert len(trials) == n and len({t["name"] for t in trials}) == n
  path = os.path.join(ROOT, "configs", module.__name__.split(".")[-1] + ".py")
  assert len(sweep.load_sweep(path + ":smoke")) == n_smoke


def test_dora_sweep_arms():
  trials = sweep.expand(dora.get_config("smoke"), dora.get_sweep("smoke"), "/runs/d")
  pre, tuned = trials[0], trials[1:]
  assert pre["name"] == "pretrain" and pre["config"].init_from is None
  assert pre["config"].data.source_seed == 0 and tuned[0]["config"].data.source_seed == 1
  assert {t["config"].init_from for t in tuned} == {"/runs/d/pretrain"}
  assert {t["config"].reparam.transform for t in tuned} == {"none"} | {
      f"{m}(rank={r})" for m in ("lora", "dora") for r in (4, 8, 16)}
  assert all(t["config"].optimizer.role_rules for t in tuned) and not pre["config"].optimizer.role_rules


def test_multipliers_sweep_arms():
  trials = sweep.expand(multipliers.get_config("smoke"), multipliers.get_sweep("smoke"), "/runs/m")
  main = {(t["config"].optimizer.name, t["config"].reparam.transform) for t in trials[:20]}
  assert main == {(o, t) for o in ("adamw", "muon") for t in multipliers.TRANSFORMS}
  ratios = {(t["config"].optimizer.name, t["config"].optimizer.learning_rate / t["config"].optimizer.weight_decay)
            for t in trials}
  assert len(ratios) == 4           # two values of η/λ per optimizer in the smoke (three in the full variant)
  assert all(t["config"].optimizer.adam_learning_rate == 1e-2 for t in trials)


def test_magnitude_direction_fit_is_exact(tmp_path):
  # Three kernels on the exact line dM = 3 - 2·dD at two checkpoints, and a frozen head (no point).
  rows = [{"step": s, "head/kernel/dD": 0.0, "head/kernel/dM": 0.0,
           **{f"L{i}/kernel/{k}": v for i in range(3)
              for k, v in (("dD", 0.01 * s * (i + 1)), ("dM", 3.0 - 2.0 * 0.01 * s * (i + 1)))}}
          for s in (1, 2)]
  fit = plots.magnitude_direction_fit([{"name": "a", "diagnostics": rows}])
  assert fit["points"] == 6 and fit["slope"] == pytest.approx(-2.0) and fit["r"] == pytest.approx(-1.0)
  assert fit["r_within_step"] == pytest.approx(-1.0)


def synthetic_trial(root, name, overrides, final=1.0):
  d = os.path.join(root, name)
  results.write_json(os.path.join(d, "trial.json"), {"index": 0, "overrides": overrides})
  results.write_json(os.path.join(d, "result.json"), {"done": True, "eval_loss": final})
  results.append_jsonl(os.path.join(d, "metrics.jsonl"), [{"step": s, "train_loss": final + 1 / s,
                                                           "eval_loss": final} for s in (1, 2, 3)])


def test_lr_plot_only_when_an_arm_has_two_learning_rates(tmp_path):
  # DoRA's arms each set their own lr: a plot of final loss against lr would be one column of dots.
  for i, arm in enumerate(("lora", "dora")):
    synthetic_trial(tmp_path, arm, {"reparam.transform": arm, "optimizer.learning_rate": 0.01, "seed": 0}, i)
  assert "(lr.png)" not in open(report.write(str(tmp_path), {})).read()
  synthetic_trial(tmp_path, "dora-2", {"reparam.transform": "dora", "optimizer.learning_rate": 0.03, "seed": 0})
  assert "(lr.png)" in open(report.write(str(tmp_path), {})).read()


def test_pretraining_and_fine_tuning_get_separate_rows_and_distinct_colours(tmp_path):
  synthetic_trial(tmp_path, "pretrain", {"data.source_seed": 0})
  for r in range(12):          # more configurations than the 10 colours of matplotlib's default cycle
    synthetic_trial(tmp_path, f"t{r}", {"init_from": "/x/pretrain", "reparam.transform": f"lora(rank={r + 1})"})
  trials = report.load_trials(str(tmp_path))
  stages = plots._stages(trials)
  assert [(name, len(ts)) for name, ts in stages] == [("pretraining: ", 1), ("fine-tuning: ", 12)]
  colours = [c for cs in plots._stage_colours(stages) for c in cs]
  assert len(colours) == 13 and len(set(colours)) == 13
  assert plots.curves(trials, str(tmp_path), "eval_loss") == "curves.png"
  assert plots._stages([t for t in trials if t["name"] != "pretrain"])[0][0] == ""     # one stage: one row
