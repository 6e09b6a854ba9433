"""Hutchinson's estimator against its target and its variance formula."""

import jax
import jax.numpy as jnp
import numpy as np

from anisonoise._src import estimators


def test_hutchinson_matches_trace_and_variance_formula():
  rng = np.random.default_rng(0)
  b = rng.normal(size=(6, 6)).astype(np.float32)
  a = jnp.asarray(b @ b.T)
  like = {"u": jnp.zeros(2), "w": jnp.zeros((2, 2))}  # a pytree of size 6

  def form(v):
    flat = jnp.concatenate([v["u"], v["w"].ravel()])
    return flat @ a @ flat

  num = 4000
  est = estimators.hutchinson(form, like, jax.random.key(1), num, None)
  var = 2 * (jnp.sum(a**2) - jnp.sum(jnp.diag(a) ** 2))  # one probe's
  sem = float(jnp.sqrt(var / num))
  # The mean within 4 standard errors of Tr(A); the reported standard
  # error within 10% of the formula's (its own relative error is about
  # sqrt(kurtosis / num) < 5% here).
  assert abs(float(est.mean) - float(jnp.trace(a))) < 4 * sem
  np.testing.assert_allclose(float(est.stderr), sem, rtol=0.1)


def test_one_sample_has_no_standard_error():
  est = estimators.mean_and_sem(jnp.array([3.0]))
  assert float(est.mean) == 3.0 and np.isnan(float(est.stderr))
