"""The optimizer config: keys, defaults, and the checks that run before any compute.

`config` is a plain dict or an `ml_collections.ConfigDict` (usually `config.optimizer`), e.g.

    dict(name="muon", learning_rate=0.02, weight_decay=0.1, schedule="cosine", warmup_steps=100)

| key | default | meaning |
|---|---|---|
| `name` | `"adamw"` | optimizer of the `matrix` role (hidden matrices): `"adamw"` or `"muon"` |
| `learning_rate` | required | peak lr of the matrices (and of every AdamW leaf when `name="adamw"`) |
| `adam_learning_rate` | `3e-3` | with `name="muon"`: peak lr of every AdamW-routed leaf (ignored with `"adamw"`) |
| `weight_decay` | `0.0` | decay of the `matrix` role; other roles default to 0 |
| `b1`, `b2`, `eps` | `0.9, 0.999, 1e-8` | AdamW moments (optax's defaults) |
| `muon_beta`, `ns_steps` | `0.95, 5` | Muon momentum (Nesterov) and Newton–Schulz steps |
| `consistent_rms` | `None` | Muon scale: None = `√max(1, out/in)` (Jordan); c = `c·√max(in, out)` (Moonlight: .2) |
| `schedule` | `"constant"` | `"constant"`, `"cosine"` or `"linear"` decay after the warmup |
| `warmup_steps` | `0` | linear warmup from 0 to the peak lr |
| `min_lr_ratio` | `0.0` | the decay ends at `min_lr_ratio · peak` at `total_steps` |
| `grad_clip_norm` | `None` | global-norm clipping, first in the chain (None = off) |
| `roles` | `{}` | per-role overrides `{role: {optimizer, lr_mult, weight_decay}}` |
| `role_rules` | `[]` | `(regex, role)` pairs for `reparam.roles` (extra embeddings, heads, frozen leaves) |
| `width_scaling` | `None` | `{base_width, lr_exponent=1.0, wd_exponent=0.5, roles=["matrix"]}` (Fan et al. 2025) |
| `nap` | `None` | `{every=1, roles=["matrix", "head"], norm_roles=["norm"]}` (Lyle et al. 2024), or True |
| `muon_axes` | `[]` | `(regex, (reduction_axes, output_axes))` overrides of the Muon dimension numbers |

Why 3e-3 for `adam_learning_rate`: Muon's lr (~0.02) moves every matrix by a fixed spectral amount and is ~10×
too large for Adam, whose per-coordinate step is ~lr; 3e-3 is a common AdamW peak for small transformers.
"""
from __future__ import annotations

import re
from numbers import Integral, Real
from typing import Any, Mapping

import optax

from reparam.core import ROLES, ConfigError

OPTIMIZERS = ("adamw", "muon")
ROLE_OPTIMIZERS = ("adamw", "muon", "frozen")
SCHEDULES = ("constant", "cosine", "linear")
REQUIRED = object()

DEFAULTS = dict(name="adamw", learning_rate=REQUIRED, adam_learning_rate=3e-3, weight_decay=0.0, b1=0.9, b2=0.999,
                eps=1e-8, muon_beta=0.95, ns_steps=5, consistent_rms=None, schedule="constant", warmup_steps=0,
                min_lr_ratio=0.0, grad_clip_norm=None, roles={}, role_rules=[], width_scaling=None, nap=None,
                muon_axes=[])
ROLE_DEFAULTS = dict(optimizer=None, lr_mult=1.0, weight_decay=None)   # None: the role's default
WIDTH_DEFAULTS = dict(base_width=REQUIRED, lr_exponent=1.0, wd_exponent=0.5, roles=["matrix"])
NAP_DEFAULTS = dict(every=1, roles=["matrix", "head"], norm_roles=["norm"])


def _plain(config) -> Any:
  """A ConfigDict (or FrozenConfigDict) as nested plain dicts; anything else as it is."""
  return config.to_dict() if hasattr(config, "to_dict") else config


def _keys(given, defaults: Mapping, where: str) -> dict:
  """`given` merged over `defaults`, refusing unknown and missing keys."""
  given = _plain(given)
  if not isinstance(given, Mapping):
    raise ConfigError(f"{where}: expected a dict of options, got {type(given).__name__}")
  for key in given:
    if key not in defaults:
      raise ConfigError(f"{where}.{key}: unknown key; valid: {', '.join(defaults)}")
  out = {**defaults, **given}
  for key, value in out.items():
    if value is REQUIRED:
      raise ConfigError(f"{where}.{key}: required (e.g. {where}.learning_rate=3e-3 for adamw, 0.02 for muon)"
                        if key == "learning_rate" else f"{where}.{key}: required")
  return out


def _number(value, where: str, lo: float = 0.0, lo_open: bool = False, hi: float | None = None,
            integer: bool = False, optional: bool = False):
  if value is None and optional:
    return None
  kind = Integral if integer else Real
  ok = isinstance(value, kind) and not isinstance(value, bool)
  ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
  if not ok:
    span = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
    raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'} {span}"
                      f"{' or None' if optional else ''}, got {value!r}")
  return value


def _choice(value, choices, where: str) -> str:
  if value not in choices:
    raise ConfigError(f"{where}: {value!r} is not valid; valid: {', '.join(choices)}")
  return value


def _roles_list(value, where: str) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, (list, tuple)):
    raise ConfigError(f"{where}: expected a list of roles, got {value!r}; valid roles: {', '.join(ROLES)}")
  for role in value:
    _choice(role, ROLES, where)
  return tuple(value)


def _check_roles(roles, where: str) -> dict:
  roles = _plain(roles) or {}
  if not isinstance(roles, Mapping):
    raise ConfigError(f"{where}: expected {{role: {{optimizer, lr_mult, weight_decay}}}}, got {roles!r}")
  out = {}
  for role, spec in roles.items():
    if role not in ROLES:
      raise ConfigError(f"{where}.{role}: unknown role; valid: {', '.join(ROLES)}")
    spec = _keys(spec, ROLE_DEFAULTS, f"{where}.{role}")
    if spec["optimizer"] is not None:
      _choice(spec["optimizer"], ROLE_OPTIMIZERS, f"{where}.{role}.optimizer")
    _number(spec["lr_mult"], f"{where}.{role}.lr_mult")
    _number(spec["weight_decay"], f"{where}.{role}.weight_decay", optional=True)
    out[role] = spec
  return out


def _check_pairs(pairs, where: str, second: str) -> list[tuple]:
  pairs = list(_plain(pairs) or [])
  for i, pair in enumerate(pairs):
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
      raise ConfigError(f"{where}[{i}]: expected a (regex, {second}) pair, got {pair!r}")
    try:
      re.compile(pair[0])
    except re.error as e:
      raise ConfigError(f"{where}[{i}]: {pair[0]!r} is not a valid regex: {e}") from None
  return [tuple(p) for p in pairs]


def _axes(value, where: str) -> tuple[int, ...]:
  axes = (value,) if isinstance(value, Integral) else value
  if not (isinstance(axes, (list, tuple)) and axes and all(isinstance(a, Integral) for a in axes)):
    raise ConfigError(f"{where}: expected an axis or a list of axes, got {value!r}")
  return tuple(int(a) for a in axes)


def _check_muon_axes(pairs, where: str) -> list[tuple[str, tuple, tuple]]:
  out = []
  for i, (pattern, dims) in enumerate(_check_pairs(pairs, where, "(reduction_axes, output_axes)")):
    if not (isinstance(dims, (list, tuple)) and len(dims) == 2):
      raise ConfigError(f"{where}[{i}]: expected (reduction_axes, output_axes), e.g. (0, (1, 2)); got {dims!r}")
    out.append((pattern, _axes(dims[0], f"{where}[{i}]"), _axes(dims[1], f"{where}[{i}]")))
  return out


def _check_width(value, where: str) -> dict | None:
  if value is None or value is False:
    return None
  ws = _keys(value, WIDTH_DEFAULTS, where)
  _number(ws["base_width"], f"{where}.base_width", lo=0, lo_open=True, integer=True)
  _number(ws["lr_exponent"], f"{where}.lr_exponent")
  _number(ws["wd_exponent"], f"{where}.wd_exponent")
  ws["roles"] = _roles_list(ws["roles"], f"{where}.roles")
  return ws


def _check_nap(value, where: str) -> dict | None:
  if value is None or value is False:
    return None
  nap = _keys({} if value is True else value, NAP_DEFAULTS, where)
  _number(nap["every"], f"{where}.every", lo=1, integer=True)
  nap["roles"] = _roles_list(nap["roles"], f"{where}.roles")
  nap["norm_roles"] = _roles_list(nap["norm_roles"], f"{where}.norm_roles")
  return nap


def check(config, where: str = "optimizer") -> dict:
  """The validated config as a plain dict with every default filled in; raises ConfigError (one line naming
  the key, e.g. `optimizer.roles.gian`, and the valid choices) on anything wrong. See `check_schedule`."""
  cfg = _keys(config, DEFAULTS, where)
  _choice(cfg["name"], OPTIMIZERS, f"{where}.name")
  _number(cfg["learning_rate"], f"{where}.learning_rate", lo_open=True)
  _number(cfg["adam_learning_rate"], f"{where}.adam_learning_rate", lo_open=True)
  _number(cfg["weight_decay"], f"{where}.weight_decay")
  for key in ("b1", "b2", "muon_beta"):
    _number(cfg[key], f"{where}.{key}", hi=1.0)
  _number(cfg["eps"], f"{where}.eps", lo_open=True)
  _number(cfg["ns_steps"], f"{where}.ns_steps", lo=1, integer=True)
  _number(cfg["consistent_rms"], f"{where}.consistent_rms", lo_open=True, optional=True)
  _choice(cfg["schedule"], SCHEDULES, f"{where}.schedule")
  _number(cfg["warmup_steps"], f"{where}.warmup_steps", integer=True)
  _number(cfg["min_lr_ratio"], f"{where}.min_lr_ratio", hi=1.0)
  _number(cfg["grad_clip_norm"], f"{where}.grad_clip_norm", lo_open=True, optional=True)
  cfg["roles"] = _check_roles(cfg["roles"], f"{where}.roles")
  cfg["role_rules"] = _check_pairs(cfg["role_rules"], f"{where}.role_rules", "role")
  for i, (_, role) in enumerate(cfg["role_rules"]):
    _choice(role, ROLES, f"{where}.role_rules[{i}]")
  cfg["muon_axes"] = _check_muon_axes(cfg["muon_axes"], f"{where}.muon_axes")
  cfg["width_scaling"] = _check_width(cfg["width_scaling"], f"{where}.width_scaling")
  cfg["nap"] = _check_nap(cfg["nap"], f"{where}.nap")
  return cfg


def check_schedule(cfg: dict, total_steps: int | None, where: str = "optimizer") -> None:
  """A decaying schedule needs `total_steps`, and the warmup must end before it."""
  if total_steps is not None:
    _number(total_steps, "total_steps", lo=1, integer=True)
  if cfg["schedule"] != "constant":
    if total_steps is None:
      raise ConfigError(f"{where}.schedule: {cfg['schedule']!r} decays over the run; pass "
                        f"make(..., total_steps=N) or use schedule='constant'")
    if cfg["warmup_steps"] >= total_steps:
      raise ConfigError(f"{where}.warmup_steps: {cfg['warmup_steps']} must be < total_steps={total_steps}")


def schedule(cfg: dict, peak: float, total_steps: int | None = None):
  """The learning rate at step t (optax counts from 0): linear warmup from 0, then the decay, W = warmup_steps,
  T = total_steps, m = min_lr_ratio · peak:

      t < W:   peak · t / W
      cosine:  m + (peak − m) · ½(1 + cos(π (t − W)/(T − W)))      (m after T)
      linear:  peak + (m − peak) · (t − W)/(T − W)                  (m after T)
      constant: peak

  A constant schedule with no warmup is returned as a float, so optax keeps no step counter for it.
  """
  w, end = cfg["warmup_steps"], cfg["min_lr_ratio"] * peak
  if cfg["schedule"] == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, w, total_steps, end)
  if cfg["schedule"] == "constant":
    return float(peak) if w == 0 else optax.warmup_constant_schedule(0.0, peak, w)
  decay = optax.linear_schedule(peak, end, total_steps - w)
  return decay if w == 0 else optax.join_schedules([optax.linear_schedule(0.0, peak, w), decay], [w])
