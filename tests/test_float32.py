"""float32, as users run it: Lanczos at a million parameters."""

import jax
import jax.numpy as jnp
import numpy as np

import anisonoise

D = 1_000_000
K = 10


def _rotated_diagonal(seed=0):
  """``A = R diag(d) R`` with ``R = I - 2 w w^T`` (a Householder reflection,
  so the eigenvectors ``R e_i`` are dense): known eigenpairs. ``d``: K
  leading eigenvalues 100, 90, ... 10 above a bulk uniform in [0, 1]
  (low rank plus a diagonal, in a rotated basis)."""
  rng = np.random.default_rng(seed)
  d = rng.uniform(0.0, 1.0, D).astype(np.float32)
  top = rng.choice(D, K, replace=False)
  d[top] = np.arange(100, 100 - 10 * K, -10, dtype=np.float32)
  w = rng.normal(size=D).astype(np.float32)
  w /= np.linalg.norm(w)
  return jnp.asarray(d), jnp.asarray(w), top


def test_lanczos_float32_at_a_million_parameters():
  d, w, top = _rotated_diagonal()

  def reflect(v):
    return v - 2 * jnp.vdot(w, v) * w

  def matvec(p):
    return {"a": reflect(d * reflect(p["a"]))}

  like = {"a": jnp.zeros(D, jnp.float32)}
  res = jax.jit(lambda: anisonoise.top_eigenpairs(
      matvec, like, K, key=jax.random.key(0), num_iters=40))()
  vecs = res.eigenvectors["a"]
  assert vecs.dtype == jnp.float32 and res.eigenvalues.dtype == jnp.float32
  # float32 sums over 10^6 entries round at about sqrt(D) eps = 1.2e-4,
  # relative to ||A|| = lambda_1 (measured: 2.7e-5 lambda_1 at most).
  exact = np.arange(100, 100 - 10 * K, -10, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(res.eigenvalues, np.float64), exact,
                             rtol=0, atol=1e-4 * exact[0])
  # Orthonormal to float32 working precision at this size (Gram matrix in
  # float64): the norms are float32 sums of 10^6 squares, off by about
  # sqrt(D) eps (measured: 1.4e-4 on the diagonal, <= 5e-5 off it).
  v64 = np.asarray(vecs, np.float64)
  gram = v64 @ v64.T
  assert np.abs(gram - np.eye(K)).max() < 3e-4
  assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-4
  # Each is the true eigenvector R e_i, up to sign.
  for j, i in enumerate(top):
    true = np.asarray(reflect(jax.nn.one_hot(i, D, dtype=jnp.float32)))
    assert abs(float(np.dot(np.asarray(vecs[j]), true))) > 0.9999
  # The reported residuals bound the true ones (to float32 rounding).
  actual = [float(jnp.linalg.norm(matvec({"a": v})["a"] - lam * v))
            for v, lam in zip(vecs, res.eigenvalues)]
  assert max(actual) < 1e-3 * 100
  assert np.all(np.asarray(res.residual_norms) < 1e-3 * 100)
