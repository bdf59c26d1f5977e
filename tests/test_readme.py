"""The README's example runs as written and does what it says."""
import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def block_after(marker: str) -> str:
  text = README.read_text()
  return re.search(re.escape(marker) + r"\s*```\w*\n(.*?)```", text, re.S).group(1)


def test_readme_example_trains_and_merges():
  code = block_after("<!-- example -->")
  assert len(code.strip().splitlines()) <= 25
  scope = {}
  exec(compile(code, "README example", "exec"), scope)
  model, rules, rp, params, x = (scope[k] for k in ("model", "rules", "rparams", "params", "x"))
  assert set(rp["Dense_0"]["kernel"]) == {"w", "dora", "multipliers"}
  assert np.any(rp["Dense_0"]["kernel"]["dora"]["B"])                   # trained away from init
  np.testing.assert_allclose(model.apply({"params": params}, x),
                             model.apply({"params": scope["reparam"].materialize(rules, rp)}, x), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(params) == jax.tree.structure(model.init(jax.random.key(0), x)["params"])


def test_ci_runs_the_readme_test_command():
  ci = (README.parent / ".ci" / "run").read_text()
  assert "<!-- test-command -->" in ci and "pytest" in block_after("<!-- test-command -->")
