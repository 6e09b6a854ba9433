"""Models of the paper's experiments, in Flax NNX.

:class:`LeNet` is the network of Section 5.3 / App. D.3 (11,330 parameters):

  input => conv1 => max_pool => ReLU => conv2 => max_pool => ReLU => fc1
        => ReLU => fc2

with 5x5 kernels, 10 channels, no padding, 50 hidden units and weights drawn
from a truncated normal with standard deviation 0.02 (biases zero), as in the
authors' scripts.

Speed: on a CPU the first convolution's weight gradient dominates a full-batch
step. Since the first layer sees the raw images, its 5x5 patches can be
extracted once (:func:`lenet_patches`) and conv1 becomes one matmul; max
pooling is a reshape and a max. conv2 is 25 static slices and one matmul:
XLA:CPU runs convolutions inside loops and conditionals (Lanczos loops, the
transforms' periodic refresh) several times slower than outside them, and a
model without convolution ops avoids that (measured: an 11-HVP refresh under
``lax.cond`` took 18.3 s with ``lax.conv`` against 1.9 s without). The model
accepts either images ``(n, 28, 28, 1)`` or precomputed patches
``(n, 576, 25)`` and gives the same outputs (and gradients) to float
tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LENET_NUM_PARAMS = 11_330


def lenet_patches(images: jax.Array) -> jax.Array:
  """The 5x5 valid patches of ``(n, 28, 28, 1)`` images, ``(n, 576, 25)``.

  Compute once per data set and feed the result to :class:`LeNet` in place of
  the images (conv1 becomes a matmul).
  """
  if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
    raise ValueError(
        f"lenet_patches expects images of shape (n, 28, 28, 1), got"
        f" {images.shape}."
    )
  p = jax.lax.conv_general_dilated_patches(
      images, (5, 5), (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # (n, 24, 24, 25), feature order (c, kh, kw) with c = 1
  return p.reshape(images.shape[0], 24 * 24, 25)


def _pool2(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet(nnx.Module):
  """The paper's LeNet (App. D.3), 11,330 parameters.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from anisonoise.models import LeNet
    >>> model = LeNet(nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """

  def __init__(self, rngs: nnx.Rngs, *, std: float = 0.02):
    init = nnx.initializers.truncated_normal(stddev=std)
    self.conv1 = nnx.Conv(1, 10, (5, 5), padding="VALID", kernel_init=init,
                          rngs=rngs)
    self.conv2 = nnx.Conv(10, 10, (5, 5), padding="VALID", kernel_init=init,
                          rngs=rngs)
    self.fc1 = nnx.Linear(160, 50, kernel_init=init, rngs=rngs)
    self.fc2 = nnx.Linear(50, 10, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for images ``(n, 28, 28, 1)`` or patches ``(n, 576, 25)``."""
    if x.ndim == 4:
      x = lenet_patches(x)
    if x.ndim != 3 or x.shape[1:] != (576, 25):
      raise ValueError(
          "LeNet expects images (n, 28, 28, 1) or patches (n, 576, 25), got"
          f" {x.shape}."
      )
    n = x.shape[0]
    w1 = self.conv1.kernel[...].reshape(25, 10)  # (kh, kw, 1, c) -> (25, c)
    h = (x @ w1 + self.conv1.bias[...]).reshape(n, 24, 24, 10)
    h = jax.nn.relu(_pool2(h))
    h = jax.nn.relu(_pool2(self._conv2_as_matmul(h)))
    h = jax.nn.relu(self.fc1(h.reshape(n, 160)))
    return self.fc2(h)


  def _conv2_as_matmul(self, h: jax.Array) -> jax.Array:
    """conv2 (5x5, valid) as 25 static slices and one matmul: no convolution
    op, so no slow path inside XLA loops and conditionals on a CPU."""
    n = h.shape[0]
    cols = jnp.stack([h[:, i:i + 8, j:j + 8, :]
                      for i in range(5) for j in range(5)], axis=3)
    w2 = self.conv2.kernel[...].reshape(250, 10)  # (kh, kw, cin) -> rows
    return cols.reshape(n, 8, 8, 250) @ w2 + self.conv2.bias[...]


def reference_lenet_logits(model: LeNet, images: jax.Array) -> jax.Array:
  """The same network with plain XLA convolutions and ``max_pool`` layers.

  Kept as the reference the fast formulation is tested against.
  """
  h = model.conv1(images)
  h = jax.nn.relu(nnx.max_pool(h, (2, 2), (2, 2)))
  h = jax.nn.relu(nnx.max_pool(model.conv2(h), (2, 2), (2, 2)))
  h = jax.nn.relu(model.fc1(h.reshape(h.shape[0], -1)))
  return model.fc2(h)


def num_params(model: nnx.Module) -> int:
  """The number of ``nnx.Param`` entries of ``model``."""
  state = nnx.state(model, nnx.Param)
  return sum(x.size for x in jax.tree.leaves(state))
