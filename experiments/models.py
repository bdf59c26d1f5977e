"""The models of the experiments (Flax linen): `make(config, dataset)` dispatches on `config.name`.

Every module is `__call__(x, train=False) -> logits` (float32). Parameter paths are stable, since rules match them:

    mlp          Dense_{i}/kernel, Dense_{i}/bias, norm_{i}/{scale,bias}, head/{kernel,bias}
    cnn          Conv_{i}/kernel, Conv_{i}/bias, norm_{i}/{scale,bias}, head/{kernel,bias}
    transformer  embed/embedding, block_{i}/{attn_norm,query,key,value,out,mlp_norm,mlp_in,mlp_out}/...,
                 final_norm/..., head/kernel

`norm` goes before each nonlinearity; a Dense/Conv followed by a norm with an offset (layer, batch, mean-only
batch) has no bias, since the norm's offset replaces it (and a redundant bias would confuse Normalize-and-Project).
"batch" and "mean_only_batch" keep running statistics in the `batch_stats` collection: train with
`model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})`; eval (`train=False`)
reads the running averages and needs no rng.

Config keys (None means the default):
    mlp:          hidden (64, 64), act "relu", norm None
    cnn:          width 1.0, depth 3, act "leaky_relu", norm None, dropout 0.5, input_noise 0.15
    transformer:  d_model 128, num_heads 4, num_layers 2, mlp_ratio 4, norm "layer", use_bias False,
                  dtype "float32" (compute dtype; parameters are always float32)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reparam.core import ConfigError

NAMES = ("mlp", "cnn", "transformer")
NORMS = (None, "layer", "rms", "batch", "mean_only_batch")
WITH_OFFSET = ("layer", "batch", "mean_only_batch")
ACTS: dict[str, Callable] = {"relu": nn.relu, "gelu": nn.gelu, "tanh": nn.tanh, "silu": nn.silu,
                             "leaky_relu": lambda x: nn.leaky_relu(x, 0.1)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BN_MOMENTUM = 0.9     # flax's 0.99 is too slow for runs of a few hundred steps


class MeanOnlyBatchNorm(nn.Module):
  """y = x - mean_batch(x) + b per channel: batch norm without the variance division (Salimans & Kingma 2016).

  The companion of weight norm: weight norm fixes each unit's scale, this centres it. In eval, the running mean.
  """
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool = False):
    running = self.variable("batch_stats", "mean", lambda: jnp.zeros(x.shape[-1], jnp.float32))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    if train:
      mean = jnp.mean(x.astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
      if not self.is_initializing():
        running.value = self.momentum * running.value + (1 - self.momentum) * mean
    else:
      mean = running.value
    return (x - mean + bias).astype(x.dtype)


def _norm(kind: str | None, name: str, x, train: bool, dtype=jnp.float32):
  """Applies the norm `kind` as a submodule called `name` (inside a compact method); None is the identity."""
  if kind is None:
    return x
  if kind == "layer":
    return nn.LayerNorm(dtype=dtype, name=name)(x)
  if kind == "rms":
    return nn.RMSNorm(dtype=dtype, name=name)(x)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)(x)
  return MeanOnlyBatchNorm(name=name)(x, train)


class MLP(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (64, 64)
  act: str = "relu"
  norm: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x_BxD = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x_BxD = nn.Dense(width, use_bias=self.norm not in WITH_OFFSET, name=f"Dense_{i}")(x_BxD)
      x_BxD = ACTS[self.act](_norm(self.norm, f"norm_{i}", x_BxD, train))
    return nn.Dense(self.num_classes, name="head")(x_BxD)


class CNN(nn.Module):
  """The weight-norm paper's CIFAR-10 network (Salimans & Kingma 2016, appendix), width- and depth-scalable.

  noise(0.15) -> [conv3x3 96] x depth -> maxpool 2 -> dropout -> [conv3x3 192] x depth -> maxpool 2 -> dropout
  -> conv3x3 192 (valid where the map is at least 3x3) -> NiN 1x1 192 x 2 -> global mean pool -> dense.
  The input noise draws from the `dropout` rng stream, so one rng serves both.
  """
  num_classes: int
  width: float = 1.0
  depth: int = 3
  act: str = "leaky_relu"
  norm: str | None = None
  dropout: float = 0.5
  input_noise: float = 0.15

  def _conv(self, x, i: int, features: int, size: int, train: bool, padding="SAME"):
    x = nn.Conv(features, (size, size), padding=padding, use_bias=self.norm not in WITH_OFFSET, name=f"Conv_{i}")(x)
    return ACTS[self.act](_norm(self.norm, f"norm_{i}", x, train))

  @nn.compact
  def __call__(self, x, train: bool = False):
    x_BxHxWxC = x.astype(jnp.float32)
    if train and self.input_noise > 0:
      x_BxHxWxC = x_BxHxWxC + self.input_noise * jax.random.normal(self.make_rng("dropout"), x_BxHxWxC.shape)
    c1, c2 = max(1, round(96 * self.width)), max(1, round(192 * self.width))
    i = 0
    for features in (c1, c2):
      for _ in range(self.depth):
        x_BxHxWxC, i = self._conv(x_BxHxWxC, i, features, 3, train), i + 1
      x_BxHxWxC = nn.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2))
      x_BxHxWxC = nn.Dropout(self.dropout, deterministic=not train)(x_BxHxWxC)
    valid = min(x_BxHxWxC.shape[1:3]) >= 3       # 8x8 -> 6x6 on CIFAR; the 2x2 map of 8x8 digits keeps SAME
    x_BxHxWxC = self._conv(x_BxHxWxC, i, c2, 3, train, "VALID" if valid else "SAME")
    for j in (1, 2):
      x_BxHxWxC = self._conv(x_BxHxWxC, i + j, c2, 1, train)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x_BxHxWxC, axis=(1, 2)))


def sinusoidal(length: int, d: int) -> np.ndarray:
  """Transformer positions (Vaswani et al. 2017): no parameters, so no leaf for transforms or optimizers to route."""
  pos_Lx1 = np.arange(length)[:, None]
  freq = np.exp(-math.log(10000.0) * np.arange(0, d, 2) / d)
  out_LxD = np.zeros((length, d), np.float32)
  out_LxD[:, 0::2], out_LxD[:, 1::2] = np.sin(pos_Lx1 * freq), np.cos(pos_Lx1 * freq[: d // 2])
  return out_LxD


class Block(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)); every matrix a plain 2-D Dense kernel."""
  num_heads: int
  mlp_ratio: int
  norm: str
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD):
    b, length, d = x_BxLxD.shape
    h = self.num_heads
    dense = lambda features, name: nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype, name=name)
    y_BxLxD = _norm(self.norm, "attn_norm", x_BxLxD, False, self.dtype)
    q, k, v = (dense(d, n)(y_BxLxD).reshape(b, length, h, d // h) for n in ("query", "key", "value"))
    logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // h)
    causal_LxL = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal_LxL, logits_BxHxLxL, -1e30), axis=-1).astype(self.dtype)
    y_BxLxD = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
    x_BxLxD = x_BxLxD + dense(d, "out")(y_BxLxD)
    y_BxLxF = nn.gelu(dense(d * self.mlp_ratio, "mlp_in")(_norm(self.norm, "mlp_norm", x_BxLxD, False, self.dtype)))
    return x_BxLxD + dense(d, "mlp_out")(y_BxLxF)


class Transformer(nn.Module):
  """Pre-norm decoder-only LM: embed + sinusoidal positions, `num_layers` blocks, final norm, head."""
  vocab_size: int
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4
  norm: str = "layer"
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxL, train: bool = False):
    x_BxLxD = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name="embed")(tokens_BxL)
    x_BxLxD = x_BxLxD + sinusoidal(tokens_BxL.shape[1], self.d_model).astype(self.dtype)
    for i in range(self.num_layers):
      x_BxLxD = Block(self.num_heads, self.mlp_ratio, self.norm, self.use_bias, self.dtype, name=f"block_{i}")(x_BxLxD)
    x_BxLxD = _norm(self.norm, "final_norm", x_BxLxD, False, self.dtype)
    logits = nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=self.dtype, name="head")(x_BxLxD)
    return logits.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ config

def make(config, dataset) -> nn.Module:
  """The model `config.name` names, sized for `dataset` (its classes or vocabulary, its input)."""
  name = config.get("name") or "mlp"
  if name not in NAMES:
    raise ConfigError(f"model.name={name!r} is not one of: {', '.join(NAMES)}")
  wants = "lm" if name == "transformer" else "classification"
  if dataset.kind != wants:
    raise ConfigError(f"model.name={name!r} needs a {wants} dataset; data.name={dataset.name!r} is {dataset.kind}")
  return _BUILDERS[name](lambda key, default: _get(config, key, default), dataset)


def _get(config, key: str, default):
  value = config.get(key)
  return default if value is None else value


def _choice(get, key: str, choices, default):
  value = get(key, default)
  value = None if value in ("none", "") else value
  if value not in choices:
    raise ConfigError(f"model.{key}={value!r} is not one of: {', '.join(map(str, choices))}")
  return value


def _positive(get, key: str, default, kind=int):
  value = get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
    raise ConfigError(f"model.{key}={value!r} must be a positive {'number' if kind is float else 'integer'}")
  return value


def _mlp(get, dataset) -> MLP:
  hidden = get("hidden", (64, 64))
  hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
  if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
    raise ConfigError(f"model.hidden={hidden!r} must be a tuple of positive integers, e.g. (64, 64)")
  return MLP(dataset.num_classes, hidden, _choice(get, "act", tuple(ACTS), "relu"),
             _choice(get, "norm", NORMS, None))


def _cnn(get, dataset) -> CNN:
  if len(dataset.input_shape) != 3:
    raise ConfigError(f"model.name='cnn' needs (H, W, C) images; data.name={dataset.name!r} gives "
                      f"{dataset.input_shape}")
  dropout, noise = get("dropout", 0.5), get("input_noise", 0.15)
  if not 0 <= dropout < 1:
    raise ConfigError(f"model.dropout={dropout!r} must be in [0, 1)")
  if noise < 0:
    raise ConfigError(f"model.input_noise={noise!r} must be >= 0")
  return CNN(dataset.num_classes, float(_positive(get, "width", 1.0, float)), _positive(get, "depth", 3),
             _choice(get, "act", tuple(ACTS), "leaky_relu"), _choice(get, "norm", NORMS, None), dropout, noise)


def _transformer(get, dataset) -> Transformer:
  d, heads = _positive(get, "d_model", 128), _positive(get, "num_heads", 4)
  if d % heads:
    raise ConfigError(f"model.d_model={d} must be divisible by model.num_heads={heads}")
  return Transformer(dataset.num_classes, d, heads, _positive(get, "num_layers", 2), _positive(get, "mlp_ratio", 4),
                     _choice(get, "norm", ("layer", "rms"), "layer"), bool(get("use_bias", False)),
                     DTYPES[_choice(get, "dtype", tuple(DTYPES), "float32")])


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}
