"""Entry-point plumbing shared by train, sweep and report: flags, one-line errors, `--debug` for tracebacks.

A researcher who mistypes `--config.optimzer.lr` should read one line that names the key and the fix, not a
40-line traceback; `--debug` brings the traceback back. Anything that fails while the flags and config are
parsed is bad input; afterwards only `ConfigError` and unreadable paths are, and everything else is a bug
whose traceback we want to see.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Callable, Sequence

from absl import flags

from reparam.core import ConfigError

flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
flags.DEFINE_bool("compilation_cache", True, "Keep compiled XLA programs on disk (see `compilation_cache`), so "
                  "the seeds of a sweep and a resumed run do not compile them again.")

CACHE_MAX_BYTES = 2 * 2**30      # JAX evicts the least recently used programs beyond this

INPUT_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                IsADirectoryError)


def _unquote(line: str) -> str:
  line = line.strip()
  return line[1:-1].strip() if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line


def one_line(e: BaseException) -> str:
  """The message of `e` on one line; ml_collections' KeyError "did you mean" hints are kept."""
  msg = str(e)
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  if "Traceback (most recent call last)" in msg:   # config_flags wraps an error in get_config with its traceback
    head, _, trace = msg.partition("Traceback (most recent call last)")
    head = head.strip().removesuffix("Error whilst parsing config file:").strip()
    msg = f"{head} {trace.strip().splitlines()[-1]}"
  # KeyError's message is a quoted repr: unquote whole lines only, so "... base 10: 'ten'" keeps its quote
  lines = [_unquote(line) for line in msg.splitlines() if _unquote(line)]
  if isinstance(e, KeyError) and lines:
    lines[0] = f"no such config key {lines[0]!r}"
  return "; ".join(lines) or type(e).__name__


def check_workdir(path: str) -> None:
  """A workdir that cannot be created or written fails now, not after minutes of set-up."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={path!r} is a file, not a directory")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f"--workdir={path!r} cannot be created: {parent!r} is a file, not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={path!r} is not writable: no write permission on {parent!r}")
  check_run_dir(path)


def check_run_dir(path: str) -> None:
  """A run directory damaged outside the run fails now, with its path: a `checkpoints` that is a file fails
  inside orbax's background thread with a traceback. (An unreadable config.json is refused by
  `train._check_resumable`, which in-process calls go through too.)"""
  ckpt = os.path.join(path, "checkpoints")
  if os.path.exists(ckpt) and not os.path.isdir(ckpt):
    raise ConfigError(f"{ckpt!r} is a file, not the run's checkpoint directory: move it away or use a new --workdir")


def _config_file(argv: Sequence[str], name: str) -> str | None:
  """The `path[:arg]` given to --name, as typed."""
  m = re.search(rf"--{name}[= ](\S+)", " ".join(argv))
  return m.group(1) if m else None


def _lacks_get_config(file: str | None) -> bool:
  """True when the config file never mentions get_config: config_flags' AttributeError is then about it, not
  about something get_config itself did."""
  try:
    with open(file.partition(":")[0]) as f:
      return "get_config" not in f.read()
  except (OSError, AttributeError):
    return False


def _unknown_key(argv: Sequence[str], name: str) -> str | None:
  """config_flags reports `--config.optimizer.lr=1` (a key the config lacks) as a bare `'lr'`: the flag, the
  missing key and what its level does have, from the config file loaded again (None if that fails too)."""
  text, file = " ".join(argv), _config_file(argv, name)
  if not file:
    return None
  try:
    path, _, arg = file.partition(":")
    spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    node = module.get_config(*([arg] if arg else []))
  except Exception:  # noqa: BLE001  only a better message is at stake
    return None
  for dotted in re.findall(rf"--{name}\.([\w.]+)", text):
    level = node
    for i, part in enumerate(dotted.split(".")):
      where = ".".join(dotted.split(".")[:i]) or "the config"
      if not hasattr(level, "keys"):
        return f"--{name}.{dotted}: {where} is a value, not a group"
      if part not in level:
        return f"--{name}.{dotted}: no such config key {part!r}; {where} has: {', '.join(sorted(level))}"
      level = level[part]
  return None


def _unloaded_config(name: str) -> str | None:
  """config_flags keeps a config file it could not load (missing, unreadable) as a placeholder that raises
  only when first used, deep inside the run; its error, on one line, or None."""
  value = flags.FLAGS[name].value
  if type(value).__name__ != "_ErrorConfig":
    return None
  error = object.__getattribute__(value, "_error")
  last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
  return f"--{name}: cannot load the config file: {last}"


def compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache, unless `--nocompilation_cache`, in a directory of ours unless the
  user chose one (`JAX_COMPILATION_CACHE_DIR`); returns the directory in use. Every program is kept, however fast
  it compiled, unless `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise.

  The seeds of a configuration compile identical programs: with the cache, 8 sequential quickstart runs took
  15 s instead of 40 s here. It lives in the user's cache directory, not the workdir (a refused rerun must leave
  the workdir untouched), one folder per host: a CPU executable compiled on one machine of a shared home
  directory need not run on another."""
  import socket

  import jax
  if not flags.FLAGS.compilation_cache:
    return None
  # Small programs are most of a run's compile time: keep them all, in the user's directory too, unless the user
  # set the threshold (JAX's default, 1 s, kept only the programs that happened to compile slowly).
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  path = os.path.join(root, "reparam", f"jax-{socket.gethostname()}")
  jax.config.update("jax_compilation_cache_dir", path)
  try:
    import filelock  # noqa: F401  JAX needs it to bound the cache; without it every read warns on stderr
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  except ImportError:
    pass
  return path


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Parses flags and runs `main(argv)`; bad input exits with status 2 and one line on stderr."""
  argv = list(sys.argv if argv is None else argv)
  debug = "--debug" in argv or "--debug=true" in argv
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  anything raised while parsing flags and overrides is bad input
    if debug:
      raise
    message = one_line(e)
    if isinstance(e, AttributeError) and _lacks_get_config(_config_file(argv, "config")):  # config_flags names no file
      message = f"--config={_config_file(argv, 'config')}: the file defines no get_config(arg=None)"
    unknown = _unknown_key(argv, "config") if isinstance(e, (KeyError, AttributeError)) else None
    if unknown:           # keep ml_collections' "Did you mean" hint
      message = "; ".join([unknown] + [p for p in message.split("; ") if p.startswith("Did you mean")])
    fail(message)
  for name in flags.FLAGS:
    error = _unloaded_config(name)
    if error and not debug:
      fail(error)
  try:
    code = main(rest)
  except INPUT_ERRORS as e:
    if debug:
      raise
    fail(one_line(e))
  sys.exit(code or 0)
