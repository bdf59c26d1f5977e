"""What a reparameterization costs per training step, as ratios measured side by side in one run.

    python benchmarks/train_step.py                       # the full table (~25 minutes on 2 CPU cores)
    python benchmarks/train_step.py --rounds 5 --seeds_steps 60     # a quicker, noisier look
    python benchmarks/train_step.py --json benchmarks/results/cpu.json
    python benchmarks/train_step.py --report benchmarks/results/cpu_2core.json    # a saved run's tables again
    python benchmarks/train_step.py --report a.json b.json c.json     # runs of the same steps, processes pooled
    python benchmarks/train_step.py --regime 512,1,128 --only "^nap$" --seeds 0 --processes 6 --rounds 40

**Method.** Every variant is the jitted training step of `experiments/train.py` (`make_train_step`: the forward
through `reparam.apply` or `materialize`, the backward, the optax update of `reparam.optim.make`, the finiteness
checks and metric sums; the state donated) on the pre-norm transformer LM of `experiments/models.py` (2 blocks,
8 heads, MLP ×4, vocabulary 256), with the transform on its 12 hidden kernels, in two regimes: d_model 512 at 128
tokens per step (1 × 128) and d_model 256 at 4096 tokens (16 × 256). All variants are compiled and warmed up
first; then, in each of `--rounds` rounds, every variant is timed once (`--calls` steps) in a fresh random
order, and its ratio to its reference is taken within the round: the load of a shared machine drifts over
seconds, and a ratio of timings taken seconds apart cancels most of it. The tables give the median over rounds.
Peak memory is XLA's own buffer assignment of the compiled step (`memory_analysis()`: arguments + outputs +
temporaries − donated), which is exact and has no noise. FLOPs are XLA's count (`cost_analysis()`).

Also measured: Muon against AdamW with the Newton–Schulz share of the step's FLOPs (5 iterations of
`4·m²·n + 2·m³` per `m × n` matrix, m ≤ n), our weight norm against `flax.linen.WeightNorm` on the same kernels,
DoRA with `remat=True` (`x K₀` computed again in the backward pass instead of read back from the kept output),
and the throughput of 8 seeds of the quickstart model trained as one vmapped program (`--vmap_seeds`) against 8
runs one after the other, both per step and end to end (`--seeds_runs` whole runs of each way, in alternating
order: `train_seeds` / `train_and_evaluate`, compilation, evaluation and checkpoints included, with a fresh
persistent compilation cache as a sweep has). Where torch and peft are installed (`pip install -e ".[peft]"`),
peft's DoRA/LoRA step ratio on the same shapes is printed beside ours (benchmarks/peft_dora.py).

MFU (the "MFU %" column): the LM's model FLOPs per step (`model_flops`, PaLM's count) per second, over the rate of a
large matmul measured in the step's dtype on the same device (`matmul_peak`; with `--processes`, by each process for
its own rows, and the run reports their median), and in brackets over the datasheet's dense bf16 peak where the
device is in `DATASHEET_BF16_PEAK` (H100, H200). Every row is credited the plain model's FLOPs, so MFU compares
time: LoRA and DoRA skip the frozen kernels' weight gradients (a third of those kernels' matmuls) and can pass 100%.
`--dtype bfloat16` runs the LM's compute in bf16 (parameters float32). Off CPU, `reparam.apply` chooses weight space
on a layer whose activations outnumber its weight (`space="auto"`), so the table there also has rows with every
activation-space form (`space="activation"`).

A control row, "plain, again", is the plain step compiled a second time and timed like any variant: its ratio
to plain (ideally 1) shows how far apart two identical programs measure in this run, the resolution of every
other ratio in the table.

Two rows are floors, not transforms: "multipliers, gradient sums only" and "dora r8, norm and gain sum only" do
the gradient work their transform cannot avoid (the multipliers' per-unit sums over activations and the updates
of their leaves; DoRA's norm from `AᵀK₀`, `AᵀA` and ‖K₀‖₀², and m's sum) but none of its scalings, so their
outputs are the plain model's and LoRA's (`multipliers_gradient_sums_only`, `dora_norm_and_gain_sum_only`).
They time that work alone, as autodiff and this backend compile it: where the transform measures above its
floor, the excess is what its scalings cost, and a target below the floor's ratio is out of reach of any form
that computes those sums the same way. It is a reference, not a proven bound: XLA may fuse a transform's sums
with its scalings better than the floor's bare ones (on 2 CPU cores at 4096 tokens both transforms measured at
or under their floors).

Every variant's ratio also gets a 95% confidence interval for its median (from the per-round ratios,
distribution-free: order statistics, see `median_interval`), of the ratio its target is on (× LoRA for DoRA,
× plain for the rest). A target is "met" when the whole interval is within it, missed ("no") when the whole
interval is above it, and "on the bound" when the run cannot tell; peak memory, which has no noise, is compared
as is.

`--processes N` measures each regime N times, each in a fresh process, one after another. Two builds of the
same program can differ by a few percent for the whole life of a process, consistently over its rounds (the
control measured 0.996–1.044 in six processes of 40 rounds on this project's 2-core test machine, NaP 0.990 in
one process of 300 rounds and 1.051–1.084 in those six), so a per-round interval, which cannot see that, is
too narrow. With N > 1 every number is the median over processes, and a ratio's interval is that of the
process medians (N ≥ 6 for 95%). `--report A.json B.json ...` pools the processes of saved runs of the same
compiled steps (`pool`), for an interval over all of them where six leave a target on the bound.

This prints and writes numbers; it asserts nothing. Targets (issue 6) are shown beside the ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Optional
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # run from anywhere

if __name__ == "__main__":     # time the step as `python -m experiments.train` runs it (experiments/hugepages.py)
  from experiments import hugepages
  hugepages.rerun_with_huge_pages()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import reparam  # noqa: E402
from experiments import models, setup, train  # noqa: E402
from reparam.layout import resolve  # noqa: E402
from reparam.optim.routing import routing  # noqa: E402
from reparam.transforms.dora import lowrank_norm as dora_lowrank_norm, stacked_products  # noqa: E402
from reparam.transforms.lora import lowrank_linear  # noqa: E402

HIDDEN = ("query", "key", "value", "out", "mlp_in", "mlp_out")
HIDDEN_KERNELS = r"block_\d+/(" + "|".join(HIDDEN) + ")/kernel"
ADAMW = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1)
REGIMES = ((512, 1, 128), (256, 16, 256))          # (d_model, batch, sequence length)
LAYERS, VOCAB, MLP_RATIO = 2, 256, 4
# Dense bf16 matrix-unit peaks from the vendor's datasheets (FLOP/s, no sparsity), by `device_kind`: MFU's
# usual denominator. The script also measures a large matmul in the step's own dtype (`matmul_peak`).
DATASHEET_BF16_PEAK = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12}


@dataclasses.dataclass
class Variant:
  """One training step to time. `ref` is a second reference besides `plain` (DoRA: LoRA; ours: flax's)."""
  name: str
  transform: Optional[reparam.Reparam] = None       # on the hidden kernels
  optimizer: dict = dataclasses.field(default_factory=dict)    # overrides of ADAMW
  fast: bool = True                                  # reparam.apply (activation space) or materialize
  space: str = "auto"                                # reparam.apply's choice of space where fast
  flax_weight_norm: bool = False
  projection: str = "lazy"                           # NaP: computes with c·q (as the loop) or writes it ("deferred")
  ref: Optional[str] = None
  target: Optional[float] = None                     # the issue's bound on the time ratio to `target_of`
  memory_target: Optional[float] = None              # and on the peak-memory ratio
  target_of: str = "plain"
  floor_of: Optional[str] = None                     # a floor row: the transform whose unavoidable work it does


@jax.custom_vjp
def _gradient_sum_tap(x, v):
  """`x` as it is; the backward passes the cotangent `g` on and gives `v` (shaped like x's trailing axes) the sum
  over x's rows of `x ⊙ g`, on the 2-D view `reparam.fast.scale_trailing` reduces on."""
  return x


def _tap_fwd(x, v):
  return x, x


def _tap_bwd(x, g):
  return g, jnp.sum(x.reshape(-1, x.shape[-1]) * g.reshape(-1, x.shape[-1]), axis=0)


_gradient_sum_tap.defvjp(_tap_fwd, _tap_bwd)


def multipliers_gradient_sums_only() -> reparam.Reparam:
  """Not a transform: a floor for the multipliers' activation-space form, measured as a row of its own.

  It has the multipliers' leaves (s, r, c, their roles, their AdamW updates) and computes their gradients as
  the multipliers do, by the same per-unit sums over activations (`Σ z⊙G` for s·r, `Σ x⊙dx` for c), but scales
  nothing: the layer's output is the plain layer's whatever the factors hold. At init (all ones) its gradients
  are the multipliers' exactly (tests/test_benchmarks.py). The activation-space multipliers do this work and
  more (a scaling of the input forward, of the cotangent and of the input gradient backward), so their ratio
  over this row is what those scalings cost, as far as XLA compiles both alike (see the module docstring)."""
  mult = reparam.multipliers(scalar=True, row=True, col=True)

  def linear(factors, w, x, layer):
    layer.check(resolve(w.ndim))
    y = layer.base(_gradient_sum_tap(x, factors["col"]))
    return _gradient_sum_tap(y, factors["scalar"] * factors["row"])

  return mult._replace(apply=lambda factors, w: w, linear=linear, name="multipliers, gradient sums only")


def dora_norm_and_gain_sum_only(rank: int) -> reparam.Reparam:
  """Not a transform: a floor for DoRA's activation-space form against LoRA, measured as a row of its own.

  It has DoRA's leaves (m, k0_sq, A, B) and does the work DoRA adds to LoRA's layer that no scaling can avoid:
  it computes the norm n from `Aᵀ K₀`, `AᵀA` and the cached ‖K₀‖₀² (`lowrank_norm`, as DoRA does, `Aᵀ K₀` in
  one matmul with `x K₀` where `Layer.stacks`), keeps the layer's output and sums `Σ y⊙G` over its rows for m's
  gradient, and updates m. But its output is LoRA's,
  `x K₀ + (x A) B`, whatever m and n are: the m/n scalings of the output, the cotangent and B are skipped. At
  init (m = n) its gradients are DoRA's (tests/test_benchmarks.py). DoRA's ratio over this row is what its
  scalings cost, as far as XLA compiles both alike (see the module docstring). Not a floor for memory: its step
  peaks above DoRA's (52.2 against 49.4 MiB on the benchmark LM at 128 tokens)."""
  lora = reparam.lora(rank)
  # reparam.dora(rank)'s own defaults: alpha None (scale 1), its eps, n detached
  defaults = inspect.signature(reparam.dora).parameters
  assert defaults["alpha"].default is None and defaults["detach_norm"].default
  eps = defaults["eps"].default

  def linear(factors, w, x, layer):
    layout = resolve(w.ndim)
    layer.check(layout)
    w = jax.lax.stop_gradient(w)
    y0, ak = stacked_products(factors, w, x, layer)            # as DoRA does: Aᵀ K₀ from the layer's own matmul
    n = jax.lax.stop_gradient(dora_lowrank_norm(factors, w, layout, 1.0, eps, ak))
    y = lowrank_linear({"A": factors["A"], "B": factors["B"]}, w, x, layer, 1.0, y0=y0)
    return _gradient_sum_tap(y, factors["m"] / n)

  return reparam.dora(rank)._replace(apply=lambda factors, w: lora.apply({"A": factors["A"], "B": factors["B"]}, w),
                                     linear=linear, name="dora, norm and gain sum only")


def variants(rank: int) -> list[Variant]:
  """The table's rows. Where `reparam.apply`'s space="auto" may choose another form by shape
  (`Layer.activation_space_pays`: off CPU, weight space for multipliers, weight norm and DoRA; on CPU, DoRA's
  kernel-scaled form), they also run with every activation-space form."""
  mult = reparam.multipliers(scalar=True, row=True, col=True)
  by_cost = jax.default_backend() != "cpu"
  lora = f"lora r{rank}"
  dora_target = dict(ref=lora, target=1.10, memory_target=1.05, target_of=lora)    # the issue's DoRA bounds
  return [
      Variant("plain"),
      Variant("plain, again"),      # the same program built twice: its ratio is how far apart equal steps measure
      Variant("multipliers", mult, target=1.03),
      # a floor for the multipliers: their gradient sums and updates, no scaling (not a transform)
      Variant("multipliers, gradient sums only", multipliers_gradient_sums_only(), floor_of="multipliers"),
      # no scalar: s adds a 512-element sum, two products and an update per layer to the row's work
      Variant("multipliers, row and col", reparam.multipliers(row=True, col=True)),
      *([Variant("multipliers, activation space", mult, space="activation")] if by_cost else []),
      Variant("multipliers, materialized", mult, fast=False),
      Variant("weight_norm", reparam.weight_norm(), ref="flax.linen.WeightNorm", target=1.07),
      *([Variant("weight_norm, activation space", reparam.weight_norm(), space="activation")] if by_cost else []),
      Variant("weight_norm, materialized", reparam.weight_norm(), fast=False),
      Variant("flax.linen.WeightNorm", flax_weight_norm=True),
      Variant("nap", optimizer={"nap": True}, target=1.05),
      Variant("nap, written", optimizer={"nap": True}, projection="deferred"),    # the projection before 2026-12-06
      Variant(lora, reparam.lora(rank)),
      Variant(f"dora r{rank}", reparam.dora(rank), **dora_target),
      Variant(f"dora r{rank}, remat", reparam.dora(rank, remat=True), **dora_target),    # nothing kept for m
      # a floor for DoRA over LoRA: its norm and m's gradient, no m/n scaling (not a transform)
      Variant(f"dora r{rank}, norm and gain sum only", dora_norm_and_gain_sum_only(rank), ref=lora, target_of=lora,
              floor_of=f"dora r{rank}"),
      # off CPU DoRA may run materialized by shape, on CPU scale its kernel (`Layer.scales_kernel`)
      Variant(f"dora r{rank}, activation space", reparam.dora(rank), space="activation", ref=lora),
      Variant(f"dora r{rank}, materialized", reparam.dora(rank), fast=False, ref=lora),
      Variant("muon", optimizer={"name": "muon", "learning_rate": 0.02}),
  ]


@contextlib.contextmanager
def flax_weight_norm_on_hidden_kernels():
  """`experiments.models` seeing a `flax.linen` whose `Dense` wraps the hidden layers in `nn.WeightNorm`: the
  same model, its code unchanged, with flax's own weight norm on the kernels our rules would wrap."""
  linen = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")})

  def dense(features, name=None, **kwargs):
    layer = nn.Dense(features, name=name, **kwargs)
    return nn.WeightNorm(layer) if name in HIDDEN else layer

  linen.Dense = dense
  with mock.patch.object(models, "nn", linen):
    yield


@dataclasses.dataclass
class Step:
  """A compiled training step and the state it threads through (donated at every call)."""
  run: Callable
  state: Any
  batch: dict
  peak_bytes: int
  flops: float
  newton_schulz_flops: float = 0.0

  def time(self, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
      self.state = self.run(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - t0) / calls


def _memory(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", math.nan))


def newton_schulz_flops(opt: dict, rules, rparams) -> float:
  """FLOPs of Muon's orthogonalization per step: per matrix (its reduction axes × output axes, m ≤ n),
  `ns_steps` iterations of X Xᵀ (2m²n), A² (2m³) and B X (2m²n), as optax.contrib.muon computes them."""
  total = 0.0
  for r in routing(opt, rules, rparams).values():
    if r.optimizer == "muon":
      rows = math.prod(r.shape[a] for a in r.muon_dims.reduction_axis)
      cols = math.prod(r.shape[a] for a in r.muon_dims.output_axis)
      m, n = sorted((rows, cols))
      total += opt.get("ns_steps", 5) * (4 * m * m * n + 2 * m ** 3)
  return total


def model_flops(d_model: int, seq: int, tokens: int) -> float:
  """The LM's model FLOPs per training step, as MFU counts them (PaLM, Chowdhery et al. 2022, appendix B):
  3 × the forward's matmuls (forward, and the backward's two products per matmul), with N = 12·L·d² + d·V
  matmul weights (q, k, v, out: 4d²; MLP ×4: 8d²; the head: d·V; the embedding is a lookup) and the attention's
  two products of 2·seq·d per token and layer, counted in full (no credit for the causal mask):
  tokens · (6N + 12·L·seq·d). The transform's own work is not model work: a reparameterization that costs
  time lowers MFU."""
  n = 12 * LAYERS * d_model ** 2 + d_model * VOCAB
  return float(tokens * (6 * n + 12 * LAYERS * seq * d_model))


def matmul_peak(dtype, n: Optional[int] = None, calls: int = 10) -> float:
  """FLOP/s of a large jitted `n × n` matmul in `dtype` at the default precision (the ceiling the step's own
  matmuls can reach on this device): the median over `calls` timed calls after a warm-up. n: 8192 on an
  accelerator, 1024 on CPU (where larger adds minutes and no rate)."""
  n = n or (1024 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)          # random data: zeros run faster on some chips
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def build_step(v: Variant, d_model: int, batch: int, seq: int, key, dtype=jnp.float32) -> Step:
  """The training loop's own step (`train.make_train_step`) for one variant, compiled ahead of time."""
  tokens = jax.random.randint(key, (batch, seq + 1), 0, 256)
  data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  opt = {**ADAMW, **v.optimizer}
  with flax_weight_norm_on_hidden_kernels() if v.flax_weight_norm else contextlib.nullcontext():
    model = models.Transformer(vocab_size=VOCAB, d_model=d_model, num_heads=8, num_layers=LAYERS,
                               mlp_ratio=MLP_RATIO, dtype=dtype)
    params = model.init(key, data["x"])["params"]
    rules = [(HIDDEN_KERNELS, v.transform)] if v.transform else []
    rparams = reparam.init(rules, params, jax.random.fold_in(key, 1))
    s = types.SimpleNamespace(
        config=ml_collections.ConfigDict({"seed": 0, "train": {"log_every": 1000, "skip_nonfinite": False},
                                         "optimizer": opt}),
        forward=setup.forward_fn(model, rules, v.fast, v.space), rparams=rparams, collections={}, rules=rules,
        tx=reparam.optim.make(opt, rules, rparams, projection=v.projection))     # as experiments.setup makes it
    state = train.init_state(s)
    compiled = jax.jit(train.make_train_step(s), donate_argnums=0).lower(state, data).compile()
  ns = newton_schulz_flops(opt, rules, rparams) if opt["name"] == "muon" else 0.0
  return Step(compiled, state, data, _memory(compiled), _flops(compiled), ns)


def interleaved(steps: dict[str, Step], rounds: int, calls: int, seed: int = 0) -> dict[str, list[float]]:
  """Seconds per step of every variant, `rounds` samples each, the variants in a fresh order every round."""
  for s in steps.values():          # warm-up: the first calls pay for allocation and caches
    s.time(2)
  rng = np.random.default_rng(seed)
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name in rng.permutation(list(steps)):
      times[name].append(steps[name].time(calls))
  return times


def round_ratios(times: dict[str, list[float]], name: str, ref: str) -> np.ndarray:
  """The within-round ratios of `name` to `ref`, one per round."""
  return np.array(times[name]) / np.array(times[ref])


def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
  """The median over rounds of the within-round ratio."""
  return float(np.median(round_ratios(times, name, ref)))


def median_interval(samples, level: float = 0.95) -> Optional[tuple[float, float]]:
  """A distribution-free confidence interval for the median of `samples` (assumed independent draws): the order
  statistics k and n+1-k for the largest k whose coverage, 1 - 2·P(Binomial(n, ½) < k), is at least `level`
  (n = 20: the 6th and 15th of the sorted samples, 95.9%). None when n is too small for `level` (n < 6 at 95%)."""
  x, n = np.sort(np.asarray(samples, float)), len(samples)
  k, below = 0, 0.0                   # below = P(Binomial(n, ½) <= j)
  for j in range(n // 2):
    below += math.comb(n, j) / 2 ** n
    if 1 - 2 * below < level:
      break
    k = j + 1
  return (float(x[k - 1]), float(x[n - k])) if k else None


def ratio_samples(r: dict, name: str, ref: str) -> np.ndarray:
  """What a ratio's interval is taken over: the per-round ratios of a regime measured in one process, or, for one
  measured in several (`--processes`), each process's median ratio. A step can run a few percent faster or slower
  than its twin for the whole life of a process (whatever fixes it, the step's memory, its threads, the machine's
  load over those minutes, is shared by all of that process's rounds), so only the spread over processes covers
  it."""
  if r.get("processes"):
    return np.array([ratio(p["times_s"], name, ref) for p in r["processes"]])
  return round_ratios(r["times_s"], name, ref)


def target_ratios(row: dict) -> tuple[float, float]:
  """A targeted row's time and peak-memory ratios to what its target is on: LoRA for DoRA, plain for the rest."""
  if (row.get("target_of") or "plain") == "plain":
    return row["x_plain"], row["memory_x_plain"]
  return row["x_ref"], row["memory_x_ref"]


def judge(r: dict) -> None:
  """Adds to every row of a regime the 95% interval of its ratio to its target's reference, else to plain
  (`x_ci`, over `ratio_samples`: the per-round ratios, or the process medians), and to a row with a target two
  judgments: `meets_target` on the medians alone (as runs before the intervals were judged), and a verdict:
  "met" when the whole interval is within the bound (and the memory, which is exact, too), "missed" when the
  whole interval is above it (or the memory is), "on the bound" when the interval straddles it: the run cannot
  tell. With too few samples for an interval, the median decides."""
  for row in r["rows"]:
    ref = row.get("target_of") or "plain"
    row["x_ci"] = median_interval(ratio_samples(r, row["variant"], ref))
    if not row.get("target"):
      continue
    x, mem = target_ratios(row)
    memory_ok = row["memory_target"] is None or mem <= row["memory_target"]
    row["meets_target"] = bool(x <= row["target"] and memory_ok)
    ci = row["x_ci"] or (x, x)
    if not memory_ok or ci[0] > row["target"]:
      row["verdict"] = "missed"
    else:
      row["verdict"] = "met" if ci[1] <= row["target"] else "on the bound"


def _timed(times: dict[str, list[float]], name: str, ref: Optional[str], gflop: float) -> dict:
  """A row's numbers that come from its timings: the median step (ms), its ratios to plain and to its
  reference (`ratio`), and its rate."""
  ms = 1e3 * float(np.median(times[name]))
  row = {"ms": ms, "x_plain": ratio(times, name, "plain"), "gflop_per_s": gflop / ms * 1e3}
  if ref:
    row["x_ref"] = ratio(times, name, ref)
  return row


def regime(d_model: int, batch: int, seq: int, args, peak: Optional[dict] = None) -> dict:
  """Every variant's step at one shape, timed side by side; `peak`: the FLOP/s that MFU divides by
  ({"measured": ..., "datasheet": ... or None})."""
  vs = variants(args.rank)
  if args.only:       # the chosen variants, with plain, the control and their references
    keep = {v.name for v in vs if re.search(args.only, v.name)}
    keep |= {"plain", "plain, again"} | {v.ref for v in vs if v.name in keep and v.ref}
    keep |= {v.floor_of for v in vs if v.name in keep and v.floor_of}      # a floor is read beside its transform
    vs = [v for v in vs if v.name in keep]
  key = jax.random.key(0)
  t0 = time.perf_counter()
  steps = {v.name: build_step(v, d_model, batch, seq, key, jnp.dtype(args.dtype)) for v in vs}
  print(f"  compiled {len(steps)} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
  times = interleaved(steps, args.rounds, args.calls)
  rows = []
  useful = model_flops(d_model, seq, batch * seq)
  for v in vs:
    st = steps[v.name]
    row = {"variant": v.name, **_timed(times, v.name, v.ref, st.flops / 1e9), "peak_mib": st.peak_bytes / 2 ** 20,
           "memory_x_plain": st.peak_bytes / steps["plain"].peak_bytes, "gflop": st.flops / 1e9,
           "ref": v.ref, "target": v.target, "memory_target": v.memory_target}
    sec = row["ms"] / 1e3
    for kind, flops_per_s in (peak or {}).items():
      if flops_per_s:
        row[f"mfu_{kind}"] = useful / sec / flops_per_s
    if v.ref:
      row["memory_x_ref"] = st.peak_bytes / steps[v.ref].peak_bytes
    if st.newton_schulz_flops:
      row["newton_schulz_share"] = st.newton_schulz_flops / st.flops
    if v.target or v.floor_of:
      row["target_of"] = v.target_of
    if v.floor_of:
      row["floor_of"] = v.floor_of
    rows.append(row)
  r = {"d_model": d_model, "batch": batch, "seq": seq, "tokens": batch * seq, "dtype": args.dtype,
       "model_gflop": useful / 1e9, "rounds": args.rounds, "calls": args.calls, "rows": rows, "times_s": times}
  judge(r)
  return r


_PER_PROCESS = ("ms", "x_plain", "x_ref", "gflop_per_s", "mfu_measured", "mfu_datasheet")


def combine(runs: list[dict]) -> dict:
  """One regime from the same regime measured in several processes: each row's times, ratios, rates and MFU are
  the medians over processes (memory and FLOPs, exact, are the same in all), every process's timings are kept
  (`processes`), and each ratio's interval is over the process medians (`ratio_samples`, `judge`)."""
  first = runs[0]
  r = {k: v for k, v in first.items() if k not in ("rows", "times_s", "matmul_peak_measured")}
  # each process's MFU is over the matmul peak that process measured
  r["processes"] = [{"times_s": run["times_s"], **({"matmul_peak_measured": run["matmul_peak_measured"]}
                                                   if "matmul_peak_measured" in run else {})} for run in runs]
  r["rows"] = []
  for i, row in enumerate(first["rows"]):
    row = dict(row)
    for key in _PER_PROCESS:
      if key in row:
        row[key] = float(np.median([run["rows"][i][key] for run in runs]))
    r["rows"].append(row)
  judge(r)
  return r


def regime_in_processes(d_model: int, batch: int, seq: int, args) -> dict:
  """`regime` measured `args.processes` times, each in a fresh Python process of this script (its own
  compilation, buffers and threads, one after another), and combined (`combine`)."""
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.processes):
      path = os.path.join(tmp, f"{i}.json")
      cmd = [sys.executable, os.path.abspath(__file__), "--regime", f"{d_model},{batch},{seq}", "--seeds", "0",
             "--rounds", str(args.rounds), "--calls", str(args.calls), "--rank", str(args.rank),
             "--dtype", args.dtype, "--only", args.only, "--json", path]
      t0 = time.perf_counter()
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode:
        raise SystemExit(f"process {i + 1} of {args.processes} failed:\n{done.stderr[-3000:]}")
      with open(path) as f:
        done_json = json.load(f)
      run = dict(done_json["regimes"][0], matmul_peak_measured=done_json["matmul_peak_flops"]["measured"])
      runs.append(run)
      targeted = ", ".join(f"{row['variant']} {target_ratios(row)[0]:.3f}" for row in run["rows"] if row.get("target"))
      print(f"  process {i + 1}/{args.processes} ({time.perf_counter() - t0:.0f} s): {targeted}", file=sys.stderr)
  return combine(runs)


def _mfu(row: dict) -> str:
  """MFU in percent of the measured matmul peak, and of the datasheet's where the device is in the table."""
  if "mfu_measured" not in row:          # runs saved before MFU was measured
    return ""
  datasheet = f" ({100 * row['mfu_datasheet']:.1f})" if "mfu_datasheet" in row else ""
  return f"{100 * row['mfu_measured']:.1f}{datasheet}"


def print_regime(r: dict) -> None:
  dtype = f", {r['dtype']}" if "dtype" in r else ""
  print(f"\n### d_model {r['d_model']}, {r['tokens']} tokens per step ({r['batch']} × {r['seq']}{dtype})\n")
  print("| variant | ms/step | × plain | × ref (ref) | 95% interval | peak MiB | mem × plain | mem × ref | GFLOP/s "
        "| MFU % | target | met |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for row in r["rows"]:
    ref = f"{row['x_ref']:.3f} ({row['ref']})" if row.get("ref") else ""
    mem_ref = f"{row['memory_x_ref']:.3f}" if row.get("ref") else ""
    target = f"floor of {row['floor_of']}" if row.get("floor_of") else ""
    if row["target"]:
      target = f"≤ {row['target']} × {'plain' if row['target_of'] == 'plain' else 'ref'}"
      target += f", mem ≤ {row['memory_target']}" if row["memory_target"] else ""
    extra = f" (Newton–Schulz: {100 * row['newton_schulz_share']:.1f}% of FLOPs)" if "newton_schulz_share" in row else ""
    met = {"met": "yes", "missed": "**no**", "on the bound": "on the bound", None: ""}[row.get("verdict")]
    ci = row.get("x_ci")
    ci = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci and row["variant"] != row.get("target_of", "plain") else ""
    print(f"| {row['variant']}{extra} | {row['ms']:.2f} | {row['x_plain']:.3f} | {ref} | {ci} | "
          f"{row['peak_mib']:.1f} | {row['memory_x_plain']:.3f} | {mem_ref} | {row['gflop_per_s']:.1f} | {_mfu(row)} | "
          f"{target} | {met} |")
  if r.get("processes"):
    print(f"\nMedians over {len(r['processes'])} processes of {r['rounds']} rounds each; a ratio's 95% interval is "
          "over the process medians. Each process's median ratio:\n")
    for row in r["rows"]:
      ref = row.get("target_of") or "plain"
      shown = row.get("target") or row.get("floor_of") or row["variant"] == "plain, again"
      pairs = [(row["variant"], ref)] if shown else []
      if row.get("floor_of"):         # what the transform's scalings cost over the work it cannot avoid
        pairs.append((row["floor_of"], row["variant"]))
      for name, of in pairs:
        if name != of:
          each = ", ".join(f"{x:.3f}" for x in ratio_samples(r, name, of))
          print(f"- {name} × {of}: {each}")


# --------------------------------------------------------------------------------------- seeds: vmap or not

def seeds_throughput(n_seeds: int, steps: int, rounds: int, calls: int, runs: int) -> dict:
  """8 seeds of the quickstart model: one vmapped program against one run after another, per step (`rounds`
  interleaved samples) and end to end (`runs` pairs of whole runs, in alternating order)."""
  from configs import quickstart
  config = quickstart.get_config(f"steps={steps}")
  config.train.update(progress=False, tensorboard=False)
  s = setup.build(config)
  one = jax.jit(train.make_train_step(s), donate_argnums=0)
  many = jax.jit(jax.vmap(train.make_train_step(s, vmapped=True)), donate_argnums=0)
  bs = config.data.batch_size
  batches = [s.dataset.batch(0, bs, seed) for seed in range(n_seeds)]
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  fresh = lambda: jax.tree.map(jnp.copy, train.init_state(s))    # own buffers: every step donates its state
  seq = [Step(one, fresh(), b, 0, 0.0) for b in batches]
  vm = Step(many, train._stack([fresh() for _ in range(n_seeds)]), stacked, 0, 0.0)

  class Sequential:        # one "step" of n seeds: each seed's own step, one after the other
    def time(self, k):
      return sum(st.time(k) for st in seq)

  times = interleaved({"sequential": Sequential(), "vmapped": vm}, rounds, calls)
  step_ratio = ratio(times, "sequential", "vmapped")

  def end_to_end(vmapped: bool) -> float:
    """Wall time of the 8 runs as a sweep does them: with a persistent compilation cache (experiments/cli.py),
    a fresh one, so that each way compiles its own programs once."""
    from jax._src import compilation_cache     # reset_cache: the cache directory is read once, at first use
    with tempfile.TemporaryDirectory() as tmp:
      jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      compilation_cache.reset_cache()
      configs = []
      for seed in range(n_seeds):
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed = seed
        configs.append(c)
      dirs = [os.path.join(tmp, str(i)) for i in range(n_seeds)]
      t0 = time.perf_counter()
      if vmapped:
        train.train_seeds(configs, dirs)
      else:
        for c, d in zip(configs, dirs):
          train.train_and_evaluate(c, d)
      elapsed = time.perf_counter() - t0
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    return elapsed

  e2e = {"sequential": [], "vmapped": []}
  for i in range(max(1, runs)):
    for mode in (("sequential", "vmapped") if i % 2 == 0 else ("vmapped", "sequential")):
      e2e[mode].append(end_to_end(mode == "vmapped"))
  pairs = np.array(e2e["sequential"]) / np.array(e2e["vmapped"])   # each pair ran back to back: its own ratio
  return {"seeds": n_seeds, "steps": steps, "step_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
          "step_throughput_ratio": step_ratio, "end_to_end_s": e2e,
          "end_to_end_throughput_ratio": float(np.median(e2e["sequential"]) / np.median(e2e["vmapped"])),
          "end_to_end_pair_ratios": pairs.tolist()}


def print_seeds(r: dict) -> None:
  print(f"\n### {r['seeds']} seeds of the quickstart model: vmapped (`--vmap_seeds`) against sequential\n")
  print("| measure | sequential | vmapped | throughput × | target |")
  print("|---|---|---|---|---|")
  print(f"| one training step of all seeds (ms) | {r['step_ms']['sequential']:.2f} | {r['step_ms']['vmapped']:.2f} | "
        f"{r['step_throughput_ratio']:.2f} | ≥ 2 |")
  e, pairs = r["end_to_end_s"], r.get("end_to_end_pair_ratios")      # runs saved before the pairs have none
  spread = f" (pairs: {min(pairs):.2f}–{max(pairs):.2f})" if pairs and len(pairs) > 1 else ""
  print(f"| {r['seeds']} runs of {r['steps']} steps, end to end (s), {len(e['vmapped'])} of each | "
        f"{np.median(e['sequential']):.1f} | {np.median(e['vmapped']):.1f} | "
        f"{r['end_to_end_throughput_ratio']:.2f}{spread} | ≥ 2 |")


def print_peak(dtype: str, peak: dict) -> None:
  """The rates MFU divides by (`matmul_peak_flops` of a run)."""
  print(f"{dtype} matmul, measured: {peak['measured'] / 1e12:.2f} TFLOP/s"
        + (f"; datasheet bf16 peak {peak['datasheet'] / 1e12:.1f}" if peak.get("datasheet") else "")
        + ". MFU % = the LM's model FLOPs (`model_flops`) per second over the measured rate (over the datasheet's);"
        " every row is credited the full model's training FLOPs, so LoRA and DoRA, which skip the frozen kernels'"
        " gradients, can pass 100%")


def pool(paths: list[str]) -> dict:
  """Several runs saved with --json, as one: each regime measured in all of them, with the variants all of them
  timed, as if its processes had been one run's (`combine`: every ratio the median over all process medians,
  its interval over all of them). A run of one process counts as one. More processes narrow the interval of a
  ratio's median where six leave it on the bound; pooling is only sound across runs of the same compiled steps
  (`benchmarks/hlo_traffic.py` tells whether two commits compile the same kernels), which the caller vouches
  for. Exact numbers (peak memory, FLOPs) come from the first run; MFU, which divides by each process's own
  matmul peak, is left out."""
  outs = []
  for path in paths:
    with open(path) as f:
      outs.append(json.load(f))
  shapes = [{(r["d_model"], r["batch"], r["seq"], r.get("dtype", "float32")): r for r in out["regimes"]}
            for out in outs]
  pooled = {k: v for k, v in outs[0].items() if k not in ("seeds", "peft")}      # not pooled: not shown
  pooled.update(pooled=list(paths), regimes=[])
  for shape, first in shapes[0].items():
    if not all(shape in s for s in shapes[1:]):
      continue
    regimes = [s[shape] for s in shapes]
    processes = [p for r in regimes for p in (r.get("processes") or [{"times_s": r["times_s"]}])]
    names = [row["variant"] for row in first["rows"] if all(row["variant"] in p["times_s"] for p in processes)]
    runs = [_process_run(first, names, p["times_s"]) for p in processes]
    r = combine(runs)
    r["rounds"] = "/".join(dict.fromkeys(str(x["rounds"]) for x in regimes))
    pooled["regimes"].append(r)
  if not pooled["regimes"]:
    raise SystemExit(f"--report: no regime (d_model, batch, seq, dtype) was measured in all of {', '.join(paths)}")
  return pooled


def _process_run(regime: dict, names: list[str], times: dict) -> dict:
  """One process of a saved regime as `combine` takes it: the rows `names`, with that process's times."""
  rows = []
  for row in regime["rows"]:
    if row["variant"] not in names:
      continue
    row = {k: v for k, v in row.items() if not k.startswith("mfu_")}
    rows.append({**row, **_timed(times, row["variant"], row.get("ref"), row["gflop"])})
  return {**{k: v for k, v in regime.items() if k not in ("rows", "times_s", "processes")}, "rows": rows,
          "times_s": {name: times[name] for name in names}}


def report(paths: list[str]) -> None:
  """The tables of a run saved with --json, the intervals and verdicts recomputed from its raw timings; of
  several runs, their processes pooled (`pool`)."""
  if len(paths) > 1:
    out = pool(paths)
    print(f"{len(paths)} runs pooled: {', '.join(paths)}")
  else:
    with open(paths[0]) as f:
      out = json.load(f)
  print(f"{out['backend']} ({out['device']}), {out['cpu_count']} CPU cores, jax {out['jax']}, {out['date']}"
        + (" (the first run's)" if len(paths) > 1 else ""))
  if out.get("matmul_peak_flops", {}).get("measured") and len(paths) == 1:     # runs before MFU have none
    print_peak(out["args"].get("dtype", "float32"), out["matmul_peak_flops"])
  for r in out["regimes"]:
    judge(r)
    print_regime(r)
  if out.get("seeds"):
    print_seeds(out["seeds"])
  if out.get("peft"):
    from benchmarks import peft_dora
    peft_dora.print_table(out["peft"], {(r["d_model"], r["tokens"]): r for r in out["regimes"]}, out["args"]["rank"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=20, help="timed samples per variant")
  ap.add_argument("--calls", type=int, default=5, help="steps per timed sample")
  ap.add_argument("--rank", type=int, default=8, help="LoRA/DoRA rank")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the LM's compute dtype (parameters stay float32)")
  ap.add_argument("--regime", action="append", default=None,
                  help="d_model,batch,seq (repeatable); default: 512,1,128 and 256,16,256; none: only the seeds")
  ap.add_argument("--only", default="", help="regex: time only the variants it matches (and their references)")
  ap.add_argument("--processes", type=int, default=1,
                  help="measure each regime this many times, each in a fresh process, and judge the targets on the "
                       "spread of the process medians (6 or more give a 95%% interval)")
  ap.add_argument("--seeds", type=int, default=8, help="seeds for the vmap comparison (0: skip it)")
  ap.add_argument("--seeds_steps", type=int, default=300, help="steps of each end-to-end quickstart run")
  ap.add_argument("--seeds_runs", type=int, default=5,
                  help="end-to-end runs of each way (~10 s a pair on 2 CPU cores), in alternating order")
  ap.add_argument("--peft", action="store_true", help="also time peft's LoRA and DoRA (needs torch and peft)")
  ap.add_argument("--json", default=None, help="write every number (and the raw timings) here")
  ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                  help="print the tables of a saved run again (no timing); of several runs of the same steps, with "
                       "their processes pooled")
  args = ap.parse_args()
  if args.report:
    report(args.report)
    return
  if args.regime == ["none"]:
    regimes = []
  elif args.regime:
    regimes = [tuple(int(x) for x in r.split(",")) for r in args.regime]
  else:
    regimes = REGIMES

  dev = jax.devices()[0]
  out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
         "backend": dev.platform, "device": dev.device_kind, "devices": jax.device_count(),
         "cpu_count": os.cpu_count(), "machine": platform.machine(), "args": vars(args), "regimes": [],
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}     # huge pages on or off (experiments/hugepages.py)
  print(f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}; medians over "
        f"{args.rounds} rounds of {args.calls} steps; ratios taken within each round")
  # With --processes, each process measures the peak its own MFU divides by: the run reports their median.
  in_processes = args.processes > 1
  peak = {"measured": matmul_peak(jnp.dtype(args.dtype)) if regimes and not in_processes else None,
          "datasheet": DATASHEET_BF16_PEAK.get(dev.device_kind)}
  out["matmul_peak_flops"] = peak
  if regimes and not in_processes:
    print_peak(args.dtype, peak)
  peaks = []
  for d_model, batch, seq in regimes:
    if in_processes:
      r = regime_in_processes(d_model, batch, seq, args)
      peaks += [p["matmul_peak_measured"] for p in r["processes"]]
      peak["measured"] = float(np.median(peaks))
      print_peak(args.dtype, peak)
      print("(the median of the peaks the processes measured, each its own MFU's denominator)")
    else:
      r = regime(d_model, batch, seq, args, peak)
    out["regimes"].append(r)
    print_regime(r)
    save(out, args.json)
  if args.seeds:
    out["seeds"] = seeds_throughput(args.seeds, args.seeds_steps, args.rounds, args.calls, args.seeds_runs)
    print_seeds(out["seeds"])
    save(out, args.json)
  if args.peft:
    from benchmarks import peft_dora
    # peft's steps take up to seconds on a CPU: a quarter of the rounds, 2 steps each, keeps this section ~10 minutes
    rounds, calls = (max(3, args.rounds // 4), 2) if dev.platform == "cpu" else (args.rounds, args.calls)
    out["peft"] = [peft_dora.measure(d, b, s, args.rank, rounds, calls, args.dtype) for d, b, s in regimes]
    peft_dora.print_table(out["peft"], {(r["d_model"], r["tokens"]): r for r in out["regimes"]}, args.rank)
    save(out, args.json)
  if args.json:
    print(f"\nwrote {args.json}")


def save(out: dict, path: Optional[str]) -> None:
  """Writes what is measured so far, after each section: a run stopped at its time limit keeps its finished
  sections (`--report` prints them). Written to a temporary file and renamed, so a stop mid-write leaves the
  previous version whole."""
  sys.stdout.flush()
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
