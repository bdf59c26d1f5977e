"""The training loop end to end: smoke per model, accuracy on digits, kill-and-resume, devices, clear errors."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import serialization

from conftest import fake_prepared

import reparam
from configs import common, quickstart
from experiments import results, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, steps=2):
  config.train.update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps, diagnostics_every=1,
                      progress=False, tensorboard=False)
  config.data.update(batch_size=8, eval_batch_size=16)
  config.optimizer.warmup_steps = 0
  return config


def load_params(workdir):
  with open(os.path.join(workdir, "params.msgpack"), "rb") as f:
    return serialization.msgpack_restore(f.read())


@pytest.mark.parametrize("dataset,model", [("mnist", "mlp"), ("cifar10", "cnn"), ("tiny_shakespeare",
                                                                                    "transformer")])
def test_one_step_smoke_per_model_on_mock_data(tmp_path, dataset, model):
  c = tiny(common.base("smoke"))
  c.data.name, c.model.name = dataset, model
  c.model.update(width=0.125, depth=1, d_model=16, num_heads=2, num_layers=1)
  c.data.seq_len = 8
  c.reparam.transform = "chain(weight_norm, multipliers(row=True))"
  c.data.dir = str(tmp_path / "tfds")
  fake_prepared(dataset, c.data.dir)
  with tfds.testing.mock_data(num_examples=32, data_dir=c.data.dir):
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["done"] and np.isfinite(result["eval_loss"]) and result["steps"] == 2
  diag = results.read_jsonl(os.path.join(tmp_path, "run", "diagnostics.jsonl"))
  assert len(diag) == 2 and any(k.endswith("/sigma_max") for k in diag[0])
  assert any(k.endswith("multipliers/row/mean") for k in diag[0])
  assert os.path.exists(os.path.join(tmp_path, "run", "routing.txt"))


def test_200_steps_on_digits_reach_90_percent(tmp_path):
  c = quickstart.get_config("steps=200")
  c.train.update(progress=False, tensorboard=False)
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result["eval_accuracy"] >= 0.90, result
  rows = results.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows[0]["train_loss"] > 3 * rows[-1]["train_loss"]


def run_cli(args, env=None, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  proc = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
  return proc


SHORT = ["--config", "configs/quickstart.py:steps=60", "--config.train.checkpoint_every=10",
         "--config.train.progress=False", "--config.train.tensorboard=False",
         "--config.reparam.transform=chain(weight_norm, multipliers(row=True))"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["step:30", "save:30"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, fault):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  run_cli(SHORT + ["--workdir", full])
  proc = run_cli(SHORT + ["--workdir", killed], env={"REPARAM_FAULT": fault}, check=False)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(killed, "result.json"))
  run_cli(SHORT + ["--workdir", killed])
  a, b = reparam.flatten(load_params(full)), reparam.flatten(load_params(killed))
  assert list(a) == list(b) and len(a) == 6
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows]
  assert strip(results.read_jsonl(os.path.join(full, "metrics.jsonl"))) == strip(
      results.read_jsonl(os.path.join(killed, "metrics.jsonl")))
  assert results.read_json(os.path.join(full, "result.json")) == results.read_json(
      os.path.join(killed, "result.json"))


@pytest.mark.slow
def test_eight_devices_give_the_loss_of_one(tmp_path):
  args = ["--config", "configs/quickstart.py:steps=20", "--config.train.progress=False",
          "--config.train.tensorboard=False", "--config.reparam.transform=weight_norm"]
  run_cli(args + ["--workdir", str(tmp_path / "one")])
  run_cli(args + ["--workdir", str(tmp_path / "eight")],
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  one = results.read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
  eight = results.read_jsonl(str(tmp_path / "eight" / "metrics.jsonl"))
  assert len(one) == len(eight) > 3
  for r1, r8 in zip(one, eight):
    for k in ("train_loss", "eval_loss", "eval_accuracy"):
      if k in r1:
        np.testing.assert_allclose(r8[k], r1[k], rtol=2e-5, atol=1e-6, err_msg=f"{k} at step {r1['step']}")


@pytest.mark.parametrize("args,message", [
    (["--config.optimzer.learning_rate=0.1"], "no such config key 'optimzer'"),
    (["--config.data.name=imagenet"], "data.name='imagenet' is not one of: digits, markov"),
    (["--config.reparam.transform=dropconnect"], "reparam.transform: unknown transform 'dropconnect'"),
    (["--config.train.steps=-5"], "train.steps=-5 must be a positive integer"),
    (["--config.optimizer.name=sgd"], "optimizer.name"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "run"
  proc = run_cli(["--config", "configs/quickstart.py", "--workdir", str(workdir), *args], check=False)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
  assert not workdir.exists()


def test_config_json_records_the_resolved_config(tmp_path):
  c = tiny(quickstart.get_config(), steps=3)
  train.train_and_evaluate(c, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["optimizer"]["name"] == "adamw" and saved["train"]["steps"] == 3


def test_compiled_programs_are_cached_per_host_outside_the_workdir(tmp_path):
  """The command line keeps XLA programs in the user's cache directory (one folder per host), not in the
  workdir; --nocompilation_cache turns it off; a directory the user chose (JAX_COMPILATION_CACHE_DIR) wins."""
  args = ["--config", "configs/quickstart.py:steps=4", "--config.train.progress=False",
          "--config.train.tensorboard=False"]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  run_cli([*args, "--workdir", str(tmp_path / "a")], env=env)
  folders = os.listdir(tmp_path / "xdg" / "reparam")
  assert folders == [f"jax-{socket.gethostname()}"] and os.listdir(tmp_path / "xdg" / "reparam" / folders[0])
  assert not any(".jax" in name or "cache" in name for name in os.listdir(tmp_path / "a"))
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg2")
  run_cli([*args, "--workdir", str(tmp_path / "b"), "--nocompilation_cache"], env=env)
  assert not os.path.exists(tmp_path / "xdg2")
  run_cli([*args, "--workdir", str(tmp_path / "c")], env={**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
  assert os.listdir(tmp_path / "mine") and not os.path.exists(tmp_path / "xdg2")


def test_nonfinite_leaves_flags_each_bad_leaf_as_numpy_does():
  """The step's per-leaf finiteness flags (big leaves screened by their sums, small ones as one concatenation,
  both confirmed element by element) against numpy on each leaf alone: big and small leaves, bf16, NaN and inf,
  all finite, finite leaves whose sums overflow, and vmapped over seeds."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  shapes = [(train.SMALL + 1,), (3, 4), (), (train.SMALL,), (7,), (2, train.SMALL)]
  base = [rng.normal(size=s).astype(np.float32) for s in shapes]
  flags = jax.jit(train.nonfinite_leaves)

  def check(leaves):
    want = [not np.isfinite(np.asarray(x, np.float32)).all() for x in leaves]
    assert flags(leaves).tolist() == want
    assert train.nonfinite_leaves(leaves, screen=False).tolist() == want
    return want

  assert check([jnp.asarray(x) for x in base]) == [False] * len(shapes)
  # Finite but huge: every sum overflows to ±inf (the screen's false alarm), and the exact check clears them all.
  huge = [np.full(s, 3e38 if i % 2 else -3e38, np.float32) for i, s in enumerate(shapes)]
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.sum(huge[0], dtype=np.float32))
  assert check(huge) == [False] * len(shapes)
  for bad in ([1, 4], [0], [2, 5], [3]):
    leaves = [x.copy() for x in base]
    for i in bad:
      leaves[i].reshape(-1)[rng.integers(leaves[i].size)] = np.nan if i % 2 else np.inf
    leaves[1] = jnp.asarray(leaves[1], jnp.bfloat16)     # a bf16 leaf keeps its NaN or inf
    assert [i for i, b in enumerate(check(leaves)) if b] == bad
  seeds = [[x.copy() for x in base] for _ in range(3)]
  seeds[1][4][2] = np.nan
  stacked = [np.stack(xs) for xs in zip(*seeds)]
  for screen in (True, False):            # a vmapped step checks unscreened (`make_train_step(vmapped=True)`)
    got = jax.jit(jax.vmap(lambda ls: train.nonfinite_leaves(ls, screen=screen)))(stacked)
    assert got.tolist() == [[False] * 6, [False] * 4 + [True, False], [False] * 6]


@pytest.mark.parametrize("clip", [None, 1.0])
def test_step_flags_the_trained_leaves_whose_gradients_are_nonfinite(clip):
  """NaN in one example: the step's `bad_leaves` are the trained leaves whose gradient (computed here,
  independently of the step) is non-finite: the kernels and the head's bias, not the hidden biases (ReLU's
  gradient at a NaN input is 0), and not the head's kernel, frozen by a role rule though its gradient is NaN.
  Without clipping the step reads the updated values, and exactly the flagged leaves came out non-finite; with
  `grad_clip_norm` every trained leaf's update is non-finite (the global norm is NaN), which is why it reads
  the gradients there."""
  import jax
  import jax.numpy as jnp
  c = tiny(quickstart.get_config("steps=2"))
  c.optimizer.update(grad_clip_norm=clip, role_rules=(("head/kernel", "frozen"),))
  s = train.build(c)
  state = train.init_state(s)
  batch = {k: jnp.asarray(v) for k, v in s.dataset.batch(0, c.data.batch_size, c.seed).items()}
  batch["x"] = batch["x"].at[3].set(jnp.nan)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def loss_fn(rp):
    logits, _ = s.forward(rp, state["collections"], batch["x"], True, rng)
    return train.loss_and_accuracy(logits, batch["y"])[0]

  grads = reparam.flatten(jax.grad(loss_fn)(state["rparams"]))
  nonfinite = {p for p, g in grads.items() if not np.all(np.isfinite(np.asarray(g, np.float64)))}
  assert nonfinite == {"Dense_0/kernel", "Dense_1/kernel", "head/kernel", "head/bias"}
  new = jax.jit(train.make_train_step(s))(state, batch)
  flagged = {p for p, b in zip(reparam.flatten(s.rparams), np.asarray(new["bad_leaves"])) if b}
  assert flagged == nonfinite - {"head/kernel"}
  assert int(new["bad_step"]) == 1
  updated = {p for p, x in reparam.flatten(new["rparams"]).items() if not np.all(np.isfinite(np.asarray(x)))}
  assert train.watched_leaves(s)[1] == bool(clip)
  assert updated == (set(grads) - {"head/kernel"} if clip else flagged)


@pytest.mark.parametrize("fast_path", [True, False])
def test_nap_step_projects_lazily_and_gives_the_eager_numbers(fast_path):
  """The training step keeps NaP's unprojected q and computes with c·q: three steps give the weights of the
  eager projection (`projection="deferred"`, which writes them), while the stored values are off their norms;
  the step compiles once."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  c = tiny(quickstart.get_config(), steps=3)
  c.reparam.transform, c.model.norm, c.optimizer.nap, c.train.fast_path = "multipliers(row=True)", "layer", True, fast_path
  c.optimizer.update(weight_decay=0.1, learning_rate=0.05)
  s = train.build(c)
  eager = dataclasses.replace(s, tx=reparam.optim.make(c.optimizer, s.rules, s.rparams, total_steps=c.train.steps,
                                                       projection="deferred"))
  lazy_step, eager_step = (jax.jit(train.make_train_step(x)) for x in (s, eager))
  lazy, ref = train.init_state(s), train.init_state(eager)
  for i in range(3):
    batch = {k: jnp.asarray(v) for k, v in s.dataset.batch(i, c.data.batch_size, c.seed).items()}
    lazy, ref = lazy_step(lazy, batch), eager_step(ref, batch)
    np.testing.assert_allclose(float(lazy["sums"]["loss"]), float(ref["sums"]["loss"]), rtol=1e-5)
  assert lazy_step._cache_size() == 1
  got, want, stored = (reparam.flatten(t) for t in (train.weights(lazy), ref["rparams"], lazy["rparams"]))
  norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))
  init = reparam.flatten(s.rparams)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=2e-5, atol=1e-6, err_msg=path)
  kernels = [p for p in want if p.endswith(("kernel", "kernel/w"))]
  assert kernels and all(abs(norm(got[p]) / norm(init[p]) - 1) < 1e-5 for p in kernels)
  assert all(abs(norm(stored[p]) / norm(init[p]) - 1) > 1e-4 for p in kernels)


def test_train_space_reaches_the_fast_path(monkeypatch):
  """`--config.train.space` is what the training step's forward passes to `reparam.apply`."""
  import jax
  from experiments import setup
  seen, real = [], reparam.apply

  def recording(*args, space, **kwargs):
    seen.append(space)
    return real(*args, space=space, **kwargs)
  monkeypatch.setattr(reparam, "apply", recording)
  for space in ("auto", "activation"):
    c = tiny(quickstart.get_config())
    c.train.space, c.reparam.transform = space, "weight_norm"
    s = setup.build(c)
    logits, _ = s.forward(s.rparams, s.collections, s.dataset.batch(0, 8, 0)["x"], False, jax.random.key(0))
    assert np.isfinite(np.asarray(logits)).all()
  assert seen == ["auto", "activation"]


# ------------------------------------------------------------------------------------------ compilation

def test_init_compiled_at_level_1_gives_the_default_bits():
  """`setup.INIT_COMPILER_OPTIONS` compiles the model's init faster; its parameters must be bit for bit those
  of XLA's default optimization level (the MLP of the quickstart, the CNN of the weight-norm paper)."""
  import jax
  from configs import weight_norm
  from experiments import setup
  for config in (quickstart.get_config(), weight_norm.get_config("smoke=True")):
    s = setup.build(config)
    x = s.dataset.batch(0, 2, 0)["x"]
    init = lambda k, x: s.model.init({"params": k, "dropout": k}, x, train=False)
    outs = [jax.jit(init, compiler_options=opts)(jax.random.key(3), x) for opts in (None, setup.INIT_COMPILER_OPTIONS)]
    for a, b in zip(*(jax.tree.leaves(o) for o in outs)):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_eval_and_diagnostics_compile_once_ahead_of_their_first_use(tmp_path):
  """`train.compile_ahead` compiles the evaluation and diagnostics programs while the step compiles; their first
  real calls must find them compiled (a warm-up shaped or sharded otherwise would compile each twice): one
  compilation of each program in a run, for one seed and for a vmapped group of two. The eval split (297 digits
  in batches of 16) ends with a shorter batch: a second eval program, also compiled ahead."""
  import jax
  compiled = []

  def listener(event, duration, fun_name=None, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(fun_name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    configs = [tiny(quickstart.get_config(), steps=3) for _ in range(3)]
    configs[2].seed = 1
    train.train_and_evaluate(configs[0], str(tmp_path / "one"))
    assert [compiled.count(f"jit({f})") for f in ("step_fn", "eval_step", "layer_stats")] == [1, 2, 1], compiled
    compiled.clear()
    train.train_seeds(configs[1:], [str(tmp_path / "a"), str(tmp_path / "b")])
    names = ("step_fn", "eval_step_of_seeds", "layer_stats_of_seeds")
    assert [compiled.count(f"jit({f})") for f in names] == [1, 2, 1], compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_four_vmapped_seeds_under_weight_norm_finish(tmp_path):
  """Four vmapped seeds of the quickstart MLP under weight norm, diagnostics at every step. On the 2-core test
  machine this hung for ever at the first diagnostics when they were vmapped (jaxlib's batched SVDs waited on
  XLA's thread pool from inside it; see `train._map_seeds`). In a subprocess with a time limit, so that a hang
  fails this test rather than stalling the suite."""
  code = (
      "import sys; from configs import quickstart; from experiments import train\n"
      "cs = [quickstart.get_config('steps=3') for _ in range(4)]\n"
      "for i, c in enumerate(cs):\n"
      "  c.seed = i; c.reparam.transform = 'weight_norm'\n"
      "  c.train.update(diagnostics_every=1, progress=False, tensorboard=False)\n"
      "train.train_seeds(cs, [sys.argv[1] + f'/{i}' for i in range(4)])\n")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                 check=True, timeout=300, capture_output=True)
  for i in range(4):
    rows = results.read_jsonl(str(tmp_path / str(i) / "diagnostics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    sigmas = [v for r in rows for k, v in r.items() if k.endswith("/sigma_max")]
    assert len(sigmas) == 3 * 3 and np.isfinite(sigmas).all() and min(sigmas) > 0
