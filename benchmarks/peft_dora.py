"""peft's DoRA/LoRA training-step ratio on the shapes of benchmarks/train_step.py, for comparison with ours.

    python benchmarks/train_step.py --peft        # both, side by side (needs torch and peft: the `peft` extra)
    python benchmarks/peft_dora.py                # peft alone

The model is the PyTorch twin of experiments/models.py's transformer LM: 2 pre-norm blocks (LayerNorm, causal
softmax attention with 8 heads, GELU MLP ×4, no biases), token embedding and sinusoidal positions, vocabulary 256,
its linear layers named as ours (`query`, `key`, `value`, `out`, `mlp_in`, `mlp_out`), so that peft wraps the same
12 hidden kernels (`LoraConfig(r, lora_alpha=r, target_modules=...)`, `use_dora=True` for DoRA). A step is
forward, backward and `torch.optim.AdamW` on the trainable parameters. Rounds interleave LoRA and DoRA, and the
ratio is taken within each round, as in train_step.py. Not a dependency of the library: only imported here.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

HIDDEN = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def _model(d_model: int, seq: int):
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
      for name in ("query", "key", "value", "out"):
        setattr(self, name, nn.Linear(d_model, d_model, bias=False))
      self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=False)
      self.mlp_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x):
      b, length, d = x.shape
      h = self.attn_norm(x)
      q, k, v = (getattr(self, n)(h).view(b, length, 8, d // 8).transpose(1, 2) for n in ("query", "key", "value"))
      y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.out(y.transpose(1, 2).reshape(b, length, d))
      return x + self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.mlp_norm(x))))

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(256, d_model)
      self.blocks = nn.ModuleList([Block() for _ in range(2)])
      self.final_norm = nn.LayerNorm(d_model)
      self.head = nn.Linear(d_model, 256, bias=False)
      pos = torch.arange(seq)[:, None]
      freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2) / d_model)
      pe = torch.zeros(seq, d_model)
      pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
      self.register_buffer("pe", pe)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pe
      for block in self.blocks:
        x = block(x)
      return self.head(self.final_norm(x))

  return LM()


def _device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _step_fn(d_model: int, batch: int, seq: int, rank: int, dora: bool, dtype: str = "float32"):
  """One training step of peft's LoRA or DoRA on the GPU where there is one; with dtype bfloat16 the forward
  runs under autocast (parameters float32, as in train_step.py's `--dtype bfloat16`)."""
  import torch
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(0)
  device = _device()
  model = get_peft_model(_model(d_model, seq), LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                          target_modules=list(HIDDEN), use_dora=dora)).to(device)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  tokens = torch.randint(0, 256, (batch, seq + 1), device=device)
  x, y = tokens[:, :-1], tokens[:, 1:]
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    with autocast:
      logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def measure(d_model: int, batch: int, seq: int, rank: int = 8, rounds: int = 20, calls: int = 5,
            dtype: str = "float32") -> dict:
  """Median ms per step of peft LoRA and DoRA, and the median within-round DoRA/LoRA ratio."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  steps = {k: _step_fn(d_model, batch, seq, rank, k == "dora", dtype) for k in ("lora", "dora")}
  sync = torch.cuda.synchronize if _device().type == "cuda" else (lambda: None)   # GPU work is asynchronous
  for f in steps.values():
    for _ in range(3):
      f()
  sync()
  times = {k: [] for k in steps}
  rng = np.random.default_rng(0)
  for _ in range(rounds):
    for name in rng.permutation(list(steps)):
      t0 = time.perf_counter()
      for _ in range(calls):
        steps[name]()
      sync()
      times[name].append((time.perf_counter() - t0) / calls)
  return {"d_model": d_model, "tokens": batch * seq, "rank": rank, "torch": torch.__version__,
          "device": str(_device()), "dtype": dtype,
          "lora_ms": 1e3 * float(np.median(times["lora"])), "dora_ms": 1e3 * float(np.median(times["dora"])),
          "dora_x_lora": float(np.median(np.array(times["dora"]) / np.array(times["lora"])))}


def print_table(peft_rows: list[dict], ours: dict | None = None, rank: int = 8) -> None:
  """peft's DoRA/LoRA ratio per regime, beside ours (`ours[(d_model, tokens)]`: a train_step.py regime)."""
  print(f"\n### DoRA against LoRA (rank {rank}): peft (PyTorch) beside reparam (JAX)\n")
  print("| d_model, tokens | peft LoRA ms | peft DoRA ms | peft DoRA × LoRA | reparam DoRA × LoRA |")
  print("|---|---|---|---|---|")
  for r in peft_rows:
    mine = ""
    if ours and (r["d_model"], r["tokens"]) in ours:
      rows = {row["variant"]: row for row in ours[(r["d_model"], r["tokens"])]["rows"]}
      mine = f"{rows[f'dora r{rank}']['x_ref']:.3f}"
    print(f"| {r['d_model']}, {r['tokens']} | {r['lora_ms']:.2f} | {r['dora_ms']:.2f} | {r['dora_x_lora']:.3f} | "
          f"{mine} |")


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--calls", type=int, default=5)
  ap.add_argument("--rank", type=int, default=8)
  args = ap.parse_args()
  print_table([measure(d, b, s, args.rank, args.rounds, args.calls) for d, b, s in ((512, 1, 128), (256, 16, 256))],
              rank=args.rank)
