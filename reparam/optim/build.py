"""`make`: the optax transformation of a run, and `describe`: the routing table it prints at start.

    make(config) = chain(clip_by_global_norm,                       # if grad_clip_norm; frozen leaves excluded
                         partition({label: adamw | muon | set_to_zero}, labels from roles),
                         normalize_and_project)                     # if nap; last, it sees the final update

(`projection="deferred"`: NaP's projection waits for `reparam.optim.apply_updates`; `projection="lazy"`: it is
never written, and the training loop computes with `reparam.optim.projected(q, state)`; see `reparam.optim.nap`.)

One partition label per role (per role and fan-in under width scaling), each an unmodified optax optimizer:
`optax.adamw`, `optax.contrib.muon` (given the leaf's dimension numbers, so its update is exactly optax's) or
`optax.set_to_zero`. `optax.partition` stores each group's state with `optax.MaskedNode` at the leaves it does
not own, so frozen leaves hold no optimizer state at all.

An AdamW group of small leaves only (at most `SMALL` elements each, one dtype: multipliers, gains, norms,
biases, LoRA factors) runs under `optax.flatten`: AdamW is elementwise, so updating the group's leaves as one
concatenated vector gives the same numbers, in a handful of kernels instead of a few per leaf. At small batches
each kernel costs more than its arithmetic (36 multiplier leaves added ~100 separate optimizer kernels to the
step), which is what the flattening removes. The training step checks such leaves for finiteness the same way.
"""
from __future__ import annotations

import math

import jax
import optax

from reparam.core import flatten as leaves_by_path, path_str
from reparam.optim.config import check, check_schedule, schedule
from reparam.optim.nap import check_projection, normalize_and_project
from reparam.optim.routing import Route, labels, routes


def _muon(cfg: dict, lr, weight_decay: float, dims: dict):
  # Inside optax.partition the tree holds optax.MaskedNode at the leaves this group does not own, and optax's
  # muon needs its dimension numbers in the same structure: mapping over the tree it is given keeps them.
  def dim_numbers(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: dims[path_str(p)], tree)

  extra = {} if cfg["consistent_rms"] is None else {"consistent_rms": cfg["consistent_rms"]}  # newer optax only
  return optax.contrib.muon(lr, ns_steps=cfg["ns_steps"], beta=cfg["muon_beta"], weight_decay=weight_decay,
                            muon_weight_dimension_numbers=dim_numbers, **extra)


SMALL = 2 ** 16      # elements: a leaf this small is cheaper to copy into a concatenation than to update alone


def _flattens(route: Route, table: dict[str, Route], dtypes: dict) -> bool:
  """Whether an AdamW label's leaves are all small and of one dtype (concatenating mixed dtypes would promote)."""
  group = [r for r in table.values() if r.label == route.label]
  return all(math.prod(r.shape) <= SMALL for r in group) and len({dtypes[r.path] for r in group}) == 1


def _group(cfg: dict, route: Route, table: dict[str, Route], total_steps, dtypes: dict):
  """The optax optimizer of one partition label (every leaf of a label shares optimizer, lr and decay)."""
  if route.optimizer == "frozen":
    return optax.set_to_zero()
  lr = schedule(cfg, route.lr, total_steps)
  if route.optimizer == "adamw":
    adamw = optax.adamw(lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=route.weight_decay)
    return optax.flatten(adamw) if _flattens(route, table, dtypes) else adamw
  dims = {path: r.muon_dims for path, r in table.items() if r.label == route.label}
  return _muon(cfg, lr, route.weight_decay, dims)


def make(config, rules, rparams, total_steps: int | None = None, where: str = "optimizer",
         projection: str = "eager") -> optax.GradientTransformation:
  """The optimizer of `rparams` (`reparam.init(rules, params, key)`), routed by role.

  Args:
    config: a dict or ConfigDict with the keys of `reparam.optim.config` (e.g. `dict(name="muon",
      learning_rate=0.02, weight_decay=0.1)`); every key is checked before anything is built.
    rules, rparams: as for `reparam.roles`; only shapes of rparams are read (ShapeDtypeStructs work).
    total_steps: length of the run, needed by the cosine and linear schedules.
    where: the config's name in error messages (`optimizer.roles.gian: unknown role; valid: ...`).
    projection: how NaP's projection is written, if the config has `nap` (same numbers each way; see
      `reparam.optim.nap`): "eager" in the updates, as any optax transform; "deferred" by
      `reparam.optim.apply_updates`, which must then replace `optax.apply_updates` (one read of every
      projected weight fewer per step); "lazy" never: the params hold the unprojected `q`, and the step computes
      with `reparam.optim.projected(q, state)` (three passes fewer than "deferred"; the training loop's way).
  Returns:
    an optax transformation; pass `params` to `update` (AdamW's decay and NaP need them).
  """
  check_projection(projection, "make")
  cfg = check(config, where)
  check_schedule(cfg, total_steps, where)
  table = routes(cfg, rules, rparams, where)
  dtypes = {path: x.dtype for path, x in leaves_by_path(rparams).items()}
  groups = {}
  for route in table.values():
    if route.label not in groups:
      groups[route.label] = _group(cfg, route, table, total_steps, dtypes)
  parts = []
  if cfg["grad_clip_norm"]:
    # The global norm is over the trained leaves only: a frozen leaf's gradient (nonzero when it is frozen by a
    # role rule rather than by stop_gradient) must not shrink everyone else's step.
    trained = jax.tree_util.tree_map_with_path(lambda p, _: table[path_str(p)].optimizer != "frozen", rparams)
    parts.append(optax.masked(optax.clip_by_global_norm(cfg["grad_clip_norm"]), trained))
  parts.append(optax.partition(groups, labels(table, rparams)))
  if cfg["nap"]:
    roles_tree = jax.tree_util.tree_map_with_path(lambda p, _: table[path_str(p)].role, rparams)
    parts.append(normalize_and_project(roles_tree, every=cfg["nap"]["every"], roles=cfg["nap"]["roles"],
                                       norm_roles=cfg["nap"]["norm_roles"], projection=projection))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------- the table

def _axes(dims) -> str:
  if dims is None:
    return ""
  return f"{','.join(map(str, dims.reduction_axis))} -> {','.join(map(str, dims.output_axis))}"


def _row(r: Route, nap) -> dict[str, str]:
  frozen = r.optimizer == "frozen"
  row = {"path": r.path, "shape": "x".join(map(str, r.shape)) or "scalar", "role": r.role,
         "optimizer": r.optimizer, "lr": "-" if frozen else f"{r.lr:.3g}",
         "lr mult": "-" if frozen else f"{r.lr_mult:.4g}", "wd": "-" if frozen else f"{r.weight_decay:.3g}",
         "muon axes": _axes(r.muon_dims)}
  if nap:
    row["nap"] = "joint" if r.role in nap["norm_roles"] else ("yes" if r.role in nap["roles"] else "")
  return row


def _header(cfg: dict, total_steps) -> str:
  lr = f"lr={cfg['learning_rate']:g}"
  if cfg["name"] == "muon":
    lr += f" adam_lr={cfg['adam_learning_rate']:g}"
  sched = f"{cfg['schedule']} warmup={cfg['warmup_steps']}"
  if cfg["schedule"] != "constant":
    sched += f" min_lr_ratio={cfg['min_lr_ratio']:g} total_steps={total_steps}"
  nap = cfg["nap"] and f"every {cfg['nap']['every']}"
  ws = cfg["width_scaling"] and f"base_width={cfg['width_scaling']['base_width']}"
  return (f"optimizer {cfg['name']} {lr} wd={cfg['weight_decay']:g} | schedule {sched} | "
          f"clip {cfg['grad_clip_norm'] or 'off'} | width_scaling {ws or 'off'} | nap {nap or 'off'}")


def describe(config, rules, rparams, total_steps: int | None = None, where: str = "optimizer") -> str:
  """The routing table, one row per leaf of rparams: path, shape, role, optimizer, peak lr, lr multiplier
  (after width scaling), weight decay, Muon axes (reduction -> output) and, with NaP, whether it is projected;
  then a header line with the config and a footer with the leaf and parameter counts per optimizer."""
  cfg = check(config, where)
  if total_steps is not None:
    check_schedule(cfg, total_steps, where)
  table = routes(cfg, rules, rparams, where)
  rows = [_row(r, cfg["nap"]) for r in table.values()]
  cols = [c for c in rows[0] if c != "muon axes" or any(r["muon axes"] for r in rows)] if rows else []
  width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
  line = lambda cells: "| " + " | ".join(cells[c].ljust(width[c]) for c in cols) + " |"
  out = [_header(cfg, total_steps), line({c: c for c in cols}), line({c: "-" * width[c] for c in cols})]
  out += [line(r) for r in rows]
  counts = {}
  for r in table.values():
    n, size = counts.get(r.optimizer, (0, 0))
    counts[r.optimizer] = (n + 1, size + math.prod(r.shape))
  out.append(" | ".join(f"{k}: {n} leaves, {size:,} params" for k, (n, size) in counts.items()))
  return "\n".join(out)
