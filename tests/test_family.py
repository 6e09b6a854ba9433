"""The multiplicative-noise family and anticorrelated noise against their
dense definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import dense_reference, linear_problem

pytestmark = pytest.mark.usefixtures("x64")

N = 40  # examples of linear_problem
M = 10  # SGD minibatch size matched
B = 20  # sub-batch size of the "-B" variants
NUM_DRAWS = 10000


def _rademacher(n):
  return lambda key: jax.random.rademacher(key, (n,), jnp.float64)


# name -> (weights, centred, estimation_size, trace[, replacement])
CASES = {
    "gaussian-cov": ("gaussian", True, None, None),
    "gaussian-fisher": ("gaussian", False, None, None),
    "gaussian-cov-B": ("gaussian", True, B, None),
    "gaussian-fisher-B": ("gaussian", False, B, None),
    "bernoulli-cov": ("bernoulli", True, None, None),
    "bernoulli-fisher": ("bernoulli", False, None, None),
    "bernoulli-cov-B": ("bernoulli", True, B, None),
    "bernoulli-fisher-B": ("bernoulli", False, B, None),
    "sampling": ("sampling", True, None, None),
    "sampling-B": ("sampling", True, B, None),
    "own-cov": (_rademacher(N), True, None, None),
    "own-fisher-B": (_rademacher(B), False, B, None),
    "gaussian-cov-trace": ("gaussian", True, None, 0.5),
    "gaussian-fisher-trace": ("gaussian", False, None, 0.5),
    "sampling-without-replacement": ("sampling", True, None, None, False),
    "bernoulli-fisher-without-B": ("bernoulli", False, B, None, False),
}


def _draws(tx, loss_fn, params, batch, num, seed=0):
  """``num`` noise draws: one update each, vmapped over the state's key."""
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def one(key):
    eps, _ = tx.update(zeros, state._replace(rng_key=key), params,
                       loss_fn=loss_fn, batch=batch)
    return ravel_pytree(eps)[0]

  keys = jax.random.split(jax.random.key(seed), num)
  return np.asarray(jax.jit(jax.vmap(one))(keys))


def _tolerance(x, y=None):
  """4 standard errors of ``||mean(x y^T) - E[x y^T]||_F`` from the draws
  themselves (any distribution: the Bernoulli and sampling noises are far
  from Gaussian)."""
  y = x if y is None else y
  products = x[:, :, None] * y[:, None, :]
  return 4 * np.sqrt(products.var(axis=0).sum() / len(x))


def _second_moment(x, y=None):
  y = x if y is None else y
  return x.T @ y / len(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_draws_have_the_covariance_of_sgd(name):
  """Each weight class, centred (``C/m``) and uncentred (the Fisher
  ``F/m``), on all examples and on a random sub-batch, against the dense
  covariance; the tolerance tells ``C/m`` from ``F/m`` and from each class's
  unscaled covariance."""
  weights, centred, size, trace, *replacement = CASES[name]
  replacement = replacement[0] if replacement else True
  loss_fn, params, batch = linear_problem(n=N)
  g, _, c, _ = dense_reference(loss_fn, params, batch)
  f = g.T @ g / N
  k, other = (c, f) if centred else (f, c)
  scale = 1 / M if trace is None else trace / np.trace(k)
  if not replacement:  # an actual minibatch of M distinct examples
    scale *= (N - M) / (N - 1)
  tx = anisonoise.multiplicative_noise(
      weights, centred=centred, batch_size=None if trace else M,
      trace=trace, replacement=replacement, estimation_size=size)
  x = _draws(tx, loss_fn, params, batch, NUM_DRAWS)
  tol = _tolerance(x)
  err = np.linalg.norm(_second_moment(x) - scale * k)
  assert err < tol, (err, tol)
  # What the tolerance rules out: the other covariance, and the unscaled
  # covariances of sampling without replacement ((n-m)/(n-1)) and of
  # Bernoulli weights (1 - m/n), on all examples (n = 40) or b = 20.
  assert tol < np.linalg.norm(scale * (k - other))
  assert tol < np.linalg.norm(scale * k) * (1 - (N - M) / (N - 1))


def test_draws_have_the_covariance_of_sgd_without_replacement():
  """The exact SGD-noise of minibatches of M distinct examples, as
  ``sgd_noise(replacement=False)``: the same draw for the same key."""
  loss_fn, params, batch = linear_problem(n=N)
  out = []
  for tx in (anisonoise.sgd_noise(batch_size=M, replacement=False, key=4),
             anisonoise.multiplicative_noise(batch_size=M, replacement=False,
                                             key=4)):
    u, _ = tx.update(jnp.zeros_like(params), tx.init(params), params,
                     loss_fn=loss_fn, batch=batch)
    out.append(np.asarray(u))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_sgd_noise_is_the_gaussian_member():
  """``sgd_noise`` and centred Gaussian weights: the same draw for the same
  key (one weighted backward pass, one home)."""
  loss_fn, params, batch = linear_problem(n=N)
  grads = jnp.zeros_like(params)
  out = []
  for tx in (anisonoise.sgd_noise(batch_size=M, key=3),
             anisonoise.multiplicative_noise(batch_size=M, key=3)):
    u, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn,
                     batch=batch)
    out.append(np.asarray(u))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=1e-14)
  assert np.abs(out[0]).max() > 0


@pytest.mark.parametrize("name", ["bernoulli-fisher-B",
                                  "gaussian-cov-trace"])
def test_chunks_give_the_same_draw(name):
  weights, centred, size, trace = CASES[name]
  loss_fn, params, batch = linear_problem(n=N)
  out = []
  for chunk_size in (None, 7):
    tx = anisonoise.multiplicative_noise(
        weights, centred=centred, batch_size=None if trace else M,
        trace=trace, estimation_size=size, chunk_size=chunk_size, key=2)
    u, _ = tx.update(jnp.zeros_like(params), tx.init(params), params,
                     loss_fn=loss_fn, batch=batch)
    out.append(np.asarray(u))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-10)
  assert np.abs(out[0]).max() > 0


def test_batch_size_may_be_an_array():
  """A scheduled scale (``optax.inject_hyperparams`` passes arrays): the
  same draw as the int; the picking classes need an int."""
  loss_fn, params, batch = linear_problem(n=N)
  out = []
  for m in (M, jnp.asarray(float(M))):
    tx = anisonoise.multiplicative_noise(batch_size=m, estimation_size=B,
                                         key=0)
    u, _ = jax.jit(lambda s: tx.update(jnp.zeros_like(params), s, params,
                                       loss_fn=loss_fn, batch=batch))(
                                           tx.init(params))
    out.append(np.asarray(u))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-12)
  with pytest.raises(TypeError, match="batch_size is a structural setting"):
    anisonoise.multiplicative_noise("sampling", batch_size=jnp.asarray(4))


def _anticorrelated_draws(tx, loss_fn, params, batch, num, steps=3):
  """``num`` chains of ``steps`` updates of ``tx`` (zero gradients): the
  noise of each step, ``(num, steps, D)``."""
  state = tx.init(params)
  zeros = jnp.zeros_like(params)

  def chain(key):
    s = state._replace(inner_state=state.inner_state._replace(
      rng_key=jax.random.key_data(key)))

    def step(s, _):
      eps, s = tx.update(zeros, s, params, loss_fn=loss_fn, batch=batch)
      return s, eps

    return jax.lax.scan(step, s, length=steps)[1]

  keys = jax.random.split(jax.random.key(1), num)
  return np.asarray(jax.jit(jax.vmap(chain))(keys))


def test_anticorrelated_lag_one_autocovariance():
  """eps_t = z_t - z_{t-1} of an anisotropic inner noise (covariance
  Sigma = C/m): Cov(eps_0) = Sigma, Cov(eps_t) = 2 Sigma and
  Cov(eps_t, eps_{t-1}) = -Sigma."""
  loss_fn, params, batch = linear_problem(n=N)
  _, _, c, _ = dense_reference(loss_fn, params, batch)
  sigma = c / M
  tx = anisonoise.anticorrelated_noise(
      anisonoise.multiplicative_noise(batch_size=M))
  x = _anticorrelated_draws(tx, loss_fn, params, batch, 4000)
  e0, e1, e2 = x[:, 0], x[:, 1], x[:, 2]
  for (a, b), target in (((e0, e0), sigma), ((e1, e1), 2 * sigma),
                         ((e2, e2), 2 * sigma), ((e2, e1), -sigma),
                         ((e1, e0), -sigma)):
    tol = _tolerance(a, b)
    assert np.linalg.norm(_second_moment(a, b) - target) < tol
    # It tells -Sigma from uncorrelated draws.
    assert tol < np.linalg.norm(sigma)
  # Lag two: uncorrelated.
  assert np.linalg.norm(_second_moment(e2, e0)) < _tolerance(e2, e0)


def test_anticorrelated_wraps_an_existing_transform_in_a_chain():
  """Around a refreshed noise of Table 1: the noise added is the inner
  transform's draws differenced, and the sum of the noises telescopes to
  the last draw. (Chains with optax optimizers and NNX: the conformance
  suite.)"""
  loss_fn, params, batch = linear_problem(n=N)
  inner = anisonoise.diagonal_noise(batch_size=M, trace_estimator="exact",
                                   key=5)
  anti = anisonoise.anticorrelated_noise(inner)
  grads = jnp.ones_like(params)

  def steps(tx, num=4):
    update = jax.jit(lambda s: tx.update(grads, s, params, loss_fn=loss_fn,
                                         batch=batch))
    state, out = tx.init(params), []
    for _ in range(num):
      u, state = update(state)
      out.append(np.asarray(u) - 1)
    return np.stack(out), state

  z, _ = steps(inner)
  eps, state = steps(anti)
  np.testing.assert_allclose(eps[0], z[0], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(eps[1:], z[1:] - z[:-1], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(eps.sum(0), z[-1], rtol=1e-9, atol=1e-12)
  assert int(state.count) == 4 and int(state.inner_state.count) == 4



def test_bad_inputs():
  loss_fn, params, batch = linear_problem(n=N)
  grads = jnp.zeros_like(params)

  def update(tx):
    return tx.update(grads, tx.init(params), params, loss_fn=loss_fn,
                     batch=batch)

  with pytest.raises(ValueError, match=r"shape \(40,\), got shape \(41,\)"):
    update(anisonoise.multiplicative_noise(_rademacher(N + 1)))
  with pytest.raises(ValueError, match=r"shape \(20,\), got shape \(40,\)"):
    update(anisonoise.multiplicative_noise(_rademacher(N),
                                           estimation_size=B))
  with pytest.raises(ValueError, match="non-finite"):
    update(anisonoise.multiplicative_noise(
        lambda key: jnp.full((N,), jnp.nan)))
  with pytest.raises(ValueError, match="estimation_size=41 is larger than"
                     " the batch of n=40"):
    update(anisonoise.multiplicative_noise(estimation_size=N + 1))
  with pytest.raises(ValueError, match="needs m < 20"):
    update(anisonoise.multiplicative_noise("bernoulli", batch_size=B,
                                           estimation_size=B))
  with pytest.raises(ValueError, match="needs m < 40"):
    update(anisonoise.multiplicative_noise("sampling"))
  for kwargs, match in (
      ({"weights": "uniform"}, "weights must be 'gaussian'"),
      ({"weights": "sampling", "centred": False}, "always centred"),
      ({"weights": "bernoulli", "trace": 1.0}, "not trace="),
      ({"estimation_size": 1}, "estimation_size >= 2"),
      ({"estimation_size": 0}, "estimation_size must be an int >= 1"),
      ({"centred": 1}, "centred must be True"),
      ({"batch_size": 4, "trace": 1.0}, "not both"),
  ):
    with pytest.raises(ValueError, match=match):
      anisonoise.multiplicative_noise(**kwargs)
  with pytest.raises(ValueError, match="wraps a noise transform"):
    anisonoise.anticorrelated_noise(0.1)


def test_family_dynamics_by_name():
  states = {"Anti-PGD": anisonoise.AnticorrelatedNoiseState}
  for name in anisonoise.FAMILY_DYNAMICS:
    tx = anisonoise.dynamics_noise(name, std=1e-3, k=2, batch_size=4,
                                   estimation_size=8, refresh_every=3, key=1)
    state = tx.init(jnp.zeros(5))
    assert type(state) is states.get(name,
                                     anisonoise.MultiplicativeNoiseState)
  with pytest.raises(ValueError, match="needs estimation_size="):
    anisonoise.dynamics_noise("MSGD-Cov-B", batch_size=4)
  with pytest.raises(ValueError, match="needs std="):
    anisonoise.dynamics_noise("Anti-PGD")
