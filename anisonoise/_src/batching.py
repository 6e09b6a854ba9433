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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
        name for name, v in (("loss_fn", loss_fn), ("batch", batch))
        if v is None
    )
    raise ValueError(
        f"{who} needs the per-example loss to estimate its noise, but {missing}"
        " was not given. Pass them as extra arguments:"
        " tx.update(grads, state, params, loss_fn=loss_fn, batch=batch), where"
        " loss_fn(params, batch) returns one loss per example, shape (n,)."
        " In a Flax Linen loop, TrainState.apply_gradients drops them: use"
        " anisonoise.NoisyTrainState and"
        " state.apply_gradients(grads=grads, loss_fn=loss_fn, batch=batch)."
        " With nnx.Optimizer: optimizer.update(model, grads,"
        " loss_fn=anisonoise.nnx_loss(model, loss), batch=batch)."
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
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f"{who}: loss_fn(params, batch) returned dtype {out.dtype}; the"
        " per-example losses must be floating point to be differentiated"
        " (compute them in the parameters' float dtype, e.g. cast labels"
        " or counts with .astype(jnp.float32) before the loss)."
    )
  return n


def single_example_loss(
    loss_fn: LossFn) -> Callable[[Params, Batch], jax.Array]:
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


STATIC_ARGS_EXAMPLE = ("optax.inject_hyperparams(anisonoise.hessian_noise,"
                       " static_args=('k', 'refresh_every',"
                       " 'num_probes'))")


def check_static(name: str, value: Any) -> None:
  """Raises ``TypeError`` if a structural setting (one that fixes shapes or
  the compiled program) arrives as an array, as
  ``optax.inject_hyperparams`` passes every numeric argument it is not
  told is static."""
  if isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(
        f"{name} is a structural setting (it fixes shapes or the compiled"
        f" program) and must be a Python value fixed when the transform is"
        f" built, got an array {value!r}. Under optax.inject_hyperparams,"
        f" name it in static_args with the factory's other structural"
        f" settings, e.g. {STATIC_ARGS_EXAMPLE}; the numeric"
        f" hyperparameters (std, trace, batch_size, tol) can be injected.")


def is_int(value: Any) -> bool:
  """True for a Python or NumPy integer (bools are not integers here)."""
  return (isinstance(value, (int, np.integer))
          and not isinstance(value, (bool, np.bool_)))


def check_positive_int(name: str, value: Any) -> int:
  """``value`` as an ``int``; ``ValueError`` unless it is a Python or NumPy
  integer >= 1 (bools refused)."""
  check_static(name, value)
  if not is_int(value) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  return int(value)


# Chunks are looped over (``lax.scan``) unless a caller asks otherwise: only
# a loop guarantees that one chunk's intermediates are alive at a time.
# Unrolled, XLA:CPU merged the chunks back into one pass: exact Tr(C) of an
# MLP with D = 2,035,210 on n = 4,096 examples in 16 unrolled chunks of 256
# asked for one 35 GB allocation (the n x D per-example gradients the
# chunks exist to avoid). A loop also compiles the body once, whatever the
# number of chunks (a VGG11 step, a Lanczos of many products). The price is
# an XLA:CPU one: convolutions inside loop bodies run several times slower
# there (16 Hessian-vector products of LeNet on 1,200 images with
# ``lax.conv`` layers: 2.3 s unrolled, 19 s under ``lax.scan(unroll=4)``);
# without convolution ops (the library's LeNet) the loop costs nothing
# (2.4 s looped, 2.6 s unrolled). ``map_chunks(..., unroll=True)`` remains
# for callers who measured that they gain from it.


def check_chunk_size(chunk_size: int | None) -> None:
  """Raises ``ValueError`` unless ``chunk_size`` is ``None`` or an int >= 1."""
  check_static("chunk_size", chunk_size)
  if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
    raise ValueError(
        f"chunk_size must be a positive int or None (all examples at once),"
        f" got {chunk_size!r}."
    )


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


def example_shards(tree: Any) -> int:
  """How many pieces axis 0 of ``tree``'s leaves is split into (Explicit
  mesh axes only; 1 for unsharded arrays and inside Auto-mode ``jit``)."""
  shards = 1
  for leaf in jax.tree.leaves(tree):
    try:
      sharding = jax.typeof(leaf).sharding
    except (TypeError, AttributeError):
      continue
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if not spec or spec[0] is None or mesh is None:
      continue
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = max(shards, math.prod(mesh.shape[a] for a in names))
  return shards


def explicit_sharding(x: jax.Array) -> Any:
  """``x``'s sharding when it lives on a mesh with an Explicit axis, else
  ``None`` (one device, Auto meshes: ``jit`` places things there)."""
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh._any_axis_explicit:  # pylint: disable=protected-access
    return None
  return sharding


def match_sharding(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` resharded like ``ref`` when ``ref`` lives on an Explicit mesh.

  A random cotangent or probe drawn with ``jax.random`` is replicated;
  under Explicit sharding a ``vjp`` refuses a cotangent whose sharding
  differs from its output's, so per-example weights take the sharding of
  the per-example losses. Elsewhere (one device, Auto meshes) ``x`` is
  returned unchanged and ``jit`` places it.
  """
  sharding = explicit_sharding(ref)
  if sharding is None or jax.typeof(x).sharding == sharding:
    return x
  return jax.sharding.reshard(x, sharding)


def replicate(tree: Any) -> Any:
  """Leaves on an Explicit mesh resharded to replicated (an all-gather);
  anything else is returned unchanged (``jit`` places it)."""

  def one(x):
    sharding = explicit_sharding(x)
    if sharding is None or all(s is None for s in sharding.spec):
      return x
    return jax.sharding.reshard(x, jax.P())

  return jax.tree.map(one, tree)


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------


class ChunkPlan(NamedTuple):
  """How ``n`` entries are split: ``num_chunks`` chunks of ``size``, the
  last ``pad`` slots being copies of the first entries, weighted 0.

  Chunk ``j`` holds entries ``j, j + num_chunks, j + 2 num_chunks, ...``
  (strided rather than contiguous): reshaping ``(n, ...)`` to
  ``(size, num_chunks, ...)`` keeps a batch sharded along its example axis
  sharded inside every chunk, so each device works on its own examples in
  every chunk and nothing is gathered.
  """

  n: int
  num_chunks: int
  size: int
  pad: int


def chunk_plan(n: int, chunk_size: int | None, shards: int = 1) -> ChunkPlan:
  """Chunks of at most ``chunk_size`` entries (``None``: one chunk).

  Unsharded: ``ceil(n / chunk_size)`` chunks of equal size, padded with
  masked copies when they do not divide ``n``. Sharded ``shards`` ways along
  the example axis (an Explicit mesh): the largest chunk size ``<=
  chunk_size`` that divides ``n`` and is a multiple of ``shards`` (no
  padding: a sharded axis cannot be padded without moving data).
  """
  check_chunk_size(chunk_size)
  if chunk_size is None or chunk_size >= n:
    return ChunkPlan(n, 1, n, 0)
  if shards > 1:
    sizes = [c for c in range(shards, chunk_size + 1, shards) if n % c == 0]
    if not sizes:
      raise ValueError(
          f"chunk_size={chunk_size} cannot split a batch of {n} examples"
          f" sharded {shards} ways: each chunk must hold a multiple of"
          f" {shards} examples and the chunks must divide {n}. Use a"
          f" chunk_size that is a multiple of {shards} and divides {n}"
          " (or at least one such divisor), or None."
      )
    return ChunkPlan(n, n // sizes[-1], sizes[-1], 0)
  num = -(-n // chunk_size)
  size = -(-n // num)
  return ChunkPlan(n, num, size, num * size - n)


def to_chunks(tree: Any, plan: ChunkPlan) -> Any:
  """``(n, ...)`` leaves to ``(num_chunks, size, ...)``, strided chunks."""

  def split(x):
    if plan.pad:
      x = jnp.concatenate([x, x[: plan.pad]])
    x = reshape_examples(x, (plan.size, plan.num_chunks, *x.shape[1:]))
    return jnp.moveaxis(x, 1, 0)

  return jax.tree.map(split, tree)


def reshape_examples(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x.reshape(shape)`` keeping the sharding of the leading (example)
  axis.

  On an Explicit mesh jax infers the sharding of a reshape that splits or
  merges axes, and may move or drop it: on a one-device mesh the split
  ``(n,) -> (size, num_chunks)`` with ``size == 1`` put it on the chunk
  axis, which ``scan`` then refused, and a split into several axes is not
  inferred at all. Here it stays on the leading axis.
  """
  sharding = explicit_sharding(x)
  if sharding is None:
    return x.reshape(shape)
  return jax.lax.reshape(x, shape, out_sharding=jax.P(sharding.spec[0]))


def from_chunks(tree: Any, plan: ChunkPlan) -> Any:
  """The inverse of :func:`to_chunks` (padding dropped)."""

  def merge(x):
    x = reshape_examples(jnp.moveaxis(x, 0, 1),
                         (plan.size * plan.num_chunks, *x.shape[2:]))
    return x[: plan.n] if plan.pad else x

  return jax.tree.map(merge, tree)


def fold_chunks(
    fn: Callable[[Any, jax.Array | None], Any],
    xs: Any,
    chunk_size: int | None,
    *,
    unroll: bool = False,
    dtype: Any = None,
) -> Any:
  """``sum_j fn(chunk_j, weights_j)`` over the chunks of ``xs``.

  ``fn`` receives a chunk (leaves ``(size, ...)``) and its weights (``None``
  or ``(size,)``, 0 on padded entries) and returns a pytree that is
  already summed over the chunk, each entry multiplied by its weight. With
  ``chunk_size=None`` (or ``>= n``) this is ``fn(xs, None)``.

  Args:
    fn: ``(chunk, weights) -> pytree``.
    xs: pytree of arrays sharing a leading axis of size ``n``.
    chunk_size: entries per chunk.
    unroll: unroll the chunks at trace time (``True``) or loop over them
      (``False``, the default: one chunk in memory at a time).
    dtype: dtype of the weights (default: that of the first float leaf).

  Returns:
    The sum of ``fn`` over the chunks.
  """
  n = num_examples(xs)
  plan = chunk_plan(n, chunk_size, example_shards(xs))
  if plan.num_chunks == 1:
    return fn(xs, None)
  if dtype is None:
    floats = [x for x in jax.tree.leaves(xs)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    dtype = floats[0].dtype if floats else jnp.float32
  parts = to_chunks(xs, plan)
  weights = None
  if plan.pad:
    weights = to_chunks((jnp.arange(n + plan.pad) < n).astype(dtype),
                        ChunkPlan(n + plan.pad, plan.num_chunks, plan.size, 0))
  def add(a, b):
    return jax.tree.map(jnp.add, a, b)

  if unroll:
    outs = [fn(jax.tree.map(lambda x: x[j], parts),
               None if weights is None else weights[j])
            for j in range(plan.num_chunks)]
    return functools.reduce(add, outs)
  first = fn(jax.tree.map(lambda x: x[0], parts),
             None if weights is None else weights[0])
  rest = (jax.tree.map(lambda x: x[1:], parts),
          None if weights is None else weights[1:])
  total, _ = jax.lax.scan(lambda acc, pw: (add(acc, fn(*pw)), None), first,
                          rest)
  return total


def weighted_sum(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """``sum_i w_i values_i`` over axis 0 (plain sum when ``weights`` is None)."""
  if weights is None:
    return jnp.sum(values, axis=0)
  w = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * w.astype(values.dtype), axis=0)


def map_chunks(
    fn: Callable, xs: Any, chunk_size: int | None = None, *,
    reduce_sum: bool = False, unroll: bool = False,
) -> Any:
  """``fn`` on every entry along axis 0 of ``xs``, vmapped chunk by chunk.

  ``chunk_size`` entries are vectorised at once (``None``: all), which bounds
  memory. Chunks are strided (chunk ``j`` holds entries ``j``,
  ``j + num_chunks``, ...), so a batch sharded along its example axis stays
  sharded; the outputs come back in the order of ``xs``. The chunks are
  looped over, one in memory at a time.

  Args:
    fn: function of one entry (a pytree slice without the leading axis).
    xs: pytree of arrays (or PRNG keys) sharing a leading axis.
    chunk_size: entries per vectorised chunk.
    reduce_sum: return ``sum_i fn(x_i)`` instead of the stacked outputs.
    unroll: unroll the chunks at trace time (``True``) instead of looping
      (``False``): faster for convolutions on XLA:CPU, but XLA may then
      hold several chunks at once.

  Returns:
    The stacked outputs (leading axis as ``xs``), or their sum.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> anisonoise.map_chunks(lambda x: x ** 2, jnp.arange(5.), 2).tolist()
    [0.0, 1.0, 4.0, 9.0, 16.0]
  """
  if reduce_sum:
    return fold_chunks(
        lambda part, w: jax.tree.map(lambda y: weighted_sum(y, w),
                                     jax.vmap(fn)(part)),
        xs, chunk_size, unroll=unroll)
  n = num_examples(xs)
  plan = chunk_plan(n, chunk_size, example_shards(xs))
  if plan.num_chunks == 1:
    return jax.vmap(fn)(xs)
  parts = to_chunks(xs, plan)
  if unroll:
    outs = [jax.vmap(fn)(jax.tree.map(lambda x: x[j], parts))
            for j in range(plan.num_chunks)]
    stacked = jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
  else:
    stacked = jax.lax.map(jax.vmap(fn), parts)
  return from_chunks(stacked, plan)


@jax.custom_batching.custom_vmap
def any_over_batch(pred: jax.Array) -> jax.Array:
  """``pred`` itself, but under ``jax.vmap`` the ``any`` of it over the
  mapped axis, unbatched.

  A ``lax.cond`` on a batched predicate becomes a ``select`` that runs both
  branches; on this one it stays a ``cond``. So S seeds mapped over one
  jitted step run a refresh only at the steps where some seed refreshes,
  and the step costs about S times one seed's.
  """
  return pred


@any_over_batch.def_vmap
def _any_over_batch_vmap(axis_size, in_batched, pred):
  del axis_size
  (batched,) = in_batched
  if not batched:
    return any_over_batch(pred), False
  # Calling itself again keeps an enclosing vmap unbatched too.
  return any_over_batch(jnp.any(pred, axis=0)), False


def where_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``jnp.where(pred, a, b)`` leaf by leaf over two like pytrees."""
  return jax.tree.map(lambda a, c: jnp.where(pred, a, c), on_true, on_false)
