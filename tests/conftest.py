"""Shared small models for dense float64 references.

x64 is enabled for the whole suite so that references can be exact; tests that
check float32 behaviour create float32 arrays explicitly.
"""

import gzip
import struct

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402


def linear_problem(n=40, d=8, seed=0, dtype=jnp.float64):
  """Least squares: l_i = 0.5 (x_i . w - y_i)^2, params a flat vector."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)
  y = x @ rng.normal(size=d) + rng.normal(size=n)
  batch = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}

  def loss_fn(w, b):
    return 0.5 * (b["x"] @ w - b["y"]) ** 2

  params = jnp.asarray(rng.normal(size=d) * 0.1, dtype)
  return loss_fn, params, batch


def logistic_problem(n=50, d=10, seed=1, dtype=jnp.float64):
  """Logistic regression with a dict of params (weights and bias)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
  batch = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}

  def loss_fn(p, b):
    z = b["x"] @ p["w"] + p["b"]
    return jnp.logaddexp(0.0, z) - b["y"] * z

  params = {"w": jnp.asarray(rng.normal(size=d) * 0.3, dtype),
            "b": jnp.asarray(0.1, dtype)}
  return loss_fn, params, batch


def mlp_problem(n=30, d_in=5, hidden=16, classes=3, seed=2,
                dtype=jnp.float64):
  """Tiny tanh MLP with softmax cross entropy; nested params, D = 147."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in))
  y = rng.integers(0, classes, size=n)
  batch = (jnp.asarray(x, dtype), jnp.asarray(y))

  def loss_fn(p, b):
    xb, yb = b
    h = jnp.tanh(xb @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"][0] + p["l2"][1]
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, yb[:, None], axis=-1)[:, 0]

  params = {
      "l1": {"w": jnp.asarray(rng.normal(size=(d_in, hidden)) * 0.5, dtype),
             "b": jnp.asarray(rng.normal(size=hidden) * 0.1, dtype)},
      "l2": (jnp.asarray(rng.normal(size=(hidden, classes)) * 0.5, dtype),
             jnp.asarray(np.zeros(classes), dtype)),
  }
  return loss_fn, params, batch


PROBLEMS = {"linear": linear_problem, "logistic": logistic_problem,
            "mlp": mlp_problem}


def dense_reference(loss_fn, params, batch):
  """(G, gbar, C, H) formed explicitly on the raveled params."""
  flat, unravel = ravel_pytree(params)
  losses = lambda f: loss_fn(unravel(f), batch)  # noqa: E731
  g = np.asarray(jax.jacrev(losses)(flat))
  gbar = g.mean(0)
  gc = g - gbar
  c = gc.T @ gc / g.shape[0]
  h = np.asarray(jax.hessian(lambda f: jnp.mean(losses(f)))(flat))
  return g, gbar, c, h


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
  return PROBLEMS[request.param]()


def write_idx(path, array, magic=None):
  """Writes ``array`` as a gzipped IDX file of unsigned bytes."""
  from anisonoise import data

  array = np.asarray(array, np.uint8)
  ndim = array.ndim
  magic = data._MAGIC[ndim] if magic is None else magic
  header = struct.pack(">I", magic) + struct.pack(f">{ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_fake_split(directory, split, n, seed=0):
  """Random Fashion-MNIST-shaped IDX files of ``n`` examples for ``split``."""
  from anisonoise import data

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28))
  labels = rng.integers(0, 10, size=n)
  img, lab = data.FILES[split]
  write_idx(directory / img, images)
  write_idx(directory / lab, labels)
  return images.astype(np.uint8), labels.astype(np.uint8)
