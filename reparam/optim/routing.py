"""Routing: the optimizer, peak learning rate and weight decay of every leaf of rparams, decided by its role.

Defaults per role (see `reparam.roles`):

    matrix                                    -> `name` (Muon or AdamW), weight decay `weight_decay`
    embedding, head, gain, multiplier,
    bias, norm, lowrank                       -> AdamW, no weight decay
    frozen                                    -> optax.set_to_zero(): no update, no optimizer state

Muon is for hidden matrices only (Jordan et al. 2024; Muon on embeddings and the output head is empirically
worse), learnable multipliers are trained with Adam and no decay even when their matrix uses Muon (Velikanov et
al. 2026), and LoRA/DoRA factors use AdamW as in their papers. `roles` overrides any of this per role.

Muon dimension numbers (which axes form the matrix Muon orthogonalizes), from the leaf's *parameter* path (a
wrapped weight `Dense_0/kernel/w` is looked up as `Dense_0/kernel`), first match wins:
  1. `muon_axes` overrides `(regex, (reduction_axes, output_axes))`;
  2. rank-3 `.../(query|key|value)/kernel`, Flax DenseGeneral `(D, heads, head_dim)`: reduction 0, output (1, 2);
  3. rank-3 `.../out/kernel`, `(heads, head_dim, D)`: reduction (0, 1), output 2;
  4. any other rank >= 2 leaf: reduction = every axis but the last, output = the last (Dense `(in, out)`,
     Conv `(H, W, in, out)`).

Width scaling (Fan et al. 2025, "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning",
arXiv:2510.15262), for AdamW leaves of the `width_scaling.roles` (default `matrix`) of rank >= 2:

    lr = lr_base · (base_width / d)^lr_exponent,     wd = wd_base · (d / base_width)^wd_exponent

with d the leaf's **fan-in**: the product of its reduction axes above (Dense: `in`; Conv: `H·W·in`; attention
query: `D`; attention out: `heads·head_dim`). The defaults (1, 0.5) are the paper's: the μP rule η ∝ 1/d and
λ ∝ √d (optax's decay, like PyTorch's, is multiplied by the lr). Muon leaves are not rescaled: Muon already
scales its update by the matrix shape.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

import jax
from optax.contrib import MuonDimensionNumbers

from reparam import core
from reparam.core import ConfigError, flatten, path_str
from reparam.optim.config import check

ATTN_IN = r"(.*/)?(query|key|value)/kernel"
ATTN_OUT = r"(.*/)?out/kernel"


class Route(NamedTuple):
  """Where one leaf of rparams goes. `lr_mult` is `lr` over its optimizer's base lr (role × width scaling)."""
  path: str                 # path in rparams
  param: str                # the parameter path (a wrapped weight's path without its trailing "/w")
  shape: tuple
  role: str
  optimizer: str            # "adamw" | "muon" | "frozen"
  lr: float                 # peak learning rate (the schedule multiplies it)
  lr_mult: float
  weight_decay: float
  label: str                # its optax.partition label
  muon_dims: Optional[MuonDimensionNumbers] = None
  fan_in: Optional[int] = None


def param_paths(rules, rparams) -> dict[str, str]:
  """rparams path -> parameter path: `Dense_0/kernel/w -> Dense_0/kernel`; factors and plain leaves keep theirs."""
  def on_wrapped(path, t, factors, w):
    return {core.WEIGHT: path,
            **jax.tree_util.tree_map_with_path(lambda p, _: f"{path}/{path_str(p)}", factors)}
  return flatten(core._map_wrapped(core._compile(rules), rparams, on_wrapped, lambda path, x: path))


def muon_dims(param: str, shape: tuple, overrides=(), where: str = "optimizer") -> MuonDimensionNumbers:
  """The Muon dimension numbers of a rank >= 2 leaf (see the module docstring)."""
  ndim = len(shape)
  for i, (pattern, red, out) in enumerate(overrides):
    if re.fullmatch(pattern, param):
      ok = all(-ndim <= a < ndim for a in red + out) and not {a % ndim for a in red} & {a % ndim for a in out}
      if not ok:
        raise ConfigError(f"{where}.muon_axes[{i}]: axes {red} / {out} do not fit {param} of shape {shape}")
      return MuonDimensionNumbers(red, out)
  if ndim == 3 and re.fullmatch(ATTN_IN, param):
    return MuonDimensionNumbers((0,), (1, 2))
  if ndim == 3 and re.fullmatch(ATTN_OUT, param):
    return MuonDimensionNumbers((0, 1), (2,))
  return MuonDimensionNumbers(tuple(range(ndim - 1)), (ndim - 1,))


def _role_settings(cfg: dict, role: str) -> tuple[str, float, float]:
  """(optimizer, lr multiplier, weight decay) of a role: its default, then `roles` overrides."""
  opt = {"matrix": cfg["name"], "frozen": "frozen"}.get(role, "adamw")
  wd = cfg["weight_decay"] if role == "matrix" else 0.0
  spec = cfg["roles"].get(role, {})
  opt = spec.get("optimizer") or opt
  wd = wd if spec.get("weight_decay") is None else spec["weight_decay"]
  return opt, float(spec.get("lr_mult", 1.0)), float(wd)


def _route(cfg: dict, path: str, param: str, shape: tuple, role: str, where: str) -> Route:
  opt, lr_mult, wd = _role_settings(cfg, role)
  if opt == "frozen":
    return Route(path, param, shape, role, "frozen", 0.0, 0.0, 0.0, role)
  ws = cfg["width_scaling"]
  scaled = ws is not None and opt == "adamw" and role in ws["roles"] and len(shape) >= 2
  dims = fan_in = None
  if opt == "muon" or scaled:
    if len(shape) < 2:
      key = f"roles.{role}.optimizer" if cfg["roles"].get(role, {}).get("optimizer") else "role_rules"
      raise ConfigError(f"{where}.{key}: {path} (role {role}, shape {shape}) cannot use Muon, which needs "
                        f"rank >= 2; valid for it: adamw, frozen")
    dims = muon_dims(param, shape, cfg["muon_axes"], where)
    fan_in = math.prod(shape[a] for a in dims.reduction_axis)
  label = role
  if scaled:
    ratio = ws["base_width"] / fan_in
    lr_mult, wd = lr_mult * ratio ** ws["lr_exponent"], wd * ratio ** -ws["wd_exponent"]
    label = f"{role}_fan_in_{fan_in}"
  base = cfg["learning_rate"] if opt == "muon" or cfg["name"] == "adamw" else cfg["adam_learning_rate"]
  return Route(path, param, shape, role, opt, base * lr_mult, lr_mult, wd, label,
               dims if opt == "muon" else None, fan_in)


def _roles(cfg: dict, rules, rparams, where: str):
  try:
    return core.roles(rules, rparams, cfg["role_rules"])
  except ConfigError as e:
    if cfg["role_rules"] and str(e).startswith("role rule"):
      raise ConfigError(f"{where}.role_rules: {e}") from None
    raise


def routes(cfg: dict, rules, rparams, where: str = "optimizer") -> dict[str, Route]:
  """The Route of every leaf, keyed by rparams path, in tree order; `cfg` is a checked config."""
  role_of = flatten(_roles(cfg, rules, rparams, where))
  param_of = param_paths(rules, rparams)
  out = {path: _route(cfg, path, param_of[path], tuple(x.shape), role_of[path], where)
         for path, x in flatten(rparams).items()}
  for i, (pattern, _, _) in enumerate(cfg["muon_axes"]):
    if not any(re.fullmatch(pattern, p) for p in param_of.values()):
      raise ConfigError(f"{where}.muon_axes[{i}]: {pattern!r} matches no parameter; parameter paths are: "
                        + ", ".join(list(dict.fromkeys(param_of.values()))[:8]))
  return out


def routing(config, rules, rparams, where: str = "optimizer") -> dict[str, Route]:
  """`routes` from a raw config (dict or ConfigDict): what `make` builds and `describe` prints."""
  return routes(check(config, where), rules, rparams, where)


def labels(table: dict[str, Route], rparams):
  """The optax.partition label tree: shaped like rparams, one label string per leaf."""
  return jax.tree_util.tree_map_with_path(lambda p, _: table[path_str(p)].label, rparams)
