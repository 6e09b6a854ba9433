"""Runs every transform and diagnostic on one device and on a device mesh.

Started by ``tests/test_multidevice.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX
starts), or by hand on a multi-GPU host. Prints one JSON object: for each
case and mesh mode, the largest relative difference to the one-device run
(float32) and the number of all-gather ops in the compiled program.

``--loop-krylov`` (the suite passes it) runs the Krylov recursion in
``fori_loop`` on the CPU too, as ``tests/conftest.py`` does in-process: the
worker compiles each case three times and runs it once, so compilation is
its cost, and an unrolled recursion compiles every step.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType

import anisonoise

N, D_IN, HIDDEN, CLASSES = 64, 12, 32, 5
CHUNK = 16  # 64 examples on 8 devices: 4 chunks of 16, 2 per device each
# Chunked cases: one of each kind of pass (per-example statistics, C v,
# H v, the noise draw, forward-only sums) rather than every function again.
CHUNKED = ("diagonal_noise", "leading_noise", "hessian_noise", "sgd_noise",
           "escape_indicator_stochastic", "expected_sharpness")


def problem(n=N):
  """A tanh MLP (D = 581) and ``n`` random examples, in float32."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, D_IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  params = {
      "w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)) * 0.3, jnp.float32),
      "b1": jnp.zeros(HIDDEN, jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(HIDDEN, CLASSES)) * 0.3,
                        jnp.float32),
  }

  def loss_fn(p, b):
    z = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(z, b["y"])

  return loss_fn, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def transforms(chunk):
  common = dict(batch_size=4, chunk_size=chunk)
  return {
      "isotropic_noise": anisonoise.isotropic_noise(1e-2),
      "dynamic_isotropic_noise": anisonoise.dynamic_isotropic_noise(**common),
      "dynamic_isotropic_noise_hutchinson":
          anisonoise.dynamic_isotropic_noise(trace_estimator="hutchinson",
                                             num_probes=4, **common),
      "diagonal_noise": anisonoise.diagonal_noise(**common),
      # One cycle each (tol=None): the same products on one device and on
      # the mesh. With a tol, the number of restarts can differ with the
      # rounding of the sums, and the pairs then agree to tol, not to
      # float32 rounding.
      "leading_noise": anisonoise.leading_noise(3, num_iters=8, tol=None,
                                                **common),
      "hessian_noise": anisonoise.hessian_noise(3, num_iters=8, tol=None,
                                                **common),
      "hessian_eigvec_noise": anisonoise.hessian_eigvec_noise(
          num_iters=8, tol=None, **common),
      "sgd_noise": anisonoise.sgd_noise(**common),
  }


def same_draw_transforms():
  """The low-rank noises at their default ``tol`` (a stop decided by the
  sums of each layout), refreshed at each of two steps (a cold and a warm
  refresh): their noise, not their eigenvectors, is what must agree."""
  common = dict(batch_size=8, refresh_every=1, key=0)
  return {
      "leading_noise": anisonoise.leading_noise(4, **common),
      "hessian_noise": anisonoise.hessian_noise(4, **common),
      "hessian_eigvec_noise": anisonoise.hessian_eigvec_noise(**common),
  }


def two_draws(tx, loss_fn):
  """The noise ``tx`` draws at two jitted steps of GD (lr 0.1)."""
  def run(p, s, b):
    zeros = jax.tree.map(jnp.zeros_like, p)
    first, s = tx.update(zeros, s, p, loss_fn=loss_fn, batch=b)
    g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
    p = jax.tree.map(lambda a, x: a - 0.1 * x, p, g)
    second, _ = tx.update(zeros, s, p, loss_fn=loss_fn, batch=b)
    return first, second
  return run


def diagnostics(loss_fn, chunk):
  key = jax.random.key(1)
  return {
      "hessian_spectrum_top5": lambda p, b: anisonoise.hessian_spectrum(
          loss_fn, p, b, num_eigs=5, num_iters=16, key=key,
          chunk_size=chunk).eigenvalues,
      "escape_indicator_exact": lambda p, b: anisonoise.escape_indicator(
          loss_fn, p, b, batch_size=4, chunk_size=chunk),
      "escape_indicator_stochastic": lambda p, b: anisonoise.escape_indicator(
          loss_fn, p, b, batch_size=4, method="stochastic", key=key,
          num_samples=4, chunk_size=chunk).mean,
      "covariance_trace": lambda p, b: anisonoise.covariance_trace(
          loss_fn, p, b, chunk_size=chunk),
      # E[L(theta + nu)]: the sharpness is a small difference of losses,
      # rounded in float32 as L is, so it is compared at L's scale.
      "expected_sharpness": lambda p, b: anisonoise.expected_sharpness(
          loss_fn, p, b, key=key, num_samples=8, chunk_size=chunk).mean
                                         + jnp.mean(loss_fn(p, b)),
  }


def rel_diff(a, b):
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.floating):
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-30)
    worst = max(worst, float(np.abs(x - y).max() / scale))
  return worst


def main(argv):
  if "--loop-krylov" in argv:
    from anisonoise._src import curvature
    curvature._UNROLL_LIMIT = 0
  assert jax.device_count() == 8, jax.devices()
  loss_fn, params, batch = problem()
  results = {}
  cases = {}
  # ``--cases none``: the data-parallel example alone.
  chunks = () if "--cases" in argv else (None, CHUNK)
  for chunk in chunks:
    suffix = "" if chunk is None else f"@chunk{chunk}"
    for name, tx in transforms(chunk).items():
      if chunk is not None and name not in CHUNKED:
        continue
      def step(p, s, b, tx=tx):
        g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
        u, s = tx.update(g, s, p, loss_fn=loss_fn, batch=b)
        return u, s
      cases[name + suffix] = (step, lambda tx=tx: tx.init(params))
    for name, fn in diagnostics(loss_fn, chunk).items():
      if chunk is not None and name not in CHUNKED:
        continue
      cases[name + suffix] = (lambda p, s, b, fn=fn: fn(p, b), lambda: None)

  if chunks:
    for name, tx in same_draw_transforms().items():
      cases["same_draw/" + name] = (two_draws(tx, loss_fn),
                                    lambda tx=tx: tx.init(params))
  reference = {name: jax.jit(step)(params, init(), batch)
               for name, (step, init) in cases.items()}
  # Auto axes: the draws' agreement, and with ``--auto-all`` (the slow
  # set) every unchunked case too (the default suite's two-process test
  # runs its cases on Auto axes; chunks are covered with Explicit axes).
  auto_all = "--auto-all" in argv
  for mode, axis_type in (("explicit", AxisType.Explicit),
                          ("auto", AxisType.Auto)):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data")))
    with jax.set_mesh(mesh):
      for name, (step, init) in cases.items():
        if mode == "auto" and ("@chunk" in name or not (
            auto_all or name.startswith("same_draw/"))):
          continue
        if mode == "explicit" and name.startswith("same_draw/"):
          continue  # one mesh mode: the draws' agreement, not the axes
        state = init()
        start = time.perf_counter()
        compiled = jax.jit(step).lower(params, state, sharded).compile()
        out = compiled(params, state, sharded)
        hlo = compiled.as_text()
        results[f"{mode}/{name}"] = {
            "rel_diff": rel_diff(out, reference[name]),
            "all_gathers": hlo.count("all-gather-start") + hlo.count(
                " all-gather("),
            "all_reduces": hlo.count("all-reduce"),
            "seconds": time.perf_counter() - start,
        }
  if "--data-parallel" in argv:
    i = argv.index("--data-parallel")
    results["data_parallel"] = data_parallel_example(
        argv[i + 1], argv[i + 2], run="--cli-only" not in argv)
  json.dump(results, sys.stdout)


def data_parallel_example(data_dir, out, run=True):
  """``examples/data_parallel.py`` in this process (one JAX start for
  every multi-device test): a short run, and its command line with a batch
  the devices cannot share evenly. Its prints go to stderr, so that stdout
  stays one JSON object."""
  import contextlib
  import os
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                  "examples"))
  import data_parallel

  with contextlib.redirect_stdout(sys.stderr):
    record = {"devices": jax.device_count()}
    if run:  # ``run=False``: the command line's error only (no compile)
      record = data_parallel.run(steps=3, n=64, k=2, refresh_every=2,
                                 chunk_size=16, data_dir=data_dir, out=out)
    argv = sys.argv
    sys.argv = ["data_parallel.py", "--steps", "1", "--n", "60",
                "--data-dir", data_dir]
    try:
      data_parallel.main()
      error = None
    except SystemExit as e:
      error = str(e.code)
    finally:
      sys.argv = argv
  return {"devices": record["devices"], "error": error}


if __name__ == "__main__":
  main(sys.argv[1:])
