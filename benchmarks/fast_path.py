"""Cost of each transform per training step: activation-space `reparam.apply` vs `materialize`, vs the plain model.

    python benchmarks/fast_path.py [--tokens 128] [--d_model 512] [--rank 8] [--repeats 30]

A 2-block transformer-like stack made only of Dense layers (q, k, v, out, a 4x MLP; LayerNorm; softmax attention),
one sequence of `tokens` tokens. Each variant is the jitted forward + backward (grad w.r.t. the rparams, or the
params for the plain model) of a mean-square loss. Variants are interleaved within each repeat, so that drift in
the machine's load hits them all alike; each prints its median time and its ratio to the plain model (DoRA also
to LoRA, its baseline), each a median of ratios of back-to-back timings. No assertion: this prints, it does not
test.
"""
import argparse
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # run from anywhere

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import reparam  # noqa: E402


class Block(nn.Module):
  heads: int = 8

  @nn.compact
  def __call__(self, x):                                   # x: (T, D)
    t, d = x.shape
    h = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(d, name=n)(h).reshape(t, self.heads, -1) for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(d // self.heads), axis=-1)
    x = x + nn.Dense(d, name="out")(jnp.einsum("hqk,khd->qhd", att, v).reshape(t, d))
    h = nn.gelu(nn.Dense(4 * d, name="up")(nn.LayerNorm()(x)))
    return x + nn.Dense(d, name="down")(h)


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = Block()(x)
    return x


def transforms(rank):
  mult = reparam.multipliers(scalar=True, row=True, col=True)
  return {"weight_norm": reparam.weight_norm(), "multipliers": mult,
          "multipliers(row)": reparam.multipliers(row=True), "multipliers(col)": reparam.multipliers(col=True),
          "lora": reparam.lora(rank=rank),
          "dora": reparam.dora(rank=rank), "dora_full_grad": reparam.dora(rank=rank, detach_norm=False),
          "dora+multipliers": reparam.chain(reparam.dora(rank=rank), mult)}


def perturb(tree, key):
  # Away from init: the compiled program is the same, but the numbers are those of a model in training.
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def variants(model, params, x, rank):
  loss = lambda y: jnp.mean(y * y)
  out = {"plain": (jax.jit(jax.grad(lambda p: loss(model.apply({"params": p}, x)))), params)}
  for name, t in transforms(rank).items():
    rules = [(r".*kernel", t)]
    rp = perturb(reparam.init(rules, params, jax.random.key(1)), jax.random.key(2))
    fast = lambda rp, rules=rules: loss(reparam.apply(rules, model, rp, x))
    mat = lambda rp, rules=rules: loss(model.apply({"params": reparam.materialize(rules, rp)}, x))
    out[f"{name} fast"] = (jax.jit(jax.grad(fast)), rp)
    out[f"{name} materialized"] = (jax.jit(jax.grad(mat)), rp)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=128)
  ap.add_argument("--d_model", type=int, default=512)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--calls", type=int, default=3, help="calls per timed sample")
  ap.add_argument("--only", default="", help="regex: time only the variants it matches (and their baselines)")
  args = ap.parse_args()

  model = Stack()
  x = jax.random.normal(jax.random.key(0), (args.tokens, args.d_model))
  params = model.init(jax.random.key(1), x)["params"]
  all_vs = variants(model, params, x, args.rank)
  keep = {k for k in all_vs if k == "plain" or re.search(args.only, k)}
  keep |= {baseline_lora(k, all_vs) for k in keep} - {None}      # DoRA brings its LoRA baseline
  vs = {k: v for k, v in all_vs.items() if k in keep}
  for f, p in vs.values():                    # compile and warm up
    for _ in range(3):
      jax.block_until_ready(f(p))

  def timed(name):
    f, p = vs[name]
    t0 = time.perf_counter()
    for _ in range(args.calls):
      out = f(p)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / args.calls

  # Each sample times a variant right after its baselines, and the ratios are taken within the sample: other
  # load on the machine drifts over seconds, and a ratio of back-to-back timings cancels most of it.
  rng = np.random.default_rng(0)
  times, ratios = {name: [] for name in vs}, {name: [] for name in vs}
  for _ in range(args.repeats):
    for name in rng.permutation(list(vs)):
      lora = baseline_lora(name, vs)
      t_plain, t_lora, t = timed("plain"), timed(lora) if lora else None, timed(name)
      times[name].append(t)
      ratios[name].append((t / t_plain, t / t_lora if lora else None))

  print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores: {args.tokens} tokens, d_model {args.d_model}, "
        f"rank {args.rank}; forward + backward; medians over {args.repeats} samples of {args.calls} calls")
  # The fastest sample of each is the least disturbed by other load: its ratios are printed beside the medians.
  best = {name: min(ts) for name, ts in times.items()}
  print(f"{'variant':32s} {'ms':>8s} {'x plain':>8s} {'x lora':>8s}   {'best: x plain':>13s} {'x lora':>7s}")
  for name in vs:
    lora = baseline_lora(name, vs)
    x_plain = np.median([r[0] for r in ratios[name]])
    x_lora = f"{np.median([r[1] for r in ratios[name]]):8.3f}" if lora else " " * 8
    best_lora = f"{best[name] / best[lora]:7.3f}" if lora else ""
    print(f"{name:32s} {1e3 * np.median(times[name]):8.2f} {x_plain:8.3f} {x_lora}   "
          f"{best[name] / best['plain']:13.3f} {best_lora}")

def baseline_lora(name, vs):
  """DoRA's baseline is LoRA on the same path (its ratio to LoRA is the cost of the magnitude/direction split)."""
  lora = "lora " + name.split()[-1]
  return lora if name.startswith("dora") and lora in vs else None

if __name__ == "__main__":
  main()
