"""Normalize-and-Project (Lyle et al. 2024, "Normalization and effective learning rates in reinforcement learning",
arXiv:2407.01800): does NaP keep a network's plasticity over a sequence of tasks?

One run trains one network on task 0, 1, 2, ... in turn (`data.steps_per_task` steps each, data/task
sequences in experiments/data.py) and evaluates each task at its end (`train.eval_every = steps_per_task`; eval
rows carry the `task` field). Arms (2 seeds in the smoke variant, 3 in the full one):
    none        plain MLP (ReLU, no normalization)
    norm        LayerNorm before each nonlinearity (`model.norm="layer"`)
    nap         LayerNorm + the projection `K ← K·‖K⁰‖/‖K‖` after every step (`optimizer.nap=True`)
AdamW at a constant learning rate and no weight decay, as in a continual-learning run that never ends. Read:
the report's per-task plot (final accuracy on each task against its index: plasticity loss is a downward
trend) and the diagnostics plot, whose `‖ΔW‖/‖W‖` panel is the effective learning rate (it decays as the
weight norms grow, unless they are projected).

Smoke (CPU minutes, offline): random-label memorization on scikit-learn's `digits` (a new random labelling of the
same 512 images per task), a 2×128 ReLU MLP (26k parameters), batch 64, lr 1e-3, 20 tasks × 300 steps
(6000 steps a run, ~4 minutes for the sweep here):

    python -m experiments.sweep --config configs/nap.py:smoke --workdir runs/nap_smoke

Full: TFDS `mnist` (prepare once: `tfds build mnist --file_format=array_record`; `--config.data.dir=...` for
another data_dir), random labels on 10k images, a 3×256 MLP (335k parameters), batch 128, 50 tasks × 2000 steps
(100k steps a run; one H100 ran ~240 steps/s with in-memory data), 3 seeds; `kind=permute` runs permuted MNIST
(each task a fixed pixel permutation of all 60k images, evaluated on the permuted test split); `dataset=cifar10`
swaps the data; `tasks=N`, `steps_per_task=N`, `seeds=N` resize either variant (the tests use
`tasks=2,steps_per_task=1`):

    python -m experiments.sweep --config configs/nap.py --workdir runs/nap
    python -m experiments.sweep --config configs/nap.py:kind=permute --workdir runs/nap_permute
    python -m experiments.sweep --config configs/nap.py:dataset=cifar10 --workdir runs/nap_cifar10

Per-task results: the report's `tasks.png`; the numbers are the `task`-tagged eval rows of each metrics.jsonl.
"""
from configs import common

ARMS = {
    "none": {"model.norm": "none", "optimizer.nap": False},
    "norm": {"model.norm": "layer", "optimizer.nap": False},
    "nap": {"model.norm": "layer", "optimizer.nap": True},
}


def _arg(arg):
  return common.parse_arg(arg, smoke=False, kind="random_labels", dataset="mnist", tasks=0, steps_per_task=0,
                          seeds=0)


def get_config(arg=None):
  a = _arg(arg)
  c = common.base("nap")
  c.model.name = "mlp"
  c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=0.0, schedule="constant", warmup_steps=0)
  if a.smoke:
    tasks, spt = a.tasks or 20, a.steps_per_task or 300
    # 512 images: a 2x128 MLP memorizes a labelling in 300 steps (~37 epochs) while it is plastic
    c.data.update(name="digits", task_kind="random_labels", train_size=512, batch_size=64, eval_batch_size=512)
    c.model.hidden = (128, 128)
  else:
    tasks, spt = a.tasks or 50, a.steps_per_task or 2000
    c.data.update(name=a.dataset, task_kind=a.kind, batch_size=128, eval_batch_size=2000,
                  train_size=10_000 if a.kind == "random_labels" else None)
    c.model.hidden = (256, 256, 256)
  c.data.update(steps_per_task=spt, source_seed=0)      # every seed sees the same task sequence
  steps = tasks * spt
  c.train.update(steps=steps, log_every=max(spt // 10, 1), eval_every=spt,        # eval = the end of each task
                 checkpoint_every=spt * max(tasks // 4, 1), diagnostics_every=max(spt // 5, 1))
  c.report.update(metric="eval_accuracy", mode="max", metrics=("eval_accuracy", "eval_loss", "train_loss"),
                  target=None)
  return c


def get_sweep(arg=None):
  a = _arg(arg)
  seeds = a.seeds or (2 if a.smoke else 3)
  return common.product(list(ARMS.values()), common.sweep("seed", list(range(seeds))))
