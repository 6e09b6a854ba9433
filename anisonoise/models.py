"""Models of the paper's experiments, in Flax NNX.

:class:`VGG11` is the network of the SVHN and CIFAR-10 studies (App. D.4,
9,750,922 parameters). :class:`LeNet` is the network of Section 5.3 /
App. D.3 (11,330 parameters):

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

from anisonoise._src import batching

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
  """2x2 max-pool, stride 2, of ``(n, h, w, c)`` as a reshape and a max.

  On an Explicit mesh the reshape is told to keep the example axis's
  sharding (jax does not infer it for a split into several axes). Four
  strided slices would need no such hint but made a LeNet Lanczos run 2.4x
  slower (and compile 3x slower) on the CPU.
  """
  n, h, w, c = x.shape
  y = batching.reshape_examples(x, (n, h // 2, 2, w // 2, 2, c))
  return y.max(axis=(2, 4))


def _conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)``; on an Explicit mesh, under Auto axes.

  jax (0.10) has no Explicit-sharding rule for a convolution's transpose
  with respect to its kernel (the weight gradient raises "Please specify
  the output sharding"), so there the convolution runs with the mesh's axes
  switched to Auto (``jax.sharding.auto_axes``) and its output keeps the
  images' example-axis sharding.
  """
  sharding = batching.explicit_sharding(x)
  if sharding is None:
    return conv(x)
  graphdef, state = nnx.split(conv)
  apply = jax.sharding.auto_axes(
      lambda x, state: nnx.merge(graphdef, state)(x),
      out_sharding=jax.P(sharding.spec[0]))
  return apply(x, state)


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
    h = batching.reshape_examples(x @ w1 + self.conv1.bias[...],
                                 (n, 24, 24, 10))
    h = jax.nn.relu(_pool2(h))
    h = jax.nn.relu(_pool2(self._conv2_as_matmul(h)))
    h = jax.nn.relu(self.fc1(batching.reshape_examples(h, (n, 160))))
    return self.fc2(h)


  def _conv2_as_matmul(self, h: jax.Array) -> jax.Array:
    """conv2 (5x5, valid) as 25 static slices and one matmul: no convolution
    op, so no slow path inside XLA loops and conditionals on a CPU."""
    n = h.shape[0]
    cols = jnp.stack([h[:, i:i + 8, j:j + 8, :]
                      for i in range(5) for j in range(5)], axis=3)
    w2 = self.conv2.kernel[...].reshape(250, 10)  # (kh, kw, cin) -> rows
    cols = batching.reshape_examples(cols, (n, 8, 8, 250))
    return cols @ w2 + self.conv2.bias[...]


VGG11_NUM_PARAMS = 9_750_922
# Configuration A of Simonyan and Zisserman: output channels of the 3x3
# convolutions, "M" a 2x2 max-pool.
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512,
                "M")


class VGG11(nnx.Module):
  """VGG11 for 32 x 32 x 3 images (App. D.4), 9,750,922 parameters.

  Configuration A (3x3 convolutions, padding 1: 64, M, 128, M, 256, 256, M,
  512, 512, M, 512, 512, M with M a 2x2 max-pool), ReLU, then fully
  connected 512-512-512-``num_classes`` with ReLU; no batch norm, no
  dropout, as in the paper. The convolutions hold 9,220,480 parameters and
  the classifier 530,442. Convolution kernels are drawn from
  ``N(0, 2 / (9 c_out))`` with zero biases (the initialisation of the
  CIFAR VGG that the authors' scripts build on); the dense layers use
  Flax's default.

  Args:
    num_classes: number of outputs.
    rngs: ``nnx.Rngs`` for the initialisation.
    width: multiplier of every layer's channels and hidden units (1, the
      default, is the paper's network; smaller values give the same
      architecture at a fraction of the cost, for reduced studies on a CPU).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from anisonoise.models import VGG11, num_params
    >>> model = VGG11(10, rngs=nnx.Rngs(0))
    >>> num_params(model)
    9750922
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs,
               width: float = 1.0):
    if not width > 0:
      raise ValueError(f"VGG11 width must be > 0, got {width}.")
    scaled = lambda c: max(1, round(c * width))  # noqa: E731
    convs = []
    c_in = 3
    for channels in VGG11_LAYERS:
      if channels == "M":
        continue
      c_out = scaled(channels)
      init = nnx.initializers.normal(stddev=(2.0 / (9 * c_out)) ** 0.5)
      convs.append(nnx.Conv(c_in, c_out, (3, 3), padding=1, kernel_init=init,
                            rngs=rngs))
      c_in = c_out
    hidden = scaled(512)
    self.features = c_in
    self.convs = nnx.List(convs)
    self.fc1 = nnx.Linear(c_in, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.fc3 = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for images ``(n, 32, 32, 3)``."""
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
      raise ValueError(
          f"VGG11 expects images of shape (n, 32, 32, 3), got {x.shape}.")
    convs = iter(self.convs)
    for width in VGG11_LAYERS:
      if width == "M":
        x = _pool2(x)
      else:
        x = jax.nn.relu(_conv(next(convs), x))
    x = batching.reshape_examples(x, (x.shape[0], self.features))
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.fc3(x)


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
