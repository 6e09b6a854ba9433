"""The network of each study as ``(params, loss_fn, logits_fn)``.

``loss_fn(params, batch)`` returns the per-example losses, the convention
of every transform and diagnostic of the library.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from anisonoise.models import LENET_NUM_PARAMS, VGG11, VGG11_NUM_PARAMS
from anisonoise.models import LeNet

from configs import Config


def create(cfg: Config, seed: int):
  """``(params, loss_fn, logits_fn)`` of the study's network at its
  initialisation (LeNet for Fashion-MNIST, VGG11 otherwise)."""
  if cfg.model == "lenet":
    model = LeNet(nnx.Rngs(seed))
    expected = LENET_NUM_PARAMS
  else:
    model = VGG11(10, rngs=nnx.Rngs(seed), width=cfg.vgg_width)
    expected = VGG11_NUM_PARAMS if cfg.vgg_width == 1 else None
  graphdef, params = nnx.split(model, nnx.Param)
  if cfg.init == "normal":  # MultiNoise's ConvSmall: every entry N(0, 0.02^2)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(treedef, [
        0.02 * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves)])
  d = sum(x.size for x in jax.tree.leaves(params))
  if expected is not None and d != expected:
    raise AssertionError(f"{cfg.model} has {d} parameters, expected"
                         f" {expected}.")

  def logits_fn(p, x):
    return nnx.merge(graphdef, p)(x)

  def loss_fn(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(p, b["x"]), b["y"])

  return params, loss_fn, logits_fn
