"""The network of each study as ``(params, loss_fn, logits_fn)``.

``loss_fn(params, batch)`` returns the per-example losses, the convention
of every transform and diagnostic of the library.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

import anisonoise
from anisonoise import data
from anisonoise.models import LENET_NUM_PARAMS, VGG11, VGG11_NUM_PARAMS
from anisonoise.models import CharTransformer, LeNet, sequence_losses
from anisonoise.models import transformer_num_params

from configs import Config


def create(cfg: Config, seed: int):
  """``(params, loss_fn, logits_fn)`` of the study's network at its
  initialisation (LeNet for Fashion-MNIST, the CharTransformer for the
  fortunes, VGG11 otherwise); a sequence's loss is the mean over its
  tokens."""
  if cfg.model == "transformer":
    vocab = len(data.ALPHABET)
    model = CharTransformer(vocab, context=cfg.seq_len, dim=cfg.tf_dim,
                            heads=cfg.tf_heads, layers=cfg.tf_layers,
                            rngs=nnx.Rngs(seed))
    expected = transformer_num_params(vocab, cfg.seq_len, cfg.tf_dim,
                                      cfg.tf_layers)
  elif cfg.model == "lenet":
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
    if cfg.model == "transformer":
      return sequence_losses(logits_fn(p, b["x"]), b["y"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(p, b["x"]), b["y"])

  return params, loss_fn, logits_fn


def _transformer_block(path: str) -> str:
  """The CharTransformer's blocks: the embeddings, each block's attention
  and MLP, the LayerNorms together, the read-out."""
  parts = path.split("/")
  if parts[0] in ("embed", "position"):
    return "embeddings"
  if parts[0] == "blocks" and parts[2] == "attention":
    return f"attention {parts[1]}"
  if parts[0] == "blocks" and parts[2].startswith("mlp"):
    return f"MLP {parts[1]}"
  if parts[0] == "head":
    return "read-out"
  return "LayerNorms"


def blocks(cfg: Config, params) -> dict:
  """The blocks of the parameters the per-block diagnostics split:
  ``{name: mask}`` (:func:`anisonoise.param_blocks`); the layers for LeNet
  and VGG11."""
  if cfg.model == "transformer":
    return anisonoise.param_blocks(params, group=_transformer_block)
  return anisonoise.param_blocks(params)
