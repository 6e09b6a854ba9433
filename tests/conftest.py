"""Shared small models for dense float64 references.

The suite runs in float32, as users do. Tests that compare against exact
dense references switch float64 on for themselves through the ``x64``
fixture (``pytestmark = pytest.mark.usefixtures("x64")`` for a module).
"""

import gzip
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

# LLVM's optimisation level 0 for the suite's CPU programs, set before JAX
# starts its backend (which reads XLA_FLAGS then; subprocesses inherit
# it). The suite is mostly compilation: ``leading_noise``'s step on the
# multidevice worker's MLP compiled in 26 s at XLA's default level and
# 14 s at level 0 (one core). The programs compute the same operations;
# only their machine code is less optimised. The whole suite, back to back
# on the 2-core CPU with a study on one core: 2,404 s at the default level,
# 1,993 s at level 0 (the tiny VGG study, which runs more than it compiles,
# went from 187 s to 207 s).
def _with_xla_flag(env, flag):
  """``env`` with ``flag`` appended to its ``XLA_FLAGS`` (once)."""
  flags = env.get("XLA_FLAGS", "")
  if flag not in flags:
    env["XLA_FLAGS"] = f"{flags} {flag}".strip()
  return env


_with_xla_flag(os.environ, "--xla_backend_optimization_level=0")
# And XLA:CPU's older fused-loop code generator instead of its fusion
# emitters: a jitted ``hessian_noise(10)`` step on a 4,400-parameter MLP
# compiled in 4.6 s with the emitters and 2.7 s without them (level 0
# both; the step ran in 0.11 s either way).
_with_xla_flag(os.environ, "--xla_cpu_use_fusion_emitters=false")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session, subprocesses included.

  The study's tests run the same small programs many times over (each run
  builds its jitted functions anew); from the cache a repeated tiny
  Fashion-MNIST run took 2.4 s against 12.6 s compiling again.
  """
  # Under pytest-xdist the workers share it (their base directories have
  # one parent), so a program one worker compiled the other reads.
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  path = str(root / "jax_cache")
  os.makedirs(path, exist_ok=True)
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in settings.items():
      jax.config.update(name, value)
      patch.setenv(name.upper(), str(value))
    yield path


@pytest.fixture(scope="session", autouse=True)
def looped_krylov():
  """The suite runs the Krylov recursion in ``fori_loop`` on the CPU too,
  whatever the library's default (``curvature._UNROLL_LIMIT``, 0 now).

  Unrolled, convolution products run faster but each step is compiled
  separately; on the suite's small models compilation dominates. Measured
  on the 2-core CPU (the other core busy): ``tests/test_conformance.py``
  and ``tests/test_transforms.py`` took 894 s unrolled and 585 s looped.
  Both paths run the same recursion; the unrolled one keeps its own tests
  (``unroll=True`` in ``test_engine.py``, and the backend default in
  ``test_lanczos_unroll_choice``).
  """
  from anisonoise._src import curvature

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(curvature, "_UNROLL_LIMIT", 0)
    yield


def forced_devices_env(n=8):
  """The environment for a subprocess that sees ``n`` forced CPU devices.

  The device count is fixed when JAX starts, so multi-device tests run
  their code in a subprocess; it inherits this process's environment
  (``XLA_FLAGS`` included) with the device count appended, on the CPU,
  in float32.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_ENABLE_X64", None)
  return _with_xla_flag(env, f"--xla_force_host_platform_device_count={n}")


@pytest.fixture
def x64():
  """float64 switched on for one test (and off again after it)."""
  with jax.enable_x64(True):
    yield


def _float(dtype):
  """``dtype``, or the widest float enabled (float64 under ``x64``)."""
  return dtype or jax.dtypes.canonicalize_dtype(jnp.float64)


def linear_problem(n=40, d=8, seed=0, dtype=None):
  """Least squares: l_i = 0.5 (x_i . w - y_i)^2, params a flat vector."""
  dtype = _float(dtype)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)
  y = x @ rng.normal(size=d) + rng.normal(size=n)
  batch = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}

  def loss_fn(w, b):
    return 0.5 * (b["x"] @ w - b["y"]) ** 2

  params = jnp.asarray(rng.normal(size=d) * 0.1, dtype)
  return loss_fn, params, batch


def logistic_problem(n=50, d=10, seed=1, dtype=None):
  """Logistic regression with a dict of params (weights and bias)."""
  dtype = _float(dtype)
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
                dtype=None):
  """Tiny tanh MLP with softmax cross entropy; nested params, D = 147."""
  dtype = _float(dtype)
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
  losses = lambda f, b: loss_fn(unravel(f), b)  # noqa: E731
  # Jitted, with the batch an argument: eagerly each operation of the
  # Jacobian and the Hessian is dispatched on its own (a transformer's
  # took 24 s against 3 s jitted).
  g = np.asarray(jax.jit(jax.jacrev(losses))(flat, batch))
  gbar = g.mean(0)
  gc = g - gbar
  c = gc.T @ gc / g.shape[0]
  h = np.asarray(jax.jit(jax.hessian(
      lambda f, b: jnp.mean(losses(f, b))))(flat, batch))
  return g, gbar, c, h


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request, x64):
  del x64
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


# The longest modules first (seconds of one xdist worker, default suite,
# 2-core CPU): with ``--dist loadfile`` each module runs whole on one
# worker, in collection order, so a long module collected last runs alone
# while the other worker idles. Longest-first keeps both busy to the end.
_LONGEST_FIRST = ("test_modern_models.py", "test_multidevice.py",
                  "test_fortunes.py", "test_fashion_mnist.py",
                  "test_benchmarks.py", "test_multiprocess.py",
                  "test_transforms.py", "test_conformance.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: each module keeps its own order
