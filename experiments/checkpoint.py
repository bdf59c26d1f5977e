"""Orbax checkpoints of the whole training state, with a fall-back when the latest one is unreadable.

orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
no half-written step behind. A finished step can still be damaged later (a truncated copy, a full disk, a bad
sync); then the run says so, moves the damaged step aside (`<step>.unreadable`, nothing is deleted) and resumes
from the newest step that does restore.

orbax does not notice every kind of damage: a flipped byte inside a compressed data file can decode to wrong
numbers without any error. So each step also records a CRC-32 of every leaf (in orbax's step metadata, written
atomically with the step), and a restored state whose checksums differ is treated as unreadable too. Their
keys, the saved leaves' paths, also tell an intact step of another state tree (saved by another version of the
code) from a damaged one: that is refused with an error, and nothing is moved.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from reparam.core import ConfigError, flatten


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def checksums(state) -> dict[str, int]:
  """CRC-32 of each leaf's bytes, keyed by its path (a host copy: checkpoints are rare, the state small)."""
  return {path: zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
          for path, x in flatten(jax.device_get(state)).items()}


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  # StandardSave/StandardRestore with a target: optax's NamedTuple states come back as NamedTuples.
  mgr.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata={"crc32": checksums(state)})


def _restore_step(path: str, abstract):
  """One step, read without the manager: a manager that once met a damaged step (e.g. one whose item
  directory is gone) infers a different layout and then fails on every good step and on the next save."""
  with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
    expected = (json.load(f).get("custom_metadata") or {}).get("crc32")
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    state = ckptr.restore(os.path.join(path, "default"), args=ocp.args.StandardRestore(abstract))
  if expected is not None:            # None: a checkpoint written before checksums existed
    got = checksums(state)
    bad = [k for k in expected if got.get(k) != expected[k]] + [k for k in got if k not in expected]
    if bad:
      raise ValueError(f"checksum mismatch in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
  return state


def _collect_quietly() -> None:
  """After a failed read orbax leaves the reads it never awaited; collected later, each prints a ~60-line
  'Exception ignored' traceback that would bury the one-line warning. Collect them now, silently."""
  hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def brief(message: str, limit: int = 120) -> str:
  """The first sentence of the first line, cut at a word boundary with "…" if still longer than `limit`:
  TensorStore's messages go on with "See full TensorStore details: <bound method ...>" and a whole spec."""
  line = (message.strip().splitlines() or [""])[0]
  head, dot, _ = line.partition(". ")
  line = head + "." if dot else line
  if len(line) <= limit:
    return line
  window = line[:limit + 1]           # a space right after the limit ends a whole word
  cut = window.rsplit(" ", 1)[0] if " " in window else line[:limit - 1]
  return cut.rstrip(" ,;:") + "…"


def _saved_paths(path: str) -> set[str] | None:
  """The leaf paths a step holds, from its checksums; None where unknown (unreadable, or saved without them)."""
  try:
    with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
      crc = (json.load(f).get("custom_metadata") or {}).get("crc32")
  except (OSError, ValueError, AttributeError):      # damaged: left to the restore below to report
    return None
  return set(crc) if isinstance(crc, dict) else None


def check_same_tree(path: str, like) -> None:
  """Refuses, moving nothing, a step that holds another state tree than `like`: a checkpoint saved by another
  version of the code (e.g. before DoRA cached ‖K₀‖₀² as the factor `k0_sq`) is intact, not damaged, and
  taking it for damage would move every step aside and start the run over."""
  saved = _saved_paths(path)
  here = set(flatten(like))
  if saved is None or saved == here:
    return
  show = lambda paths: ", ".join(sorted(paths)[:3]) + (" ..." if len(paths) > 3 else "") or "none"
  raise ConfigError(f"checkpoint {path} holds another training state than this code builds (leaves only there: "
                    f"{show(saved - here)}; only here: {show(here - saved)}): it was saved by another version "
                    "of reparam or of the model; resume it with that version, or use a new workdir")


def restore_latest(mgr: ocp.CheckpointManager, like, max_step: int | None = None, log=logging.warning):
  """Restores the newest readable step (at most `max_step`) into the structure of `like`.

  Returns `(state, step)`, or `(like, 0)` when there is none. A step of another state tree is refused
  (`check_same_tree`); a damaged one is moved aside and the one before it tried.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  for step in sorted((s for s in mgr.all_steps() if max_step is None or s <= max_step), reverse=True):
    path = os.path.join(str(mgr.directory), str(step))
    check_same_tree(path, like)
    try:
      return _restore_step(path, abstract), step
    except Exception as e:  # noqa: BLE001  any failure to read a step means: try the one before
      error = f"{type(e).__name__}: {brief(str(e))}"
    _collect_quietly()
    log(f"checkpoint step {step} is unreadable ({error}); moved to {path}.unreadable, trying the previous one")
    if os.path.isdir(path):
      os.replace(path, f"{path}.unreadable")
    mgr.reload()
  return like, 0
