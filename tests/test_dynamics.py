"""The library's one table of compared dynamics."""

import jax.numpy as jnp
import optax
import pytest

import anisonoise

STATES = {
    "GLD const": anisonoise.IsotropicNoiseState,
    "GLD dynamic": anisonoise.DynamicIsotropicNoiseState,
    "GLD diag": anisonoise.DiagonalNoiseState,
    "GLD leading": anisonoise.LowRankNoiseState,
    "GLD Hessian": anisonoise.LowRankNoiseState,
    "GLD 1st eigvec(H)": anisonoise.LowRankNoiseState,
    "GD + SGD noise": anisonoise.SgdNoiseState,
}


@pytest.mark.parametrize("name", anisonoise.DYNAMICS)
def test_each_name_builds_its_structure(name):
  tx = anisonoise.dynamics_noise(name, std=1e-3, k=2, batch_size=4,
                                 refresh_every=3, key=1)
  if name in ("GD", "SGD"):
    return
  state = tx.init(jnp.zeros(5))
  assert type(state) is STATES[name]
  if name in ("GLD leading", "GLD Hessian"):
    assert state.eigenvalues.shape == (2,)
  if name == "GLD 1st eigvec(H)":
    assert state.eigenvalues.shape == (1,)


def test_settings_reach_the_factory():
  """batch_size and trace are passed on, not dropped: a fixed trace shows
  in the state after one update."""
  tx = anisonoise.dynamics_noise("GLD dynamic", trace=0.25)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.zeros(3), state, jnp.zeros(3))
  assert float(state.trace) == 0.25


def test_errors():
  with pytest.raises(ValueError, match="unknown dynamics 'Adam'"):
    anisonoise.dynamics_noise("Adam")
  with pytest.raises(ValueError, match=r"no dynamics takes \['lr'\]"):
    anisonoise.dynamics_noise("GLD diag", lr=0.1)
  with pytest.raises(ValueError, match="needs std="):
    anisonoise.dynamics_noise("GLD const")
  with pytest.raises(ValueError, match="needs k="):
    anisonoise.dynamics_noise("GLD Hessian", batch_size=4)


@pytest.mark.parametrize("name", ["GD", "SGD"])
def test_gd_and_sgd_chain_and_add_nothing(name):
  """The rows without a noise transform chain like the others: the update
  is sgd's on the gradient given (for SGD, the minibatch gradient)."""
  tx = optax.chain(anisonoise.dynamics_noise(name, batch_size=4),
                   optax.sgd(0.5))
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.arange(3.0)}
  u, _ = tx.update(grads, tx.init(params), params, loss_fn=None, batch=None)
  assert u["w"].tolist() == [0.0, -0.5, -1.0]
