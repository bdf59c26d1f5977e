"""notebooks/colab.ipynb: valid nbformat-4 JSON and valid Python; the configs and datasets it names exist and are
the ones the configs use; and the exact sweep command it builds runs (smoke variant, `--dry_run`)."""
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import types

import pytest

from experiments import data, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab.ipynb")
OFFLINE = ("digits", "markov")          # data that needs no TFDS preparation


def load() -> dict:
  with open(NOTEBOOK) as f:
    return json.load(f)


def source(cell) -> str:
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells() -> list[str]:
  return [source(c) for c in load()["cells"] if c["cell_type"] == "code"]


def as_python(code: str) -> str:
  """IPython lines (`!shell`, `%magic`) become `pass` at their indentation, so a block they sit in stays a block."""
  return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line) for line in code.splitlines())


def cell(title: str) -> str:
  """The code cell whose Colab form title is `title`."""
  found = [c for c in code_cells() if f"# @title {title}\n" in c + "\n"]
  assert len(found) == 1, f"no single cell titled {title!r}"
  return found[0]


def built(paper: str, variant: str, workdir: str, data_dir: str = "/data", extra: str = "") -> dict:
  """The namespace after the form cell and the command cell, with these form values (as a user would set)."""
  scope: dict = {}
  exec(cell("Sweep, variant and directories"), scope)
  scope.update(PAPER=paper, VARIANT=variant, USE_DRIVE=False, WORKDIR=workdir, DATA_DIR=data_dir,
               EXTRA_FLAGS=extra, DEVICE_COUNT=1)
  exec(cell("Build the sweep command"), scope)
  return scope


def sweeps() -> dict:
  return built("quickstart", "full", "/tmp/unused")["SWEEPS"]


def config_module(paper: str):
  return importlib.import_module("configs." + paper)


def variant_arg(paper: str, smoke: bool):
  return "smoke" if smoke and paper != "quickstart" else None


def expanded(paper: str, smoke: bool, **data_overrides) -> list[dict]:
  m, arg = config_module(paper), variant_arg(paper, smoke)
  config = m.get_config(arg)
  config.data.update(data_overrides)      # what a `--config.data.x=...` flag does to the sweep's base config
  return sweep.expand(config, m.get_sweep(arg), "/tmp/unused")


def test_notebook_is_valid_nbformat_4():
  nb = load()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = [c.get("id") for c in nb["cells"]]
  if nb["nbformat_minor"] >= 5:                      # 4.5 made cell ids required and unique
    assert all(isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    assert len(set(ids)) == len(ids)
  for c in nb["cells"]:
    assert c["cell_type"] in ("markdown", "code", "raw") and isinstance(c["metadata"], dict)
    assert isinstance(c["source"], str) or all(isinstance(s, str) for s in c["source"])
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None     # committed without outputs
    else:
      assert "outputs" not in c and "execution_count" not in c
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds[0] == "markdown" and kinds.count("code") >= 6


def test_notebook_validates_against_the_nbformat_schema_when_installed():
  nbformat = pytest.importorskip("nbformat")
  nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


def test_every_code_cell_is_python_without_its_ipython_lines():
  cells = code_cells()
  for i, code in enumerate(cells):
    compile(as_python(code), f"code cell {i}", "exec")
  shell = [line for c in cells for line in c.splitlines() if line.lstrip().startswith("!")]
  assert any("pip install" in line for line in shell) and any("tfds build" in c for c in cells)


def test_install_keeps_the_preinstalled_accelerator_jax():
  install = cell("Clone and install")
  assert re.search(r'^REPO_URL = "[^"]+"\s+# @param', install, re.M)
  pip = [line for line in install.splitlines() if "pip install" in line]
  assert pip and all("-c /content/jax_constraints.txt" in line and "-e" in line for line in pip)
  for code in code_cells():      # nothing installs jax without its accelerator extra
    assert not re.search(r"pip install[^\n]*\bjax\b(?!\[)", code)
  assert "jaxlib" in install and "libtpu" in install and "jax-cuda12-plugin" in install


def test_form_choices_are_the_configs_the_notebook_names():
  form = cell("Sweep, variant and directories")
  papers = json.loads(re.search(r"^PAPER = .*# @param (\[.*\])$", form, re.M).group(1))
  assert papers == list(sweeps())
  assert json.loads(re.search(r"^VARIANT = .*# @param (\[.*\])$", form, re.M).group(1)) == ["full", "smoke"]
  text = "".join(source(c) for c in load()["cells"])
  mentioned = set(re.findall(r"configs/(\w+)\.py", text))
  assert mentioned == set(papers)
  for paper in mentioned:
    path, _, _ = sweeps()[paper]
    assert path == f"configs/{paper}.py" and os.path.exists(os.path.join(ROOT, path))
    for smoke in (False, True):
      m, arg = config_module(paper), variant_arg(paper, smoke)
      assert m.get_sweep(arg) and m.get_config(arg).data.name


@pytest.mark.parametrize("paper", ["weight_norm", "dora", "multipliers", "nap", "quickstart"])
def test_tfds_datasets_are_the_ones_the_full_sweep_reads(paper):
  import tensorflow_datasets as tfds
  _, full, _ = sweeps()[paper]
  assert sorted({t["config"].data.name for t in expanded(paper, False)} - set(OFFLINE)) == sorted(full)
  assert {t["config"].data.name for t in expanded(paper, True)} <= set(OFFLINE)   # smoke: nothing to build
  for name in full:
    assert name in data.NAMES and tfds.builder_cls(name).name == name            # `tfds build NAME` knows it
  smoke, fullcmd = built(paper, "smoke", "/w"), built(paper, "full", "/w", data_dir="/d")
  assert smoke["TFDS_DATASETS"] == [] and fullcmd["TFDS_DATASETS"] == full
  assert ("--config.data.dir=/d" in fullcmd["SWEEP_ARGS"]) == bool(full)


@pytest.mark.parametrize("paper", ["weight_norm", "dora", "multipliers", "nap"])
def test_data_dir_override_reaches_every_trial(paper):
  """The notebook passes the data_dir once, on the command line: no trial of get_sweep() may set it back."""
  trials = expanded(paper, False, dir="/prepared")
  assert trials and all(t["config"].data.dir == "/prepared" for t in trials)


@pytest.mark.parametrize("paper", ["weight_norm", "dora", "multipliers", "nap", "quickstart"])
def test_vmap_seeds_where_the_config_docstring_uses_it(paper):
  doc = config_module(paper).__doc__
  full = re.search(rf"python -m experiments\.sweep --config configs/{paper}\.py (.*)", doc).group(1)
  _, _, vmap = sweeps()[paper]
  assert vmap == ("--vmap_seeds" in full)
  assert ("--vmap_seeds" in built(paper, "full", "/w")["SWEEP_ARGS"]) == vmap
  assert "--vmap_seeds" not in built(paper, "smoke", "/w")["SWEEP_ARGS"]   # the smoke docstrings run without


def run(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
  """The notebook's commands, all started at once (each is mostly imports): every paper's smoke variant with
  `--dry_run` as its dry-run cell runs it, and weight_norm's full variant against an empty data_dir."""
  tmp = tmp_path_factory.mktemp("nb")
  procs, workdirs = {}, {}
  for paper in sweeps():
    workdirs[paper] = str(tmp / paper)
    procs[paper] = run(shlex.split(built(paper, "smoke", workdirs[paper])["SWEEP"]) + ["--dry_run"])
  os.makedirs(tmp / "empty_tfds")
  full = built("weight_norm", "full", str(tmp / "full"), data_dir=str(tmp / "empty_tfds"))
  procs["full"], workdirs["full"] = run(shlex.split(full["SWEEP"])), str(tmp / "full")
  out = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
  return out, workdirs, tmp


def test_dry_run_and_sweep_cells_run_the_built_command():
  cells = [c.strip() for c in code_cells()]
  assert "!{SWEEP} --dry_run" in cells and "!{SWEEP}" in cells


@pytest.mark.parametrize("paper", ["weight_norm", "dora", "multipliers", "nap", "quickstart"])
def test_smoke_command_dry_runs(commands, paper):
  out, workdirs, _ = commands
  code, stdout, stderr = out[paper]
  assert code == 0, stderr[-2000:]
  n = len(config_module(paper).get_sweep(variant_arg(paper, True)))
  assert stdout.strip().splitlines()[-1] == f"{n} of {n} trials in shard 0/1"
  assert not os.path.exists(workdirs[paper])          # a dry run writes nothing


def test_full_command_reads_the_notebooks_data_dir(commands):
  """Unprepared data fails in the sweep's up-front check, naming the notebook's data_dir: the flag got there."""
  out, workdirs, tmp = commands
  code, _, stderr = out["full"]
  assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
  assert "data.name='cifar10': not prepared under " + str(tmp / "empty_tfds") in stderr
  assert not os.path.exists(workdirs["full"])


def test_report_cell_shows_each_linked_plot_where_it_is_linked(tmp_path, monkeypatch):
  shown = []
  display = types.ModuleType("IPython.display")
  display.Markdown = lambda text: ("md", text)
  display.Image = lambda filename: ("image", os.path.basename(filename))
  display.display = lambda *objs: shown.extend(objs)
  monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
  monkeypatch.setitem(sys.modules, "IPython.display", display)
  report = tmp_path / "report"
  report.mkdir()
  (report / "report.md").write_text("# Sweep\n\n![Loss](loss.png)\n\n| a |\n\n![Lr](lr.png)\n")
  for png in ("loss.png", "lr.png", "extra.png"):
    (report / png).write_bytes(b"\x89PNG")
  exec(cell("Show the report"), {"RUN_DIR": str(tmp_path)})
  assert [x for x in shown if x[0] == "image"] == [("image", "loss.png"), ("image", "lr.png"),
                                                   ("image", "extra.png")]
  assert shown[:3] == [("md", "# Sweep\n\n"), ("image", "loss.png"), ("md", "\n\n| a |\n\n")]
  assert not any("![" in x[1] for x in shown if x[0] == "md")
