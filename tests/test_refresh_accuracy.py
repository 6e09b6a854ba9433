"""What the low-rank noises' cached vectors capture along a run, against
dense float64 references, and what a warm-started refresh costs.

The paper-scale measurements (LeNet, the MLPs of the benchmarks) are
``benchmarks/trajectory.py``'s; these are their small twins: a tanh MLP
with random labels near its initialisation, where the top of the
spectrum is flat and moves from refresh to refresh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import dense_reference, mlp_problem

K = 10


def _problem():
  # D = 754, float32 parameters (what users run).
  return mlp_problem(n=200, d_in=20, hidden=24, classes=10, seed=3,
                     dtype=jnp.float32)


def _dense(loss_fn, params, batch):
  with jax.enable_x64(True):
    cast = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jnp.asarray(np.asarray(x, np.float64))
        if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    _, _, c, h = dense_reference(loss_fn, cast(params), cast(batch))
  return c, h


def _captured(m, vectors, k):
  u = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vectors), np.float64)
  return float(np.einsum("id,de,ie->", u, m, u)
               / np.linalg.eigvalsh(m)[::-1][:k].sum())


def test_cached_vectors_capture_the_top_k_along_a_run():
  """hessian_noise and leading_noise with their defaults (refresh every
  10 steps, the subspace criterion at tol 3e-3), 40 steps of
  ``chain(noise, sgd)`` from initialisation: after each refresh the cached
  vectors capture at least 99% of the top-10 curvature of the full-batch
  H (or C) at that step's parameters; and none of the refreshes hits its
  budget."""
  loss_fn, params0, batch = _problem()
  for noise, of_c in ((anisonoise.hessian_noise(K, batch_size=20, key=0),
                       False),
                      (anisonoise.leading_noise(K, batch_size=20, key=1),
                       True)):
    tx = optax.chain(noise, optax.sgd(0.2))

    @jax.jit
    def step(params, state, tx=tx):
      g = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
      u, state = tx.update(g, state, params, loss_fn=loss_fn, batch=batch)
      return optax.apply_updates(params, u), state

    params, state = params0, tx.init(params0)
    captured, products = [], []
    for i in range(40):
      before = params
      params, state = step(params, state)
      if i % 10 == 0:
        c, h = _dense(loss_fn, before, batch)
        captured.append(_captured(c if of_c else h,
                                  state[0].eigenvectors, K))
        products.append(int(state[0].num_matvecs))
    assert int(state[0].num_unconverged) == 0
    assert min(captured) >= 0.99, (captured, products)
    # The warm refreshes cost less than the cold first one.
    assert max(products[1:]) < products[0], products


def test_a_warm_start_pays_along_a_run():
  """At a point 10 GD steps along the run, a solve warm-started from the
  cache of step 0 runs fewer products than a cold one there and captures
  as much (to 1e-3) of the dense top-10 curvature."""
  loss_fn, params, batch = _problem()
  solve = lambda p, **kw: anisonoise.top_eigenpairs(  # noqa: E731
      anisonoise.hessian_operator(loss_fn, p, batch), p, K,
      key=jax.random.key(0), tol=3e-3, criterion="subspace", **kw)
  cache = solve(params).eigenvectors
  grad = jax.jit(jax.grad(lambda p: jnp.mean(loss_fn(p, batch))))
  for _ in range(10):
    params = jax.tree.map(lambda a, g: a - 0.2 * g, params, grad(params))
  h = _dense(loss_fn, params, batch)[1]
  cold, warm = solve(params), solve(params, init_subspace=cache)
  stale = _captured(h, cache, K)
  got = {name: (int(r.num_matvecs), _captured(h, r.eigenvectors, K))
         for name, r in (("cold", cold), ("warm", warm))}
  assert stale < 0.995, stale  # the cache has moved: a real test
  assert got["warm"][0] < got["cold"][0], got
  assert got["warm"][1] >= got["cold"][1] - 1e-3, got
  assert got["warm"][1] >= 0.99, got
