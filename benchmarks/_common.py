"""Timing discipline and the LeNet problem shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from anisonoise.models import LeNet, lenet_patches, reference_lenet_logits


def environment() -> dict:
  """Machine, device and versions, printed and stored with every result."""
  import flax
  try:  # only solver_overhead.py needs it (the bench extra)
    import matfree
  except ImportError:
    matfree = None

  info = {
      "machine": platform.machine(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "matfree": getattr(matfree, "__version__", "?") if matfree else None,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
  }
  return info


def timeit(fn, *args, repeats: int = 5, warmup: bool = True) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` runs after a warm-up
  (compilation) run, or none with ``warmup=False`` (for functions compiled
  ahead of time); every result is waited for with ``block_until_ready``."""
  if warmup:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def gd(loss_fn, params, batch, steps, lr=0.1):
  """``steps`` full-batch GD steps: a Python loop over one jitted step
  (in a ``lax.scan`` the plain-convolution LeNet's 500 steps took over 15
  minutes on the 2-core CPU, where XLA:CPU runs convolutions inside loops
  several times slower)."""

  @jax.jit
  def step(p, b):
    g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
    return jax.tree.map(lambda a, d: a - lr * d, p, g)

  for _ in range(steps):
    params = step(params, batch)
  return jax.block_until_ready(params)


def lenet_images(n: int = 1200, seed: int = 0):
  """``(images (n, 28, 28, 1) in [-1, 1], labels, description)``.

  The paper's corrupted Fashion-MNIST training set (``n // 6`` random labels)
  when the data is installed, else random images of the same shape and
  uniform labels (timings depend on shapes only).
  """
  from anisonoise import data

  try:
    images, labels = data.load_fashion_mnist("train")
    s = data.corrupted_training_set(images, labels, num_clean=n - n // 6,
                                    num_corrupt=n // 6, seed=seed)
    return s.x, s.y, "Fashion-MNIST, corrupted labels"
  except data.DataError:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(n, 28, 28, 1)).astype(np.float32)
    return images, rng.integers(0, 10, size=n), "random images (no data)"


def lenet_problem(n: int = 1200, seed: int = 0, with_info: bool = False,
                  plain_conv: bool = False):
  """(loss_fn, params, batch) for the paper's LeNet on ``n`` images (see
  :func:`lenet_images`); with ``with_info`` also a dict with the images,
  labels and a description of the data. ``plain_conv``: the same network
  as a user writes it (``lax.conv`` and ``max_pool``,
  :func:`anisonoise.models.reference_lenet_logits`) on the images."""
  images, labels, what = lenet_images(n, seed)
  model = LeNet(nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jnp.asarray(images)
  batch = {"x": x if plain_conv else lenet_patches(x),
           "y": jnp.asarray(labels)}

  def loss_fn(params, b):
    net = nnx.merge(graphdef, params)
    logits = reference_lenet_logits(net, b["x"]) if plain_conv else net(
        b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  if with_info:
    return loss_fn, params, batch, {"images": images, "labels": labels,
                                    "data": what}
  return loss_fn, params, batch


def mlp_problem(x, labels, hidden: int, activation=jax.nn.relu, seed: int = 0):
  """(loss_fn, params, batch) of a one-hidden-layer MLP with 10 classes on
  inputs ``x`` (flattened to ``(n, d_in)``)."""
  x = jnp.asarray(np.asarray(x).reshape(len(x), -1))
  d_in = x.shape[1]
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w1": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
            "b2": jnp.zeros(10)}

  def loss_fn(p, b):
    h = activation(b["x"] @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["w2"] + p["b2"], b["y"])

  return loss_fn, params, {"x": x, "y": jnp.asarray(labels)}


def run_child(cmd: list[str], timeout: float | None = None,
              **failure: object) -> dict:
  """Runs a benchmark in a fresh process (its peak memory is its own) and
  returns the JSON object of its last output line, or ``failure`` with a
  ``failed`` entry saying why (the last line of its stderr, or the
  timeout)."""
  import subprocess
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
  except subprocess.TimeoutExpired:
    return dict(failure, failed=f"timed out after {timeout:.0f} s")
  if proc.returncode == 0:
    return json.loads(proc.stdout.strip().splitlines()[-1])
  why = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() \
      else f"exit {proc.returncode}"
  return dict(failure, failed=why)


def write_results(out: str, name: str, res: dict, table: str,
                  quiet: bool = False) -> None:
  """Writes ``name.json`` and ``name.md`` to ``out`` and prints the table
  (unless ``quiet``)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  if not quiet:
    print(table)
