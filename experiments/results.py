"""What a run writes: JSON written atomically, JSONL metrics that survive a kill, read back leniently.

A file is either the old version or the new one, never half of each: JSON files are written to a temporary
name and renamed. JSONL rows are appended and flushed; a row cut short by a kill is skipped on reading, and on
resume every row past the restored step is dropped so the log matches an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

import numpy as np


def _plain(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  return x


def write_json(path: str, obj: Any, sort_keys: bool = True) -> None:
  """Atomic: readers see the previous file or the complete new one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(_plain(obj), f, indent=1, sort_keys=sort_keys)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def short_key(key: str) -> str:
  """`optimizer.learning_rate` -> `learning_rate`, `optimizer.name` -> `optimizer` (names in labels and paths)."""
  parts = key.split(".")
  return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def read_json(path: str, default: Any = None) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return default


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(_plain(row), sort_keys=True) + "\n")
    f.flush()


def read_jsonl(path: str) -> list[dict]:
  """All complete rows; a last line cut short by a kill is ignored."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  except FileNotFoundError:
    pass
  return rows


def truncate_jsonl(path: str, max_step: int) -> None:
  """Keeps the rows with `step <= max_step` (atomically), so a resumed run does not log a step twice."""
  if not os.path.exists(path):
    return
  rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
  with os.fdopen(fd, "w") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")
  os.replace(tmp, path)
