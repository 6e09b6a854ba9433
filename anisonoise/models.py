"""Models in Flax NNX: the paper's, and two that people train today.

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

Beyond the paper: :class:`CharTransformer`, a decoder-only transformer for
characters (token and position embeddings, causal self-attention,
LayerNorm, GELU MLP blocks, dropout), and :class:`ResNet20`, the residual
network of He et al. (2016) for 32x32 images, with BatchNorm. For the
transformer one sequence is one example: its ``loss_fn`` returns one loss
per sequence (:func:`sequence_losses`, the mean over its tokens), so the
library's ``C`` is the covariance of per-sequence gradients. Train
:class:`ResNet20` through :func:`anisonoise.nnx_loss`: the noise and the
diagnostics see BatchNorm with its running averages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention

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
    assert self.conv1.bias is not None and self.conv2.bias is not None
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
    return cols @ w2 + self.conv2.bias[...]  # type: ignore[index]  # has one


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


# ---------------------------------------------------------------------------
# Beyond the paper
# ---------------------------------------------------------------------------


def sequence_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """One loss per sequence: the mean over its tokens of the cross entropy.

  The per-example convention of every transform and diagnostic with a
  sequence as the example: ``C`` is then the covariance of per-sequence
  gradients and ``H`` the Hessian of the mean over sequences.

  Args:
    logits: ``(n, T, vocab_size)``.
    targets: ``(n, T)`` integer tokens.

  Returns:
    ``(n,)`` losses.
  """
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets).mean(axis=-1)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """``nnx.Dropout(rate)``, holding an RNG stream only when it draws masks
  (``rate > 0``): at rate 0 the model's state is its parameters alone."""
  return nnx.Dropout(rate, rngs=rngs if rate else None)


def _attention(query, key, value, *, mask=None, dropout_rng=None,
               dropout_rate=0.0, broadcast_dropout=True, deterministic=False,
               dtype=None, precision=None, module=None, is_causal=False):
  """Flax's attention weights (``dot_product_attention_weights``) and
  their sum over the values, in the inputs' dtype.

  Without dropout, ``nnx.dot_product_attention`` hands over to
  ``jax.nn.dot_product_attention``, which takes the softmax in float32
  whatever the dtype: a float64 copy then differed from its dense
  float64 references by 2e-8 (relative), against 1e-15 with this.
  """
  weights = attention.dot_product_attention_weights(
      query, key, None, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, dtype, precision, module, is_causal=is_causal)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value,
                    precision=precision)


class _Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

  def __init__(self, dim: int, heads: int, hidden: int, dropout: float,
               rngs: nnx.Rngs, param_dtype):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, **kw)
    self.attention = nnx.MultiHeadAttention(
        num_heads=heads, in_features=dim, dropout_rate=dropout,
        decode=False, attention_fn=_attention, **kw)
    self.norm2 = nnx.LayerNorm(dim, **kw)
    self.mlp_in = nnx.Linear(dim, hidden, **kw)
    self.mlp_out = nnx.Linear(hidden, dim, **kw)
    self.dropout = _dropout(dropout, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.dropout(self.attention(self.norm1(x), mask=mask))
    h = jax.nn.gelu(self.mlp_in(self.norm2(x)))
    return x + self.dropout(self.mlp_out(h))


class CharTransformer(nnx.Module):
  """A small decoder-only transformer over characters (tokens).

  Token and learned position embeddings, ``layers`` pre-LayerNorm blocks
  (causal multi-head self-attention, ``nnx.MultiHeadAttention``; a GELU
  MLP of ``mlp_ratio * dim`` hidden units), a final LayerNorm and a linear
  read-out; dropout after the embeddings, the attention and the MLP. The
  number of parameters is :func:`transformer_num_params`.

  Args:
    vocab_size: number of distinct tokens.
    context: longest sequence (positions embedded).
    dim: width of the residual stream.
    heads: attention heads (``dim`` must be a multiple).
    layers: number of blocks.
    mlp_ratio: MLP hidden units per residual unit.
    dropout: dropout rate (``nnx_loss`` and ``model.eval()`` turn it off;
      at 0, the default, the model holds no RNG state).
    param_dtype: the parameters' dtype (float64 for dense references;
      ``nnx.Embed`` computes in the dtype it was built with).
    rngs: ``nnx.Rngs`` for the initialisation (and ``dropout`` for the
      masks).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from anisonoise.models import CharTransformer, num_params
    >>> model = CharTransformer(32, context=16, dim=32, heads=4, layers=2,
    ...                         rngs=nnx.Rngs(0))
    >>> num_params(model)
    28064
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 32)
  """

  def __init__(self, vocab_size: int, *, context: int, dim: int = 64,
               heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
               dropout: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"CharTransformer: dim ({dim}) must be a multiple of"
                       f" heads ({heads}).")
    self.context = context
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Embed(vocab_size, dim, **kw)
    self.position = nnx.Embed(context, dim, **kw)
    self.dropout = _dropout(dropout, rngs)
    self.blocks = nnx.List([
        _Block(dim, heads, mlp_ratio * dim, dropout, rngs, param_dtype)
        for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, **kw)
    self.head = nnx.Linear(dim, vocab_size, **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits ``(n, T, vocab_size)`` for tokens ``(n, T)``."""
    if tokens.ndim != 2 or tokens.shape[1] > self.context:
      raise ValueError(
          f"CharTransformer expects tokens (n, T) with T <= {self.context},"
          f" got {tokens.shape}.")
    t = tokens.shape[1]
    x = self.embed(tokens) + self.position(jnp.arange(t))
    x = self.dropout(x)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def transformer_num_params(vocab_size: int, context: int, dim: int,
                           layers: int, mlp_ratio: int = 4) -> int:
  """:class:`CharTransformer`'s parameter count: embeddings ``(vocab +
  context) dim``; per block two LayerNorms ``4 dim``, attention ``4 (dim^2
  + dim)``, MLP ``2 r dim^2 + (r + 1) dim``; final LayerNorm ``2 dim``;
  read-out ``(dim + 1) vocab``."""
  r = mlp_ratio
  block = 4 * dim + 4 * (dim * dim + dim) + 2 * r * dim * dim + (r + 1) * dim
  return ((vocab_size + context) * dim + layers * block + 2 * dim
          + (dim + 1) * vocab_size)


class _ResidualBlock(nnx.Module):
  """Two 3x3 convolutions with BatchNorm; the shortcut is the identity, or
  for a strided block the subsampled input padded with zero channels (He
  et al.'s option A: no parameters)."""

  def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs,
               param_dtype):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.he_normal()
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding=1,
                          use_bias=False, kernel_init=init, **kw)
    self.bn1 = nnx.BatchNorm(c_out, **kw)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding=1, use_bias=False,
                          kernel_init=init, **kw)
    self.bn2 = nnx.BatchNorm(c_out, **kw)
    self.stride, self.pad = stride, c_out - c_in

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.bn1(_conv(self.conv1, x)))
    h = self.bn2(_conv(self.conv2, h))
    short = x[:, ::self.stride, ::self.stride, :]
    if self.pad:
      short = jnp.pad(short, ((0, 0), (0, 0), (0, 0),
                              (self.pad // 2, self.pad - self.pad // 2)))
    return jax.nn.relu(h + short)


RESNET20_NUM_PARAMS = 269_722


class ResNet20(nnx.Module):
  """ResNet-20 for 32x32 images (He et al., 2016, Section 4.2), with
  BatchNorm; 269,722 parameters at ``depth=20, width=1``.

  A 3x3 convolution of 16 channels, then three stages of ``(depth - 2) /
  6`` residual blocks of 16, 32 and 64 channels (the first block of the
  second and third stages halves the resolution), global average pooling
  and a linear read-out. Convolutions have no bias (each is followed by
  BatchNorm) and He-normal kernels; shortcuts are parameter-free (option
  A). Any input of at least 4x4 pixels runs (the tests use 8x8 images).
  BatchNorm's running averages (``nnx.BatchStat``) are not parameters:
  train through :func:`anisonoise.nnx_loss`, which evaluates the noise's
  losses with them.

  Args:
    num_classes: number of outputs.
    rngs: ``nnx.Rngs`` for the initialisation.
    depth: ``6 n + 2`` layers (20: the paper's ResNet-20; 8: one block a
      stage).
    width: multiplier of every stage's channels (1: He et al.'s).
    param_dtype: the parameters' (and batch statistics') dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from anisonoise.models import ResNet20, num_params
    >>> model = ResNet20(10, rngs=nnx.Rngs(0))
    >>> num_params(model)
    269722
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs,
               depth: int = 20, width: float = 1.0,
               param_dtype=jnp.float32):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"ResNet20 depth must be 6 n + 2 with n >= 1, got"
                       f" {depth}.")
    if not width > 0:
      raise ValueError(f"ResNet20 width must be > 0, got {width}.")
    channels = [max(1, round(c * width)) for c in (16, 32, 64)]
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.conv = nnx.Conv(3, channels[0], (3, 3), padding=1, use_bias=False,
                         kernel_init=nnx.initializers.he_normal(), **kw)
    self.bn = nnx.BatchNorm(channels[0], **kw)
    blocks, c_in = [], channels[0]
    for stage, c_out in enumerate(channels):
      for i in range((depth - 2) // 6):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(_ResidualBlock(c_in, c_out, stride, rngs, param_dtype))
        c_in = c_out
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(c_in, num_classes, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(n, num_classes)`` for images ``(n, h, w, 3)``."""
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 4:
      raise ValueError(f"ResNet20 expects images (n, h, w, 3) with h, w >= 4,"
                       f" got {x.shape}.")
    x = jax.nn.relu(self.bn(_conv(self.conv, x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))
