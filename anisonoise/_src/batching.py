"""Validation of the ``loss_fn`` / ``batch`` convention shared by the library.

Every curvature routine, transform and diagnostic takes a per-example loss
function ``loss_fn(params, batch) -> losses`` with ``losses.shape == (n,)`` and
a ``batch`` pytree whose leaves share a leading example axis of size ``n``.
All checks here run on static shapes, so they cost nothing inside ``jax.jit``
and fail at trace time with a message that says how to fix the call.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]


def num_examples(batch: Batch) -> int:
  """Returns ``n``, the size of the leading example axis shared by all leaves.

  Args:
    batch: a pytree of arrays, each with the examples along axis 0.

  Returns:
    The number of examples ``n``.

  Raises:
    ValueError: if the batch has no array leaves, a scalar leaf, or leaves
      whose leading sizes differ.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(
        "batch has no array leaves; pass a pytree of arrays whose leading axis"
        " indexes the examples, e.g. {'x': x, 'y': y}."
    )
  sizes = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"batch leaf {jax.tree_util.keystr(path)!r} is a scalar; every leaf"
          " needs a leading example axis (add one with x[None] for a single"
          " example)."
      )
    sizes.append((jax.tree_util.keystr(path), shape[0]))
  distinct = {s for _, s in sizes}
  if len(distinct) > 1:
    listing = ", ".join(f"{p or '<root>'}: {s}" for p, s in sizes)
    raise ValueError(
        "batch leaves have different leading (example) sizes"
        f" ({listing}); every leaf must hold the same examples along axis 0."
    )
  n = sizes[0][1]
  if n < 1:
    raise ValueError("batch holds no examples (leading size 0).")
  return n


def check_params(params: Params, who: str) -> None:
  """Raises a clear error when ``params`` is missing."""
  if params is None:
    raise ValueError(
        f"{who} needs the current parameters: call"
        " update(updates, state, params, ...) with params (the pytree the"
        " gradient was taken with respect to), not None."
    )
  if not jax.tree.leaves(params):
    raise ValueError(f"{who}: params has no array leaves.")


def check_loss_and_batch(
    loss_fn: LossFn | None, params: Params, batch: Batch | None, who: str
) -> int:
  """Checks ``loss_fn(params, batch)`` returns one loss per example.

  Args:
    loss_fn: per-example loss function ``(params, batch) -> (n,)``.
    params: parameters pytree.
    batch: the estimation batch.
    who: name of the caller, used in the error messages.

  Returns:
    The number of examples ``n``.
  """
  if loss_fn is None or batch is None:
    missing = " and ".join(
        name for name, v in (("loss_fn", loss_fn), ("batch", batch)) if v is None
    )
    raise ValueError(
        f"{who} needs the per-example loss to estimate its noise, but {missing}"
        " was not given. Pass them as extra arguments:"
        " tx.update(grads, state, params, loss_fn=loss_fn, batch=batch), where"
        " loss_fn(params, batch) returns one loss per example, shape (n,)."
    )
  if not callable(loss_fn):
    raise ValueError(f"{who}: loss_fn must be callable, got {type(loss_fn)}.")
  check_params(params, who)
  n = num_examples(batch)
  out = jax.eval_shape(loss_fn, params, batch)
  shape = getattr(out, "shape", None)
  if shape is None or tuple(shape) != (n,):
    what = "a scalar" if shape == () else f"shape {shape}"
    raise ValueError(
        f"{who}: loss_fn(params, batch) must return the per-example losses,"
        f" shape ({n},) for this batch of {n} examples, but it returned {what}."
        " Return the vector of losses before averaging (e.g. drop the final"
        " .mean())."
    )
  return n


def single_example_loss(loss_fn: LossFn) -> Callable[[Params, Batch], jax.Array]:
  """Turns a batched per-example loss into a loss of one example (no axis)."""

  def loss_one(params, example):
    batch = jax.tree.map(lambda x: x[None], example)
    return loss_fn(params, batch)[0]

  return loss_one


def mean_loss(loss_fn: LossFn, batch: Batch) -> Callable[[Params], jax.Array]:
  """``params -> L(params)``, the mean of the per-example losses."""
  return lambda params: jnp.mean(loss_fn(params, batch))


def num_params(params: Params) -> int:
  """``D``, the total number of entries of the parameter pytree."""
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))


def check_positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an int >= 1 (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
