"""Diagnostics and theory checks (Sections 3-5, App. A)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import (dense_reference, linear_problem, logistic_problem,
                      mlp_problem)

pytestmark = pytest.mark.usefixtures("x64")

M = 5


# ---------------------------------------------------------------- Eq. 13 ---


def _ou_problem(d=6, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  h = (q * np.linspace(0.3, 3.0, d)) @ q.T
  a = rng.normal(size=(d, d))
  sigma = a @ a.T / d
  return h, sigma


def test_ou_closed_form_matches_euler_maruyama():
  h, sigma = _ou_problem()
  d = h.shape[0]
  # 4,000 paths: the tolerance below is 3 standard errors of their own
  # mean, which a missing 1/4 or a wrong exponent exceeds many times over.
  num_paths, dt = 4000, 2e-3
  times = [0.1, 0.5, 2.0]
  steps = [int(round(t / dt)) for t in times]
  root = np.real(scipy.linalg.sqrtm(sigma))
  hj, rootj = jnp.asarray(h), jnp.asarray(root)

  def step(theta, key):
    dw = jax.random.normal(key, theta.shape) * np.sqrt(dt)
    theta = theta - dt * theta @ hj.T + dw @ rootj.T
    return theta, 0.5 * jnp.einsum("pi,ij,pj->p", theta, hj, theta)

  # A fixed key: each 3-SE comparison alone has a 0.3% false-alarm rate.
  keys = jax.random.split(jax.random.key(2), steps[-1])
  _, losses = jax.jit(lambda k: jax.lax.scan(
      step, jnp.zeros((num_paths, d)), k))(keys)
  losses = np.asarray(losses)
  closed = anisonoise.ou_escape_efficiency(h, sigma, jnp.asarray(times))
  for i, s in enumerate(steps):
    sample = losses[s - 1]
    sem = sample.std(ddof=1) / np.sqrt(num_paths)
    assert abs(sample.mean() - float(closed.value[i])) < 3 * sem, (
        times[i], sample.mean(), float(closed.value[i]), sem)
  # Small-t form: agrees at small t, visibly not at large t.
  small = anisonoise.ou_escape_efficiency(h, sigma, 1e-3)
  assert float(small.value) == pytest.approx(float(small.small_t), rel=5e-3)
  assert float(closed.small_t[-1]) > 2 * float(closed.value[-1])


# ---------------------------------------------------------- Proposition 1 --


def test_proposition_1_ratio_grows_with_dimension():
  ratios = []
  dims = [10, 100, 1000]
  for d in dims:
    lam = np.arange(1, d + 1, dtype=float) ** -2.0  # power-law spectrum
    rng = np.random.default_rng(d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    h = (q * lam) @ q.T
    h = (h + h.T) / 2
    sigma = h  # aligned with H: a = 1
    ratios.append(float(anisonoise.escape_ratio(h, sigma)))
  # Tr(H^2) D / Tr(H)^2 -> D zeta(4) / zeta(2)^2: slope 2d - 1 = 1 in log-log.
  slopes = np.diff(np.log(ratios)) / np.diff(np.log(dims))
  assert np.all(np.diff(ratios) > 0)
  assert np.all((slopes > 0.9) & (slopes < 1.1)), slopes
  # Isotropic H: the ratio is 1 whatever Sigma is.
  sigma = _ou_problem(d=8)[1]
  assert float(anisonoise.escape_ratio(2.0 * np.eye(8), sigma)) == (
      pytest.approx(1.0))


# ------------------------------------------------- model-based indicators --


@pytest.mark.parametrize("make", [linear_problem, mlp_problem])
def test_escape_indicator_exact_matches_dense(make):
  loss_fn, params, batch = make()
  _, _, c, h = dense_reference(loss_fn, params, batch)
  expected = np.trace(h @ c) / M
  for chunk in (None, 7):
    got = anisonoise.escape_indicator(loss_fn, params, batch, batch_size=M,
                                      chunk_size=chunk)
    np.testing.assert_allclose(float(got), expected, rtol=1e-9)
  d = c.shape[0]
  iso = anisonoise.isotropic_escape_indicator(loss_fn, params, batch,
                                              batch_size=M)
  np.testing.assert_allclose(float(iso), np.trace(c) / M * np.trace(h) / d,
                             rtol=1e-9)


def test_escape_indicator_stochastic_within_its_error():
  loss_fn, params, batch = mlp_problem()
  exact = float(anisonoise.escape_indicator(loss_fn, params, batch,
                                            batch_size=M))
  small = anisonoise.escape_indicator(
      loss_fn, params, batch, batch_size=M, method="stochastic",
      key=jax.random.key(0), num_samples=500)
  big = anisonoise.escape_indicator(
      loss_fn, params, batch, batch_size=M, method="stochastic",
      key=jax.random.key(1), num_samples=2000)
  for est in (small, big):
    assert abs(float(est.mean) - exact) < 3 * float(est.stderr)
  # 4x the samples halves the standard error (up to its own noise).
  ratio = float(small.stderr) / float(big.stderr)
  assert 1.6 < ratio < 2.5, ratio


def test_hessian_trace_exact_and_hutchinson():
  loss_fn, params, batch = mlp_problem()
  _, _, _, h = dense_reference(loss_fn, params, batch)
  np.testing.assert_allclose(
      float(anisonoise.hessian_trace(loss_fn, params, batch)), np.trace(h),
      rtol=1e-9)
  est = anisonoise.hessian_trace(loss_fn, params, batch, method="hutchinson",
                                 key=jax.random.key(0), num_probes=300)
  assert abs(float(est.mean) - np.trace(h)) < 4 * float(est.stderr)


def test_projection_coefficient_matches_dense():
  loss_fn, params, batch = mlp_problem()
  _, _, c, h = dense_reference(loss_fn, params, batch)
  w, v = np.linalg.eigh(h)
  u1, lam1 = v[:, -1], w[-1]
  expected = (u1 @ c @ u1) * np.trace(h) / (lam1 * np.trace(c))
  got = anisonoise.projection_coefficient(loss_fn, params, batch,
                                          key=jax.random.key(0),
                                          num_iters=c.shape[0])
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_gradient_noise_norms():
  loss_fn, params, batch = linear_problem()
  _, gbar, c, _ = dense_reference(loss_fn, params, batch)
  r = anisonoise.gradient_noise_norms(loss_fn, params, batch, batch_size=M)
  np.testing.assert_allclose(float(r.gradient_norm), np.linalg.norm(gbar),
                             rtol=1e-10)
  np.testing.assert_allclose(float(r.noise_norm), np.sqrt(np.trace(c) / M),
                             rtol=1e-10)


# ------------------------------------------------------------- sharpness --


def test_expected_sharpness_on_a_quadratic():
  loss_fn, _, batch = linear_problem()
  # At the minimiser the linear term vanishes: E = delta^2/2 Tr(H) exactly.
  params = jnp.linalg.lstsq(batch["x"], batch["y"])[0]
  _, _, _, h = dense_reference(loss_fn, params, batch)
  delta = 0.05
  est = anisonoise.expected_sharpness(loss_fn, params, batch,
                                      key=jax.random.key(0), delta=delta,
                                      num_samples=4000,
                                      samples_per_chunk=500)
  expected = delta**2 / 2 * np.trace(h)
  assert abs(float(est.mean) - expected) < 4 * float(est.stderr)
  assert float(est.stderr) < 0.1 * expected


# --------------------------------------------------------------- spectrum --


def test_hessian_spectrum_matches_eigh():
  loss_fn, params, batch = mlp_problem()
  _, _, _, h = dense_reference(loss_fn, params, batch)
  d = h.shape[0]
  s = anisonoise.hessian_spectrum(loss_fn, params, batch, num_eigs=5,
                                  key=jax.random.key(0), num_iters=d)
  np.testing.assert_allclose(np.asarray(s.eigenvalues),
                             np.linalg.eigvalsh(h)[::-1][:5], rtol=1e-6)
  # The default: a Krylov basis of 2k + 20 = 30 vectors, restarted until
  # every residual is at most 1e-3 lambda_1.
  s = anisonoise.hessian_spectrum(loss_fn, params, batch, num_eigs=5,
                                  key=jax.random.key(0))
  ref = np.linalg.eigvalsh(h)[::-1][:5]
  assert bool(s.converged) and int(s.num_matvecs) >= 30
  # The subspace criterion (the noises'): the top-5 space, and the
  # curvature it captures, against the dense top 5.
  sub = anisonoise.top_eigenpairs(
      anisonoise.hessian_operator(loss_fn, params, batch), params, 5,
      key=jax.random.key(0), num_iters=30, tol=1e-3, criterion="subspace")
  u = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(sub.eigenvectors),
                 np.float64)
  assert bool(sub.converged)
  assert np.einsum("id,de,ie->", u, h, u) >= (1 - 1e-3) * ref.sum()
  np.testing.assert_allclose(np.asarray(sub.eigenvalues), ref, rtol=2e-3)
  assert np.max(np.abs(np.asarray(s.eigenvalues) - ref)) <= 1e-3 * ref[0]


def test_eager_spectrum_loops_over_compiled_chunks_as_jit_computes():
  """Called eagerly, the Krylov recursion is a Python loop over jitted
  chunks of steps that take the operator's data (the staged
  linearisation's) as arguments: a compiled chunk holds no loop around its
  products (XLA:CPU runs convolutions several times slower inside one) and
  no data as constants. The jitted call computes the same numbers and
  stops at the same convergence check."""
  from anisonoise._src import curvature

  loss_fn, params, batch = mlp_problem()
  call = lambda p, b: anisonoise.hessian_spectrum(  # noqa: E731
      loss_fn, p, b, num_eigs=5, key=0)
  eager = call(params, batch)
  # Compiled chunks of steps for the whole solve (30 steps: chunks of 4
  # and one of 2); a second call on the same loss reuses them.
  compiled = curvature._jit_krylov_chunk._cache_size()
  assert 1 <= compiled <= 2
  held = curvature._last_eager_operator[0]
  call(params, batch)
  # Not cleared and compiled again: the same programs serve.
  assert curvature._last_eager_operator[0] is held
  assert curvature._jit_krylov_chunk._cache_size() == compiled
  # Another loss_fn's operator replaces the first's programs (not one
  # set of executables per loss kept).
  anisonoise.hessian_spectrum(lambda p, b: loss_fn(p, b), params, batch,
                              num_eigs=5, key=0)
  assert curvature._jit_krylov_chunk._cache_size() == compiled
  jitted = jax.jit(call)(params, batch)
  assert int(eager.num_matvecs) == int(jitted.num_matvecs) >= 30
  assert bool(eager.converged) and bool(jitted.converged)
  np.testing.assert_allclose(eager.eigenvalues, jitted.eigenvalues,
                             rtol=1e-10)
  # The subspace solve: eagerly a Python loop over one compiled chunk,
  # jitted a while_loop; they stop at the same check.
  sub = lambda p, b: anisonoise.top_eigenpairs(  # noqa: E731
      anisonoise.hessian_operator(loss_fn, p, b), p, 5, key=jax.random.key(0),
      num_iters=30, criterion="subspace")
  a, b = sub(params, batch), jax.jit(sub)(params, batch)
  assert int(a.num_matvecs) == int(b.num_matvecs)
  assert curvature._jit_subspace_chunk._cache_size() == 1
  np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
  mv, dtype, _ = curvature.flat_operator(
      anisonoise.hessian_operator(loss_fn, params, batch), params)
  d = ravel_pytree(params)[0].size
  c = curvature.CHUNK
  krylov = curvature.Krylov(jnp.zeros((c + 1, d), dtype),
                            jnp.zeros((c + 1, c), dtype))
  hlo = curvature._jit_krylov_chunk.lower(mv, 0, krylov,
                                         curvature.CHUNK).compile().as_text()
  assert "while" not in hlo
  # No data folded in: every constant is smaller than the batch (n = 30)
  # and the residuals; they come in as arguments.
  sizes = [math.prod(int(x) for x in re.search(r"\[([0-9,]*)\]",
                                                line).group(1).split(",") if x)
           for line in hlo.splitlines() if " constant(" in line]
  assert sizes and max(sizes) < 30, sizes


def test_spectral_density_moments():
  loss_fn, params, batch = mlp_problem()
  _, _, _, h = dense_reference(loss_fn, params, batch)
  d = h.shape[0]
  num_probes = 200
  s = anisonoise.spectral_density(loss_fn, params, batch,
                                  key=jax.random.key(0),
                                  num_probes=num_probes, num_iters=20,
                                  grid_size=4000)
  grid, dens = np.asarray(s.grid), np.asarray(s.density)
  np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, atol=1e-3)
  m1 = np.trapezoid(grid * dens, grid)
  m2 = np.trapezoid(grid**2 * dens, grid) - float(s.sigma) ** 2
  # Per-probe moments v^T H^r v / D; their spread gives the tolerance.
  nodes, weights = np.asarray(s.nodes), np.asarray(s.weights)
  per1 = (weights * nodes).sum(1)
  per2 = (weights * nodes**2).sum(1)
  sem1 = per1.std(ddof=1) / np.sqrt(num_probes)
  sem2 = per2.std(ddof=1) / np.sqrt(num_probes)
  assert abs(m1 - np.trace(h) / d) < 4 * sem1 + 1e-3 * abs(m1)
  assert abs(m2 - np.trace(h @ h) / d) < 4 * sem2 + 1e-3 * abs(m2)


def test_plotting_helpers_draw(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from anisonoise.plotting import plot_hessian_spectrum, plot_spectral_density

  loss_fn, params, batch = mlp_problem()
  s = anisonoise.spectral_density(loss_fn, params, batch,
                                  key=jax.random.key(0), num_iters=10)
  fig, (a, b) = plt.subplots(1, 2)
  plot_hessian_spectrum(np.array([3.0, 2.0, 1.0]), ax=a)
  plot_spectral_density(s, ax=b)
  assert len(a.lines[0].get_xdata()) == 3
  np.testing.assert_allclose(b.lines[0].get_xdata(), np.asarray(s.grid))
  plt.close(fig)


# -------------------------------------------------------------- bad input --


def test_bad_inputs():
  h, sigma = _ou_problem()
  with pytest.raises(ValueError, match="same shape"):
    anisonoise.ou_escape_efficiency(h, sigma[:5, :5], 1.0)
  with pytest.raises(ValueError, match="square"):
    anisonoise.escape_ratio(h[:, :5], sigma)
  with pytest.raises(ValueError, match="H must be symmetric"):
    anisonoise.ou_escape_efficiency(h + np.triu(np.ones_like(h), 1), sigma,
                                    1.0)
  loss_fn, params, batch = linear_problem()
  with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
    anisonoise.expected_sharpness(loss_fn, params, batch,
                                  key=jax.random.key(0), num_samples=0)
  with pytest.raises(ValueError, match="delta must be > 0"):
    anisonoise.expected_sharpness(loss_fn, params, batch,
                                  key=jax.random.key(0), delta=0.0)
  with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
    anisonoise.escape_indicator(loss_fn, params, batch, method="stochastic",
                                key=jax.random.key(0), num_samples=0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    anisonoise.escape_indicator(loss_fn, params, batch, method="stochastic")
  with pytest.raises(ValueError, match="method must be"):
    anisonoise.escape_indicator(loss_fn, params, batch, method="dense")


def test_diagnostics_on_bfloat16_params():
  """bfloat16 models: the Hessian spectrum is solved in float32 (``eigh``
  has no bfloat16), and the escape indicator runs in the params' dtype;
  both agree with the float32 model to bfloat16's rounding (8 bits)."""
  loss_fn, params, batch = logistic_problem(dtype=jnp.float32)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  spectra = [anisonoise.hessian_spectrum(loss_fn, p, batch, num_eigs=2,
                                         key=jax.random.key(0)).eigenvalues
             for p in (params, bf16)]
  assert spectra[1].dtype == jnp.float32
  np.testing.assert_allclose(spectra[1], spectra[0], rtol=3e-2)
  escape = [anisonoise.escape_indicator(loss_fn, p, batch)
            for p in (params, bf16)]
  np.testing.assert_allclose(np.float32(escape[1]), escape[0], rtol=3e-2)
