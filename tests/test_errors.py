"""Bad input: every error says what was wrong and what to do."""

import jax
import jax.numpy as jnp
import pytest

import anisonoise
from conftest import linear_problem

LOW_RANK = [anisonoise.leading_noise, anisonoise.hessian_noise]
NEEDS_LOSS = [
    lambda: anisonoise.dynamic_isotropic_noise(),
    lambda: anisonoise.diagonal_noise(),
    lambda: anisonoise.leading_noise(2),
    lambda: anisonoise.hessian_noise(2),
    lambda: anisonoise.hessian_eigvec_noise(),
    lambda: anisonoise.sgd_noise(),
]


@pytest.mark.parametrize("factory", LOW_RANK)
def test_k_below_one(factory):
  with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
    factory(0)


@pytest.mark.parametrize("factory", LOW_RANK)
def test_k_above_num_params(factory):
  _, params, _ = linear_problem(d=8)
  with pytest.raises(ValueError, match=r"k=9 eigenpairs asked of a model with"
                     r" D=8 parameters; use k <= 8"):
    factory(9).init(params)
  factory(8).init(params)  # k = D: the full covariance (paper's 2D example)


@pytest.mark.parametrize("factory", [
    anisonoise.dynamic_isotropic_noise, anisonoise.diagonal_noise,
    anisonoise.hessian_eigvec_noise, anisonoise.sgd_noise,
    lambda **kw: anisonoise.leading_noise(2, **kw),
    lambda **kw: anisonoise.hessian_noise(2, **kw)])
@pytest.mark.parametrize("bad", [0, -3])
def test_batch_size_not_positive(factory, bad):
  with pytest.raises(ValueError, match=f"batch_size must be >= 1.*got {bad}"):
    factory(batch_size=bad)


@pytest.mark.parametrize("factory", [
    anisonoise.dynamic_isotropic_noise, anisonoise.diagonal_noise,
    anisonoise.hessian_eigvec_noise,
    lambda **kw: anisonoise.hessian_noise(2, **kw)])
def test_batch_size_and_trace_together(factory):
  with pytest.raises(ValueError, match="either batch_size .* or trace"):
    factory(batch_size=20, trace=0.01)


def test_negative_std():
  with pytest.raises(ValueError, match="std must be a non-negative"):
    anisonoise.isotropic_noise(-1.0)


def test_negative_trace():
  with pytest.raises(ValueError, match="trace must be a non-negative"):
    anisonoise.diagonal_noise(trace=-1.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_refresh_every(bad):
  with pytest.raises(ValueError, match="refresh_every must be an int >= 1"):
    anisonoise.hessian_noise(2, refresh_every=bad)


@pytest.mark.parametrize("make", NEEDS_LOSS)
@pytest.mark.parametrize("missing", ["loss_fn", "batch", "both"])
def test_missing_loss_or_batch(make, missing):
  loss_fn, params, batch = linear_problem()
  tx = make()
  state = tx.init(params)
  kw = {"loss_fn": loss_fn, "batch": batch}
  for name in (("loss_fn", "batch") if missing == "both" else (missing,)):
    kw.pop(name)
  with pytest.raises(ValueError, match=r"needs the per-example loss.*"
                     r"loss_fn=loss_fn, batch=batch"):
    tx.update(params, state, params, **kw)


@pytest.mark.parametrize("make", NEEDS_LOSS)
def test_scalar_loss(make):
  loss_fn, params, batch = linear_problem()
  tx = make()
  with pytest.raises(ValueError, match=r"shape \(40,\).*returned a scalar"):
    tx.update(params, tx.init(params), params,
              loss_fn=lambda p, b: jnp.mean(loss_fn(p, b)), batch=batch)


@pytest.mark.parametrize("make", NEEDS_LOSS)
def test_wrong_length_loss(make):
  loss_fn, params, batch = linear_problem()
  tx = make()
  with pytest.raises(ValueError, match=r"shape \(40,\).*returned shape"
                     r" \(39,\)"):
    tx.update(params, tx.init(params), params,
              loss_fn=lambda p, b: loss_fn(p, b)[:-1], batch=batch)


@pytest.mark.parametrize("make", NEEDS_LOSS)
def test_ragged_batch(make):
  loss_fn, params, batch = linear_problem()
  tx = make()
  bad = {"x": batch["x"], "y": batch["y"][:30]}
  with pytest.raises(ValueError, match=r"different leading \(example\) sizes"
                     r".*\['x'\]: 40.*\['y'\]: 30"):
    tx.update(params, tx.init(params), params, loss_fn=loss_fn, batch=bad)


@pytest.mark.parametrize("make", NEEDS_LOSS + [
    lambda: anisonoise.dynamic_isotropic_noise(trace=0.1)])
def test_params_none(make):
  loss_fn, params, batch = linear_problem()
  tx = make()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(params, state, None, loss_fn=loss_fn, batch=batch)


def test_bad_key():
  with pytest.raises(ValueError, match="key must be an int seed"):
    anisonoise.sgd_noise(key="seed")


def test_trace_estimator_name():
  with pytest.raises(ValueError, match="trace_estimator must be one of"):
    anisonoise.leading_noise(2, trace_estimator="fast")
  # Deflation needs eigenvectors: only the low-rank noises offer it.
  with pytest.raises(ValueError,
                     match="one of 'exact' .*'hutchinson' .*got 'deflated'"):
    anisonoise.diagonal_noise(trace_estimator="deflated")
  with pytest.raises(ValueError, match="num_probes"):
    anisonoise.dynamic_isotropic_noise(num_probes=0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    anisonoise.covariance_diagonal(lambda w, b: b @ w, jnp.zeros(2),
                                   jnp.ones((3, 2)), method="hutchinson")
  with pytest.raises(ValueError, match="deflate= applies to"):
    anisonoise.covariance_trace(lambda w, b: b @ w, jnp.zeros(2),
                                jnp.ones((3, 2)), deflate=jnp.eye(2))
  with pytest.raises(ValueError, match="in_span= is the part"):
    anisonoise.covariance_trace(lambda w, b: b @ w, jnp.zeros(2),
                                jnp.ones((3, 2)), method="hutchinson",
                                key=jax.random.key(0), in_span=1.0)
  with pytest.raises(ValueError, match="hessian_trace: method must be"
                     " 'exact' .* or 'hutchinson'"):
    anisonoise.hessian_trace(lambda w, b: b @ w, jnp.zeros(2),
                             jnp.ones((3, 2)), method="probes")
  with pytest.raises(ValueError, match="num_probes must be an int >= 1"):
    anisonoise.hessian_trace(lambda w, b: b @ w, jnp.zeros(2),
                             jnp.ones((3, 2)), method="hutchinson",
                             key=jax.random.key(0), num_probes=0)


def test_isotropic_needs_no_loss_nor_params():
  params = {"w": jnp.zeros(3)}
  tx = anisonoise.isotropic_noise(0.1)
  u, _ = tx.update(params, tx.init(params), None)
  assert float(jnp.abs(u["w"]).max()) > 0


def test_fixed_trace_dynamic_needs_no_loss():
  params = {"w": jnp.zeros(3)}
  tx = anisonoise.dynamic_isotropic_noise(trace=0.3)
  u, s = tx.update(params, tx.init(params), params)
  assert float(s.trace) == pytest.approx(0.3)
  assert float(jnp.abs(u["w"]).max()) > 0


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_sgd_noise_sampling_batch_size(bad):
  loss_fn, params, batch = linear_problem()
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    anisonoise.sample_sgd_noise(loss_fn, params, batch, 0, batch_size=bad)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    anisonoise.sgd_noise_sampler(loss_fn, params, batch, batch_size=bad)


def test_numpy_integers_accepted_and_bools_refused():
  import numpy as np

  i = np.int64
  anisonoise.hessian_noise(i(2), batch_size=i(4), refresh_every=i(2),
                           num_probes=i(3), chunk_size=i(8), num_iters=i(12),
                           max_matvecs=i(12), key=i(0))
  anisonoise.diagonal_noise(batch_size=np.int32(4), num_probes=i(2))
  with pytest.raises(ValueError, match="k must be an int >= 1, got True"):
    anisonoise.leading_noise(True)


def test_max_matvecs_below_one_cycle_refused_at_construction():
  with pytest.raises(ValueError, match="max_matvecs=3 is below the 15"):
    anisonoise.hessian_noise(5, max_matvecs=3)


def test_stream_passed_to_a_transform():
  loss_fn, params, batch = linear_problem()
  tx = anisonoise.hessian_noise(2, key=0)
  with pytest.raises(ValueError, match="not a Batches stream"):
    tx.update(params, tx.init(params), params, loss_fn=loss_fn,
              batch=anisonoise.Batches([batch]))


def test_integer_loss():
  loss_fn, params, batch = linear_problem()
  tx = anisonoise.sgd_noise(key=0)
  with pytest.raises(ValueError, match="must be floating point"):
    tx.update(params, tx.init(params), params, batch=batch,
              loss_fn=lambda p, b: loss_fn(p, b).astype(jnp.int32))
