"""Orbax checkpoints of the whole training state, with a fall-back when the latest one is unreadable.

orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
no half-written step behind. A finished step can still be damaged later (a truncated copy, a full disk, a bad
sync); then the run says so, moves the damaged step aside (`<step>.unreadable`, nothing is deleted) and resumes
from the newest step that does restore.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  # StandardSave/StandardRestore with a target: optax's NamedTuple states come back as NamedTuples.
  mgr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(mgr: ocp.CheckpointManager, like, max_step: int | None = None, log=logging.warning):
  """Restores the newest readable step (at most `max_step`) into the structure of `like`.

  Returns `(state, step)`, or `(like, 0)` when there is none.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  for step in sorted((s for s in mgr.all_steps() if max_step is None or s <= max_step), reverse=True):
    try:
      return mgr.restore(step, args=ocp.args.StandardRestore(abstract)), step
    except Exception as e:  # noqa: BLE001  any failure to read a step means: try the one before
      path = os.path.join(str(mgr.directory), str(step))
      log(f"checkpoint step {step} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
          f"moved to {path}.unreadable, trying the previous one")
      if os.path.isdir(path):
        os.replace(path, f"{path}.unreadable")
      mgr.reload()
  return like, 0
