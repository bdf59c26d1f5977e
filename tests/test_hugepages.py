"""experiments/hugepages.py: when the entry points rerun themselves with glibc's huge-page tunable, and what it does."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from experiments import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNABLE = "glibc.malloc.hugetlb"


def _applies() -> bool:
  return (sys.platform.startswith("linux")
          and hugepages.tunables_with_huge_pages({}, platform.libc_ver(), hugepages.thp_mode()) is not None)


needs_madvise_glibc = pytest.mark.skipif(not _applies(), reason="needs Linux, glibc >= 2.35 and THP in madvise mode")


@pytest.mark.parametrize("environ, libc, mode, expected", [
    ({}, ("glibc", "2.36"), "madvise", f"{TUNABLE}=1"),
    ({}, ("glibc", "2.35"), "madvise", f"{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, ("glibc", "2.39"), "madvise",
     f"glibc.malloc.arena_max=4:{TUNABLE}=1"),
    ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, ("glibc", "2.36"), "madvise", None),       # the user's choice stands
    ({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=4:{TUNABLE}=1"}, ("glibc", "2.36"), "madvise", None),
    ({}, ("glibc", "2.34"), "madvise", None),         # no such tunable before 2.35
    ({}, ("glibc", "2.4"), "madvise", None),
    ({}, ("", ""), "madvise", None),                  # musl, or a libc platform cannot name
    ({}, ("glibc", "2.36"), "always", None),          # large mappings get huge pages already
    ({}, ("glibc", "2.36"), "never", None),
    ({}, ("glibc", "2.36"), None, None),              # no THP in this kernel
])
def test_tunables_with_huge_pages(environ, libc, mode, expected):
  assert hugepages.tunables_with_huge_pages(environ, libc, mode) == expected


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(path)) == "always"
  path.write_text("garbled\n")
  assert hugepages.thp_mode(str(path)) is None
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def _run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  environ.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env)
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=environ, capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr
  return done


RERUN = """
    import os, sys
    print("start", flush=True)
    from experiments import hugepages
    hugepages.rerun_with_huge_pages()
    print("tunables", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


@needs_madvise_glibc
def test_rerun_sets_the_tunable_once_and_keeps_the_command():
  out = _run(RERUN, "--workdir", "runs/x")
  # the first run printed "start" and was replaced; the rerun printed "start" again and went on, exactly once
  assert out.stdout.splitlines() == ["start", "start", f"tunables {TUNABLE}=1 ['--workdir', 'runs/x']"]


@needs_madvise_glibc
def test_rerun_respects_the_users_choice():
  out = _run(RERUN, GLIBC_TUNABLES=f"{TUNABLE}=0")
  assert out.stdout.splitlines() == ["start", f"tunables {TUNABLE}=0 []"]
  out = _run(RERUN, GLIBC_TUNABLES="glibc.malloc.arena_max=8")
  assert out.stdout.splitlines()[-1] == f"tunables glibc.malloc.arena_max=8:{TUNABLE}=1 []"


FAULTS = """
    import resource
    import jax, jax.numpy as jnp
    # A (6000, 8) x (8, 6000) product, summed: XLA writes the 144 MB product as a temporary at every call.
    f = jax.jit(lambda a, b: jnp.sum(jnp.dot(a, b)))
    a, b = jnp.ones((6000, 8)), jnp.ones((8, 6000))
    f(a, b).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      total = f(a, b).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5, float(total))
"""


@needs_madvise_glibc
def test_huge_pages_cut_the_page_faults_of_large_temporaries():
  """The reason for the rerun, on a program whose temporaries glibc maps afresh at every call: 4 KiB pages fault
  in one by one (~35,000 a call for 144 MB), huge pages 2 MiB at a time."""
  plain = [float(x) for x in _run(FAULTS).stdout.split()]
  huge = [float(x) for x in _run(FAULTS, GLIBC_TUNABLES=f"{TUNABLE}=1").stdout.split()]
  assert plain[1] == huge[1] == 6000 * 6000 * 8       # the same result
  assert plain[0] > 20_000, plain                     # a fresh mapping of the 144 MB product at every call
  assert huge[0] < plain[0] / 10, (huge, plain)
