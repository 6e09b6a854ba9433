"""Chunked passes and Batches streams give the one-pass numbers (float64)."""

import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import PROBLEMS, dense_reference, mlp_problem

pytestmark = pytest.mark.usefixtures("x64")

KEY = jax.random.key(3)

# name -> f(loss_fn, params, data, chunk_size) returning a pytree of arrays.
# Every diagnostic and engine function that takes the data.
CALLS = {
    "hvp": lambda f, p, d, c: anisonoise.hvp(
        f, p, d, jax.tree.map(jnp.ones_like, p), chunk_size=c),
    "hessian_operator": lambda f, p, d, c: anisonoise.hessian_operator(
        f, p, d, chunk_size=c)(jax.tree.map(jnp.ones_like, p)),
    "covariance_operator": lambda f, p, d, c: anisonoise.covariance_operator(
        f, p, d, chunk_size=c)(jax.tree.map(jnp.ones_like, p)),
    "covariance_diagonal": lambda f, p, d, c: anisonoise.covariance_diagonal(
        f, p, d, chunk_size=c),
    "covariance_trace_exact": lambda f, p, d, c: anisonoise.covariance_trace(
        f, p, d, chunk_size=c),
    "covariance_trace_hutchinson": lambda f, p, d, c: (
        anisonoise.covariance_trace(f, p, d, method="hutchinson", key=KEY,
                                    num_probes=3, chunk_size=c)),
    "sample_sgd_noise": lambda f, p, d, c: anisonoise.sample_sgd_noise(
        f, p, d, KEY, batch_size=4, chunk_size=c),
    "sgd_noise_sampler": lambda f, p, d, c: anisonoise.sgd_noise_sampler(
        f, p, d, batch_size=4, chunk_size=c)(KEY),
    "escape_indicator_stochastic": lambda f, p, d, c: (
        anisonoise.escape_indicator(f, p, d, batch_size=4,
                                    method="stochastic", key=KEY,
                                    num_samples=3, chunk_size=c)),
    "hessian_trace_exact": lambda f, p, d, c: anisonoise.hessian_trace(
        f, p, d, chunk_size=c),
    "hessian_trace_hutchinson": lambda f, p, d, c: anisonoise.hessian_trace(
        f, p, d, method="hutchinson", key=KEY, num_probes=3, chunk_size=c),
    "isotropic_escape_indicator": lambda f, p, d, c: (
        anisonoise.isotropic_escape_indicator(f, p, d, batch_size=4,
                                              chunk_size=c)),
    "projection_coefficient": lambda f, p, d, c: (
        anisonoise.projection_coefficient(f, p, d, key=KEY, num_iters=6,
                                          chunk_size=c)),
    "gradient_noise_norms": lambda f, p, d, c: (
        anisonoise.gradient_noise_norms(f, p, d, batch_size=4, chunk_size=c)),
    "expected_sharpness": lambda f, p, d, c: anisonoise.expected_sharpness(
        f, p, d, key=KEY, delta=0.05, num_samples=7, samples_per_chunk=3,
        chunk_size=c),
    "hessian_spectrum": lambda f, p, d, c: anisonoise.hessian_spectrum(
        f, p, d, num_eigs=3, num_iters=8, key=KEY, chunk_size=c),
    "spectral_density": lambda f, p, d, c: anisonoise.spectral_density(
        f, p, d, key=KEY, num_probes=2, num_iters=5, grid_size=50,
        chunk_size=c),
}
# One function per code path (the others are sums or compositions of
# these, and the jaxpr test below still traces every function).
DISTINCT_PATHS = ("hessian_operator", "covariance_operator",
                  "covariance_diagonal", "covariance_trace_hutchinson",
                  "sample_sgd_noise", "escape_indicator_stochastic",
                  "hessian_trace_exact", "projection_coefficient",
                  "expected_sharpness", "hessian_spectrum",
                  "spectral_density")
IN_MEMORY_ONLY = {
    "escape_indicator_exact": lambda f, p, d, c: anisonoise.escape_indicator(
        f, p, d, batch_size=4, chunk_size=c),
}


def _assert_tree_close(a, b, rtol=1e-9, atol=1e-11):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _split(batch, cuts):
  n = anisonoise.num_examples(batch)
  edges = [0, *cuts, n]
  return [jax.tree.map(lambda x: x[a:b], batch)
          for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("name", sorted((*DISTINCT_PATHS, *IN_MEMORY_ONLY)))
@pytest.mark.parametrize("chunk_size", [8])
def test_chunked_equals_one_pass(name, chunk_size):
  """8 of n = 30: 4 strided chunks of 8, the last 2 slots masked copies
  (chunks that divide n are checked on a mesh in test_multidevice.py)."""
  call = {**CALLS, **IN_MEMORY_ONLY}[name]
  loss_fn, params, batch = mlp_problem()
  _assert_tree_close(call(loss_fn, params, batch, chunk_size),
                     call(loss_fn, params, batch, None))


@pytest.mark.parametrize(
    "name", sorted(set(DISTINCT_PATHS) - {"projection_coefficient"}))
def test_stream_equals_concatenated_batch(name):
  loss_fn, params, batch = mlp_problem()
  stream = anisonoise.Batches(_split(batch, [11, 12, 25]))
  _assert_tree_close(CALLS[name](loss_fn, params, stream, None),
                     CALLS[name](loss_fn, params, batch, None))


def test_stream_of_chunked_batches_and_callable_source():
  loss_fn, params, batch = mlp_problem()
  parts = _split(batch, [16])
  stream = anisonoise.Batches(lambda: iter(parts))
  got = anisonoise.covariance_diagonal(loss_fn, params, stream, chunk_size=5)
  _assert_tree_close(got, anisonoise.covariance_diagonal(loss_fn, params,
                                                         batch))


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_chunked_operators_match_dense(kind):
  loss_fn, params, batch = PROBLEMS[kind]()
  _, _, c, h = dense_reference(loss_fn, params, batch)
  flat, unravel = ravel_pytree(params)
  v = np.linspace(-1.0, 1.0, flat.size)
  for op, dense in ((anisonoise.hessian_operator, h),
                    (anisonoise.covariance_operator, c)):
    got = ravel_pytree(op(loss_fn, params, batch, chunk_size=9)(
        unravel(jnp.asarray(v))))[0]
    np.testing.assert_allclose(got, dense @ v, rtol=1e-9, atol=1e-12)


def test_chunked_sgd_noise_covariance():
  """Many chunked draws: covariance C/m within its sampling error."""
  loss_fn, params, batch = PROBLEMS["linear"]()
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  m = 5
  draw = anisonoise.sgd_noise_sampler(loss_fn, params, batch, batch_size=m,
                                      chunk_size=6)
  num = 4000
  eps = jax.vmap(draw)(jax.random.split(jax.random.key(0), num))
  cov = np.cov(np.asarray(eps).T, bias=True)
  target = c / m
  # Frobenius error of a Gaussian sample covariance: sd ~ sqrt((tr^2 +
  # ||S||_F^2) / N); 4 sd.
  tol = 4 * np.sqrt((np.trace(target) ** 2 + np.sum(target ** 2)) / num)
  assert np.linalg.norm(cov - target) < tol


def _max_intermediate_size(fn, *args):
  """Largest array (in entries) in the jaxpr of ``fn`` and its sub-jaxprs."""
  closed = jax.make_jaxpr(fn)(*args)
  best = 0

  def visit(jaxpr):
    nonlocal best
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        best = max(best, int(np.prod(shape)) if shape else 1)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(closed.jaxpr)
  return best


@pytest.mark.parametrize("name", sorted({**CALLS, **IN_MEMORY_ONLY}))
def test_chunked_passes_form_no_n_by_d_or_d_by_d(name):
  """With chunks of 5 of n = 30 examples (D = 147), no intermediate holds
  as many entries as the per-example gradients (n D) or a D x D matrix
  (the exact Hessian trace, also inside the isotropic indicator and the
  projection coefficient: unit vectors 64 at a time, 49 here)."""
  call = {**CALLS, **IN_MEMORY_ONLY}[name]
  loss_fn, params, batch = mlp_problem()
  n, d = 30, anisonoise._src.batching.num_params(params)
  biggest = _max_intermediate_size(
      lambda p, b: call(loss_fn, p, b, 5), params, batch)
  exact_tr_h = ("hessian_trace_exact", "isotropic_escape_indicator",
                "projection_coefficient")
  bound = 64 * d if name in exact_tr_h else n * d
  assert biggest < min(bound, d * d), biggest


def test_batches_errors():
  loss_fn, params, batch = mlp_problem()
  with pytest.raises(ValueError, match="one-shot iterator"):
    anisonoise.Batches(iter([batch]))
  with pytest.raises(ValueError, match="no batches"):
    anisonoise.hessian_trace(loss_fn, params, anisonoise.Batches([]))
  x, y = batch
  mixed = anisonoise.Batches([(x[:10], y[:10]), {"x": x[10:], "y": y[10:]}])
  with pytest.raises(ValueError, match="pytree structure"):
    anisonoise.covariance_diagonal(loss_fn, params, mixed)
  calls = itertools.count()

  def shrinking():
    k = next(calls)
    return iter(_split(batch, [10 + k]))

  with pytest.raises(ValueError, match="same batches on every pass"):
    anisonoise.hessian_spectrum(loss_fn, params, anisonoise.Batches(shrinking),
                                num_eigs=2, num_iters=4, key=KEY)
  with pytest.raises(ValueError, match="needs the batch in memory"):
    anisonoise.escape_indicator(loss_fn, params,
                                anisonoise.Batches([batch]))
  with pytest.raises(ValueError, match="sequence of batches"):
    anisonoise.Batches(3)


def test_chunk_plan():
  plan = anisonoise._src.batching.chunk_plan
  assert plan(30, None) == (30, 1, 30, 0)
  assert plan(30, 7) == (30, 5, 6, 0)
  assert plan(31, 7) == (31, 5, 7, 4)
  # Sharded 8 ways: the largest multiple of 8 <= chunk_size dividing n.
  assert plan(1200, 64, 8) == (1200, 25, 48, 0)
  with pytest.raises(ValueError, match="multiple of 8"):
    plan(1200, 6, 8)


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunks_on_a_one_device_explicit_mesh(chunk_size):
  """Chunks of one example on a one-device Explicit mesh: jax put the
  example axis's sharding on the chunk axis when splitting ``(n,)`` into
  ``(1, n)``, which ``scan`` refused; the chunks keep it on their examples."""
  loss_fn, params, batch = PROBLEMS["linear"]()
  mesh = jax.make_mesh((1,), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  placed = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data")))
  fn = jax.jit(lambda p, b: (
      anisonoise.covariance_trace(loss_fn, p, b, chunk_size=chunk_size),
      anisonoise.hvp(loss_fn, p, b, p, chunk_size=chunk_size)))
  with jax.set_mesh(mesh):
    got = fn(params, placed)
  _assert_tree_close(got, fn(params, batch))


def test_lanczos_unroll_choice(monkeypatch):
  """Streams unroll (eager products), chunked solves loop (40 unrolled
  chunk loops took 165 s to compile for VGG11 on the CPU), else the
  backend default (the library's, not the suite's: see conftest)."""
  from anisonoise._src import curvature
  monkeypatch.setattr(curvature, "_UNROLL_LIMIT", 64)
  _, _, batch = PROBLEMS["linear"]()
  assert curvature.lanczos_unroll(anisonoise.Batches([batch]), 8, 40)
  assert not curvature.lanczos_unroll(batch, 8, 40)
  assert curvature.lanczos_unroll(batch, None, 40) == (
      jax.default_backend() == "cpu")
  assert not curvature.lanczos_unroll(batch, None, 65)


def test_defaults_form_no_n_squared_activations_nor_n_by_d():
  """Without chunk_size, exact Tr(H Sigma) takes its n Hessian products a
  few at a time (not n^2 examples' activations), and sgd_noise(trace=T)
  estimates Tr(C) without the n x D per-example gradients."""
  loss_fn, params, batch = mlp_problem()
  n, d = 30, anisonoise._src.batching.num_params(params)
  hidden = 16
  escape = _max_intermediate_size(
      lambda p, b: anisonoise.escape_indicator(loss_fn, p, b), params, batch)
  assert escape < n * n * hidden, escape
  tx = anisonoise.sgd_noise(trace=1.0, key=0)
  state = tx.init(params)
  step = _max_intermediate_size(
      lambda p, b: tx.update(p, state, p, loss_fn=loss_fn, batch=b)[0],
      params, batch)
  assert step < n * d, step


def test_stream_kernels_compile_once_for_a_loss_written_afresh():
  """A stream's programs are found again for a loss_fn written anew at
  every call, and the cache does not keep every loss (and its
  executables) alive."""
  import gc
  import weakref

  from anisonoise._src import sums

  loss_fn, params, batch = mlp_problem()
  stream = anisonoise.Batches([batch, batch])
  traces = []

  def counted(p, b):
    traces.append(1)
    return loss_fn(p, b)

  for _ in range(3):
    anisonoise.mean_gradient(lambda p, b: counted(p, b), params, stream)
  assert len(traces) == 3 + 1  # a shape check per call, one compilation

  class Scale:
    pass

  refs = []
  for i in range(sums.KERNEL_CACHE_SIZE + 4):
    scale = Scale()
    scale.value = float(i + 1)
    refs.append(weakref.ref(scale))
    anisonoise.mean_gradient(
        lambda p, b, s=scale: s.value * loss_fn(p, b), params, stream)
  del scale
  gc.collect()
  assert refs[0]() is None and refs[-1]() is not None
