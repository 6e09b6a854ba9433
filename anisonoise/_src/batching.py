"""Validation of the ``loss_fn`` / ``batch`` convention shared by the library.

Every curvature routine, transform and diagnostic takes a per-example loss
function ``loss_fn(params, batch) -> losses`` with ``losses.shape == (n,)`` and
a ``batch`` pytree whose leaves share a leading example axis of size ``n``.
All checks here run on static shapes, so they cost nothing inside ``jax.jit``
and fail at trace time with a message that says how to fix the call.
"""

from __future__ import annotations

import functools
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


# Chunks processed by Python-unrolled vmaps before falling back to an XLA
# loop. Measured on the 2-core CPU (jax 0.10.2, 16 Hessian-vector products
# of LeNet on 1,200 images): with ``lax.conv`` layers they took 2.3 s
# unrolled and 2.6 s as one vmap, but 36 s under ``lax.map(batch_size=4)``
# and 19 s under ``lax.scan(unroll=4)``: XLA:CPU runs convolutions inside
# loop bodies (and conditionals) several times slower. Without convolution
# ops (the library's LeNet since) the loop costs nothing (2.4 s under
# ``lax.scan(unroll=4)``, 2.6 s unrolled) but vmapping the products does
# (6.8 s). Unrolled chunks are the one choice that is fast for both kinds of
# model. Forward passes alone lose nothing in a loop either way (200
# perturbed LeNet losses: 17.4 s looped, 19.1 s unrolled) and unrolling
# holds more memory (7.5 GB against 1.8 GB there), so callers with
# forward-only work pass unroll=False.
MAX_UNROLLED_CHUNKS = 32


def map_chunks(
    fn: Callable, xs: Any, chunk_size: int | None = None, *,
    reduce_sum: bool = False, unroll: bool | None = None,
) -> Any:
  """``fn`` on every entry along axis 0 of ``xs``, vmapped chunk by chunk.

  ``chunk_size`` entries are vectorised at once (``None``: all), which bounds
  memory. Up to :data:`MAX_UNROLLED_CHUNKS` chunks are unrolled at trace time
  rather than looped over, because an XLA loop around the heavy products is
  several times slower on a CPU (see the measurement above); beyond that a
  loop keeps the compiled program small.

  Args:
    fn: function of one entry (a pytree slice without the leading axis).
    xs: pytree of arrays (or PRNG keys) sharing a leading axis.
    chunk_size: entries per vectorised chunk.
    reduce_sum: return ``sum_i fn(x_i)`` instead of the stacked outputs.
    unroll: unroll the chunks (``True``) or loop over them (``False``);
      ``None`` unrolls up to :data:`MAX_UNROLLED_CHUNKS` chunks.

  Returns:
    The stacked outputs (leading axis as ``xs``), or their sum.
  """
  n = num_examples(xs)
  chunk = n if chunk_size is None else max(1, min(chunk_size, n))
  starts = range(0, n, chunk)

  def on_chunk(part):
    out = jax.vmap(fn)(part)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), out) if reduce_sum else (
        out)

  def add(a, b):
    return jax.tree.map(jnp.add, a, b)

  if unroll is None:
    unroll = len(starts) <= MAX_UNROLLED_CHUNKS
  if unroll or len(starts) == 1:
    outs = [on_chunk(jax.tree.map(lambda x: x[s:s + chunk], xs))
            for s in starts]
    if reduce_sum:
      return functools.reduce(add, outs)
    return jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)
  if not reduce_sum:
    return jax.lax.map(fn, xs, batch_size=chunk)
  num_full, rem = divmod(n, chunk)
  head = jax.tree.map(
      lambda x: x[: num_full * chunk].reshape(num_full, chunk, *x.shape[1:]),
      xs)
  total, _ = jax.lax.scan(
      lambda acc, b: (add(acc, on_chunk(b)), None),
      on_chunk(jax.tree.map(lambda x: x[0], head)),
      jax.tree.map(lambda x: x[1:], head))
  if rem:
    total = add(total, on_chunk(jax.tree.map(lambda x: x[num_full * chunk:],
                                             xs)))
  return total
