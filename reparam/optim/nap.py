"""Normalize-and-Project (Lyle et al. 2024, "Normalization and effective learning rates in reinforcement
learning", arXiv:2407.01800), the projection half: after every update,

    K ← K · ‖K⁰‖_F / ‖K‖_F

for every projected weight K, with the targets ‖K⁰‖_F taken at `init` and kept in the state. The scale and
offset of a normalization layer are projected *jointly*: the concatenation (γ, β) of one norm module is
rescaled to its joint init norm ‖(γ⁰, β⁰)‖. With a normalization layer before each nonlinearity the network is
invariant to these scales, so the projection changes nothing the network computes and only pins the effective
learning rate, which would otherwise decay as the weight norms grow.

It is an optax transform in the shape of `optax.keep_params_nonnegative`: it rewrites `updates` so that
`params + updates` lands on the projection, so it must be **last** in the chain (after AdamW or Muon, their
weight decay and the learning rate). A leaf whose init norm is 0 (a zero-initialized kernel) is left alone:
there is no scale to keep, and projecting it would pin it at zero forever.

`projection="deferred"` leaves the projection to `apply_updates(params, updates, opt_state)` (used instead of
`optax.apply_updates`), which projects `params + updates` itself, the way `optax.projections` are applied after
an update. The numbers are the same (one rounding fewer: no `p + (x·scale − p)`), and each step reads every
projected weight once less: in the transform form `optax.apply_updates` must read `p` again to add it back,
since `p + (y − p)` is not `y` in floating point. On the LM of benchmarks/train_step.py (d_model 512, 128
tokens) its step moves 24.5 MiB less, peaks 4.5 MiB lower and takes 0.982× the time of the transform form's
(200 rounds side by side; at 4096 tokens 0.998×, no change).

`projection="lazy"` writes no projection at all, and is what the training loop uses. The norm of `q = p + u` must be
complete before any of `c·q` can be written, so a written projection costs three passes over every projected
weight (the norm's read, the rescaling's read and write; XLA:CPU fuses no reduction with its producer's other
outputs). Lazily, the params keep `q`, and the step reads the weight `p = c·q` where it is used: the model as
`c·(x·q)` for each projected Dense, DenseGeneral or Conv kernel (`reparam.apply(..., scales=)`, which hands
back `∂L/∂p`), the optimizer as `c·q` fused into its own pass (`projected`). `update` records ‖q‖ for the
next step, summing the `squares` of `params + updates`; the training loop's finiteness screen sums that same
expression over the updated leaves, so XLA reads each one once for both. On that LM's step: 535.1 MiB moved
against plain's 533.5 (+0.1 passes; written, +3.1), and 0.996× plain's time (six processes). It is the same
recursion: `q_{t+1} = p_t + u_t` is what the eager forms project, `p_{t+1} = c·q_{t+1}` their next weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from reparam.core import ROLES, ConfigError, flatten, path_str, times


class NormalizeAndProjectState(NamedTuple):
  count: jax.Array     # updates seen so far (int32), for `every`
  targets: Any         # like params: the float32 target norm at each projected leaf, optax.MaskedNode elsewhere


@dataclasses.dataclass(frozen=True)
class DeferredProjectionState:
  """The state of `normalize_and_project(..., projection="deferred" or "lazy")`: what `apply_updates` needs to
  project. `groups` (rparams path -> projection group, as pairs), `every` and `lazy` are static: part of the
  tree's structure, not leaves. `lazy`: `apply_updates` does not project; the params hold `q` and `projected`
  gives the weights."""
  count: jax.Array
  targets: Any
  groups: tuple
  every: int
  lazy: bool = False
  norms: Any = None    # lazy: like targets, each projected leaf's group norm ‖q‖ of the params `update` made


jax.tree_util.register_dataclass(DeferredProjectionState, data_fields=["count", "targets", "norms"],
                                 meta_fields=["groups", "every", "lazy"])


def _groups(roles_tree, roles: Sequence[str], norm_roles: Sequence[str]) -> dict[str, str]:
  """rparams path -> projection group: the leaf itself, or for norm roles its parent module (joint projection)."""
  for where, given in (("roles", roles), ("norm_roles", norm_roles)):
    bad = [r for r in given if r not in ROLES]
    if bad:
      raise ConfigError(f"normalize_and_project: {where}: {bad[0]!r} is not a role; valid: {', '.join(ROLES)}")
  groups = {}
  for path, role in flatten(roles_tree).items():
    if role in norm_roles:
      groups[path] = "norm:" + path.rpartition("/")[0]
    elif role in roles:
      groups[path] = "leaf:" + path
  return groups


def squares(x: jax.Array) -> jax.Array:
  """x², elementwise in float32: what a norm sums. The training step's finiteness screen sums the same
  expression over each updated leaf, so that XLA computes a lazily projected leaf's norm and its screen in one
  reduction, one read (`experiments.train.nonfinite_leaves`)."""
  x = x.astype(jnp.float32)
  return x * x


def _group_norms(groups: dict[str, str], leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """‖·‖_F of each group, over all its leaves together, in float32."""
  sq = {}
  for path, group in groups.items():
    s = jnp.sum(squares(leaves[path]))
    sq[group] = sq[group] + s if group in sq else s
  return {group: jnp.sqrt(s) for group, s in sq.items()}


def _scale(target: jax.Array, norm: jax.Array) -> jax.Array:
  """`target/norm`, or 1 for a zero target (a zero-init leaf: nothing to keep) or a zero norm (no direction)."""
  return jnp.where((target > 0) & (norm > 0), target / jnp.where(norm > 0, norm, 1.0), 1.0)


def _scales(leaves: dict[str, jax.Array], groups: dict[str, str], targets: dict[str, jax.Array]
            ) -> dict[str, jax.Array]:
  """`{path: target/‖group‖}` (float32 scalars, `_scale`) for every projected leaf."""
  norms = _group_norms(groups, leaves)
  return {path: _scale(targets[path], norms[group]) for path, group in groups.items()}


def _rescaled(tree, groups: dict[str, str], targets_tree) -> dict[str, jax.Array]:
  """`{path: leaf · target/‖group‖}` for every projected leaf of `tree`, in the leaf's dtype: what every form
  projects onto (`reparam.core.times`, as the lazy form's `projected` and `scaled_leaf` take it)."""
  leaves = flatten(tree)
  scales = _scales(leaves, groups, flatten(targets_tree))
  return {path: times(leaves[path], c) for path, c in scales.items()}


def _require_params(params) -> None:
  if params is None:
    raise ValueError("normalize_and_project needs the params: call update(updates, state, params)")


PROJECTIONS = ("eager", "deferred", "lazy")


def check_projection(projection: str, where: str) -> None:
  """Raises ConfigError unless `projection` is one of `PROJECTIONS` (`where` names the caller)."""
  if projection not in PROJECTIONS:
    raise ConfigError(f"{where}: projection must be one of {', '.join(PROJECTIONS)}; got {projection!r}")


def normalize_and_project(roles_tree, params=None, every: int = 1, roles: Sequence[str] = ("matrix", "head"),
                          norm_roles: Sequence[str] = ("norm",), projection: str = "eager"
                          ) -> optax.GradientTransformation:
  """The NaP projection as the last optax transform of a chain.

  Args:
    roles_tree: a tree shaped like the params holding each leaf's role (`reparam.roles(rules, rparams)`).
    params: the weights whose norms are the targets; default: the params given to `init` (the init weights).
    every: project after every k-th update only (steps k, 2k, ...); the others pass through unchanged.
    roles: roles projected leaf by leaf (`K ← K · ‖K⁰‖/‖K‖`).
    norm_roles: roles projected jointly per parent module (a LayerNorm's scale and bias together).
    projection: who writes the projection (one of `PROJECTIONS`; the numbers are the same):
      "eager": `update` rewrites the updates so that `optax.apply_updates` lands on it (the optax way);
      "deferred": `update` passes the updates through and `apply_updates(params, updates, state)` projects
        (one read of every projected weight fewer; `optax.apply_updates` would not project at all);
      "lazy": nothing writes it: the params hold `q = p + u`, and the weights are `projected(q, state)`, which
        the training step computes with in activation space (`projection_scales`, `reparam.apply(...,
        scales=)`; three passes over every projected weight fewer than "deferred"). See `projected`.
  """
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ConfigError(f"normalize_and_project: every must be an integer >= 1, got {every!r}")
  check_projection(projection, "normalize_and_project")
  lazy, deferred = projection == "lazy", projection == "deferred"
  groups = _groups(roles_tree, roles, norm_roles)

  def targets_of(tree):
    norms = _group_norms(groups, flatten(tree))
    return jax.tree_util.tree_map_with_path(
        # A copy per leaf: a norm layer's scale and bias share one target value, but must not share a buffer
        # (a training step that donates its state would donate that buffer twice).
        lambda p, x: jnp.array(norms[groups[path_str(p)]], copy=True) if path_str(p) in groups
        else optax.MaskedNode(), tree)

  fixed = None if params is None else targets_of(params)

  def init_fn(params):
    count, targets = jnp.zeros([], jnp.int32), targets_of(params) if fixed is None else fixed
    if lazy:     # the norms of the params given, computed apart from the targets: buffers of their own
      return DeferredProjectionState(count, targets, tuple(groups.items()), every, True, targets_of(params))
    if deferred:
      return DeferredProjectionState(count, targets, tuple(groups.items()), every)
    return NormalizeAndProjectState(count, targets)

  if lazy:
    def lazy_update(updates, state, params=None):
      _require_params(params)
      # the norms of the next q = params + updates, as `apply_updates` will add them (the same expression: XLA
      # computes it once), for the next step's `projection_scales`
      return updates, dataclasses.replace(state, count=optax.safe_increment(state.count),
                                          norms=targets_of(optax.apply_updates(params, updates)))
    return optax.GradientTransformation(init_fn, lazy_update)

  if deferred:
    return optax.GradientTransformation(
        init_fn, lambda updates, state, params=None: (updates, dataclasses.replace(
            state, count=optax.safe_increment(state.count))))

  def update_fn(updates, state, params=None):
    _require_params(params)
    rescaled = _rescaled(jax.tree.map(lambda p, u: p + u, params, updates), groups, state.targets)
    count = optax.safe_increment(state.count)
    project = count % every == 0

    def one(path, p, u):
      if path not in rescaled:
        return u
      projected = (rescaled[path] - p).astype(u.dtype)
      # every=1 projects at every step: no select, which would read both updates of every matrix
      return projected if every == 1 else jnp.where(project, projected, u)

    updates = jax.tree_util.tree_map_with_path(lambda kp, p, u: one(path_str(kp), p, u), params, updates)
    return updates, NormalizeAndProjectState(count, state.targets)

  return optax.GradientTransformation(init_fn, update_fn)


def _project(params, state: DeferredProjectionState):
  """`params` projected onto the state's target norms (on the steps `every` selects), as `update_fn` would."""
  rescaled = _rescaled(params, dict(state.groups), state.targets)
  project = state.count % state.every == 0      # the count already includes this update

  def one(kp, x):
    path = path_str(kp)
    if path not in rescaled:
      return x
    return rescaled[path] if state.every == 1 else jnp.where(project, rescaled[path], x)

  return jax.tree_util.tree_map_with_path(one, params)


def _deferred_states(opt_state) -> list[DeferredProjectionState]:
  is_deferred = lambda x: isinstance(x, DeferredProjectionState)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_deferred) if is_deferred(x)]


def apply_updates(params, updates, opt_state):
  """`optax.apply_updates(params, updates)`, then every deferred NaP projection found in `opt_state` (the state
  `update` returned with these updates) that is not lazy. Without one it is exactly `optax.apply_updates`, so a
  training loop can always call it. With a lazy state, pass the *projected* params (`projected(q, opt_state)`
  before the update): the result is the next `q`."""
  new = optax.apply_updates(params, updates)
  for state in _deferred_states(opt_state):
    if not state.lazy:
      new = _project(new, state)
  return new


def projection_scales(opt_state) -> dict[str, jax.Array]:
  """`{rparams path: c}` for every leaf a lazy NaP state in `opt_state` projects: the weight is `c·q` for the
  stored `q` (`c = ‖K⁰‖/‖q‖`, jointly per norm layer; 1 between the steps `every` selects, at count 0, and for
  a zero target or norm). Empty without a lazy state. Reads no weight: the norms of `q` are the ones `update`
  recorded when it made `q` (from `params + updates`, which `apply_updates` adds the same way).

  Lazy projection is NaP's recursion exactly: the stored `q_t = p_{t-1} + u_{t-1}` is what the eager form would
  project, so `p_t = c_t·q_t` is its weight (to a rounding), and the step feeds the optimizer `p_t` and `∂L/∂p_t`
  (`reparam.apply(..., scales=)`)."""
  out = {}
  for state in _deferred_states(opt_state):
    if state.lazy:
      due = (state.count > 0) & (state.count % state.every == 0)
      targets, norms = flatten(state.targets), flatten(state.norms)
      for path in dict(state.groups):
        out[path] = jnp.where(due, _scale(targets[path], norms[path]), 1.0)
  return out


def projected(params, opt_state, scales: dict | None = None):
  """The weights the params of a lazy NaP state stand for: each projected leaf multiplied by its
  `projection_scales` (pass them if computed already), in the leaf's dtype. `params` itself without a lazy
  state: read the weights through this wherever they are used outside the training step (evaluation, export,
  diagnostics)."""
  scales = projection_scales(opt_state) if scales is None else scales
  if not scales:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: times(x, scales[path_str(kp)]) if path_str(kp) in scales else x, params)
