"""Transparent huge pages for XLA:CPU's temporaries, through glibc's `glibc.malloc.hugetlb` tunable.

XLA's CPU runtime allocates a program's temporaries at every call (`posix_memalign`) and frees them when the call
returns. glibc maps a block that large afresh each time, and the kernel zero-fills the new mapping 4 KiB at a
time: the benchmark LM's training step at 4096 tokens (d_model 256), with 443-547 MiB of temporaries, took
139,000-166,000 page faults per step. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc asks for transparent
huge pages on its mappings (`madvise`), 2 MiB each: 700-3,500 faults per step and steps 1-21% faster in ten of
ten processes, with the same peak memory (docs/performance.md, "Huge pages"). Programs whose temporaries are
small enough for glibc's heap (the 128-token steps, the quickstart) do not change.

glibc reads its tunables once, when a process starts, so `python -m experiments.train` and `python -m
experiments.sweep` run themselves again with the tunable set (`rerun_with_huge_pages`) before importing JAX.
To opt out, set the tunable yourself: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"); None where there is none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def tunables_with_huge_pages(environ: Mapping[str, str], libc: tuple[str, str],
                             mode: Optional[str]) -> Optional[str]:
  """`GLIBC_TUNABLES` with `glibc.malloc.hugetlb=1` added, or None where adding it would do nothing or the user
  already chose: a libc other than glibc 2.35 or later (the tunable's first release), a kernel mode other than
  "madvise" ("always" already gives large mappings huge pages, "never" gives none), or `GLIBC_TUNABLES`
  naming the tunable already."""
  name, version = libc
  try:
    release = tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None
  if name != "glibc" or release < (2, 35) or mode != "madvise":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if f"{TUNABLE}=" in current:
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def rerun_with_huge_pages() -> None:
  """Replaces this process with the same command and `GLIBC_TUNABLES` from `tunables_with_huge_pages`; returns
  where that is None (as it is in the rerun) or the command cannot be run again. Call it first in `__main__`,
  before anything is imported or written."""
  if not sys.platform.startswith("linux") or not sys.executable:
    return
  tunables = tunables_with_huge_pages(os.environ, platform.libc_ver(), thp_mode())
  if tunables is None:
    return
  before = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  except OSError:       # an optimization only: go on as we are
    if before is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = before
