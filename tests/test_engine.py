"""The engine against dense float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import dense_reference, linear_problem, mlp_problem

pytestmark = pytest.mark.usefixtures("x64")


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _random_like(params, seed):
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.key(seed), flat.shape,
                                   flat.dtype))


def test_hvp_matches_dense_hessian(problem):
  loss_fn, params, batch = problem
  _, _, _, h = dense_reference(loss_fn, params, batch)
  v = _random_like(params, 0)
  expected = h @ _flat(v)
  np.testing.assert_allclose(
      _flat(anisonoise.hvp(loss_fn, params, batch, v)), expected,
      rtol=1e-10, atol=1e-12)
  op = anisonoise.hessian_operator(loss_fn, params, batch)
  np.testing.assert_allclose(_flat(op(v)), expected, rtol=1e-10, atol=1e-12)


def test_covariance_matvec_matches_outer_products(problem):
  loss_fn, params, batch = problem
  g, gbar, _, _ = dense_reference(loss_fn, params, batch)
  # C from explicit per-example outer products, not from the centred Jacobian.
  c = sum(np.outer(gi - gbar, gi - gbar) for gi in g) / g.shape[0]
  v = _random_like(params, 1)
  cv = anisonoise.covariance_operator(loss_fn, params, batch)(v)
  np.testing.assert_allclose(_flat(cv), c @ _flat(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_per_example_grads_chunked(problem, chunk_size):
  loss_fn, params, batch = problem
  g, _, _, _ = dense_reference(loss_fn, params, batch)
  pe = anisonoise.per_example_grads(loss_fn, params, batch,
                                    chunk_size=chunk_size)
  got = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(pe))
  np.testing.assert_allclose(got, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_covariance_diagonal_and_trace_exact(problem, chunk_size):
  loss_fn, params, batch = problem
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  diag = anisonoise.covariance_diagonal(loss_fn, params, batch,
                                        chunk_size=chunk_size)
  np.testing.assert_allclose(_flat(diag), np.diag(c), rtol=1e-9, atol=1e-12)
  tr = anisonoise.covariance_trace(loss_fn, params, batch,
                                   chunk_size=chunk_size)
  np.testing.assert_allclose(float(tr), np.trace(c), rtol=1e-9)


def test_covariance_trace_hutchinson_within_its_error():
  loss_fn, params, batch = mlp_problem()
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  num_probes = 400
  est = anisonoise.covariance_trace(loss_fn, params, batch,
                                    method="hutchinson",
                                    key=jax.random.key(3),
                                    num_probes=num_probes)
  # Rademacher probes: Var(v^T C v) = 2 (||C||_F^2 - sum_i C_ii^2).
  sd = np.sqrt(2 * (np.sum(c**2) - np.sum(np.diag(c) ** 2)) / num_probes)
  assert abs(float(est) - np.trace(c)) < 4 * sd
  assert sd < 0.2 * np.trace(c)  # the check is not vacuous


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_covariance_diagonal_hutchinson_within_its_error(chunk_size):
  """Backward-mode Rademacher probes on the examples: each entry unbiased
  with the documented variance (checked against the dense Jacobian)."""
  loss_fn, params, batch = mlp_problem()
  g, gbar, c, _ = dense_reference(loss_fn, params, batch)
  a = g - gbar  # centred per-example gradients
  n = a.shape[0]
  num_probes, reps = 8, 200
  ests = np.asarray(jax.jit(jax.vmap(lambda k: ravel_pytree(
      anisonoise.covariance_diagonal(
          loss_fn, params, batch, method="hutchinson", key=k,
          num_probes=num_probes, chunk_size=chunk_size))[0]))(
              jax.random.split(jax.random.key(0), reps)))
  var = 2 * (np.sum(a**2, 0) ** 2 - np.sum(a**4, 0)) / (n**2 * num_probes)
  # The mean over the repeats, entry by entry, within 5 standard errors.
  np.testing.assert_array_less(np.abs(ests.mean(0) - np.diag(c)),
                               5 * np.sqrt(var / reps) + 1e-12)
  # The documented variance is the variance (chi-square: 200 repeats put
  # the ratio within about +-0.3; sum over entries to average).
  ratio = np.sum(ests.var(0, ddof=1)) / np.sum(var)
  assert 0.75 < ratio < 1.3, ratio
  assert np.all(var <= 2 * np.diag(c) ** 2 / num_probes + 1e-15)
  # The sum is an unbiased estimate of Tr(C) with the Gram-matrix variance.
  gram = a @ a.T / n
  tr_var = 2 * (np.sum(gram**2) - np.sum(np.diag(gram) ** 2)) / num_probes
  assert abs(ests.sum(1).mean() - np.trace(c)) < 5 * np.sqrt(tr_var / reps)


def test_covariance_trace_deflated_within_its_error():
  """Hutch++-style deflation: exact on the span of Q, probes on the rest;
  its variance is that of P C P, far below the plain estimate's."""
  loss_fn, params, batch = mlp_problem()
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  w, v = np.linalg.eigh(c)
  q = v[:, ::-1][:, :6]
  p = np.eye(len(c)) - q @ q.T
  pcp = p @ c @ p
  _, unravel = ravel_pytree(params)
  basis = jax.vmap(unravel)(jnp.asarray(q.T))
  num_probes, reps = 4, 100
  ests = np.asarray(jax.jit(jax.vmap(lambda k: anisonoise.covariance_trace(
      loss_fn, params, batch, method="hutchinson", key=k,
      num_probes=num_probes, deflate=basis)))(
          jax.random.split(jax.random.key(0), reps)))
  sd = np.sqrt(2 * (np.sum(pcp**2) - np.sum(np.diag(pcp) ** 2)) / num_probes)
  plain = np.sqrt(2 * (np.sum(c**2) - np.sum(np.diag(c) ** 2)) / num_probes)
  assert abs(ests.mean() - np.trace(c)) < 5 * sd / np.sqrt(reps)
  assert 0.6 < ests.std(ddof=1) / sd < 1.5
  assert sd < 0.5 * plain  # deflating by the top of C pays here
  # A known in-span part (C's Ritz values) replaces its k products: the same
  # probes give the same estimate.
  known = anisonoise.covariance_trace(
      loss_fn, params, batch, method="hutchinson", key=jax.random.key(1),
      num_probes=num_probes, deflate=basis, in_span=jnp.sum(w[::-1][:6]))
  computed = anisonoise.covariance_trace(
      loss_fn, params, batch, method="hutchinson", key=jax.random.key(1),
      num_probes=num_probes, deflate=basis)
  np.testing.assert_allclose(known, computed, rtol=1e-4)


def test_sgd_noise_sample_covariance():
  loss_fn, params, batch = linear_problem()
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  m = 5
  target = c / m
  num = 20000
  keys = jax.random.split(jax.random.key(0), num)
  draws = jax.vmap(lambda k: anisonoise.sample_sgd_noise(
      loss_fn, params, batch, k, batch_size=m))(keys)
  draws = np.asarray(draws)
  s = draws.T @ draws / num
  # For Gaussian draws, E||S - Sigma||_F^2 = (Tr(Sigma)^2 + ||Sigma||_F^2)/N.
  expected = np.sqrt((np.trace(target) ** 2 + np.sum(target**2)) / num)
  assert np.linalg.norm(s - target) < 4 * expected
  assert abs(np.trace(s) - np.trace(target)) < 5 * np.sqrt(
      2 * np.sum(target**2) / num)
  np.testing.assert_allclose(draws.mean(0), 0, atol=5 * np.sqrt(
      np.diag(target).max() / num))


def _gapped_matrix(d=120, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  lam = np.concatenate([[50., 30., 20., 12., 8.],
                        rng.uniform(-1.0, 1.0, size=d - 5)])
  return (q * lam) @ q.T


@pytest.mark.parametrize("unroll", [True, False])
def test_lanczos_top_k_matches_eigh(unroll):
  a = _gapped_matrix()
  k = 5
  params = {"a": jnp.zeros(60), "b": jnp.zeros((6, 10))}  # D = 120 pytree
  flat0, unravel = ravel_pytree(params)
  mat = jnp.asarray(a)

  def matvec(v):
    return unravel(mat @ ravel_pytree(v)[0])

  res = jax.jit(lambda key: anisonoise.top_eigenpairs(
      matvec, params, k, key=key, num_iters=40, unroll=unroll))(
          jax.random.key(0))
  w, v = np.linalg.eigh(a)
  ref_vals, ref_vecs = w[::-1][:k], v[:, ::-1][:, :k]
  np.testing.assert_allclose(np.asarray(res.eigenvalues), ref_vals,
                             rtol=1e-6)
  vecs = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(res.eigenvectors))
  cos = np.abs(np.sum(vecs * ref_vecs.T, axis=1))
  assert np.all(cos >= 0.999), cos
  assert np.all(np.asarray(res.residual_norms) < 1e-6)


def test_lanczos_on_mlp_hessian_and_covariance():
  loss_fn, params, batch = mlp_problem()
  _, _, c, h = dense_reference(loss_fn, params, batch)
  d = c.shape[0]
  for op, ref in ((anisonoise.hessian_operator, h),
                  (anisonoise.covariance_operator, c)):
    res = anisonoise.top_eigenpairs(op(loss_fn, params, batch), params, 3,
                                    key=jax.random.key(1), num_iters=d)
    w = np.linalg.eigvalsh(ref)[::-1][:3]
    np.testing.assert_allclose(np.asarray(res.eigenvalues), w, rtol=1e-6)


def test_lanczos_bad_arguments():
  like = jnp.zeros(10)
  mv = lambda v: v  # noqa: E731
  with pytest.raises(ValueError, match="k must be a positive int"):
    anisonoise.top_eigenpairs(mv, like, 0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="at most 10"):
    anisonoise.top_eigenpairs(mv, like, 11, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_iters"):
    anisonoise.top_eigenpairs(mv, like, 3, key=jax.random.key(0),
                              num_iters=2)


def _clustered(d=300, k=20, seed=0):
  """A dense symmetric matrix whose top k eigenvalues sit 0.01 apart above
  a bulk in [0, 0.99]: where a fixed Krylov size of about 2k fails."""
  rng = np.random.default_rng(seed)
  ev = np.concatenate([1 + 0.01 * np.arange(k)[::-1],
                       rng.uniform(0, 0.99, d - k)])
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * ev) @ q.T, np.sort(ev)[::-1][:k]


def _true_residuals(a, res):
  """``||A v_j - lambda_j v_j||`` of a solve's eigenpairs on the dense ``a``."""
  vecs = np.asarray(res.eigenvectors)
  return np.linalg.norm(vecs @ a - np.asarray(res.eigenvalues)[:, None]
                        * vecs, axis=1)


def test_thick_restart_converges_where_one_cycle_does_not():
  a, ref = _clustered()
  mat = jnp.asarray(a)
  solve = lambda tol, key: anisonoise.top_eigenpairs(  # noqa: E731
      lambda v: mat @ v, jnp.zeros(a.shape[0]), 20, key=key, tol=tol,
      max_matvecs=2000)
  key = jax.random.key(0)
  one = solve(None, key)  # one cycle of 40 products, as before restarts
  assert int(one.num_matvecs) == 40 and not bool(one.converged)
  assert np.max(np.abs(np.asarray(one.eigenvalues) - ref)) > 1e-2
  eager = solve(1e-3, key)
  jitted = jax.jit(solve, static_argnums=0)(1e-3, key)
  for res in (eager, jitted):
    assert bool(res.converged) and int(res.num_matvecs) > 40
    # Each residual bounds the distance to an eigenvalue: all 20 within
    # 1e-3 lambda_1 of the dense ones.
    assert np.max(np.abs(np.asarray(res.eigenvalues) - ref)) <= 1e-3 * ref[0]
    assert np.all(np.asarray(res.residual_norms) <= 1e-3 * ref[0])
  assert int(eager.num_matvecs) == int(jitted.num_matvecs)
  np.testing.assert_allclose(eager.eigenvalues, jitted.eigenvalues,
                             rtol=1e-10)


def test_residual_norms_after_restarts_are_the_true_residuals():
  """The arrowhead bookkeeping of a thick restart: the reported residuals
  equal ``||A v - theta v||`` formed explicitly."""
  a, _ = _clustered(d=200, k=6, seed=3)
  res = anisonoise.top_eigenpairs(lambda v: jnp.asarray(a) @ v,
                                  jnp.zeros(200), 6, key=jax.random.key(2),
                                  num_iters=14, tol=1e-6, max_matvecs=400)
  assert int(res.num_matvecs) > 14
  vecs = np.asarray(res.eigenvectors)
  true = _true_residuals(a, res)
  np.testing.assert_allclose(np.asarray(res.residual_norms), true,
                             rtol=1e-3, atol=1e-12)
  np.testing.assert_allclose(vecs @ vecs.T, np.eye(6), atol=1e-10)


def test_warm_start_unrolled_matches_looped():
  """A warm-started, restarted solve converges alike unrolled (the
  library's CPU default for short recursions) and in ``fori_loop`` (the
  suite's, see conftest)."""
  a, ref = _clustered()
  mat = jnp.asarray(a)
  mv = lambda v: mat @ v  # noqa: E731
  like = jnp.zeros(a.shape[0])
  cold = anisonoise.top_eigenpairs(mv, like, 6, key=jax.random.key(0),
                                   tol=None, unroll=False)
  got = [anisonoise.top_eigenpairs(
      mv, like, 6, key=jax.random.key(1), tol=1e-6, max_matvecs=600,
      init_subspace=cold.eigenvectors, unroll=unroll)
      for unroll in (True, False)]
  # XLA fuses the two programs differently, so their rounding differs and
  # a restart may stop a cycle apart (276 and 261 products here); both
  # converge, to the dense eigenvalues, with their true residuals.
  np.testing.assert_allclose(np.asarray(got[0].eigenvalues),
                             np.asarray(got[1].eigenvalues), rtol=1e-6)
  for res in got:
    np.testing.assert_allclose(np.asarray(res.eigenvalues), ref[:6],
                               rtol=2e-6)
    true = _true_residuals(a, res)
    np.testing.assert_allclose(np.asarray(res.residual_norms), true,
                               rtol=1e-3, atol=1e-12)
    assert bool(res.converged) and true.max() <= 1.01e-6 * ref[0]


def test_warm_start_from_a_subspace_builds_up_accuracy():
  """``init_subspace``: each solve a Rayleigh-Ritz step on the previous
  eigenvectors plus new Krylov directions, so repeated one-cycle solves of a
  clustered spectrum approach the dense eigenvalues where cold ones of the
  same size do not; with ``tol`` the restarts converge, eager and jitted
  alike, the residuals being the true ones."""
  a, ref = _clustered()
  mat = jnp.asarray(a)
  mv = lambda v: mat @ v  # noqa: E731
  like = jnp.zeros(a.shape[0])
  def err(r):
    return np.max(np.abs(np.asarray(r.eigenvalues) - ref)) / ref[0]
  cold = anisonoise.top_eigenpairs(mv, like, 20, key=jax.random.key(0),
                                   tol=None)
  res, errors = cold, []
  for i in range(6):
    res = anisonoise.top_eigenpairs(mv, like, 20, key=jax.random.key(i + 1),
                                    tol=None, init_subspace=res.eigenvectors)
    assert int(res.num_matvecs) == 40  # k for the block, 20 new
    errors.append(err(res))
  assert err(cold) > 1e-2 and errors[-1] < err(cold) / 10
  assert errors[-1] < errors[0]
  vecs = np.asarray(res.eigenvectors)
  true = _true_residuals(a, res)
  np.testing.assert_allclose(np.asarray(res.residual_norms), true,
                             rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(vecs @ vecs.T, np.eye(20), atol=1e-10)
  # An empty (zero) subspace starts from random vectors; with tol the
  # restarts reach it.
  zero = jnp.zeros((20, a.shape[0]))
  solve = lambda: anisonoise.top_eigenpairs(  # noqa: E731
      mv, like, 20, key=jax.random.key(0), tol=1e-3, max_matvecs=4000,
      init_subspace=zero)
  eager, jitted = solve(), jax.jit(solve)()
  for r in (eager, jitted):
    assert bool(r.converged) and err(r) <= 1e-3
  assert int(eager.num_matvecs) == int(jitted.num_matvecs)
  # A settled subspace (its own Ritz pairs meet tol) gets 4 new directions
  # and a guard of (20 + 4) // 2 more.
  settled = [anisonoise.top_eigenpairs(
      mv, like, 20, key=jax.random.key(1), tol=1e-3,
      init_subspace=r.eigenvectors)
      for r in (eager, jitted)]
  for r in settled:
    assert int(r.num_matvecs) == 36 and bool(r.converged)
    assert err(r) <= 1e-3
  # An eigenvalue risen outside it (1.5, above the block's 1.19) is seen by
  # the guard, and the same solve goes on to find it.
  w, v = np.linalg.eigh(a)
  risen = jnp.asarray(a + (1.5 - w[100]) * np.outer(v[:, 100], v[:, 100]))
  ref2 = np.concatenate([[1.5], ref[:19]])
  found = anisonoise.top_eigenpairs(
      lambda x: risen @ x, like, 20, key=jax.random.key(2), tol=1e-3,
      max_matvecs=4000, init_subspace=eager.eigenvectors)
  assert bool(found.converged)
  np.testing.assert_allclose(np.asarray(found.eigenvalues), ref2, atol=1e-3)
  with pytest.raises(ValueError, match="init_vector or init_subspace"):
    anisonoise.top_eigenpairs(mv, like, 2, key=jax.random.key(0),
                              init_vector=like, init_subspace=zero[:2])
  with pytest.raises(ValueError, match="init_subspace holds 40 vectors"):
    anisonoise.top_eigenpairs(mv, like, 2, key=jax.random.key(0),
                              num_iters=40, init_subspace=jnp.zeros((40, 300)))


def _risen(value, d=200, seed=0):
  """A symmetric ``d x d`` operator whose old top 5 are 10, 9, 8, 7, 6.9
  above a bulk in [0, 6.8], and the same with one bulk eigenvalue (its
  eigenvector orthogonal to the old top 5) moved to ``value``."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  lam = np.concatenate([[10., 9., 8., 7., 6.9], np.linspace(6.8, 0., d - 5)])
  new = lam.copy()
  new[100] = value
  return (q * new) @ q.T, q[:, :5].T, np.sort(new)[::-1][:5]


def test_warm_start_sees_an_eigenvalue_risen_outside_the_block():
  """Residuals certify eigenpairs, not that they are the top ones: a refresh
  from the cached top 5 finds an eigenvalue risen orthogonally to them (or
  would say it did not), and a settled block still costs at most 1.5 times
  ``b + 4`` products."""

  @jax.jit
  def solve(a, old, key):
    return anisonoise.top_eigenpairs(
        lambda v: a @ v, jnp.zeros(200), 5, key=key, init_subspace=old,
        tol=1e-2)

  for value in (6.5, 8.5, 20.):  # 6.5: nothing rose above the block
    a, old, top5 = _risen(value)
    for seed in range(3):
      res = solve(jnp.asarray(a), jnp.asarray(old), jax.random.key(seed))
      assert bool(res.converged)
      np.testing.assert_allclose(np.asarray(res.eigenvalues), top5,
                                 atol=1e-2 * top5[0])
      if value < 6.9:
        assert int(res.num_matvecs) <= 1.5 * (5 + 4)


def test_convergence_is_relative_to_the_largest_magnitude():
  """With lambda_1 = -1e-9 the residuals are measured against the
  operator's scale (the largest ``|theta|``, here about 10), not against
  ``|lambda_1|``, which no residual could meet."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(100, 100)))
  lam = -np.concatenate([np.linspace(1e-9, 0.05, 50),
                         np.linspace(1., 10., 50)])
  a = jnp.asarray((q * lam) @ q.T)
  res = jax.jit(lambda: anisonoise.top_eigenpairs(
      lambda v: a @ v, jnp.zeros(100), 3, key=jax.random.key(0),
      tol=1e-3))()
  assert bool(res.converged)
  # Each value is within its residual (<= 1e-3 * 10) of an eigenvalue.
  gaps = np.abs(np.asarray(res.eigenvalues)[:, None] - lam[None]).min(1)
  assert np.all(gaps <= np.asarray(res.residual_norms) + 1e-12)
  assert np.all(np.asarray(res.residual_norms) <= 1e-3 * 10.)


def test_non_convergence_is_reported():
  a, _ = _clustered()
  solve = lambda: anisonoise.top_eigenpairs(  # noqa: E731
      lambda v: jnp.asarray(a) @ v, jnp.zeros(300), 20,
      key=jax.random.key(0), tol=1e-3, max_matvecs=60)
  with pytest.warns(RuntimeWarning, match="did not reach residual"):
    res = solve()
  assert not bool(res.converged) and int(res.num_matvecs) <= 60
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    flagged = jax.jit(solve)()  # under jit: the flag only
  assert not bool(flagged.converged)
  like = jnp.zeros(10)
  with pytest.raises(ValueError, match="tol must be positive"):
    anisonoise.top_eigenpairs(lambda v: v, like, 2, key=jax.random.key(0),
                              tol=0.0)
  with pytest.raises(ValueError, match="max_matvecs must be an int >="):
    anisonoise.top_eigenpairs(lambda v: v, like, 2, key=jax.random.key(0),
                              num_iters=5, max_matvecs=4)


def test_chunk_size_validated():
  loss_fn, params, batch = linear_problem()
  with pytest.raises(ValueError, match="chunk_size"):
    anisonoise.per_example_grads(loss_fn, params, batch, chunk_size=0)


@pytest.mark.parametrize("unroll", [None, True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 100])
def test_map_chunks_matches_direct_map(unroll, chunk_size):
  xs = {"a": jnp.arange(30.0).reshape(10, 3), "b": jnp.arange(10.0)}

  def fn(x):
    return {"s": jnp.sum(x["a"]) * x["b"], "v": x["a"] ** 2}

  direct = jax.vmap(fn)(xs)
  got = anisonoise.map_chunks(fn, xs, chunk_size, unroll=unroll)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(direct)):
    np.testing.assert_allclose(a, b)
  total = anisonoise.map_chunks(fn, xs, chunk_size, unroll=unroll,
                                reduce_sum=True)
  for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(direct)):
    np.testing.assert_allclose(a, jnp.sum(b, axis=0))


def test_sgd_noise_sampler_matches_sample_sgd_noise():
  loss_fn, params, batch = linear_problem()
  key = jax.random.key(5)
  draw = anisonoise.sgd_noise_sampler(loss_fn, params, batch, batch_size=3)
  np.testing.assert_allclose(
      draw(key), anisonoise.sample_sgd_noise(loss_fn, params, batch, key,
                                             batch_size=3), rtol=1e-12)
