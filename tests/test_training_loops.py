"""The noise transforms in the training loops users have: Flax Linen's
TrainState, NNX models with batch statistics and dropout under nnx.jit,
optax.inject_hyperparams, optax.masked and optax.partition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import anisonoise
from conftest import dense_reference, mlp_problem

# The cheapest settings of each kind of transform: one that needs no loss
# and one that does (an eigen-solve of two products).
TRANSFORMS = {
    "isotropic": lambda: anisonoise.isotropic_noise(1e-2),
    "hessian": lambda: _small_hessian_noise(batch_size=4),
}


def _small_hessian_noise(**kwargs):
  return anisonoise.hessian_noise(k=1, num_iters=2, tol=None, **kwargs)


class _LinenCNN(nn.Module):
  """A small Linen CNN of the Flax MNIST example's shape."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _linen_problem():
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(12, 6, 6, 1)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 4, size=12))}
  model = _LinenCNN()
  params = model.init(jax.random.key(0), batch["x"])["params"]

  def loss_fn(p, b):
    logits = model.apply({"params": p}, b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return model, params, loss_fn, batch


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_linen_train_state_takes_every_transform(name):
  """NoisyTrainState.apply_gradients makes the step that tx.update with
  the extras makes, with a Linen CNN."""
  model, params, loss_fn, batch = _linen_problem()
  tx = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
  state = anisonoise.NoisyTrainState.create(apply_fn=model.apply,
                                            params=params, tx=tx)
  grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)

  @jax.jit
  def both(state, grads):
    new = state.apply_gradients(grads=grads, loss_fn=loss_fn, batch=batch)
    return new, tx.update(grads, state.opt_state, state.params,
                          loss_fn=loss_fn, batch=batch)

  new, (updates, opt_state) = both(state, grads)
  expected = optax.apply_updates(params, updates)
  assert int(new.step) == 1
  # The same operations twice in one program: equal up to float32 rounding
  # (XLA may fuse the two copies differently; 1 ulp seen).
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  noise = jax.tree.map(lambda u, g: -u / 0.1 - g, updates, grads)
  assert optax.tree_utils.tree_norm(noise) > 0
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(opt_state)


def test_flax_train_state_error_names_the_noisy_train_state():
  model, params, loss_fn, batch = _linen_problem()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.chain(_small_hessian_noise(), optax.sgd(0.1)))
  with pytest.raises(ValueError, match="anisonoise.NoisyTrainState"):
    state.apply_gradients(grads=params)


class _TutorialCNN(nnx.Module):
  """The NNX MNIST tutorial's kind of model, shrunk: Conv, BatchNorm,
  Dropout, Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.linear = nnx.Linear(3 * 3 * 3, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
    return self.linear(self.dropout(x.reshape(x.shape[0], -1)))


def _per_example(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]),
                                                         batch["y"])


def test_nnx_batchnorm_dropout_model_under_nnx_jit():
  """nnx.Optimizer.update(model, grads, loss_fn=nnx_loss(...), batch=...)
  runs under nnx.jit; the noise perturbs the nnx.Param state only, its loss
  is the inference-mode one, and the batch statistics and dropout RNG
  count move as in the same step without noise."""
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(10, 6, 6, 1)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 4, size=10))}

  def run(noisy):
    model = _TutorialCNN(nnx.Rngs(0))
    noise = _small_hessian_noise(batch_size=4)
    tx = optax.chain(noise, optax.adamw(1e-2)) if noisy else optax.adamw(1e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
      grads = nnx.grad(lambda m: _per_example(m, batch).mean())(model)
      extras = {"loss_fn": anisonoise.nnx_loss(model, _per_example),
                "batch": batch} if noisy else {}
      optimizer.update(model, grads, **extras)

    model.train()
    step(model, optimizer, batch)
    return model, optimizer

  model, optimizer = run(True)
  plain, _ = run(False)
  np.testing.assert_allclose(model.bn.mean[...], plain.bn.mean[...],
                             rtol=1e-6)
  np.testing.assert_array_equal(
      jax.tree.leaves(nnx.state(model, nnx.RngCount)),
      jax.tree.leaves(nnx.state(plain, nnx.RngCount)))
  noise_state = optimizer.opt_state[0]
  params = nnx.state(model, nnx.Param)
  assert (jax.tree.structure(nnx.to_pure_dict(params))
          == jax.tree.structure(nnx.to_pure_dict(noise_state.eigenvectors)))
  # The noise's loss: inference mode, deterministic, the params substituted.
  loss = anisonoise.nnx_loss(model, _per_example)
  model.eval()
  np.testing.assert_allclose(loss(params, batch), _per_example(model, batch),
                             rtol=1e-5)
  zero = jax.tree.map(jnp.zeros_like, params)
  assert not np.allclose(loss(zero, batch), loss(params, batch))


def _injected_step(tx, loss_fn, params, batch):
  return jax.jit(lambda s: tx.update(jax.tree.map(jnp.zeros_like, params), s,
                                     params, loss_fn=loss_fn, batch=batch))


def test_inject_hyperparams_changes_numeric_settings_at_run_time():
  loss_fn, params, batch = mlp_problem(dtype=jnp.float32)
  tx = optax.inject_hyperparams(
      anisonoise.hessian_noise,
      static_args=("k", "num_iters", "refresh_every", "num_probes", "key"))(
          k=1, num_iters=2, trace=0.5, tol=1e-2, refresh_every=1)
  step = _injected_step(tx, loss_fn, params, batch)
  state = tx.init(params)
  _, state = step(state)
  assert float(state.inner_state.trace) == 0.5
  state.hyperparams["trace"] = jnp.full_like(state.hyperparams["trace"], 2.0)
  state.hyperparams["tol"] = jnp.full_like(state.hyperparams["tol"], 0.1)
  _, state = step(state)
  assert float(state.inner_state.trace) == 2.0

  # batch_size as a noise scale: the target Tr(C)/m follows m.
  tx = optax.inject_hyperparams(
      anisonoise.dynamic_isotropic_noise,
      static_args=("refresh_every", "num_probes", "key"))(
          batch_size=4, trace_estimator="exact")
  step = _injected_step(tx, loss_fn, params, batch)
  _, state = step(tx.init(params))
  at_4 = float(state.inner_state.trace)
  state.hyperparams["batch_size"] = jnp.asarray(8)
  _, state = step(state)
  np.testing.assert_allclose(float(state.inner_state.trace), at_4 / 2,
                             rtol=1e-5)

  # std of GLD const, and sgd_noise's m.
  tx = optax.inject_hyperparams(anisonoise.isotropic_noise,
                                static_args=("key",))(std=1.0)
  state = tx.init(params)
  state.hyperparams["std"] = jnp.zeros_like(state.hyperparams["std"])
  u, _ = _injected_step(tx, loss_fn, params, batch)(state)
  assert optax.tree_utils.tree_norm(u) == 0
  tx = optax.inject_hyperparams(anisonoise.sgd_noise,
                                static_args=("num_probes",))(batch_size=4)
  state = tx.init(params)
  step = _injected_step(tx, loss_fn, params, batch)
  at_4 = optax.tree_utils.tree_norm(step(state)[0])
  state.hyperparams["batch_size"] = jnp.asarray(16)
  np.testing.assert_allclose(optax.tree_utils.tree_norm(step(state)[0]),
                             at_4 / 2, rtol=1e-5)


@pytest.mark.parametrize("name", ["k", "refresh_every", "num_probes"])
def test_inject_hyperparams_refuses_structural_settings(name):
  """Settings that fix the compiled program are refused as arrays. (An
  injected int seed is accepted: the key only seeds the state at init.)"""
  static = tuple({"k", "refresh_every", "num_probes"} - {name})
  tx = optax.inject_hyperparams(anisonoise.hessian_noise,
                                static_args=static)(k=2)
  with pytest.raises(TypeError, match=f"{name} is a structural.*static_args"):
    tx.init(jnp.zeros(4))


@pytest.mark.parametrize("wrapper", ["masked", "partition"])
def test_noise_on_a_block_has_the_block_covariance(wrapper, x64):
  """Under optax.masked / optax.partition the noise's Hessian eigenpairs
  are those of the selected block H[S, S] of the dense Hessian, and the
  other leaves get no noise."""
  del x64
  loss_fn, params, batch = mlp_problem(hidden=4, classes=2)
  selected = {"l1": {"w": False, "b": False}, "l2": (True, True)}
  # k = the 10 selected parameters: a full Krylov basis, exact eigenvalues.
  noise = anisonoise.hessian_noise(k=10, trace=1.0, tol=None)
  if wrapper == "masked":
    inner = optax.masked(noise, selected)
  else:
    labels = jax.tree.map(lambda s: "noisy" if s else "plain", selected)
    inner = optax.partition({"noisy": noise, "plain": optax.identity()},
                            labels)
  tx = anisonoise.with_full_params(inner)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, state = jax.jit(lambda s: tx.update(zeros, s, params, loss_fn=loss_fn,
                                         batch=batch))(tx.init(params))
  noise_state = (state.inner_state if wrapper == "masked"
                 else state.inner_states["noisy"].inner_state)
  _, _, _, h = dense_reference(loss_fn, params, batch)
  d1 = params["l1"]["w"].size + params["l1"]["b"].size  # l1 first in ravel
  block = np.linalg.eigvalsh(h[d1:, d1:])[::-1]
  np.testing.assert_allclose(noise_state.eigenvalues, block, rtol=1e-8,
                             atol=1e-10)
  assert optax.tree_utils.tree_norm(u["l1"]) == 0
  assert optax.tree_utils.tree_norm(u["l2"]) > 0


def test_masked_noise_without_full_params_says_how():
  loss_fn, params, batch = mlp_problem(dtype=jnp.float32)
  tx = optax.masked(_small_hessian_noise(),
                    {"l1": {"w": False, "b": False}, "l2": (True, True)})
  with pytest.raises(ValueError, match="anisonoise.with_full_params"):
    tx.update(params, tx.init(params), params, loss_fn=loss_fn, batch=batch)


def _accumulation_run(make, k, steps, counted=None):
  """``steps`` micro-steps of ``make(chain(hessian_noise, sgd), k)`` on
  micro-batches of the MLP problem; the updates and the final state."""
  loss_fn, params, (x, y) = mlp_problem(n=24)
  tx = make(optax.chain(_small_hessian_noise(batch_size=4, key=5),
                        optax.sgd(0.1)), k)
  noise_loss = counted(loss_fn) if counted else loss_fn

  @jax.jit
  def step(params, state, mb):
    g = jax.grad(lambda p: loss_fn(p, mb).mean())(params)
    u, state = tx.update(g, state, params, loss_fn=noise_loss, batch=mb)
    return optax.apply_updates(params, u), state, u

  state, out = tx.init(params), []
  for i in range(steps):
    mb = (x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
    params, state, u = step(params, state, mb)
    out.append(u)
  return out, state


def test_multi_steps_draws_the_noise_once_per_real_step():
  """``anisonoise.multi_steps`` gives ``optax.MultiSteps``' updates and
  state, with the noise's loss evaluated at the real steps only."""
  ticks = []

  def counted(loss_fn):
    def f(p, b):
      jax.debug.callback(lambda: ticks.append(1))
      return loss_fn(p, b)
    return f

  ours, state = _accumulation_run(anisonoise.multi_steps, 3, 6, counted)
  evaluations = len(ticks)
  theirs, their_state = _accumulation_run(optax.MultiSteps, 3, 6, counted)
  # float32 rounding: the two programs fuse the same products differently
  # (ours inside a lax.cond); differences seen: 1.2e-8 on updates of 2e-2.
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(state.gradient_step) == int(their_state.gradient_step) == 2
  for i, u in enumerate(ours):  # updates at micro-steps 2 and 5 only
    assert any(bool(jnp.any(v != 0)) for v in jax.tree.leaves(u)) == (
        i % 3 == 2)
  # optax.MultiSteps runs the noise at all 6 micro-steps, ours at 2.
  assert evaluations > 0 and len(ticks) - evaluations == 3 * evaluations


def test_multi_steps_under_vmap_equals_each_seed():
  loss_fn, params, (x, y) = mlp_problem(n=16)
  micro = (x.reshape(4, 4, -1), y.reshape(4, 4))

  def run(seed):
    tx = anisonoise.multi_steps(
        optax.chain(_small_hessian_noise(batch_size=4, key=seed),
                    optax.sgd(0.1)), 2)

    def body(carry, mb):
      p, state = carry
      g = jax.grad(lambda q: loss_fn(q, mb).mean())(p)
      u, state = tx.update(g, state, p, loss_fn=loss_fn, batch=mb)
      return (optax.apply_updates(p, u), state), None

    return jax.lax.scan(body, (params, tx.init(params)), micro)[0][0]

  mapped = jax.jit(jax.vmap(run))(jnp.arange(2))
  one = jax.jit(run)
  for s in range(2):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda v: v[s], mapped)),
                    jax.tree.leaves(one(jnp.asarray(s)))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
