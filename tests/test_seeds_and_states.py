"""Keys, seeds under ``jax.vmap`` and checkpoints of the transforms' states."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import anisonoise
from conftest import linear_problem


def _first_noise(tx, params, loss_fn, batch):
  zeros = jnp.zeros_like(params)
  return tx.update(zeros, tx.init(params), params, loss_fn=loss_fn,
                   batch=batch)[0]


def test_default_keys_give_every_transform_its_own_stream():
  params = jnp.zeros(8)
  twice = optax.chain(anisonoise.isotropic_noise(0.1),
                      anisonoise.isotropic_noise(0.1))
  once = anisonoise.isotropic_noise(0.1, key=0)
  both = twice.update(params, twice.init(params))[0]
  one = once.update(params, once.init(params))[0]
  assert np.abs(both - 2 * one).max() > 1e-3
  assert np.abs(both).max() > 0
  # Two noises of the same covariance (I) do not share their coefficients.
  loss_fn, p, batch = linear_problem()
  iso = anisonoise.isotropic_noise(1.0)
  dyn = anisonoise.dynamic_isotropic_noise(trace=float(p.size))
  assert np.abs(_first_noise(iso, p, loss_fn, batch)
                - _first_noise(dyn, p, loss_fn, batch)).max() > 1e-3


def test_every_kind_of_seed_reproduces_the_same_noise():
  loss_fn, params, batch = linear_problem()
  draws = [_first_noise(anisonoise.sgd_noise(batch_size=4, key=key), params,
                        loss_fn, batch)
           for key in (3, np.int64(3), jnp.int32(3), jax.random.key(3),
                       jax.random.PRNGKey(3))]
  for d in draws[1:]:
    np.testing.assert_array_equal(d, draws[0])
  with pytest.raises(ValueError, match="key must be an int seed"):
    anisonoise.sgd_noise(key=True)
  # The diagnostics take the same seeds.
  for key in (0, np.int64(0), jax.random.PRNGKey(0)):
    est = anisonoise.hessian_trace(loss_fn, params, batch,
                                   method="hutchinson", key=key, num_probes=2)
    np.testing.assert_array_equal(est.mean, anisonoise.hessian_trace(
        loss_fn, params, batch, method="hutchinson",
        key=jax.random.key(0), num_probes=2).mean)


def _seeded(params, loss_fn, batch, refresh_every=2):
  """A vmapped jitted step over 3 seeds of ``hessian_noise``; ``ticks``
  counts the loss evaluations that run (a refresh)."""
  ticks = []

  def counted(p, b):
    jax.debug.callback(lambda: ticks.append(1))
    return loss_fn(p, b)

  def make(seed):
    return anisonoise.hessian_noise(2, trace=0.1, key=seed,
                                    refresh_every=refresh_every)

  states = jax.vmap(lambda s: make(s).init(params))(jnp.arange(3))

  @jax.jit
  def step(states):
    def one(seed, state):
      return make(seed).update(jnp.zeros_like(params), state, params,
                               loss_fn=counted, batch=batch)
    return jax.vmap(one)(jnp.arange(3), states)

  return step, states, ticks


def test_seeds_under_vmap_are_exact_and_refresh_only_when_due():
  loss_fn, params, batch = linear_problem()
  step, states, ticks = _seeded(params, loss_fn, batch)
  eps, states = step(states)  # count 0: a refresh
  jax.effects_barrier()
  assert ticks
  alone = jax.jit(lambda seed: _first_noise(
      anisonoise.hessian_noise(2, trace=0.1, key=seed, refresh_every=2),
      params, loss_fn, batch))
  for seed in range(3):
    np.testing.assert_allclose(eps[seed], alone(seed), atol=1e-6)
  assert np.abs(eps[0] - eps[1]).max() > 0
  # Under vmap a cond on a batched predicate becomes a select that runs
  # both branches: the refresh (its loss evaluations) would run every step.
  jax.effects_barrier()
  del ticks[:]
  _, states = step(states)  # count 1: none due
  jax.effects_barrier()
  assert not ticks
  _, states = step(states)  # count 2: a refresh again
  jax.effects_barrier()
  assert ticks


def test_states_round_trip_through_flax_serialization_and_orbax(tmp_path):
  import orbax.checkpoint as ocp

  loss_fn, params, batch = linear_problem()
  # One transform of each state type (leading_noise and
  # hessian_eigvec_noise share hessian_noise's).
  txs = {
      "isotropic": anisonoise.isotropic_noise(0.1, key=1),
      "dynamic": anisonoise.dynamic_isotropic_noise(trace=1.0, key=1),
      "diagonal": anisonoise.diagonal_noise(trace=1.0, key=1),
      "hessian": anisonoise.hessian_noise(2, trace=1.0, key=1),
      "sgd": anisonoise.sgd_noise(batch_size=4, key=1),
  }
  zeros = jnp.zeros_like(params)
  steps = {name: jax.jit(lambda s, tx=tx: tx.update(
      zeros, s, params, loss_fn=loss_fn, batch=batch))
           for name, tx in txs.items()}
  states = {name: steps[name](tx.init(params))[1]
            for name, tx in txs.items()}
  restored = serialization.from_bytes(
      {name: tx.init(params) for name, tx in txs.items()},
      serialization.to_bytes(states))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", states)
    ckpt.wait_until_finished()
    from_orbax = ckpt.restore(tmp_path / "ckpt", states)
  for name in txs:
    expected = steps[name](states[name])
    for back in (restored[name], from_orbax[name]):
      chex.assert_trees_all_equal(steps[name](back), expected)
