"""Shared test set-up: CPU, float32 matmuls at full precision, so references in float64 can be tight."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
