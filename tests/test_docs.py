"""The documentation's relative links: every file they name exists, and every `#anchor` is a heading there."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, '-' and spaces kept),
  spaces to '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
  found, seen = set(), {}
  for line in FENCE.sub("", page.read_text()).splitlines():
    m = re.match(r"#{1,6} (.+)", line)
    if m:
      a = anchor(m.group(1))
      found.add(a if a not in seen else f"{a}-{seen[a]}")    # GitHub numbers repeated headings
      seen[a] = seen.get(a, 0) + 1
  return found


def links(page: pathlib.Path):
  for target in LINK.findall(FENCE.sub("", page.read_text())):
    if not re.match(r"[a-z]+:", target):      # http(s), mailto: not checked (no network here)
      yield target


def test_anchor_follows_github():
  assert anchor("Huge pages (tenth session of 2026-12-07): adopted") == "huge-pages-tenth-session-of-2026-12-07-adopted"
  assert anchor("Kernels and traffic of the compiled step (`benchmarks/hlo_traffic.py`)") == \
      "kernels-and-traffic-of-the-compiled-step-benchmarkshlo_trafficpy"
  assert anchor("On a GPU (H100 and H200)") == "on-a-gpu-h100-and-h200"


def broken_links(page: pathlib.Path) -> list[str]:
  broken = []
  for target in links(page):
    path, _, frag = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      broken.append(f"{target}: no such file")
    elif frag and dest.suffix == ".md" and frag not in anchors(dest):
      broken.append(f"{target}: no heading with that anchor in {dest.name}")
  return broken


def test_broken_links_are_found(tmp_path):
  (tmp_path / "other.md").write_text("# Other\n## A section (2026)\n")
  page = tmp_path / "page.md"
  page.write_text("# Page\n[ok](other.md#a-section-2026) [ok](#page) [gone](missing.md) [bad](other.md#b)\n"
                  "[bad](#nowhere) [web](https://example.com/x#y)\n```\n[in a fence](nothing.md)\n```\n")
  assert broken_links(page) == ["missing.md: no such file", "other.md#b: no heading with that anchor in other.md",
                                "#nowhere: no heading with that anchor in page.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
  broken = broken_links(page)
  assert not broken, f"{page.name}: " + "; ".join(broken)
