"""Quickstart: how do weight norm, learnable multipliers and Normalize-and-Project compare, under AdamW and Muon?

An MLP on scikit-learn's bundled `digits` (1797 real 8×8 images: offline, no download), 2 seeds per arm.

    python -m experiments.sweep --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.train --config configs/quickstart.py --workdir runs/one --config.reparam.transform=weight_norm

`configs/quickstart.py:steps=50` shortens every run (what the tests use).
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, steps=300)
  c = common.base("quickstart")
  c.data.batch_size = 64
  c.model.hidden = (128, 128)
  c.optimizer.update(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=a.steps // 15)
  c.train.update(steps=a.steps, log_every=max(a.steps // 15, 1), eval_every=max(a.steps // 6, 1),
                 checkpoint_every=max(a.steps // 3, 1), diagnostics_every=max(a.steps // 6, 1))
  c.report.update(metric="eval_loss", target=0.3, target_metric="train_loss")
  return c


def get_sweep(arg=None):
  del arg
  arms = [
      {"reparam.transform": "none"},
      {"reparam.transform": "weight_norm"},
      {"reparam.transform": "multipliers(scalar=True, row=True)"},
      {"reparam.transform": "none", "model.norm": "layer", "optimizer.nap": True},     # NaP
  ]
  optimizers = common.zip_(common.sweep("optimizer.name", ["adamw", "muon"]),
                           common.sweep("optimizer.learning_rate", [3e-3, 0.02]))
  return common.product(arms, optimizers, common.sweep("seed", [0, 1]))
