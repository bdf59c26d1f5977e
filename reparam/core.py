"""The core abstraction: a weight transform is a pair of pure functions, composed like optax transformations.

    Reparam.init(key, w) -> factors            # identity at init: apply(init(key, w), w) == w
    Reparam.apply(factors, w) -> w_effective   # w is the stored weight, or the previous stage's output

Rules `[(regex, Reparam | None), ...]` pick which parameters are wrapped: each regex is matched with
`re.fullmatch` against the `"/"`-joined path of a leaf (`"Dense_0/kernel"`), the first match wins, `None` keeps a
leaf as it is, and a rule that matches nothing is an error. The wrapped tree ("rparams") is a plain nested dict:
every matched leaf becomes `{"w": stored_weight, **factors}`, so orbax checkpoints it and optax updates it as is.

The model never changes: call `materialize(rules, rparams)` at the top of the loss, inside `jit`/`grad` (the
"resolve after the grad boundary" pattern of paramax and equinox), and `merge` for a plain tree at inference.
A transform never knows how it is optimized: it declares a *role* per factor, and `roles()` gives the tree the
optimizer routes on.
"""
from __future__ import annotations

import functools
import re
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

Factors = Any   # a nested dict of arrays
Rules = Sequence[tuple[str, Optional["Reparam"]]]

ROLES = ("matrix", "frozen", "lowrank", "gain", "multiplier", "bias", "norm", "embedding", "head")
WEIGHT = "w"    # key of the stored weight inside a wrapped leaf

# Default recognition of roles from parameter paths (overridable with `role_rules`).
HEAD_MODULES = r"(?i)(head|lm_head|output|logits)"
NORM_MODULES = r"(?i)(.*norm.*|ln(_?\w*)?|bn\d*|.*_ln)"


class ConfigError(ValueError):
  """A bad rule, transform name or option: its message is one line naming the offending key and the fix."""


class NoFastForm(Exception):
  """Raised by a `Reparam.linear` that cannot handle a layer (e.g. its axes are not the layer's): the layer is
  then run on the materialized weight instead, which is always correct."""


class Reparam(NamedTuple):
  """A weight transform: `init(key, w) -> factors`, `apply(factors, w) -> w_effective`.

  Besides the two functions (the shape of optax's GradientTransformation), a transform declares:
    roles: the role of each factor, a dict shaped like `init`'s output (e.g. `{"g": "gain"}`);
    freezes_base: whether the weight it receives is frozen (LoRA, DoRA), so the optimizer leaves it alone;
    name: the key its factors get inside a `chain`, shown in paths such as `Dense_0/kernel/dora/m`;
    linear: optional activation-space form, used by `reparam.apply` (see `reparam.fast`):

      linear(factors, w, x, layer) -> y,   y == layer.matmul(x, apply(factors, w))   (no bias)

    computed without forming the effective weight where the math allows. `layer` (a `reparam.fast.Layer`) gives
    `layer.base(x) == layer.matmul(x, w)`, linear in x and computed in activation space when `w` is a previous
    chain stage's output; `layer.matmul(x, k)`, the layer's own contraction with any kernel `k` shaped
    (window..., in..., any out...) (e.g. LoRA's A); `layer.scale_in(x, v)`, x scaled per input feature;
    `layer.check(layout)`, which raises `NoFastForm` unless the transform's axes are the layer's;
    `layer.check_cost(per_row)`, which raises it off CPU where scaling `per_row` activations of each row costs
    more than the weight (the layer then runs materialized).
    Output units are the trailing axes of y; `layer.scale_out(y, v)` scales them per unit (on the 2-D view that
    XLA's CPU backend differentiates fastest). A transform that freezes `w` must not call
    `layer.base` (its gradient would reach earlier stages) but `layer.matmul(x, stop_gradient(w))`; `w` is a
    real array that XLA removes as dead code when unused, so reading it (for a norm) is the only O(in·out) cost.
  """
  init: Callable[[jax.Array, jax.Array], Factors]
  apply: Callable[[Factors, jax.Array], jax.Array]
  roles: Mapping[str, Any] = {}
  freezes_base: bool = False
  name: str = "reparam"
  linear: Optional[Callable[..., jax.Array]] = None


def identity() -> Reparam:
  """The transform that changes nothing and stores no factors: the baseline arm of every comparison."""
  return Reparam(init=lambda key, w: {}, apply=lambda factors, w: w, roles={}, name="identity",
                 linear=lambda factors, w, x, layer: layer.base(x))


def _stage_linear(t: Reparam, factors, w, layer, name: str) -> Callable[[jax.Array], jax.Array]:
  """`x -> layer.matmul(x, t.apply(factors, w))`: `t.linear` where it has one and takes this layer, else on the
  materialized weight (`w`, the stages before materialized, then this stage), so one stage without a form here
  does not send the later ones back to weight space. Such a stage is noted in `layer.notes` (for `explain`)."""
  def materialized(x, why):
    if layer.notes is not None:
      layer.notes.append(f"stage {name} materialized, with any stages before it: {why}")
    return layer.matmul(x, t.apply(factors, w))

  def stage(x):
    if t.linear is None:
      return materialized(x, f"{t.name} has no activation-space form")
    try:
      return t.linear(factors, w, x, layer)
    except NoFastForm as e:
      return materialized(x, e)
  return stage


def chain(*transforms: Reparam) -> Reparam:
  """Composition: `chain(t1, t2).apply(f, w) == t2.apply(f2, t1.apply(f1, w))`, like `optax.chain`.

  Each stage is initialized on the previous stage's output, so a chain of identity-at-init transforms is the
  identity at init. Factors are stored under each stage's name (`lora`, `lora_1` when a name repeats). Stages
  before a stage that freezes its input (LoRA, DoRA) are frozen too: that is what fine-tuning on top means.
  An empty chain is refused rather than taken as the identity: `chain()` is far more often a list that came out
  empty by mistake than a wish for `identity()`.
  """
  if not transforms:
    raise ConfigError("chain needs at least one transform, e.g. chain(weight_norm(), multipliers(row=True)); "
                      "identity() is the transform that changes nothing")
  names = []
  for t in transforms:
    name, k = t.name, 1
    while name in names:
      name, k = f"{t.name}_{k}", k + 1
    names.append(name)
  last_freezer = max((i for i, t in enumerate(transforms) if t.freezes_base), default=-1)

  def init(key, w):
    factors = {}
    for name, t, k in zip(names, transforms, jax.random.split(key, len(transforms))):
      factors[name] = t.init(k, w)
      w = t.apply(factors[name], w)
    return factors

  def apply(factors, w):
    for name, t in zip(names, transforms):
      w = t.apply(factors[name], w)
    return w

  def linear(factors, w, x, layer):
    # Stage k sees stages < k twice: as `layer.base` (their activation-space form, called lazily) and as `w`
    # (their materialized output, dead code unless stage k reads it, e.g. weight norm's ‖w‖₀).
    base = layer.base
    for name, t in zip(names, transforms):
      base = _stage_linear(t, factors[name], w, layer._replace(base=base), name)
      w = t.apply(factors[name], w)
    return base(x)

  roles = {name: (jax.tree.map(lambda _: "frozen", dict(t.roles)) if i < last_freezer else t.roles)
           for i, (name, t) in enumerate(zip(names, transforms))}
  return Reparam(init, apply, roles, freezes_base=last_freezer >= 0, name="chain", linear=linear)


# ---------------------------------------------------------------------------------------------------- paths

def path_str(path) -> str:
  """`"/"`-joined names of a jax key path: `("Dense_0", "kernel") -> "Dense_0/kernel"`."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(tree) -> dict[str, Any]:
  """Leaves of a nested dict keyed by their `"/"`-joined paths, in tree order."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _compile(rules: Rules) -> list[tuple[re.Pattern, Optional[Reparam]]]:
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"rules[{i}] must be a (regex, Reparam | None) pair, got {rule!r}")
    if rule[1] is not None and not isinstance(rule[1], Reparam):
      raise ConfigError(f"rules[{i}] ({rule[0]!r}): expected a Reparam or None, got {type(rule[1]).__name__}")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ConfigError(f"rules[{i}]: {rule[0]!r} is not a valid regex: {e}") from None
  return compiled


def _first_match(compiled, path: str) -> Optional[int]:
  return next((i for i, (pattern, _) in enumerate(compiled) if pattern.fullmatch(path)), None)


def _is_wrapped(node) -> bool:
  return isinstance(node, Mapping) and WEIGHT in node and not isinstance(node[WEIGHT], Mapping)


def _map_wrapped(compiled, tree, on_wrapped: Callable, on_leaf: Callable, path: str = ""):
  """Rebuilds `tree`, calling `on_wrapped(path, transform, factors, w)` on each wrapped leaf, `on_leaf` elsewhere."""
  if isinstance(tree, Mapping):
    i = _first_match(compiled, path) if path else None
    if i is not None and compiled[i][1] is not None and _is_wrapped(tree):
      factors = {k: v for k, v in tree.items() if k != WEIGHT}
      return on_wrapped(path, compiled[i][1], factors, tree[WEIGHT])
    return {k: _map_wrapped(compiled, v, on_wrapped, on_leaf, f"{path}/{k}" if path else str(k))
            for k, v in tree.items()}
  return on_leaf(path, tree)


# ------------------------------------------------------------------------------------------------ the API

def matches(rules: Rules, params) -> list[tuple[str, tuple, str, str]]:
  """What matched what: `(path, shape, regex, transform name)` for every leaf a rule matched (`None` rules too).

  Raises ConfigError, before any compute, for a rule that matches no parameter.
  """
  compiled = _compile(rules)
  leaves = flatten(params)
  found, used = [], set()
  for path, leaf in leaves.items():
    i = _first_match(compiled, path)
    if i is not None:
      used.add(i)
      t = compiled[i][1]
      found.append((path, tuple(jnp.shape(leaf)), rules[i][0], "keep" if t is None else t.name))
  for i, (pattern, _) in enumerate(rules):
    if i not in used:
      sample = ", ".join(list(leaves)[:8]) + (", ..." if len(leaves) > 8 else "")
      shadow = " (every leaf it matches is taken by an earlier rule)" if any(
          compiled[i][0].fullmatch(p) for p in leaves) else ""
      raise ConfigError(f"rule {pattern!r} matches no parameter{shadow}; parameter paths are: {sample}")
  return found


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
  # Keyed by path, not position: adding a layer elsewhere does not change this layer's factors.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(rules: Rules, params, key: jax.Array):
  """Wraps every matched leaf as `{"w": leaf, **transform.init(key_for_path, leaf)}`; other leaves unchanged.

  All rules and shapes are checked (with `jax.eval_shape`, no compute) before anything is initialized; errors
  name the parameter path.
  """
  compiled = _compile(rules)
  matches(rules, params)
  for path, leaf in flatten(params).items():
    i = _first_match(compiled, path)
    if i is None or compiled[i][1] is None:
      continue
    t = compiled[i][1]
    try:
      out = jax.eval_shape(t.init, jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
                           jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)))
    except ValueError as e:
      raise ConfigError(f"{path} (shape {tuple(jnp.shape(leaf))}): {t.name}: {e}") from None
    if WEIGHT in out:
      raise ConfigError(f"{path}: transform {t.name!r} returned a factor named {WEIGHT!r}, which is reserved")

  def wrap(path, leaf):
    i = _first_match(compiled, path)
    if i is None or compiled[i][1] is None:
      return leaf
    return {WEIGHT: leaf, **compiled[i][1].init(_leaf_key(key, path), leaf)}

  return jax.tree_util.tree_map_with_path(lambda p, leaf: wrap(path_str(p), leaf), params)


def materialize(rules: Rules, rparams):
  """The ordinary parameter tree: each wrapped leaf replaced by `transform.apply(factors, w)`.

  Call it inside the loss, under `jit`/`grad`: gradients then flow to the factors (and to `w` unless frozen).
  """
  compiled = _compile(rules)
  return _map_wrapped(compiled, rparams, lambda path, t, factors, w: t.apply(factors, w), lambda path, x: x)


class _StaticRules(tuple):
  """Rules as a `jit` static argument: equal when the same regexes map to the very same transform objects.

  Transforms hold functions, so equality is identity; jit's cache keeps the key (and so the transforms) alive,
  hence an id is never reused while its entry exists."""

  def __hash__(self):
    return hash(tuple((pattern, id(t)) for pattern, t in self))

  def __eq__(self, other):
    return (isinstance(other, _StaticRules) and len(self) == len(other)
            and all(p == q and s is t for (p, s), (q, t) in zip(self, other)))


@functools.partial(jax.jit, static_argnums=0)
def _merge(rules: _StaticRules, rparams):
  return materialize(list(rules), rparams)


def merge(rules: Rules, rparams):
  """The plain tree for inference, computed once: the model then runs with no transform overhead at all.

  Jitted once per rules and shapes: calling it at every evaluation does not recompile."""
  _compile(rules)       # a bad rule is a ConfigError here, not an unhashable-argument error inside jit
  return _merge(_StaticRules(tuple(r) for r in rules), rparams)


def scaled(rparams, scales: Mapping[str, jax.Array]):
  """`rparams` with the leaf at each path of `scales` multiplied by its scalar, *differentiated as the product*:
  the cotangent returned for such a leaf is the one of `scale · leaf`, not `scale ·` that.

  This is how a lazily projected weight (`reparam.optim`'s NaP with `projection="lazy"`) enters a model: the state
  keeps `q`, the model computes with `p = c·q`, and the optimizer needs `∂L/∂p`. `c` is a constant here (its
  cotangent is zero): the projection is not part of the model. Paths are rparams paths (`Dense_0/kernel`, or
  `Dense_0/kernel/w` inside a wrapped leaf). `reparam.apply(..., scales=)` runs a plain Dense, DenseGeneral or
  Conv with such a kernel as `c·(x·q)` instead, never forming `c·q`."""
  if not scales:
    return rparams
  missing = sorted(set(scales) - set(flatten(rparams)))
  if missing:
    raise ConfigError(f"scales: {missing[0]!r} is not a leaf of rparams; leaves are: "
                      + ", ".join(list(flatten(rparams))[:8]))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: scaled_leaf(x, scales[path_str(p)]) if path_str(p) in scales else x, rparams)


def times(x: jax.Array, c) -> jax.Array:
  """`x·c` in x's dtype, the product taken in float32 (c a scalar or broadcastable to x): how every weight is
  rescaled here, so that a projection, a lazily projected weight and a transform round alike."""
  return (x.astype(jnp.float32) * c).astype(x.dtype)


@jax.custom_vjp
def scaled_leaf(x: jax.Array, c: jax.Array) -> jax.Array:
  """`times(x, c)`, whose cotangent passes to `x` unchanged (see `scaled`)."""
  return times(x, c)


def _scaled_leaf_fwd(x, c):
  return scaled_leaf(x, c), c


def _scaled_leaf_bwd(c, g):
  return g, jnp.zeros_like(c)


scaled_leaf.defvjp(_scaled_leaf_fwd, _scaled_leaf_bwd)


def default_role(path: str, ndim: int) -> str:
  """The role of an unwrapped leaf, recognized from its path and rank (see `HEAD_MODULES`, `NORM_MODULES`)."""
  parts = path.split("/")
  if parts[-1] == "embedding":
    return "embedding"
  if any(re.fullmatch(NORM_MODULES, p) for p in parts[:-1]):
    return "norm"
  if parts[-1] == "bias":
    return "bias"
  if any(re.fullmatch(HEAD_MODULES, p) for p in parts[:-1]) and ndim >= 2:
    return "head"
  return "matrix" if ndim >= 2 else "gain"


def roles(rules: Rules, rparams, role_rules: Sequence[tuple[str, str]] = ()):
  """A tree shaped like `rparams` holding each leaf's role (one of `ROLES`).

  `role_rules` are `(regex, role)` pairs matched first against the full path of each rparams leaf (e.g.
  `("head/.*", "frozen")`, `(".*/wte/.*", "embedding")`); otherwise a wrapped leaf's stored weight is `frozen`
  if its transform freezes it, else keeps the role of the plain weight, and factors take their declared roles.
  """
  for pattern, role in role_rules:
    if role not in ROLES:
      raise ConfigError(f"role_rules: {pattern!r} -> {role!r} is not a role; valid roles: {', '.join(ROLES)}")
  overrides = _compile([(p, None) for p, _ in role_rules])

  def on_wrapped(path, t, factors, w):
    # Roles are declared per factor name; spread each over the (possibly nested) factor it names.
    declared = jax.tree.map(lambda r, sub: jax.tree.map(lambda _: r, sub), dict(t.roles), factors)
    return {WEIGHT: "frozen" if t.freezes_base else default_role(path, jnp.ndim(w)), **declared}

  tree = _map_wrapped(_compile(rules), rparams, on_wrapped, lambda path, x: default_role(path, jnp.ndim(x)))
  used = set()

  def override(path, role):
    i = _first_match(overrides, path)
    if i is None:
      return role
    used.add(i)
    return role_rules[i][1]

  tree = jax.tree_util.tree_map_with_path(lambda p, r: override(path_str(p), r), tree)
  for i, (pattern, _) in enumerate(role_rules):
    if i not in used:
      raise ConfigError(f"role rule {pattern!r} matches no parameter; parameter paths are: "
                        + ", ".join(list(flatten(tree))[:8]))
  return tree
