"""DoRA (Liu et al. 2024, arXiv:2402.09353): full fine-tuning vs LoRA vs DoRA at ranks 4/8/16, with the paper's
magnitude/direction analysis (§3.2: per layer and checkpoint, ΔM against ΔD; LoRA's are positively correlated,
full fine-tuning's and DoRA's negatively).

A transformer LM is pretrained on one text (the sweep's first trial, `pretrain`), then every arm fine-tunes it on
another text from the same start (`init_from="{workdir}/pretrain"`). What the arms share: the token embedding,
the output head and the layer norms are frozen (pretrained) in every arm, so the arms differ only in how the 12
attention and MLP kernels (`block_*/{query,key,value,out,mlp_in,mlp_out}/kernel`) adapt: all their entries
(full fine-tuning), `K₀ + AB` (LoRA) or `m ⊙ (K₀ + AB)/‖K₀ + AB‖₀` (DoRA, `n` detached as in the paper §4.3);
scale α/r = 1, no weight decay, AdamW (`A`, `B`, `m` included), cosine schedule. Diagnostics every
`diagnostics_every` steps give ΔM and ΔD of every kernel against the pretrained one; the report plots them per
method, with the fitted slope and correlation (experiments/plots.py, `magnitude_direction`).

smoke (CPU, ~10 minutes; 2 seeds per arm): a 2-layer d=64 transformer pretrained for 1000 steps on the order-2
`markov` source of `source_seed=0`, fine-tuned for 300 steps on that of `source_seed=1` (another transition
table: another "text" over the same 16 tokens). Without `--vmap_seeds`: on a 2-core CPU the vmapped seeds of
this model ran slower than one after the other.

    python -m experiments.sweep --config configs/dora.py:smoke --workdir runs/dora

full (one GPU or a Colab TPU v2-8, bfloat16): a 6-layer d=384 byte-level transformer pretrained for 20k steps on
TFDS `lm1b`, fine-tuned for 2000 steps on TFDS `tiny_shakespeare` read as UTF-8 bytes (`data.vocab_size=256`,
lm1b's vocabulary, so the embedding and head carry over); prepare both once with
`tfds build lm1b tiny_shakespeare --file_format=array_record`:

    python -m experiments.sweep --config configs/dora.py --workdir runs/dora_full --vmap_seeds

One arm alone (after the pretraining trial has finished):

    python -m experiments.train --config configs/dora.py:smoke --workdir runs/dora_one \\
        --config.init_from=runs/dora/pretrain --config.reparam.transform="dora(rank=8)"
"""
from configs import common

RANKS = (4, 8, 16)


def get_config(arg=None):
  """The fine-tuning config; the `pretrain` trial of `get_sweep` overrides what pretraining changes."""
  a = common.parse_arg(arg, smoke=False, steps=0)
  c = common.base("dora")
  if a.smoke:       # fine-tuning: another transition table (source_seed) of the same kind of source
    c.data.update(name="markov", vocab_size=16, order=2, concentration=0.2, source_seed=1, seq_len=32,
                  batch_size=32, eval_batch_size=256)
    c.model.update(name="transformer", d_model=64, num_heads=4, num_layers=2, mlp_ratio=4)
    steps, lr = a.steps or 300, 1e-2
  else:
    c.data.update(name="tiny_shakespeare", vocab_size=256, seq_len=256, batch_size=64, eval_batch_size=64)
    c.model.update(name="transformer", d_model=384, num_heads=6, num_layers=6, mlp_ratio=4, dtype="bfloat16")
    steps, lr = a.steps or 2000, 2e-3
  c.reparam.update(transform="none", targets=r"block_\d+/.*/kernel", exclude="")
  c.optimizer.update(name="adamw", learning_rate=lr, weight_decay=0.0, schedule="cosine",
                     warmup_steps=max(steps // 20, 1), grad_clip_norm=1.0)
  # Frozen in every arm (fine-tuning and pretraining differ only here): the pretrained embedding, head and norms.
  c.optimizer.role_rules = (("embed/.*", "frozen"), ("head/.*", "frozen"), (r".*norm/.*", "frozen"))
  c.optimizer.roles = {}
  c.train.update(steps=steps, log_every=max(steps // 20, 1), eval_every=max(steps // 4, 1),
                 checkpoint_every=max(steps // 2, 1), diagnostics_every=max(steps // 6, 1))
  # The smoke's pretraining and fine-tuning texts have different entropy floors: the loss above each one's floor
  # is what compares the pretraining row with the fine-tuning rows.
  c.report.update(metric="eval_loss", mode="min",
                  metrics=("eval_loss", "eval_loss_above_floor", "eval_accuracy", "train_loss") if a.smoke else
                  ("eval_loss", "eval_accuracy", "train_loss"))
  return c


def pretrain_overrides(smoke: bool) -> dict:
  """The `pretrain` trial: the other text, everything trained, more steps (the fine-tuning's log, eval and
  checkpoint cadence; the smoke's learning rate)."""
  if smoke:
    return {"trial": "pretrain", "data.source_seed": 0, "optimizer.role_rules": (), "train.steps": 1000}
  return {"trial": "pretrain", "data.name": "lm1b", "data.eval_examples": 512, "optimizer.role_rules": (),
          "optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 0.1, "optimizer.warmup_steps": 1000,
          "train.steps": 20_000}


def arms(smoke: bool) -> list[dict]:
  """Method and learning rate. Smoke: 1e-2 for every arm, the best of {1e-3, 3e-3, 1e-2} for full fine-tuning and
  of {3e-3, 1e-2, 3e-2} for LoRA and DoRA at rank 8 (one seed). Full: untuned, full fine-tuning at half the
  pretraining peak and LoRA/DoRA 4x higher, as usual for low-rank adapters."""
  ft_lr, lowrank_lr = (1e-2, 1e-2) if smoke else (5e-4, 2e-3)
  out = [{"reparam.transform": "none", "optimizer.learning_rate": ft_lr, "method": "full"}]
  for name in ("lora", "dora"):
    out += [{"reparam.transform": f"{name}(rank={r})", "optimizer.learning_rate": lowrank_lr,
             "method": f"{name}_r{r}"} for r in RANKS]
  return out


def get_sweep(arg=None):
  a = common.parse_arg(arg, smoke=False, steps=0)
  seeds = (0, 1)
  trials = []
  for arm in arms(a.smoke):
    method = arm.pop("method")
    named = common.zip_(common.sweep("trial", [f"{method},seed={s}" for s in seeds]), common.sweep("seed", seeds))
    trials.append(common.product([{"init_from": "{workdir}/pretrain", **arm}], named))
  return common.concat([pretrain_overrides(a.smoke)], *trials)
