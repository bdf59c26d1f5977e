"""Entry-point plumbing shared by train, sweep and report: flags, one-line errors, `--debug` for tracebacks.

A researcher who mistypes `--config.optimzer.lr` should read one line that names the key and the fix, not a
40-line traceback; `--debug` brings the traceback back. Anything that fails while the flags and config are
parsed is bad input; afterwards only `ConfigError` and unreadable paths are, and everything else is a bug
whose traceback we want to see.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

from reparam.core import ConfigError

flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")

INPUT_ERRORS = (ConfigError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def one_line(e: BaseException) -> str:
  """The message of `e` on one line; ml_collections' KeyError "did you mean" hints are kept."""
  msg = str(e)
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  lines = [line.strip(" '\"") for line in msg.splitlines() if line.strip(" '\"")]
  if isinstance(e, KeyError) and lines:
    lines[0] = f"no such config key {lines[0]!r}"
  return "; ".join(lines) or type(e).__name__


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
    fail(one_line(e))
  try:
    code = main(rest)
  except INPUT_ERRORS as e:
    if debug:
      raise
    fail(one_line(e))
  sys.exit(code or 0)
