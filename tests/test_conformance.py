"""One conformance suite over every public transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import anisonoise
from conftest import logistic_problem, mlp_problem

pytestmark = pytest.mark.usefixtures("x64")

FACTORIES = {
    "isotropic_noise": lambda: anisonoise.isotropic_noise(1e-2),
    "dynamic_isotropic_noise": lambda: anisonoise.dynamic_isotropic_noise(
        batch_size=5),
    "diagonal_noise": lambda: anisonoise.diagonal_noise(batch_size=5),
    "leading_noise": lambda: anisonoise.leading_noise(3, batch_size=5),
    "hessian_noise": lambda: anisonoise.hessian_noise(
        3, batch_size=5, refresh_every=2),
    "hessian_eigvec_noise": lambda: anisonoise.hessian_eigvec_noise(
        batch_size=5),
    "sgd_noise": lambda: anisonoise.sgd_noise(batch_size=5),
    "multiplicative_noise": lambda: anisonoise.multiplicative_noise(
        "bernoulli", centred=False, batch_size=5, estimation_size=20),
    "anticorrelated_noise": lambda: anisonoise.anticorrelated_noise(
        anisonoise.isotropic_noise(1e-2)),
}
NAMES = sorted(FACTORIES)


def _grad(loss_fn, params, batch):
  return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)


def _tuple_problem(dtype=jnp.float64):
  loss_fn, params, batch = logistic_problem(dtype=dtype)
  tparams = (params["w"], params["b"])
  return (lambda p, b: loss_fn({"w": p[0], "b": p[1]}, b)), tparams, batch


PYTREES = {
    "dict": lambda: logistic_problem(),
    "tuple": _tuple_problem,
    "nested": lambda: mlp_problem(),
}


# The low-rank noises share one implementation (and its pytree handling):
# every parameter structure for one of them, the nested one for the others.
_SHARED_LOW_RANK = ("leading_noise", "hessian_eigvec_noise")
# The follow-ups' transforms are per-leaf maps around the engine's weighted
# backward pass (sgd_noise's): one parameter structure each.
_ONE_TREE = ("multiplicative_noise", "anticorrelated_noise")
CASES = [(n, t) for n in NAMES for t in sorted(PYTREES)
         if (n not in _SHARED_LOW_RANK or t == "nested")
         and (n not in _ONE_TREE or t == "tuple")]


@pytest.mark.parametrize("name,tree", CASES)
def test_jit_matches_eager_and_keeps_structure(name, tree):
  loss_fn, params, batch = PYTREES[tree]()
  tx = FACTORIES[name]()
  state = tx.init(params)
  grads = _grad(loss_fn, params, batch)
  eager, s1 = tx.update(grads, state, params, loss_fn=loss_fn, batch=batch,
                        unrelated_extra=3)
  jitted, s2 = jax.jit(lambda g, s, p: tx.update(
      g, s, p, loss_fn=loss_fn, batch=batch))(grads, state, params)
  assert jax.tree.structure(eager) == jax.tree.structure(params)
  for u in jax.tree.leaves(jitted):
    assert u.dtype == jnp.float64
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  diff = jax.tree.map(lambda a, b: a - b, eager, grads)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(diff)) > 0


# Each transform in front of one optimizer; every optimizer is covered by
# at least two transforms (the chain itself is optax's: what differs per
# transform is its state, which every step below carries).
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1),
              "momentum": lambda: optax.sgd(0.07, momentum=0.9),
              "adam": lambda: optax.adam(1e-3)}
_OPT_OF = {name: sorted(OPTIMIZERS)[i % 3] for i, name in enumerate(NAMES)}


@pytest.mark.parametrize("name", NAMES)
def test_jitted_chain_step_compiles_once_and_keeps_dtypes(name):
  """One jitted training step in float32 (as users run), three calls:

  - compiled once (no recompilation on the second call: a Python value in
    the state, or a state whose dtype or shape changes, would retrace);
  - updates and every floating state leaf stay float32 (float64: the test
    above), shapes and dtypes of the state unchanged by a step;
  - in front of sgd, momentum or adam (``_OPT_OF``), finite, and the
    noise's own count advances once per step.
  """
  dtype = jnp.float32
  loss_fn, params, batch = mlp_problem(dtype=dtype)
  tx = optax.chain(FACTORIES[name](), OPTIMIZERS[_OPT_OF[name]]())
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    grads = _grad(loss_fn, params, batch)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch)
    return optax.apply_updates(params, updates), updates, state

  state0 = state = tx.init(params)
  for _ in range(3):
    params, updates, state = step(params, state, batch)
  assert len(traces) == 1
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    if jnp.issubdtype(a.dtype, jnp.floating):
      assert a.dtype == dtype
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert int(state[0].count) == 3


def _low_precision_params():
  """The logistic problem's params in bfloat16, and mixed (bfloat16
  weights, float32 bias), with float32 data."""
  loss_fn, params, batch = logistic_problem(dtype=jnp.float32)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  mixed = {"w": bf16["w"], "b": params["b"]}
  return loss_fn, batch, {"bfloat16": bf16, "mixed": mixed}


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_and_mixed_params(name):
  """Updates keep each parameter's dtype; every solve runs, and the
  eigenvectors are stored, in float32 (orthonormal to its precision)."""
  loss_fn, batch, cases = _low_precision_params()
  tx = FACTORIES[name]()
  for params in cases.values():
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(lambda g, s, p: tx.update(
        g, s, p, loss_fn=loss_fn, batch=batch))(zeros, tx.init(params),
                                                params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
      assert np.all(np.isfinite(np.asarray(u, np.float32)))
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 0
    if hasattr(state, "eigenvectors"):
      vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(state.eigenvectors)
      assert vecs.dtype == jnp.float32
      gram = np.asarray(vecs @ vecs.T, np.float64)
      np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5)


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


# One transform per state type (the low-rank noises share theirs).
@pytest.mark.parametrize("name", [n for n in NAMES
                                  if n not in _SHARED_LOW_RANK])
def test_nnx_optimizer(name):
  model = _Net(nnx.Rngs(0))
  graphdef, _ = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(24, 4)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, size=24))}

  def loss_fn(params, b):
    logits = nnx.merge(graphdef, params)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  optimizer = nnx.Optimizer(
      model, optax.chain(FACTORIES[name](), optax.sgd(0.1)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    params = nnx.state(model, nnx.Param)
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  train_step(model, optimizer, batch)
  train_step(model, optimizer, batch)
  after = nnx.state(model, nnx.Param)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before,
                       after)
  assert max(jax.tree.leaves(moved)) > 0
  assert int(optimizer.opt_state[0].count[...]) == 2
