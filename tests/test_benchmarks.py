"""benchmarks/: the numbers the scripts compute besides timings are right, and the scripts run (no timing is
asserted anywhere: a tiny regime, one round)."""
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz

import reparam
from benchmarks import train_step
from experiments import models

NS_COEFFS = jnp.array([3.4445, -4.7750, 2.0315])


def xla_flops(f, *args) -> float:
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_newton_schulz_flops_match_xla_count_of_optax_muon():
  """The analytic count (4m²n + 2m³ per iteration) against XLA's count of optax's own orthogonalization."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  # d_model 256: the elementwise ops XLA also counts are ~1% (at 64 they would be ~4%)
  params = jax.eval_shape(models.Transformer(vocab_size=32, d_model=256, num_heads=4, num_layers=1).init,
                          jax.random.key(0), tokens)["params"]
  opt = {"name": "muon", "learning_rate": 0.02}
  ours = train_step.newton_schulz_flops(opt, [], params)
  muon_leaves = [x for path, x in reparam.flatten(params).items()
                 if x.ndim == 2 and not path.startswith(("embed", "head"))]
  assert len(muon_leaves) == 6                                  # q, k, v, out, mlp_in, mlp_out
  xla = sum(xla_flops(lambda x: orthogonalize_via_newton_schulz(x, NS_COEFFS, 5), jnp.zeros(x.shape))
            for x in muon_leaves)
  assert ours == pytest.approx(xla, rel=0.02)                   # XLA also counts the few elementwise ops


def dot_flops(jaxpr) -> float:
  """2·(output size)·(contracted size) summed over every dot_general of a jaxpr, sub-jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in contract)
    for value in eqn.params.values():                    # pjit, custom_vjp, remat... carry their jaxprs here
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if type(item).__name__ in ("Jaxpr", "ClosedJaxpr"):
          total += dot_flops(getattr(item, "jaxpr", item))
  return total


@pytest.mark.parametrize("d_model, batch, seq", [(64, 2, 16), (32, 1, 40)])
def test_model_flops_count_every_matmul_of_the_training_step(d_model, batch, seq):
  """MFU's numerator against a count of the step's own matmuls: every dot in the jaxpr of the plain LM's
  gradient (forward and backward), sizes read off the traced shapes. The formula (6N + 12·L·seq·d per token)
  must match it exactly: the embedding is a gather, everything else a dot done three times."""
  model = models.Transformer(vocab_size=train_step.VOCAB, d_model=d_model, num_heads=8,
                             num_layers=train_step.LAYERS, mlp_ratio=train_step.MLP_RATIO)
  tokens = jnp.zeros((batch, seq), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
  counted = dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert train_step.model_flops(d_model, seq, batch * seq) == counted


def test_our_weight_norm_equals_flax_weight_norm():
  """A peer implementation: flax.linen.WeightNorm (scale initialized to 1) on the same hidden kernels as our
  `weight_norm()` with g = 1 gives the same logits. The kernels are scaled by 3 first: both are invariant to
  that, the plain model is not, so the agreement is not that of two models doing nothing."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
  triple = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, x: 3 * x if reparam.core.path_str(p).endswith("/kernel") else x, tree)
  with train_step.flax_weight_norm_on_hidden_kernels():
    flax_model = models.Transformer(vocab_size=32, d_model=64, num_heads=4, num_layers=2)
    flax_params = triple(flax_model.init(jax.random.key(1), tokens)["params"])
    flax_logits = flax_model.apply({"params": flax_params}, tokens)
  scales = [p for p in reparam.flatten(flax_params) if "WeightNorm" in p]
  assert len(scales) == 12 and all(p.endswith("/scale") for p in scales)
  model = models.Transformer(vocab_size=32, d_model=64, num_heads=4, num_layers=2)
  plain = {k: {n: m for n, m in v.items() if not n.startswith("WeightNorm")} for k, v in flax_params.items()}
  rules = [(train_step.HIDDEN_KERNELS, reparam.weight_norm(eps=0.0))]
  rp = reparam.init(rules, plain, jax.random.key(2))
  rp = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones_like(x) if reparam.core.path_str(p).endswith("/g") else x, rp)
  np.testing.assert_allclose(reparam.apply(rules, model, rp, tokens), flax_logits, rtol=2e-5, atol=2e-5)
  assert not np.allclose(model.apply({"params": plain}, tokens), flax_logits, atol=1e-2)


def _floor_has_the_gradients_at_init(transform, floor, leaves: tuple[str, ...], count: int):
  """Checks that a floor row's gradients equal its transform's at init, through the fast path of both, on a small
  LM, every leaf (`count` of them ending in `leaves`, all nonzero); returns the model, its tokens, its params and
  the transform's rparams at init."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
  model = models.Transformer(vocab_size=32, d_model=64, num_heads=4, num_layers=2)
  params = model.init(jax.random.key(1), tokens)["params"]
  rules, floor_rules = [(train_step.HIDDEN_KERNELS, transform)], [(train_step.HIDDEN_KERNELS, floor)]
  rp = reparam.init(rules, params, jax.random.key(2))
  assert jax.tree.structure(rp) == jax.tree.structure(reparam.init(floor_rules, params, jax.random.key(2)))

  def grads(rules):
    loss = lambda rp: jnp.mean(jax.nn.log_softmax(reparam.apply(rules, model, rp, tokens)) ** 2)
    return reparam.flatten(jax.jit(jax.grad(loss))(rp))

  want, got = grads(rules), grads(floor_rules)
  assert set(got) == set(want) and sum(p.endswith(leaves) for p in got) == count
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-7, err_msg=path)
  assert all(np.abs(want[p]).max() > 0 for p in want if p.endswith(leaves))
  return model, tokens, params, rp


def test_the_multipliers_floor_row_does_their_gradient_work_and_scales_nothing():
  """"multipliers, gradient sums only" (a benchmark row, not a transform): at init (s = r = c = 1) its gradients,
  kernels and multipliers alike, are those of `multipliers(scalar, row, col)`; with other factors its output is
  still the plain model's, where the multipliers' is not."""
  mult, floor = reparam.multipliers(scalar=True, row=True, col=True), train_step.multipliers_gradient_sums_only()
  factors = ("/row", "/col", "/scalar")
  model, tokens, params, rp = _floor_has_the_gradients_at_init(mult, floor, factors, 36)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: 1.5 * x if reparam.core.path_str(p).endswith(factors) else x, rp)
  plain = model.apply({"params": params}, tokens)
  on = lambda t: [(train_step.HIDDEN_KERNELS, t)]
  np.testing.assert_allclose(reparam.apply(on(floor), model, moved, tokens), plain, rtol=1e-5, atol=1e-5)
  assert not np.allclose(reparam.apply(on(mult), model, moved, tokens), plain, atol=1e-2)


def test_the_dora_floor_row_does_its_norm_and_gain_work_and_scales_nothing():
  """"dora r4, norm and gain sum only" (a benchmark row, not a transform): at init (m = n) its gradients are
  DoRA's, m's included; with B and m moved its output is LoRA's with the same A and B, where DoRA's is not."""
  dora, floor = reparam.dora(4), train_step.dora_norm_and_gain_sum_only(4)
  model, tokens, _, rp = _floor_has_the_gradients_at_init(dora, floor, ("/m", "/B"), 24)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: 1.5 * x if reparam.core.path_str(p).endswith("/m") else
      (x + 0.05 if reparam.core.path_str(p).endswith("/B") else x), rp)
  # LoRA's tree: the same A, B and w, without DoRA's m and k0_sq
  strip = lambda t: {k: strip(v) for k, v in t.items() if k not in ("m", "k0_sq")} if isinstance(t, dict) else t
  on = lambda t: [(train_step.HIDDEN_KERNELS, t)]
  lora_out = reparam.apply(on(reparam.lora(4)), model, strip(moved), tokens)
  np.testing.assert_allclose(reparam.apply(on(floor), model, moved, tokens), lora_out, rtol=1e-5, atol=1e-5)
  assert not np.allclose(reparam.apply(on(dora), model, moved, tokens), lora_out, atol=1e-2)


def test_train_step_script_runs_and_writes_its_json(tmp_path, monkeypatch, capsys):
  out = tmp_path / "bench.json"
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--regime", "32,1,8", "--rounds", "1", "--calls", "1",
                                    "--seeds", "0", "--only", "^dora r8$", "--json", str(out)])
  train_step.main()
  result = json.loads(out.read_text())
  rows = {r["variant"]: r for r in result["regimes"][0]["rows"]}
  assert set(rows) == {"plain", "plain, again", "lora r8", "dora r8"}     # the chosen one, its references, the control
  assert rows["plain"]["x_plain"] == 1.0
  dora = rows["dora r8"]
  assert dora["ref"] == "lora r8" and math.isfinite(dora["x_ref"]) and dora["x_ref"] > 0
  assert dora["peak_mib"] > 0 and dora["gflop"] > 0 and isinstance(dora["meets_target"], bool)
  assert len(result["regimes"][0]["times_s"]["dora r8"]) == 1
  assert dora["verdict"] in {"met", "missed", "on the bound"} and dora["x_ci"] is None     # 1 round: no interval
  peak = result["matmul_peak_flops"]["measured"]
  assert dora["mfu_measured"] == pytest.approx(train_step.model_flops(32, 8, 8) / (dora["ms"] / 1e3) / peak)
  assert not (tmp_path / "bench.json.tmp").exists()

  capsys.readouterr()
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--report", str(out)])
  train_step.main()                                  # the saved run's tables again, from its JSON alone
  printed = capsys.readouterr().out
  assert "| dora r8 |" in printed and "95% interval" in printed


def test_a_run_stopped_midway_keeps_its_finished_sections(tmp_path, monkeypatch):
  """The JSON is written after each section: a run stopped at a time limit during the seeds keeps its regime."""
  out = tmp_path / "bench.json"
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--regime", "32,1,8", "--rounds", "1", "--calls", "1",
                                    "--only", "^weight_norm$", "--json", str(out)])

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(train_step, "seeds_throughput", stopped)
  with pytest.raises(KeyboardInterrupt):
    train_step.main()
  result = json.loads(out.read_text())
  assert [r["d_model"] for r in result["regimes"]] == [32] and "seeds" not in result
  assert {row["variant"] for row in result["regimes"][0]["rows"]} >= {"plain", "weight_norm"}


@pytest.mark.parametrize("n, ranks", [(10, (2, 9)), (20, (6, 15)), (40, (14, 27))])
def test_median_interval_takes_the_order_statistics_of_the_binomial_tables(n, ranks):
  """The 95% distribution-free interval for a median: published tables (e.g. Conover, Practical Nonparametric
  Statistics, table A3) give the 2nd and 9th of 10 sorted samples, the 6th and 15th of 20, the 14th and 27th of
  40. The samples are shuffled so that the ranks, not the input order, decide."""
  samples = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))      # sample i has rank i
  assert train_step.median_interval(samples) == ranks
  assert train_step.median_interval(samples[:5]) is None      # 5 samples cannot reach 95% (at best 1 - 2/32)


def _regime(ratios, target=1.03, memory=1.0, memory_target=None):
  """A regime with one targeted variant whose per-round time ratios to plain are `ratios`."""
  plain = [1.0] * len(ratios)
  row = {"variant": "v", "x_plain": float(np.median(ratios)), "memory_x_plain": memory, "target": target,
         "memory_target": memory_target, "target_of": "plain"}
  return {"rows": [{"variant": "plain", "target": None}, row], "times_s": {"plain": plain, "v": list(ratios)}}


@pytest.mark.parametrize("ratios, memory, verdict", [
    (np.linspace(0.98, 1.02, 20), 1.0, "met"),              # the whole interval under 1.03
    (np.linspace(1.04, 1.08, 20), 1.0, "missed"),           # the whole interval over
    (np.linspace(0.95, 1.10, 20), 1.0, "on the bound"),     # median 1.025 under 1.03, but the interval straddles it
    (np.linspace(0.98, 1.02, 20), 1.2, "missed"),           # time met, memory (exact) over its bound
])
def test_a_target_is_judged_on_the_interval_of_its_ratio(ratios, memory, verdict):
  r = _regime(ratios, memory=memory, memory_target=1.05)
  train_step.judge(r)
  row = r["rows"][1]
  assert row["verdict"] == verdict
  lo, hi = row["x_ci"]
  assert lo == pytest.approx(sorted(ratios)[5]) and hi == pytest.approx(sorted(ratios)[14])


def test_the_seeds_section_times_both_ways_and_pairs_whole_runs(tmp_path, monkeypatch, capsys):
  """The vmapped-seeds comparison on a tiny scale: per-step samples of both ways, and `--seeds_runs` whole runs
  of each way whose pairwise ratios are those of the saved times."""
  out = tmp_path / "bench.json"
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--regime", "none", "--seeds", "2", "--seeds_steps", "3",
                                    "--seeds_runs", "2", "--rounds", "2", "--calls", "1", "--json", str(out)])
  train_step.main()
  seeds = json.loads(out.read_text())["seeds"]
  e2e = seeds["end_to_end_s"]
  assert len(e2e["sequential"]) == len(e2e["vmapped"]) == 2 and min(e2e["sequential"] + e2e["vmapped"]) > 0
  np.testing.assert_allclose(seeds["end_to_end_pair_ratios"], np.divide(e2e["sequential"], e2e["vmapped"]))
  assert seeds["step_ms"]["sequential"] > 0 and seeds["step_ms"]["vmapped"] > 0
  assert "2 runs of 3 steps, end to end (s), 2 of each" in capsys.readouterr().out


def test_hlo_traffic_counts_kernels_and_the_bytes_they_read_and_write(monkeypatch, capsys):
  """`hlo_traffic.traffic` on a module whose numbers are known by hand (a tuple-valued fusion read through
  get-tuple-element, a dot, free parameters and bitcasts, a conditional that counts its predicate only), on
  today's compiled text, and the script end to end."""
  from benchmarks import hlo_traffic
  text = """HloModule m

%fused { ... }

ENTRY %main.1 (p: f32[1000], q: f32[10,20], r: pred[]) -> f32[10,30] {
  %p = f32[1000]{0} parameter(0)
  %q = f32[10,20]{1,0} parameter(1)
  %r = pred[] parameter(2)
  %conditional.7 = pred[3]{0} conditional(%r, %p, %p), true_computation=%t, false_computation=%f
  %fusion.1 = (f32[1000]{0}, s32[4]{0}) fusion(%p), kind=kLoop, calls=%fused
  %get-tuple-element.2 = f32[1000]{0} get-tuple-element(%fusion.1), index=0
  %bitcast.3 = f32[20,50]{1,0} bitcast(%get-tuple-element.2)
  %dot.4 = f32[10,50]{1,0} dot(%q, %bitcast.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %slice.5 = f32[10,30]{1,0} slice(%dot.4), slice={[0:10], [0:30]}
}
"""
  fusion = 4000 + 4000 + 16                    # reads p, writes both outputs
  dot = 800 + 4000 + 2000                      # reads q and the bitcast, writes 10 x 50
  conditional = 3 + 1                          # writes pred[3], reads its predicate; the branches' reads are theirs
  assert hlo_traffic.traffic(text) == {"kernels": 4, "bytes": fusion + dot + 2000 + 1200 + conditional}
  compiled = jax.jit(lambda a, b: jnp.dot(a, b) * 2).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  got = hlo_traffic.traffic(compiled.as_text())
  assert got["kernels"] >= 1 and got["bytes"] >= (64 * 32 + 32 * 16 + 64 * 16) * 4

  monkeypatch.setattr(sys, "argv", ["hlo_traffic.py", "--regime", "32,1,8", "--only", "^nap"])
  hlo_traffic.main()
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
  cells = [[c.strip() for c in r.strip("| ").split(" | ")] for r in rows]
  assert [c[0] for c in cells] == ["variant", "plain", "nap", "nap, written"]
  plain, lazy, written = cells[1], cells[2], cells[3]
  assert plain[2] == "+0" and plain[5] == "+0.0"
  # Written, the projection costs its norm's read and the rescaling's read and write: three passes over the
  # projected weights. Lazily, the norm is the finiteness screen's reduction and the scaling rides on the
  # activations and on AdamW's pass: at d_model 512, +0.1 passes against +3.1; here, where activations and
  # small leaves weigh more, at least those three passes fewer too.
  assert float(written[5]) - float(lazy[5]) > 3
  assert int(lazy[1]) > int(plain[1])       # the per-layer scalings, the norms' scalar arithmetic


def _run(rounds: int, plain_s: float, v_s: float) -> dict:
  """One process's regime: `rounds` rounds in which plain took `plain_s` and the targeted variant v `v_s`."""
  rows = [{"variant": "plain", "target": None, "ms": 1e3 * plain_s, "x_plain": 1.0, "gflop_per_s": 1.0},
          {"variant": "v", "target": 1.03, "memory_target": None, "target_of": "plain", "ms": 1e3 * v_s,
           "x_plain": v_s / plain_s, "memory_x_plain": 1.0, "gflop_per_s": 2.0, "peak_mib": 5.0}]
  return {"d_model": 8, "rounds": rounds, "rows": rows, "times_s": {"plain": [plain_s] * rounds, "v": [v_s] * rounds}}


def test_processes_combine_into_medians_judged_on_the_spread_between_processes():
  """Six processes whose rounds agree within each process (a per-round interval would be a point) but whose
  medians differ: the combined ratio is the median of the process medians, and its interval spans them (for six
  samples, 95% takes the smallest and the largest), so a target inside that spread is "on the bound"."""
  ratios = [1.00, 1.02, 1.04, 1.01, 1.05, 1.03]
  runs = [_run(3, 0.1, 0.1 * x) for x in ratios]
  one = _run(3, 0.1, 0.1 * ratios[0])
  train_step.judge(one)
  assert one["rows"][1]["verdict"] == "met"         # within one process: every round says 1.00
  r = train_step.combine(runs)
  v = r["rows"][1]
  assert v["x_plain"] == pytest.approx(np.median(ratios)) and v["ms"] == pytest.approx(100 * np.median(ratios))
  assert v["x_ci"] == pytest.approx((1.00, 1.05)) and v["verdict"] == "on the bound"
  assert v["peak_mib"] == 5.0 and len(r["processes"]) == 6 and "times_s" not in r
  np.testing.assert_allclose(train_step.ratio_samples(r, "v", "plain"), ratios)
  r = train_step.combine([_run(3, 0.1, 0.1 * (x - 0.02)) for x in ratios])    # all process medians <= 1.03
  assert r["rows"][1]["verdict"] == "met"


def _saved(path, processes: list[dict], shapes=((8, 1, 8),)) -> str:
  """A run saved with --json (only what --report reads): each shape measured in `processes`, each process's
  {variant: [seconds per round]}, the variants plain, its control, a targeted v and, where timed, w."""
  def row(name):
    extra = {"target": 1.03, "target_of": "plain"} if name == "v" else {}
    return {"variant": name, "ms": 1.0, "x_plain": 1.0, "peak_mib": 5.0, "memory_x_plain": 1.0, "gflop": 1.0,
            "gflop_per_s": 1.0, "ref": None, "target": None, "memory_target": None, "mfu_measured": 0.5, **extra}
  names = list(processes[0])
  regimes = [{"d_model": d, "batch": b, "seq": s, "tokens": b * s, "dtype": "float32", "rounds": 3, "calls": 1,
              "rows": [row(n) for n in names], "processes": [{"times_s": p} for p in processes]}
             for d, b, s in shapes]
  out = {"date": "2026-12-07", "jax": "0", "backend": "cpu", "device": "cpu", "cpu_count": 2,
         "args": {"dtype": "float32", "rank": 8}, "regimes": regimes, "seeds": {"not": "pooled"}}
  with open(path, "w") as f:
    json.dump(out, f)
  return str(path)


def test_report_of_several_runs_pools_their_processes(tmp_path, monkeypatch, capsys):
  """Four processes of one run and two of another: pooled, v's ratio is the median of the six process medians
  and its interval spans them (six: the smallest and largest), where neither run alone has an interval; a
  variant (w) or a shape only one run timed is left out."""
  def process(x):
    return {"plain": [0.1, 0.1, 0.1], "plain, again": [0.1] * 3, "v": [0.1 * x] * 3, "w": [0.2] * 3}
  a = _saved(tmp_path / "a.json", [process(x) for x in (1.00, 1.02, 1.04, 1.01)], shapes=((8, 1, 8), (16, 1, 8)))
  b = _saved(tmp_path / "b.json", [{k: v for k, v in process(x).items() if k != "w"} for x in (1.05, 1.03)])
  out = train_step.pool([a, b])
  assert "seeds" not in out and out["pooled"] == [a, b] and len(out["regimes"]) == 1
  r = out["regimes"][0]
  rows = {row["variant"]: row for row in r["rows"]}
  assert set(rows) == {"plain", "plain, again", "v"} and len(r["processes"]) == 6
  ratios = [1.00, 1.02, 1.04, 1.01, 1.05, 1.03]
  assert rows["v"]["x_plain"] == pytest.approx(np.median(ratios))
  assert rows["v"]["ms"] == pytest.approx(100 * np.median(ratios))
  assert rows["v"]["x_ci"] == pytest.approx((1.00, 1.05)) and rows["v"]["verdict"] == "on the bound"
  assert "mfu_measured" not in rows["v"]        # each process's peak is not in the saved runs
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--report", a, b])
  train_step.main()
  printed = capsys.readouterr().out
  assert "2 runs pooled" in printed and "Medians over 6 processes" in printed
  assert "- v × plain: 1.000, 1.020, 1.040, 1.010, 1.050, 1.030" in printed
  with pytest.raises(SystemExit, match="no regime"):
    train_step.pool([b, _saved(tmp_path / "c.json", [process(1.0)], shapes=((16, 1, 8),))])


def test_a_floor_row_prints_its_ratio_and_its_transforms_ratio_over_it(capsys):
  """A floor row (`floor_of`) is judged on no target but printed with each process's ratio to its reference,
  and the transform's ratio over the floor beside it (what its scalings cost): here the floor 1.02 × plain in
  every process, the transform 1.01, 1.03 and 1.05 × the floor."""
  runs = []
  for x in (1.00, 1.02, 1.04):
    r = _run(3, 0.1, 0.1 * 1.03 * x)
    r["rows"].append({"variant": "f", "target": None, "memory_target": None, "target_of": "plain", "floor_of": "v",
                      "ms": 102.0, "x_plain": 1.02, "memory_x_plain": 1.0, "gflop_per_s": 1.0, "peak_mib": 5.0})
    r["times_s"]["f"] = [0.102] * 3
    runs.append(r)
  r = train_step.combine(runs)
  r.update(tokens=8, batch=1, seq=8)
  r["rows"][0].update(peak_mib=5.0, memory_x_plain=1.0)
  floor = r["rows"][2]
  assert "verdict" not in floor and floor["x_ci"] is None            # three processes: no 95% interval
  train_step.print_regime(r)
  out = capsys.readouterr().out
  assert "| f | 102.00 | 1.020 |" in out and "floor of v |" in out
  assert "- f × plain: 1.020, 1.020, 1.020" in out
  assert "- v × f: 1.010, 1.030, 1.050" in out


def test_processes_option_measures_each_regime_in_fresh_processes(tmp_path, monkeypatch, capsys):
  out = tmp_path / "bench.json"
  monkeypatch.setattr(sys, "argv", ["train_step.py", "--regime", "32,1,8", "--rounds", "1", "--calls", "1",
                                    "--seeds", "0", "--only", "^nap$", "--processes", "2", "--json", str(out)])
  train_step.main()
  r = json.loads(out.read_text())["regimes"][0]
  assert len(r["processes"]) == 2 and all(len(p["times_s"]["nap"]) == 1 for p in r["processes"])
  nap = {row["variant"]: row for row in r["rows"]}["nap"]
  assert nap["x_plain"] == pytest.approx(np.median(train_step.ratio_samples(r, "nap", "plain")))
  assert nap["x_ci"] is None and nap["verdict"] in {"met", "missed", "on the bound"}    # 2 processes: no interval
  assert "Medians over 2 processes of 1 rounds each" in capsys.readouterr().out
  # the run's peak is the processes' own (the parent measures none): each process's MFU divides by its own
  doc = json.loads(out.read_text())
  peaks = [p["matmul_peak_measured"] for p in r["processes"]]
  assert all(p > 0 for p in peaks) and doc["matmul_peak_flops"]["measured"] == pytest.approx(np.median(peaks))
  assert nap["mfu_measured"] == pytest.approx(np.median(
      [train_step.model_flops(32, 8, 8) / np.median(p["times_s"]["nap"]) / p["matmul_peak_measured"]
       for p in r["processes"]]))


def _saved_run(path, ratios_by_variant: dict, name: str, date: str, tunables=None):
  """A saved train_step JSON of one 128-token regime in six processes: plain at 0.1 s, each variant at
  `ratio` × that in process k (a list of six), with the targets and references train_step gives them. The rows'
  stored ratios are wrong on purpose (0): the plot must take them from the timings."""
  rows, times = [], [{"plain": [0.1] * 3} for _ in range(6)]
  for variant, ratios in ratios_by_variant.items():
    ref = "lora r8" if variant.startswith("dora") else "plain"
    for k, x in enumerate(ratios):
      times[k][variant] = [0.1 * x] * 3
    if variant != "lora r8":
      rows.append({"variant": variant, "target": 1.10 if ref != "plain" else 1.03, "memory_target": None,
                   "target_of": ref, "x_plain": 0.0, "x_ref": 0.0, "memory_x_plain": 1.0, "memory_x_ref": 1.0})
  regime = {"d_model": 512, "tokens": 128, "rows": [{"variant": "plain", "target": None}, *rows],
            "processes": [{"times_s": t} for t in times]}
  (path / name).write_text(json.dumps({"date": date, "regimes": [regime], "glibc_tunables": tunables}))
  return str(path / name)


def test_plot_targets_takes_each_runs_verdict_from_its_processes(tmp_path):
  """Every multi-process run becomes one point per target: the median of its six process ratios, their range as
  the interval (six samples: the 95% interval is the smallest and largest), the verdict that interval gives, in
  date order, labelled by the commit in the file name; huge pages from the JSON or the file name."""
  from benchmarks import plot_targets
  late = _saved_run(tmp_path, {"multipliers": [1.05, 1.06, 1.04, 1.07, 1.05, 1.06]}, "cpu_2core_bbbbbbb_128.json",
                    "2026-12-07T10:00:00", tunables="glibc.malloc.hugetlb=1")
  early = _saved_run(tmp_path, {"multipliers": [1.00, 1.02, 1.04, 1.01, 1.05, 1.03],
                                "lora r8": [0.7] * 6, "dora r8": [0.7 * 1.05] * 6},
                     "cpu_2core_aaaaaaa_128.json", "2026-12-06T10:00:00")
  found = plot_targets.points([late, early])
  mult = found[(512, 128, "multipliers")]
  assert [p[1] for p in mult] == ["aaaaaaa", "bbbbbbb"]                  # date order
  assert mult[0][2] == pytest.approx(1.025) and mult[0][3] == pytest.approx((1.00, 1.05))
  assert mult[0][4] == "on the bound" and mult[0][6] is False
  assert mult[1][2] == pytest.approx(1.055) and mult[1][4] == "missed" and mult[1][6] is True
  dora = found[(512, 128, "dora r8")]
  assert len(dora) == 1 and dora[0][2] == pytest.approx(1.05) and dora[0][4] == "met" and dora[0][5] == 1.10
  out = tmp_path / "fig" / "targets.png"
  plot_targets.plot(found, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
