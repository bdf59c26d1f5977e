"""Learnable multipliers (Velikanov et al. 2026, "Learnable Multipliers: Freeing the Scale of Language Model Matrix
Layers", arXiv:2601.04890): none vs scalar vs row vs column vs row+column multipliers on every hidden matrix of a
transformer LM, under AdamW and under Muon, with weight decay on the matrices.

The paper's claims: with weight decay λ and learning rate η, a matrix's norm settles at a noise/decay equilibrium
‖W‖ ∝ √(η/λ) set by the hyper-parameters rather than by the data; multipliers `K' = s · c ⊙ K ⊙ r` (AdamW, no
decay, even when `K` uses Muon) free the scale, and improve the loss about as much as switching Adam → Muon.

What is wrapped: the 12 hidden kernels `block_*/{query,key,value,out,mlp_in,mlp_out}/kernel` (role `matrix`: the
ones with weight decay); embedding, head and norms are plain, AdamW, no decay (reparam.optim's defaults). Muon
runs give every AdamW leaf (embedding, head, norms, multipliers) the AdamW runs' learning rate, so that only the
matrices' optimizer changes. The schedule is constant after a warmup: the equilibrium is that of a fixed η.
Besides the main grid, `none` runs at two other (η, λ) pairs per optimizer give the equilibrium plot (report:
"Weight-decay norm equilibrium": the *stored* matrix norm, `<kernel>/w_norm` in diagnostics.jsonl, the one weight
decay acts on, divided by √(η/λ), over training, and its final value against √(η/λ); and the effective norm).

smoke (CPU, under 15 minutes, 22 runs; 2 seeds in the main grid, 1 in the two (η, λ) extras): a 2-layer d=64
transformer on the offline order-2 `markov` source with 8 tokens, 200 steps (the extras 400). Order 2, so that
attention and MLP matter (an order-1 source is a bigram table, which the embedding and head alone fit); 8 tokens,
so that it leaves the unigram plateau in ~100 steps. Without `--vmap_seeds`: on a 2-core CPU, vmapped seeds were
not faster than sequential ones (AdamW slower, Muon faster).
Why this size: an earlier smoke of 300 steps and four extras (24 runs) was on course for ~20 minutes on the shared
2-core machine (load average 4-6; each run costs ~25-35 s of compilation and setup plus ~0.065 s a step there), so
the main grid was cut to 200 steps and the extras to the one furthest (3.3x in √(η/λ)) from each optimizer's main
pair. At ηλ = 0.01 the initial weights decay as e^(-ηλt): by step 200 a run with a small √(η/λ) was still shrinking
towards its equilibrium (measured: ‖W‖/√(η/λ) still falling 10-15% per 50 steps), so the extras, which only serve
the equilibrium plot, run 400 steps (e^(-4) of the initial weights left). Measured: at step 400 they still shrink
~5% (Muon) to ~6% (AdamW) per 50 steps: their final norms are upper bounds.

    python -m experiments.sweep --config configs/multipliers.py:smoke --workdir runs/multipliers

full (one GPU or a Colab TPU v2-8, bfloat16): a 6-layer d=384 byte-level transformer on TFDS `lm1b` (prepare
once: `tfds build lm1b --file_format=array_record`), 10k steps:

    python -m experiments.sweep --config configs/multipliers.py --workdir runs/multipliers_full --vmap_seeds

One run: `python -m experiments.train --config configs/multipliers.py:smoke --workdir runs/m1
--config.reparam.transform="multipliers(row=True, col=True)" --config.optimizer.name=muon
--config.optimizer.learning_rate=0.02 --config.optimizer.weight_decay=0.25`.
"""
from configs import common

TRANSFORMS = ("none", "multipliers(scalar=True)", "multipliers(row=True)", "multipliers(col=True)",
              "multipliers(row=True, col=True)")
# (optimizer, η, λ) of the main grid, then of the extra runs (`none`, one seed) for the equilibrium plot. In the
# smoke every pair has η·λ = 0.01: the norm relaxes to its equilibrium in ~1/(2ηλ) = 50 of the 200 steps.
MAIN = {True: (("adamw", 1e-2, 1.0), ("muon", 0.02, 0.5)),
        False: (("adamw", 3e-3, 0.1), ("muon", 0.02, 0.05))}
EXTRA = {True: (("adamw", 3e-3, 10 / 3), ("muon", 6e-3, 5 / 3)),
         False: (("adamw", 1e-3, 0.3), ("adamw", 6e-3, 0.05), ("muon", 6e-3, 0.15), ("muon", 0.04, 0.025))}


def get_config(arg=None):
  a = common.parse_arg(arg, smoke=False, steps=0)
  c = common.base("multipliers")
  if a.smoke:
    c.data.update(name="markov", vocab_size=8, order=2, concentration=0.2, source_seed=0, seq_len=32,
                  batch_size=32, eval_batch_size=256)
    c.model.update(name="transformer", d_model=64, num_heads=4, num_layers=2, mlp_ratio=4)
    steps = a.steps or 200
  else:
    c.data.update(name="lm1b", seq_len=256, batch_size=64, eval_batch_size=64, eval_examples=512)
    c.model.update(name="transformer", d_model=384, num_heads=6, num_layers=6, mlp_ratio=4, dtype="bfloat16")
    steps = a.steps or 10_000
  name, lr, wd = MAIN[a.smoke][0]
  c.reparam.update(transform="none", targets=r"block_\d+/.*/kernel", exclude="")
  c.optimizer.update(name=name, learning_rate=lr, adam_learning_rate=lr, weight_decay=wd, schedule="constant",
                     warmup_steps=max(steps // 20, 1), grad_clip_norm=1.0)
  c.train.update(steps=steps, log_every=max(steps // 20, 1), eval_every=max(steps // 4, 1),
                 checkpoint_every=max(steps // 2, 1), diagnostics_every=max(steps // 10, 1))
  c.report.update(metric="eval_loss", mode="min",
                  metrics=("eval_loss", "eval_loss_above_floor", "train_loss") if a.smoke else
                  ("eval_loss", "eval_accuracy", "train_loss"))
  return c


def _optimizers(rows) -> list[dict]:
  names, lrs, wds = zip(*rows)
  return common.zip_(common.sweep("optimizer.name", names), common.sweep("optimizer.learning_rate", lrs),
                     common.sweep("optimizer.weight_decay", wds))


def get_sweep(arg=None):
  a = common.parse_arg(arg, smoke=False, steps=0)
  main = common.product(_optimizers(MAIN[a.smoke]), common.sweep("reparam.transform", TRANSFORMS),
                        common.sweep("seed", [0, 1]))
  extra = common.product(_optimizers(EXTRA[a.smoke]), common.sweep("reparam.transform", ["none"]),
                         common.sweep("seed", [0]))
  if a.smoke:      # long enough for the initial norm to decay (see the docstring); their loss is not compared
    extra = [{**e, "train.steps": 2 * (a.steps or 200)} for e in extra]
  return common.concat(main, extra)
