"""Config-driven training: data → model → reparam → optimizer → jitted loop, with eval, metrics and checkpoints.

    python -m experiments.train --config configs/quickstart.py --workdir runs/q [--config.optimizer.name=muon]

Rerunning the same command resumes from the last checkpoint and ends exactly where an uninterrupted run would.
The workdir gets: config.json, routing.txt (which optimizer owns which leaf), metrics.jsonl (train and eval
rows), diagnostics.jsonl (per-layer norms, update sizes, singular values, factor statistics), tb/ (TensorBoard),
checkpoints/, and, once finished, params.msgpack (the merged model) and result.json.
"""
from __future__ import annotations

if __name__ == "__main__":     # glibc reads its tunables only when a process starts: first, before JAX loads
  from experiments import hugepages
  hugepages.rerun_with_huge_pages()

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

import reparam
from reparam.optim.build import SMALL
from reparam.optim.nap import squares
from experiments import checkpoint, data, diagnostics, models, results
from experiments.setup import Setup, build, format_matches, loss_and_accuracy


class NonFiniteError(RuntimeError):
  """The loss, a gradient or an update became NaN/inf; the message names the step, the leaves and the last
  checkpoint."""


def _mesh():
  # Auto axes: jax >= 0.7 makes Explicit ones by default, under which an embedding gather needs an out_sharding.
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _put_batch(batch: dict, mesh) -> dict:
  """Shards the batch's leading axis over every device (each process contributes its own slice)."""
  sharding = NamedSharding(mesh, P("data"))
  n, i = jax.process_count(), jax.process_index()
  return {k: jax.make_array_from_process_local_data(sharding, np.array_split(v, n)[i])
          for k, v in batch.items()}


def _each_nonfinite(xs: list[jax.Array]) -> jax.Array:
  """The exact per-array flags, element by element: one `~all(isfinite(x))` reduction each."""
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in xs]) if xs else jnp.zeros(0, bool)


def nonfinite_leaves(leaves: list[jax.Array], screen: bool = True) -> jax.Array:
  """One flag per leaf (in order): whether it holds a non-finite element; `screen=False` checks every leaf
  element by element, which is what a vmapped step should do (below).

  Large leaves are screened by their sums of squares, and checked element by element (`isfinite`) only when a
  sum is not finite. A NaN or inf anywhere makes the sum non-finite, and a finite leaf's is non-finite only where
  it overflows (Σx² > 3.4e38), so the screen misses nothing and the exact check, which names the leaves, runs
  on a bad step only. A sum is the cheapest reduction XLA:CPU has: over the benchmark LM's 14 large leaves
  (25 MiB) 0.86 ms, against 3.0 ms for `all(isfinite(x))` (which writes a boolean array first) and 2.7 ms for
  `isfinite(sum(x·0))`; the training step at d_model 512 and 128 tokens got 4% faster (docs/performance.md).
  Squares (`reparam.optim.nap.squares`, the same memory-bound pass) because NaP's lazy projection sums exactly
  that for the norms of the updated weights: XLA then reads each of them once for both.
  Small leaves (multipliers, gains, norms: dozens of them under a transform) are concatenated and checked by one
  reduction, and only when that finds something one by one: at small batches a reduction per leaf costs more in
  kernel launches than in arithmetic. (Screening their concatenation by its sum too made XLA compute the
  flattened optimizer's per-leaf updates twice.) Under vmap a `cond` is a select: both branches run every step.
  `SMALL` is the optimizer's bound for flattening a group (`reparam.optim.build`)."""
  if not screen:
    return _each_nonfinite(leaves)
  small = [i for i, g in enumerate(leaves) if g.size <= SMALL]
  big = [i for i, g in enumerate(leaves) if g.size > SMALL]
  parts = []
  if big:
    sums = jnp.stack([jnp.sum(squares(leaves[i])) for i in big])
    parts.append(jax.lax.cond(jnp.all(jnp.isfinite(sums)), lambda xs: jnp.zeros(len(big), bool), _each_nonfinite,
                              [leaves[i] for i in big]))
  if small:
    flat = jnp.concatenate([leaves[i].ravel().astype(jnp.float32) for i in small])
    sizes = [leaves[i].size for i in small]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    one_by_one = lambda f: _each_nonfinite([f[a:b] for a, b in zip(starts, ends)])
    parts.append(jax.lax.cond(jnp.all(jnp.isfinite(flat)), lambda f: jnp.zeros(len(small), bool), one_by_one, flat))
  if not parts:
    return jnp.zeros(0, bool)
  order = np.argsort(big + small)            # back to the leaves' order
  return jnp.concatenate(parts)[order]


def watched_leaves(s: Setup) -> tuple[np.ndarray, bool]:
  """What the step's finiteness check reads: (the indices of the trained leaves, whether it reads their
  gradients rather than their updated values).

  The updated values, unless gradients are clipped. They are written in every variant anyway, while a gradient
  need not be: weight norm's `∂V = xᵀ(G⊙s) + c⊙V` is recomputed inside each of its readers (AdamW's two moments,
  and the check was a third, reading V once more). At 128 tokens (d_model 512) weight norm's step moves 24 MiB
  less, one pass over its kernels (plain's, LoRA's, DoRA's, NaP's and the multipliers' move what they did), and
  measured 0.968, 1.001 and 0.987x the time of checking gradients in three side-by-side runs
  (docs/performance.md). They name the same leaves: AdamW, Muon and NaP update each leaf from its own gradient
  only, so a NaN or inf gradient makes that leaf's new value non-finite (0·NaN is NaN, even at a zero learning
  rate) and nothing else's; an update that overflows is flagged too, rightly. With `grad_clip_norm` one
  non-finite gradient reaches every update (through the global norm), so there the gradients are read, to
  name the leaf it came from. Frozen leaves are not read: nothing from the step reaches them."""
  table = reparam.optim.routing(s.config.optimizer, s.rules, s.rparams)
  watch = np.array([i for i, r in enumerate(table.values()) if r.optimizer != "frozen"], int)
  return watch, _checks_gradients(s.config)


def _checks_gradients(config) -> bool:
  """Whether the finiteness check reads gradients (with `grad_clip_norm`) rather than updated values."""
  return bool(config.optimizer.get("grad_clip_norm"))


def make_train_step(s: Setup, vmapped: bool = False):
  """The pure step `state, batch -> state`; metrics accumulate in the state between logs. `vmapped`: it will
  run under `jax.vmap` (seeds), where the finiteness check's screens would cost more than they save (a `cond`
  runs both branches there), so every leaf is checked element by element."""
  log_every, skip = s.config.train.log_every, s.config.train.skip_nonfinite
  watch, on_grads = watched_leaves(s)

  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    # NaP projects lazily: the state holds q, the weights are p = c·q. The model computes with them in activation
    # space and hands back ∂L/∂p; the optimizer steps from p (its c·q fuses into AdamW's pass) to the next q.
    scales = reparam.optim.projection_scales(state["opt_state"])

    def loss_fn(rp):
      logits, cols = s.forward(rp, state["collections"], batch["x"], True, rng, scales)
      loss, acc, _ = loss_and_accuracy(logits, batch["y"])
      return loss, (acc, cols)

    (loss, (acc, cols)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["rparams"])
    weights = reparam.optim.projected(state["rparams"], state["opt_state"], scales)
    updates, opt_state = s.tx.update(grads, state["opt_state"], weights)
    new = {"rparams": reparam.optim.apply_updates(weights, updates, opt_state), "opt_state": opt_state,
           "collections": cols}
    leaves = jax.tree.leaves(grads if on_grads else new["rparams"])
    bad_leaves = nonfinite_leaves([leaves[i] for i in watch], screen=not vmapped)
    if len(watch) < len(leaves):       # frozen leaves: never flagged
      bad_leaves = jnp.zeros(len(leaves), bool).at[watch].set(bad_leaves)
    ok = jnp.isfinite(loss) & ~jnp.any(bad_leaves)
    if skip:     # keep the previous parameters and optimizer state for a non-finite step
      new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, {k: state[k] for k in new})
    first_bad = (state["bad_step"] < 0) & ~ok
    fresh = (state["step"] % log_every) == 0
    sums = jax.tree.map(lambda a: jnp.where(fresh, 0.0, a), state["sums"])
    sums = {"loss": sums["loss"] + jnp.where(ok, loss, 0.0), "accuracy": sums["accuracy"] + acc * ok,
            "count": sums["count"] + ok, "skipped": sums["skipped"] + ~ok}
    return {**state, **new, "step": state["step"] + 1, "sums": sums,
            "bad_step": jnp.where(first_bad, state["step"] + 1, state["bad_step"]),
            "bad_leaves": jnp.where(first_bad, bad_leaves, state["bad_leaves"])}

  return step_fn


def weights(state: dict, stacked: bool = False):
  """The weights a state's `rparams` stand for: with NaP's lazy projection they hold the unprojected `q`, and
  this is `c·q` (`reparam.optim.projected`); otherwise `rparams` itself. `stacked`: seeds on a leading axis."""
  project = jax.vmap(reparam.optim.projected) if stacked else reparam.optim.projected
  return project(state["rparams"], state["opt_state"])


def init_state(s: Setup) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "rparams": s.rparams, "opt_state": s.tx.init(s.rparams),
          "collections": s.collections, "rng": jax.random.key_data(jax.random.key(s.config.seed + 1)),
          "sums": {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "count", "skipped")},
          "bad_step": -jnp.ones((), jnp.int32), "bad_leaves": jnp.zeros(len(jax.tree.leaves(s.rparams)), bool)}


def evaluate(s: Setup, state: dict, mesh, seeds: Optional["SeedEval"] = None) -> dict[str, float] | list[dict]:
  """Loss and accuracy over the whole test split, with the merged (plain) parameters.

  With `seeds`, `state` holds the seeds stacked on a leading axis and one vmapped program evaluates them all
  (a list of results, one per seed): the test split is the same for every seed."""
  # For seeds, the merge is inside the vmapped program (one compilation instead of two; it is O(params) per
  # batch against the batch's O(batch·params) forward).
  params = weights(state, bool(seeds)) if seeds else reparam.merge(s.rules, weights(state))
  eval_step = seeds.eval_step if seeds else s.eval_step
  step = int(np.ravel(state["step"])[0])
  totals = np.zeros((seeds.n if seeds else 1, 3))
  for batch in _eval_batches(s, mesh, step):
    loss, acc, w = (np.ravel(np.asarray(a, np.float64))
                    for a in jax.device_get(eval_step(params, state["collections"], batch)))
    totals += np.stack([loss * w, acc * w, w], axis=1)
  outs = []
  for loss_sum, acc_sum, weight in totals:
    out = {"eval_loss": float(loss_sum / weight), "eval_accuracy": float(acc_sum / weight)}
    if "steps_per_task" in s.dataset.info:          # a task sequence: which task this evaluation is of
      out["task"] = max(step - 1, 0) // s.dataset.info["steps_per_task"]
    if s.dataset.entropy_floor is not None:
      out["eval_loss_above_floor"] = out["eval_loss"] - s.dataset.entropy_floor
    outs.append(out)
  return outs if seeds else outs[0]


def _eval_batches(s: Setup, mesh, step: int) -> Iterator[dict]:
  """The eval split as `evaluate` feeds it: padded so every device gets an equal share, masked, sharded."""
  for batch in s.dataset.eval_batches(s.config.data.eval_batch_size, step=step):
    n = len(batch["y"])
    pad = _padded(n) - n
    batch = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in batch.items()}
    batch["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    yield _put_batch(batch, mesh)


def _padded(rows: int) -> int:
  """An eval batch's rows padded up so that every device gets an equal share."""
  return rows + (-rows) % (jax.device_count() * jax.process_count())


def compile_ahead(programs: Callable[[], Iterable[tuple[Callable, tuple]]]) -> threading.Thread:
  """Compiles each `(jitted function, args)` that `programs()` yields on a background thread, into the
  function's own cache.

  XLA releases the GIL while it compiles, so on a host with two or more cores the evaluation and diagnostics
  programs compile while the main thread compiles the training step, instead of one after the other at their
  first use (in a vmapped 8-seed quickstart run they took 0.3 and 0.4 s to compile; with the init compiled at
  `setup.INIT_COMPILER_OPTIONS`, such runs went from 4.97 to 4.56 s, docs/performance.md). A warm-up only:
  should anything fail here, the programs not compiled yet compile at their first real call, which raises as
  it would have. Join the thread before the programs' first use (two threads compiling one program would both
  compile it)."""
  def run():
    try:
      for fn, args in programs():
        fn.lower(*args).compile()
    except Exception:  # noqa: BLE001 -- see the docstring: the real call reports it
      pass

  thread = threading.Thread(target=run, name="compile_ahead", daemon=True)
  thread.start()
  return thread


class SeedEval(NamedTuple):
  """`evaluate`'s program for n stacked seeds: `rparams, collections, batch -> (loss, accuracy, weight)` with
  the merge inside, vmapped over the seed axis (the batch is the same for every seed)."""
  n: int
  eval_step: Callable


def seed_eval(s: Setup, n: int) -> SeedEval:
  def eval_step_of_seeds(rp, collections, batch):
    return s.eval_step(reparam.merge(s.rules, rp), collections, batch)
  return SeedEval(n, jax.jit(jax.vmap(eval_step_of_seeds, in_axes=(0, 0, None))))


def _check_finite(counters: dict, paths: list[str], workdir: str, last_ckpt: int, checked: str) -> None:
  """Raises NonFiniteError if a step was non-finite; `counters` are the state's host copies (`bad_step`,
  `bad_leaves`: one flag per leaf of rparams, whose paths are `paths`; `checked`: of what, see
  `watched_leaves`)."""
  bad = int(counters["bad_step"])
  if bad < 0:
    return
  leaves = [p for p, b in zip(paths, counters["bad_leaves"]) if b]
  where = f"checkpoint of step {last_ckpt} in {workdir}/checkpoints" if last_ckpt else "no checkpoint yet"
  raise NonFiniteError(
      f"non-finite loss, gradient or update at step {bad}; non-finite {checked} in: "
      f"{', '.join(leaves[:6]) or 'none'}"
      f"{' ...' if len(leaves) > 6 else ''}; last good state: {where}. Lower the learning rate, or set "
      f"--config.train.skip_nonfinite=True to skip such steps")


def _log_row(counters: dict) -> dict[str, float]:
  sums = {k: float(v) for k, v in counters["sums"].items()}
  n = sums["count"] or float("nan")      # every step of the interval skipped: no loss, not a loss of 0
  return {"step": int(counters["step"]), "train_loss": sums["loss"] / n, "train_accuracy": sums["accuracy"] / n,
          "skipped_steps": sums["skipped"]}


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) one run; returns the final metrics, also written to `workdir/result.json`."""
  return train_seeds([config], [workdir])[0]


@dataclasses.dataclass
class Run:
  """One seed's bookkeeping: where it writes, and what it restored."""
  config: Any
  workdir: str
  setup: Setup
  mgr: Any = None
  writer: Any = None
  last_ckpt: int = 0


def _open(run: Run) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  results.write_json(os.path.join(run.workdir, "config.json"), run.config.to_dict())
  routing = reparam.optim.describe(run.config.optimizer, run.setup.rules, run.setup.rparams)
  with open(os.path.join(run.workdir, "routing.txt"), "w") as f:
    f.write(format_matches(run.setup.rules, run.setup.params) + "\n\n" + routing + "\n")
  if run.config.train.verbose:
    print(routing)
  run.mgr = checkpoint.manager(os.path.join(run.workdir, "checkpoints"), run.config.train.keep_checkpoints)
  run.writer = _tensorboard(run.workdir, run.config.train.tensorboard)


def _restore(runs: list[Run]) -> tuple[list[dict], int]:
  """Each run's newest checkpoint at or before the newest step *every* run has (a kill between the seeds'
  saves leaves them one checkpoint apart), or fresh states at step 0."""
  states = [init_state(r.setup) for r in runs]
  common = min(max(r.mgr.all_steps(), default=0) for r in runs)
  restored = [checkpoint.restore_latest(r.mgr, st, max_step=common) for r, st in zip(runs, states)]
  start = min(step for _, step in restored)
  if start and any(step != start for _, step in restored):
    restored = [checkpoint.restore_latest(r.mgr, st, max_step=start) for r, st in zip(runs, states)]
  if start == 0:
    return states, 0
  for r in runs:
    r.last_ckpt = start
  return [st for st, _ in restored], start


def train_seeds(configs: list, workdirs: list[str]) -> list[dict[str, Any]]:
  """Trains runs that differ only in their seed; more than one run goes through `jax.vmap` as one program.

  Each run writes exactly what it would write alone (its own metrics, checkpoints and result), so a vmapped
  group and separate runs can resume each other.
  """
  _check_same_but_seed(configs)
  first = build(configs[0])                          # config errors surface before any output
  runs = [Run(c, w, first if i == 0 else build(c, like=first)) for i, (c, w) in enumerate(zip(configs, workdirs))]
  for c, w in zip(configs, workdirs):
    _check_resumable(c, w)
  for run in runs:
    _open(run)
  s, tcfg, n = runs[0].setup, configs[0].train, len(runs)
  stacked = n > 1
  mesh = _mesh()
  states, start = _restore(runs)
  state = jax.device_put(_stack(states) if stacked else states[0], NamedSharding(mesh, P()))
  for run in runs:
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
      results.truncate_jsonl(os.path.join(run.workdir, name), start)

  step_fn = jax.jit(jax.vmap(make_train_step(s, vmapped=True)) if stacked else make_train_step(s), donate_argnums=0)
  seed_evaluator = seed_eval(s, n) if stacked else None
  # All seeds' diagnostics in one program; W₀ for the magnitude/direction analysis, stacked like them.
  stats_fn = functools.partial(diagnostics.layer_stats, s.rules)
  diag_fn = jax.jit(_map_seeds(stats_fn) if stacked else stats_fn)
  base = [reparam.merge(s.rules, r.setup.rparams) for r in runs]
  base = jax.device_put(_stack(base), NamedSharding(mesh, P())) if stacked else base[0]   # sent once, not per call
  seed_of = (lambda tree, i: jax.tree.map(lambda x: x[i], tree)) if stacked else (lambda tree, i: tree)
  leaf_paths = list(reparam.flatten(s.rparams))                    # what the state's `bad_leaves` flags are of
  checked = "gradients" if _checks_gradients(s.config) else "updated values"
  ahead = compile_ahead(_later_programs(s, state, mesh, seed_evaluator, diag_fn, base))
  t0, rows = time.time(), [{} for _ in runs]
  if start == tcfg.steps:    # stopped after the last checkpoint, before result.json: its final row is logged
    for i, run in enumerate(runs):
      last = [r for r in results.read_jsonl(os.path.join(run.workdir, "metrics.jsonl")) if r.get("step") == start]
      rows[i] = last[-1] if last else {}
  bar = _progress(start, tcfg.steps, configs[0], n)
  for step in range(start + 1, tcfg.steps + 1):
    batch = _batch(runs, step - 1, mesh, stacked)
    diag_due = tcfg.diagnostics_every and step % tcfg.diagnostics_every == 0
    prev = jax.tree.map(jnp.copy, weights(state, stacked)) if diag_due else None   # the step donates its input
    state = step_fn(state, batch)
    _fault("step", step)
    log_due = step % tcfg.log_every == 0 or step == tcfg.steps
    eval_due = (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.steps
    ckpt_due = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == tcfg.steps
    if not (diag_due or log_due or eval_due or ckpt_due):
      bar.update(1)
      continue
    ahead.join()
    # Host reads once for all seeds (each device_get is a sync): the counters and finiteness flags, the
    # evaluation (one vmapped program), and for a checkpoint the whole state, sliced per seed on the host. Only
    # the diagnostics need per-seed device arrays, and only of the parameters.
    small = jax.device_get({k: state[k] for k in ("step", "sums", "bad_step", "bad_leaves")})
    evals = evaluate(s, state, mesh, seed_evaluator) if eval_due and stacked else None
    host = jax.device_get(state) if ckpt_due and stacked else None
    stats = jax.device_get(diag_fn(prev, weights(state, stacked), base)) if diag_due else None
    for i, run in enumerate(runs):
      counters = seed_of(small, i)
      if diag_due:
        results.append_jsonl(os.path.join(run.workdir, "diagnostics.jsonl"), [{"step": step, **seed_of(stats, i)}])
      if (log_due or eval_due or ckpt_due) and not tcfg.skip_nonfinite:   # skipping: the step was undone
        try:
          _check_finite(counters, leaf_paths, run.workdir, run.last_ckpt, checked)
        except NonFiniteError:
          for r in runs:      # commit the checkpoint the message names before the process exits
            r.mgr.wait_until_finished()
          raise
      if log_due:
        rows[i] = {**_log_row(counters), "steps_per_sec": (step - start) / max(time.time() - t0, 1e-9)}
      if eval_due:
        rows[i] = {**(rows[i] if rows[i].get("step") == step else {"step": step}),
                   **(evals[i] if stacked else evaluate(s, state, mesh))}
      if log_due or eval_due:
        results.append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), [rows[i]])
        _write_tb(run.writer, rows[i])
      if ckpt_due:
        # A group resumed behind one seed's newest checkpoint (killed while another seed's save of that step was
        # still being written) meets that step again: it is kept, not rewritten (it holds this very state, and
        # orbax refuses to overwrite a step).
        if step not in run.mgr.all_steps():
          checkpoint.save(run.mgr, step, jax.tree.map(lambda x: np.asarray(x[i]), host) if stacked else state)
          _fault("save", step)            # the save is still being written in the background here
        run.last_ckpt = step
    if log_due or eval_due:
      bar.set_postfix({k: f"{v:.4g}" for k, v in rows[0].items() if k in ("train_loss", "eval_accuracy")})
    bar.update(1)
  bar.close()
  ahead.join()
  finals = []
  host = jax.device_get(state)     # each seed's slice on the host: its final parameters and step
  for i, (run, row) in enumerate(zip(runs, rows)):
    st = seed_of(host, i)
    run.mgr.wait_until_finished()
    row = row or evaluate(s, st, mesh)
    finals.append(_finish(run, st, {k: v for k, v in row.items() if k != "steps_per_sec"}))
  return finals


def _map_seeds(stats_fn: Callable) -> Callable:
  """`stats_fn` over stacked seeds, one seed after another (`lax.map`), not vmapped.

  The diagnostics' top singular values are LAPACK calls (`jnp.linalg.svd`). Vmapped, each becomes one batched
  call, and jaxlib 0.10's LAPACK kernels split a batch over XLA's intra-op thread pool and wait for it from a
  thread of that same pool: two such calls running at once on a 2-core machine (two pool threads) wait for each
  other forever. Measured: 3 or more vmapped seeds of the quickstart MLP under weight norm hung at their first
  diagnostics, and ran once XLA's YNNPACK fusions were off (which changed the schedule) or the seeds mapped.
  Mapped, every call is unbatched, as in a single run (none of which hung here)."""
  def layer_stats_of_seeds(*stacked):
    return jax.lax.map(lambda args: stats_fn(*args), stacked)
  return layer_stats_of_seeds


def _later_programs(s: Setup, state: dict, mesh, seeds: Optional[SeedEval], diag_fn, base) -> Callable:
  """The evaluation and diagnostics programs of a run with arguments shaped (and sharded) as their calls' will
  be, as a generator for `compile_ahead`'s thread. The state is made abstract here, on the caller's thread:
  the training step donates it."""
  rparams, collections = _abstract(state["rparams"]), _abstract(state["collections"])
  step = int(np.ravel(state["step"])[0])

  def programs():
    if s.config.train.diagnostics_every:
      yield diag_fn, (rparams, rparams, base)
    if seeds:
      eval_step, params = seeds.eval_step, rparams
    else:      # `evaluate` merges first; merge's outputs are replicated as the state is
      merged = jax.eval_shape(functools.partial(reparam.merge, s.rules), rparams)
      eval_step, params = s.eval_step, _abstract(merged, NamedSharding(mesh, P()))
    for batch in _eval_batch_shapes(s, mesh, step):
      yield eval_step, (params, collections, batch)
  return programs


def _eval_batch_shapes(s: Setup, mesh, step: int) -> list[dict]:
  """Abstract batches of each size `evaluate` feeds: a full one, and a shorter last one if the split has one."""
  first = next(_eval_batches(s, mesh, step))
  size, n = s.config.data.eval_batch_size, s.dataset.eval_size
  rows = dict.fromkeys([min(size, n), n % size or min(size, n)])
  return [{k: jax.ShapeDtypeStruct((_padded(m), *v.shape[1:]), v.dtype, sharding=v.sharding)
           for k, v in first.items()} for m in rows]


def _abstract(tree, sharding=None):
  """Shapes, dtypes and shardings of the arrays of `tree` (or `sharding` for all of them)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding,
                                                     weak_type=x.weak_type), tree)


_FAULT_HITS: dict[str, int] = {}


def _fault(point: str, step: int) -> None:
  """Fault injection for the kill-and-resume tests: `REPARAM_FAULT=save:30` SIGKILLs this process right
  after the checkpoint of step 30 starts writing, `step:30` right after step 30 is computed, and
  `step:30:3` the third time this process gets there (e.g. in a sweep's third trial)."""
  spec = os.environ.get("REPARAM_FAULT", "").split(":")
  if spec[:2] != [point, str(step)]:
    return
  _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
  if _FAULT_HITS[point] == (int(spec[2]) if len(spec) > 2 else 1):
    os.kill(os.getpid(), signal.SIGKILL)


def _stack(trees: list):
  """The trees' leaves stacked on a new leading axis, on the host: no program to compile for a one-off copy."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _batch(runs: list[Run], step: int, mesh, stacked: bool) -> dict:
  """This step's batch for each seed (stacked on a leading seed axis when vmapped), sharded over devices."""
  bs = runs[0].config.data.batch_size
  if not stacked:
    return _put_batch(runs[0].setup.dataset.batch(step, bs, runs[0].config.seed), mesh)
  per_seed = [r.setup.dataset.batch(step, bs, r.config.seed) for r in runs]
  sharding = NamedSharding(mesh, P(None, "data"))
  return {k: jax.device_put(np.stack([b[k] for b in per_seed]), sharding) for k in per_seed[0]}


def _check_same_but_seed(configs: list) -> None:
  first = {k: v for k, v in configs[0].to_dict().items() if k not in ("seed", "name")}
  for c in configs[1:]:
    other = {k: v for k, v in c.to_dict().items() if k not in ("seed", "name")}
    if other != first:
      diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
      raise reparam.ConfigError(f"runs trained together must differ only in `seed`; they differ in: {diff}")


# What a rerun may change without changing what the run computes: display, logging, the report, the remedy
# the NonFiniteError message suggests, and where prepared TFDS data is read from (data moved to another disk or
# Colab's Drive; what is read is fixed by data.name and the other data keys, which are still compared).
# train.space picks among exact forms of the same math per layer (and runs from before the key have none)
_MAY_CHANGE_ON_RESUME = ("name", "train.progress", "train.tensorboard", "train.verbose", "train.skip_nonfinite",
                         "train.keep_checkpoints", "train.space", "report.", "data.dir")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_resumable(config, workdir: str) -> None:
  """Refuses, before anything is written, a workdir that is not a directory or that holds a run of another
  config: resuming that would move its checkpoints aside as unreadable and overwrite its metrics and results.
  A config.json that is there but unreadable is refused too (the command lines, sweeps and in-process calls
  all come through here): counted as absent, it would let any config resume over the run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise reparam.ConfigError(f"workdir {workdir!r} is a file, not a directory")
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      old = json.load(f)
    if not isinstance(old, dict):
      raise ValueError(f"a JSON {type(old).__name__}, not an object")
  except FileNotFoundError:
    return
  except (ValueError, UnicodeDecodeError) as e:    # JSONDecodeError is a ValueError
    raise reparam.ConfigError(f"{path!r} is unreadable ({type(e).__name__}: {str(e)[:80]}), so a rerun cannot "
                              f"check it holds a run of this config: restore it, delete it to resume anyway, or "
                              f"use a new --workdir") from None
  before, now = _flat(old), _flat(json.loads(json.dumps(results._plain(config.to_dict()))))
  diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
          and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in _MAY_CHANGE_ON_RESUME)]
  if diff:
    shown = ", ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in diff[:3])
    raise reparam.ConfigError(f"workdir {workdir!r} holds a run of another config ({shown}"
                              f"{', ...' if len(diff) > 3 else ''}); rerun with its config to resume it, "
                              f"or use a new workdir")


def _finish(run: Run, state: dict, final: dict) -> dict:
  s = run.setup
  params = reparam.merge(s.rules, weights(state))
  tmp = os.path.join(run.workdir, ".params.msgpack.tmp")
  with open(tmp, "wb") as f:
    f.write(serialization.to_bytes(jax.device_get(params)))
  os.replace(tmp, os.path.join(run.workdir, "params.msgpack"))
  result = {**final, "done": True, "steps": int(state["step"])}
  if s.dataset.entropy_floor is not None:
    result["entropy_floor"] = s.dataset.entropy_floor
  results.write_json(os.path.join(run.workdir, "result.json"), result)
  if run.writer is not None:
    run.writer.close()
  return result


def _tensorboard(workdir: str, enabled: bool):
  if not enabled:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tb"))


def _write_tb(writer, row: dict) -> None:
  if writer is not None:
    for k, v in row.items():
      if k != "step":
        writer.add_scalar(k, v, row["step"])
    writer.flush()


def _progress(start: int, total: int, config, seeds: int = 1):
  from tqdm.auto import tqdm
  desc = config.get("name", "train") + (f" ×{seeds} seeds" if seeds > 1 else "")
  return tqdm(total=total, initial=start, desc=desc, unit="step", leave=False,
              disable=not config.train.progress, dynamic_ncols=True)


def main(argv) -> int:
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise reparam.ConfigError("--workdir is required: the directory for checkpoints, metrics and results")
  if FLAGS.config is None:
    raise reparam.ConfigError("--config is required, e.g. --config configs/quickstart.py")
  from experiments import cli
  cli.check_workdir(FLAGS.workdir)
  cli.compilation_cache()
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):      # multi-host: every host runs this same command
    jax.distributed.initialize()
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except NonFiniteError as e:
    print(f"error: {e}", file=__import__("sys").stderr)
    return 3
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
  return 0


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `path:arg`.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


if __name__ == "__main__":
  from experiments import cli
  define_flags()
  cli.run(main)
