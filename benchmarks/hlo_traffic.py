"""What each transform adds to the compiled training step, read from XLA's optimized HLO: no timing, no noise.

    python benchmarks/hlo_traffic.py                        # d_model 512, 128 tokens (the small-batch regime)
    python benchmarks/hlo_traffic.py --regime 256,16,256 --only "nap|weight_norm"

For every variant of `benchmarks/train_step.py` it compiles the same training step and counts, over the
top-level instructions of the step's entry computation (each one a kernel XLA:CPU runs: a fusion, a dot, a
copy, a custom call):

  kernels   how many there are (each costs a launch and a wait, a few microseconds on this CPU);
  MiB       the bytes they read and write: each instruction's output plus its operands, in full;
  passes    of that, what is over plain's, in units of one pass over the transformed kernels' weights
            (read or write once): the unit in which a reparameterization's extra work is paid at small batch.

It is a model of memory traffic, not a measurement: an operand counts in full even where a kernel reads part of
it, caches are ignored, a loop body (Muon's Newton–Schulz iterations) counts once, and a conditional counts its
predicate only (the finiteness check's element-by-element branch runs on a bad step only). Its use is to say where a
time ratio comes from: e.g. at 128 tokens NaP's step with the projection written (`nap, written`) moves three
more passes over the matrices than plain's (the norm of the updated weight must be complete before any of it
can be scaled, and XLA:CPU fuses no reduction with its producer's other outputs); projected lazily, as the
training loop does, 0.1. Targets and timings: `benchmarks/train_step.py`; findings: docs/performance.md.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import reparam  # noqa: E402
import train_step  # noqa: E402

_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|f16|bf16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}    # no kernel, no traffic


def _bytes(type_text: str) -> int:
  """Bytes of every array type in `type_text` (a shape, or a tuple of shapes)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype))
    total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
  return total


def _entry(hlo: str) -> list[tuple[str, str, str, list[str]]]:
  """(name, result type, opcode, operand names) of each instruction of the ENTRY computation."""
  body = hlo[hlo.index("\nENTRY "):]
  body = body[body.index("{\n") + 2:body.index("\n}")]
  out = []
  for line in body.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)", line)
    if m:
      name, rtype, opcode, args = m.groups()
      out.append((name, rtype, opcode, re.findall(r"%([\w.\-]+)", args)))
  return out


def traffic(hlo: str) -> dict:
  """`{"kernels": n, "bytes": b}` over the top-level instructions of a compiled module's text (`as_text()`)."""
  instructions = _entry(hlo)
  size = {name: _bytes(rtype) for name, rtype, _, _ in instructions}
  # A conditional reads its predicate; what a branch reads is the branch's (the finiteness check's exact
  # branch runs on a bad step only, and its operands are passed by reference, not copied).
  kernels = [(name, ops[:1] if opcode == "conditional" else ops)
             for name, _, opcode, ops in instructions if opcode not in _FREE]
  return {"kernels": len(kernels), "bytes": sum(size[n] + sum(size.get(o, 0) for o in ops) for n, ops in kernels)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--regime", default="512,1,128", help="d_model,batch,seq (default: the small-batch regime)")
  ap.add_argument("--only", default="", help="regex: the variants to compile (plain is always compiled)")
  ap.add_argument("--rank", type=int, default=8, help="LoRA/DoRA rank")
  args = ap.parse_args()
  d_model, batch, seq = (int(x) for x in args.regime.split(","))
  variants = [v for v in train_step.variants(args.rank) if v.name == "plain" or (
      v.name != "plain, again" and re.search(args.only, v.name))]
  key = jax.random.key(0)
  rows = {}
  for v in variants:
    step = train_step.build_step(v, d_model, batch, seq, key)
    rows[v.name] = traffic(step.run.as_text())
    if v.name == "plain":      # one pass over the 12 wrapped hidden kernels, float32
      weights = sum(x.size * 4 for path, x in reparam.flatten(step.state["rparams"]).items()
                    if re.fullmatch(train_step.HIDDEN_KERNELS, path))
  plain = rows["plain"]
  print(f"### compiled training step, d_model {d_model}, {batch * seq} tokens: top-level kernels and traffic\n")
  print(f"one pass over the 12 hidden kernels = {weights / 2**20:.1f} MiB\n")
  print("| variant | kernels | over plain | MiB moved | over plain | passes over plain |")
  print("|---|---|---|---|---|---|")
  for name, r in rows.items():
    extra = r["bytes"] - plain["bytes"]
    print(f"| {name} | {r['kernels']} | {r['kernels'] - plain['kernels']:+d} | {r['bytes'] / 2**20:.1f} | "
          f"{extra / 2**20:+.1f} | {extra / weights:+.1f} |")


if __name__ == "__main__":
  main()
