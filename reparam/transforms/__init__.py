"""The transforms, one small file each, and `from_spec`: build one from config data (names and numbers)."""
from __future__ import annotations

import ast
import inspect
from typing import Any, Mapping

from reparam.core import ConfigError, Reparam, chain, identity
from reparam.transforms.dora import dora
from reparam.transforms.lora import lora
from reparam.transforms.multipliers import multipliers
from reparam.transforms.weight_norm import weight_norm

FACTORIES = {"identity": identity, "weight_norm": weight_norm, "lora": lora, "dora": dora,
             "multipliers": multipliers}


def _call(name: str, kwargs: Mapping[str, Any], where: str) -> Reparam:
  if name == "chain":
    raise ConfigError(f"{where}: write a chain as a list of transforms or as 'chain(t1(...), t2(...))'")
  if name not in FACTORIES:
    raise ConfigError(f"{where}: unknown transform {name!r}; valid: {', '.join(sorted(FACTORIES))}")
  params = inspect.signature(FACTORIES[name]).parameters
  for key in kwargs:
    if key not in params:
      raise ConfigError(f"{where}: {name}() has no option {key!r}; valid: {', '.join(params)}")
  missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
  if missing:
    raise ConfigError(f"{where}: {name}() needs {', '.join(missing)} (e.g. {name}({missing[0]}=4))")
  try:
    return FACTORIES[name](**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {name}(): {e}") from None


def _chain(stages: list[Reparam], where: str) -> Reparam:
  """`chain(*stages)`, its refusal of no stages (an empty list or 'chain()') named by the config key."""
  if not stages:
    raise ConfigError(f"{where}: chain needs at least one transform, e.g. 'chain(weight_norm, multipliers(row=True))'"
                      f", or 'none' for no transform")
  return chain(*stages)


def _from_ast(node: ast.AST, where: str) -> Reparam:
  if isinstance(node, ast.Name):
    return _call(node.id, {}, where)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    if node.func.id == "chain" and not node.keywords:
      return _chain([_from_ast(a, where) for a in node.args], where)
    if node.args:
      raise ConfigError(f"{where}: pass {node.func.id}() options by name, e.g. {node.func.id}(rank=4)")
    try:
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ConfigError(f"{where}: {node.func.id}() options must be literals (numbers, strings, tuples)") from None
    return _call(node.func.id, kwargs, where)
  raise ConfigError(f"{where}: expected a transform like 'dora(rank=4)', got {ast.unparse(node)!r}")


def from_spec(spec: Any, where: str = "transform") -> Reparam | None:
  """A transform from config data. `where` names the config key in error messages.

  Accepted: `None`, `"none"` or `"keep"` (leave the leaf alone); a name (`"weight_norm"`); a call string
  (`"dora(rank=4, alpha=8)"`, `"chain(dora(rank=4), multipliers(row=True))"`); a dict
  (`{"name": "dora", "rank": 4}`); a list or tuple of any of these (a chain).
  """
  if spec is None or (isinstance(spec, str) and spec.strip() in ("none", "keep")):
    return None
  if isinstance(spec, Reparam):
    return spec
  if isinstance(spec, str):
    try:
      tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
      raise ConfigError(f"{where}: cannot parse {spec!r}; write e.g. 'dora(rank=4)'") from None
    return _from_ast(tree, where)
  if isinstance(spec, Mapping):
    kwargs = dict(spec)
    if "name" not in kwargs:
      raise ConfigError(f"{where}: a transform dict needs a 'name'; valid: {', '.join(sorted(FACTORIES))}")
    return _call(kwargs.pop("name"), kwargs, where)
  if isinstance(spec, (list, tuple)):
    stages = [from_spec(s, f"{where}[{i}]") for i, s in enumerate(spec)]
    if any(s is None for s in stages):
      raise ConfigError(f"{where}: 'none' cannot be a stage of a chain")
    return _chain(stages, where)
  raise ConfigError(f"{where}: expected a transform name, call string, dict or list, got {type(spec).__name__}")


def rules_from_spec(spec: Any, where: str = "reparam.rules") -> list[tuple[str, Reparam | None]]:
  """Rules from config data: a list of `(regex, transform spec)` pairs, or a mapping regex -> spec."""
  items = list(spec.items()) if isinstance(spec, Mapping) else list(spec or [])
  rules = []
  for i, item in enumerate(items):
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
      raise ConfigError(f"{where}[{i}]: expected a (regex, transform) pair, got {item!r}")
    rules.append((item[0], from_spec(item[1], f"{where}[{i}]")))
  return rules
