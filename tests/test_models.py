"""The paper's LeNet: size, and the fast formulation against plain XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from anisonoise.models import (LENET_NUM_PARAMS, LeNet, lenet_patches,
                               num_params, reference_lenet_logits)


def test_lenet_has_the_papers_parameter_count():
  assert num_params(LeNet(nnx.Rngs(0))) == LENET_NUM_PARAMS == 11_330


def test_patches_formulation_matches_xla_convolutions(x64):
  model = LeNet(nnx.Rngs(0), std=0.3)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)  # exact
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (6, 28, 28, 1)), jnp.float64)
  labels = jnp.asarray(rng.integers(0, 10, 6))

  def loss(params, x, forward):
    m = nnx.merge(graphdef, params)
    logits = forward(m, x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  # Jitted: eagerly, every operation of the float64 gradients is
  # dispatched and compiled on its own (49 s against a few here).
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
  fast = grad(params, lenet_patches(images), lambda m, x: m(x))
  ref = grad(params, images, reference_lenet_logits)
  np.testing.assert_allclose(fast[0], ref[0], rtol=1e-12)
  for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
  # Images and patches give the same logits.
  x32 = images.astype(jnp.float32)
  np.testing.assert_allclose(model(x32), model(lenet_patches(x32)),
                             rtol=1e-4, atol=1e-6)


def test_lenet_rejects_wrong_input_shape():
  with pytest.raises(ValueError, match=r"images \(n, 28, 28, 1\) or patches"):
    LeNet(nnx.Rngs(0))(jnp.zeros((2, 28, 28)))


def test_vgg11_has_the_papers_parameter_count_and_split():
  from anisonoise.models import VGG11, VGG11_NUM_PARAMS
  # Shapes only (nnx.eval_shape): nothing of the 9.7M entries is drawn.
  model = nnx.eval_shape(lambda: VGG11(10, rngs=nnx.Rngs(0)))
  assert num_params(model) == VGG11_NUM_PARAMS == 9_750_922
  convs = sum(c.kernel.size + c.bias.size for c in model.convs)
  assert convs == 9_220_480 and len(model.convs) == 8
  assert num_params(model) - convs == 530_442
  assert num_params(nnx.eval_shape(lambda: VGG11(100, rngs=nnx.Rngs(0)))) == (
      9_750_922 + 90 * 513)


def test_vgg11_forward_and_shape_error():
  from anisonoise.models import VGG11
  model = VGG11(10, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  logits = model(x)
  assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))
  # He initialisation keeps the signal alive through 8 ReLU convolutions.
  assert float(jnp.std(logits)) > 1e-3
  with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
    model(jnp.zeros((2, 28, 28, 1)))


def test_vgg11_gradient_on_an_explicit_mesh():
  """jax 0.10 has no Explicit-sharding rule for a convolution's weight
  gradient; VGG11 runs its convolutions under Auto axes there and gives the
  unsharded gradient."""
  from anisonoise.models import VGG11
  graphdef, params = nnx.split(VGG11(10, rngs=nnx.Rngs(0)), nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  y = jnp.array([3, 7])

  def loss(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss))
  mesh = jax.make_mesh((1,), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  data = jax.NamedSharding(mesh, jax.P("data"))
  with jax.set_mesh(mesh):
    got = grad(params, jax.device_put(x, data), jax.device_put(y, data))
  want = grad(params, x, y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
