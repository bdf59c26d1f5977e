"""Weight normalization (Salimans & Kingma 2016, arXiv:1602.07868): does weight norm train faster than the plain
parameterization, and does weight norm + mean-only batch norm give the best test error?

Arms (the paper's CIFAR-10 comparison, §5.1 and Table 1, plus the init ablation), 2 seeds each:
    plain        standard (LeCun-normal) init, no normalization            (paper: 8.43% test error)
    wn           weight norm, identity init: g = ‖V‖, starts as the plain network
    wn_init      weight norm with the paper's data-dependent init          (paper, "weight norm": 8.46%)
    wn_mobn      weight norm (data-dependent init) + mean-only batch norm  (paper: 7.31%, the best)
    bn           batch norm                                                (paper: 8.05%)
Weight norm wraps every conv kernel *and the head* (`reparam.exclude=""`), as the authors' code does; the
mean-only and full batch norms sit before each nonlinearity, hence not on the head (the authors' code also
normalizes the head's output). The data-dependent init runs on the first batch in train mode (dropout, noise).

Full: the paper's CNN (`model.name="cnn"`: noise 0.15, 3×conv96, pool, dropout 0.5, 3×conv192, pool, dropout,
conv192 valid, 2×NiN192, global mean pool, dense; 1.41M parameters) on TFDS `cifar10`, batch 100, Adam
(β₁ 0.9, β₂ 0.999), lr 0.003 decayed linearly to 0, no weight decay. 100 epochs (50k steps) a run by default;
`epochs=200` is the paper's budget. One H100 ran 220-270 steps/s (in-memory data), so a 100-epoch run takes
minutes plus data reading. Prepare the data once with `tfds build cifar10 --file_format=array_record` (and pass
`--config.data.dir=...` for another data_dir); on a TPU v2-8 add `--config.data.batch_size=96` (8 devices):

    python -m experiments.sweep --config configs/weight_norm.py --workdir runs/weight_norm
    python -m experiments.sweep --config configs/weight_norm.py:epochs=200 --workdir runs/weight_norm_200ep

Smoke (CPU, offline, under 10 minutes): the same CNN at width 1/4 and depth 2 (24/48 channels, 7 convs, 63k
parameters) on scikit-learn's `digits`, batch 100, 300 steps (20 epochs):

    python -m experiments.sweep --config configs/weight_norm.py:smoke --workdir runs/weight_norm_smoke

`steps=N` (e.g. `configs/weight_norm.py:steps=2`, what the tests use) sets the steps of either variant.

Not reproduced: the paper ZCA-whitened its inputs (here: pixels in [0, 1], so the 0.15 input noise is
relatively larger), and trained 100 epochs at a constant lr with β₁ 0.9, then 100 epochs with β₁ 0.5 and the
lr decayed linearly to 0 (here: one linear decay over the whole run, β₁ fixed at 0.9).
"""
from configs import common

ARMS = {
    "plain": {"reparam.transform": "none"},
    "wn": {"reparam.transform": "weight_norm"},
    "wn_init": {"reparam.transform": "weight_norm", "reparam.data_init": True},
    "wn_mobn": {"reparam.transform": "weight_norm", "reparam.data_init": True, "model.norm": "mean_only_batch"},
    "bn": {"reparam.transform": "none", "model.norm": "batch"},
}


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, epochs=100, steps=0)
  c = common.base("weight_norm")
  c.reparam.update(targets=r".*kernel", exclude="")        # the head too, as in the authors' code
  c.optimizer.update(name="adamw", learning_rate=3e-3, weight_decay=0.0, schedule="linear", warmup_steps=0,
                     b1=0.9)
  c.model.name = "cnn"
  if a.smoke:
    c.data.update(name="digits", batch_size=100, eval_batch_size=300)
    c.model.update(width=0.25, depth=2)                   # 24/48 channels, 7 conv layers
    steps = a.steps or 300                                # 20 epochs of digits' 1500 training images
  else:
    c.data.update(name="cifar10", batch_size=100, eval_batch_size=1000)
    c.model.update(width=1.0, depth=3)                    # 96/192 channels, 9 conv layers: ~1.4M parameters
    steps = a.steps or a.epochs * 500                     # 50k training images / batch 100
  c.model.update(dropout=0.5, input_noise=0.15)           # the paper's regularization
  c.train.update(steps=steps, log_every=max(steps // 80, 1), eval_every=max(steps // 20, 1),
                 checkpoint_every=max(steps // 2, 1) if a.smoke else 2500, diagnostics_every=max(steps // 20, 1))
  # Ranked by test loss; "steps to target" reads the convergence speed off the (dropout-noisy) train loss.
  c.report.update(metric="eval_loss", mode="min", metrics=("eval_loss", "eval_accuracy", "train_loss"),
                  target=0.6 if a.smoke else 0.5, target_metric="train_loss")
  return c


def get_sweep(arg=None):
  del arg
  return common.product(list(ARMS.values()), common.sweep("seed", [0, 1]))
