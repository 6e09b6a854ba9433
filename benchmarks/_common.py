"""Timing discipline and the LeNet problem shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from anisonoise.models import LeNet, lenet_patches


def environment() -> dict:
  """Machine, device and versions, printed and stored with every result."""
  import flax
  import matfree

  info = {
      "machine": platform.machine(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "matfree": getattr(matfree, "__version__", "?"),
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
  }
  return info


def timeit(fn, *args, repeats: int = 5) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` runs after a warm-up
  (compilation) run; every result is waited for with ``block_until_ready``."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def lenet_problem(n: int = 1200, seed: int = 0):
  """(loss_fn, params, batch) for the paper's LeNet on ``n`` images.

  Random images of Fashion-MNIST's shape (pixels in [-1, 1], uniform labels):
  the timings depend on shapes only.
  """
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, size=(n, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=n)
  model = LeNet(nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {"x": lenet_patches(jnp.asarray(images)), "y": jnp.asarray(labels)}

  def loss_fn(params, b):
    logits = nnx.merge(graphdef, params)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, batch
