"""Sums over the examples: the one mechanism behind every pass over the data.

Every quantity the library estimates is a sum over examples of a
per-example term: the mean loss and gradient, ``H v``, ``C v``, ``G^T z``
(an SGD-noise draw), ``sum_i (g_i - gbar)^2``. The kernels here compute
such a sum over a batch held in memory, chunk by chunk
(:func:`anisonoise.map_chunks`'s strided chunks, so a batch sharded over
devices stays sharded and only the per-chunk sums are reduced), and
:func:`total` adds them over a stream of batches (:class:`Batches`) when
the data do not fit at once. Peak memory is set by ``chunk_size``, not by
``n``.

Kernels take ``(loss_fn, chunk_size, params, batch, *arrays)``; the first
two are static, so that a stream calls one compiled program per batch
shape, whatever the number of calls. The programs are cached per loss, by
what the loss computes (its code and the objects it closes over) rather
than by the function object (globals it reads are read when it is first
compiled, as under ``jax.jit``), so that a ``loss_fn`` written afresh at every
call does not recompile, and the cache is bounded
(:data:`KERNEL_CACHE_SIZE` losses), so that it does not keep executables
alive without end.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import types
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import optax

from anisonoise._src import batching
from anisonoise._src.batching import Batch, LossFn, Params


class Batches:
  """A data set given as a stream of batches, for the offline diagnostics.

  Pass ``anisonoise.Batches(source)`` wherever a diagnostic takes ``batch``
  when the data do not fit on the device at once. Every product is then
  accumulated over the stream, weighted by batch size (as PyHessian does
  with a data loader), and the answer equals the one for the concatenated
  batch. Each batch goes through one compiled program per batch shape
  (further chunked by ``chunk_size`` when given); the diagnostic itself runs
  eagerly, so call it outside ``jax.jit``.

  Args:
    source: a sequence of batches (each a pytree of arrays with the examples
      along axis 0, all of one structure), or a zero-argument callable
      returning a fresh iterator over them (a ``tfds.data_source``
      wrapper, a grain loader). Several passes are made, so a one-shot
      iterator is refused.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> x = jnp.diag(jnp.array([1., 2., 3., 4.]))
    >>> stream = anisonoise.Batches([{'x': x[:3]}, {'x': x[3:]}])
    >>> float(anisonoise.hessian_trace(loss_fn, jnp.zeros(4), stream))
    7.5
  """

  def __init__(self, source: Iterable[Batch] | Callable[[], Iterator[Batch]]):
    if isinstance(source, collections.abc.Iterator):
      raise ValueError(
          "Batches got a one-shot iterator; the diagnostics pass over the"
          " data several times. Pass a sequence of batches (a list) or a"
          " zero-argument callable that returns a fresh iterator, e.g."
          " Batches(lambda: iter(loader))."
      )
    if not (callable(source) or isinstance(source, collections.abc.Iterable)):
      raise ValueError(
          "Batches needs a sequence of batches or a zero-argument callable"
          f" returning an iterator over them, got {type(source).__name__}."
      )
    self._source = source
    self._sizes: list[int] | None = None
    self._treedef = None

  def _iterate(self) -> Iterator[Batch]:
    if callable(self._source) and not isinstance(
        self._source, collections.abc.Iterable):
      it = self._source()
      if not isinstance(it, collections.abc.Iterator):
        it = iter(it)
      return it
    return iter(self._source)

  def __iter__(self) -> Iterator[Batch]:
    """Yields the batches, checking each against the first pass."""
    sizes = []
    for i, batch in enumerate(self._iterate()):
      treedef = jax.tree.structure(batch)
      if self._treedef is None:
        self._treedef = treedef
      elif treedef != self._treedef:
        raise ValueError(
            f"Batches: batch {i} has pytree structure {treedef}, but the"
            f" first batch has {self._treedef}; every batch must hold the"
            " same leaves."
        )
      n = batching.num_examples(batch)
      if self._sizes is not None and (
          i >= len(self._sizes) or self._sizes[i] != n):
        raise ValueError(
            f"Batches: pass over the source gave batch {i} of {n} examples,"
            " unlike the first pass; the source must give the same batches"
            " on every pass (a fresh iterator over the same data)."
        )
      sizes.append(n)
      yield batch
    if not sizes:
      raise ValueError("Batches: the source gave no batches.")
    if self._sizes is None:
      self._sizes = sizes
    elif len(sizes) != len(self._sizes):
      raise ValueError(
          f"Batches: a pass gave {len(sizes)} batches, the first pass"
          f" {len(self._sizes)}; the source must give the same batches on"
          " every pass."
      )

  @property
  def sizes(self) -> list[int]:
    """Examples in each batch (one pass over the source the first time)."""
    if self._sizes is None:
      for _ in self:
        pass
    assert self._sizes is not None  # the pass records them
    return list(self._sizes)

  @property
  def num_examples(self) -> int:
    """``n``, the total number of examples in the stream."""
    return sum(self.sizes)

  def first(self) -> Batch:
    """The first batch (for shape checks)."""
    for batch in self._iterate():
      return batch
    raise ValueError("Batches: the source gave no batches.")


def check_data(loss_fn: LossFn | None, params: Params, data: Any,
               who: str) -> int:
  """:func:`batching.check_loss_and_batch` for a batch or a stream; ``n``."""
  if isinstance(data, Batches):
    batching.check_loss_and_batch(loss_fn, params, data.first(), who)
    return data.num_examples
  return batching.check_loss_and_batch(loss_fn, params, data, who)


def is_single_pass(data: Any, chunk_size: int | None) -> bool:
  """True when the whole in-memory batch is one vectorised chunk."""
  if isinstance(data, Batches):
    return False
  n = batching.num_examples(data)
  return batching.chunk_plan(n, chunk_size,
                             batching.example_shards(data)).num_chunks == 1


class _Same:
  """An object compared by identity (for :func:`_stable_key`)."""

  def __init__(self, obj: Any):
    self.obj = obj

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Same) and self.obj is other.obj

  def __hash__(self) -> int:
    return id(self.obj)


def _stable_key(fn: Any) -> Any:
  """What ``fn`` computes, as a hashable key: a function by its code, its
  globals and what its closure and defaults hold (by identity), a
  ``functools.partial`` or a bound method by their parts, anything else by
  identity. A ``loss_fn`` written afresh at every call (``lambda p, b:
  model.apply(p, b)`` inside a loop) then finds its compiled program."""
  if isinstance(fn, types.FunctionType):
    try:
      cells = tuple(c.cell_contents for c in fn.__closure__ or ())
    except ValueError:  # an empty cell: no stable contents
      return _Same(fn)
    return (fn.__code__, _Same(fn.__globals__),
            tuple(_stable_key(c) if callable(c) else _Same(c)
                  for c in cells),
            tuple(map(_Same, fn.__defaults__ or ())),
            tuple((k, _Same(v))
                  for k, v in sorted((fn.__kwdefaults__ or {}).items())))
  if isinstance(fn, functools.partial):
    return ("partial", _stable_key(fn.func), tuple(map(_Same, fn.args)),
            tuple((k, _Same(v)) for k, v in sorted(fn.keywords.items())))
  if isinstance(fn, types.MethodType):
    return ("method", _stable_key(fn.__func__), _Same(fn.__self__))
  return _Same(fn)


# Compiled stream kernels, most recently used last. Each entry holds its
# loss_fn (and so whatever the key compares by identity) alive, and the
# oldest is dropped beyond the bound, with its executables.
KERNEL_CACHE_SIZE = 16
_kernels: collections.OrderedDict = collections.OrderedDict()


def _jitted(kernel: Callable, loss_fn: LossFn) -> Callable:
  """``kernel`` with ``loss_fn`` bound, jitted (``chunk_size`` static):
  one compiled program per batch shape for every call with the same loss,
  in a cache of :data:`KERNEL_CACHE_SIZE` losses."""
  key = (kernel, _stable_key(loss_fn))
  run = _kernels.pop(key, None)
  if run is None:
    run = jax.jit(functools.partial(kernel, loss_fn), static_argnums=(0,))
  _kernels[key] = run
  while len(_kernels) > KERNEL_CACHE_SIZE:
    _kernels.popitem(last=False)
  return run


def total(kernel: Callable, loss_fn: LossFn, chunk_size: int | None,
          params: Params, data: Any, *arrays: Any,
          per_example: Any = None) -> Any:
  """``kernel``'s sum over all examples of a batch or a :class:`Batches`.

  ``per_example`` (a pytree of arrays with ``n`` rows, e.g. the Gaussian
  weights of an SGD-noise draw) travels with the examples: the kernel gets
  ``(batch, per_example)`` in place of ``batch``, sliced alike.
  """
  if not isinstance(data, Batches):
    part = data if per_example is None else (data, per_example)
    return kernel(loss_fn, chunk_size, params, part, *arrays)
  run = _jitted(kernel, loss_fn)
  out = None
  offset = 0
  for batch in data:
    n = batching.num_examples(batch)
    part = batch
    if per_example is not None:
      part = (batch, jax.tree.map(lambda x: x[offset:offset + n],
                                  per_example))
    offset += n
    value = run(chunk_size, params, part, *arrays)
    wait_if_across_processes(value)
    out = value if out is None else jax.tree.map(jnp.add, out, value)
  return out


def wait_if_across_processes(tree: Any) -> None:
  """Blocks until ``tree`` is computed when it spans several processes
  (``jax.distributed``), so that nothing is queued behind the collective
  that produced it.

  Why: the CPU client admits a bounded number of programs per device at
  once, and a program takes its slot when its launch runs, not when it
  was dispatched. An eager solve on global arrays dispatches dozens of
  small programs behind each product's all-reduce; if those that wait on
  its result take every slot of one device first, that device never
  joins the all-reduce and every process waits on it for ever. An eager
  ``hessian_spectrum`` over a stream of global batches hung so on 2
  processes of 2 CPU devices (gloo, jax 0.10.2) in about 1 run in 10 on a
  loaded 2-core machine: one device's launch blocked on the semaphore, the
  other three in the all-reduce. Waiting for each product costs the
  overlap of the host loop with it, on multi-process runs only."""
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable
         for x in jax.tree.leaves(tree)):
    jax.block_until_ready(tree)


def scale(tree: Any, factor: Any) -> Any:
  """Every leaf times ``factor`` (kept in the leaf's dtype)."""
  return jax.tree.map(lambda x: x * jnp.asarray(factor, x.dtype), tree)


# --------------------------------------------------------------------------
# Kernels: sums over the examples of a batch in memory, chunk by chunk.
# --------------------------------------------------------------------------


def _weighted_losses(loss_fn, params, part, weights):
  return batching.weighted_sum(loss_fn(params, part), weights)


def loss_sum(loss_fn, chunk_size, params, batch):
  """``sum_i l_i(theta)``."""
  return batching.fold_chunks(
      lambda part, w: _weighted_losses(loss_fn, params, part, w), batch,
      chunk_size)


def grad_sum(loss_fn, chunk_size, params, batch):
  """``sum_i g_i``."""
  return batching.fold_chunks(
      lambda part, w: jax.grad(_weighted_losses, argnums=1)(
          loss_fn, params, part, w), batch, chunk_size)


def hvp_sum(loss_fn, chunk_size, params, batch, v):
  """``sum_i (nabla^2 l_i) v``: forward-over-reverse on each chunk."""

  def on(part, w):
    grad = lambda p: jax.grad(_weighted_losses, argnums=1)(  # noqa: E731
        loss_fn, p, part, w)
    return jax.jvp(grad, (params,), (v,))[1]

  return batching.fold_chunks(on, batch, chunk_size)


def hvp_sum_many(loss_fn, chunk_size, params, batch, vs):
  """:func:`hvp_sum` for a stack of vectors (leading axis)."""
  return jax.vmap(lambda v: hvp_sum(loss_fn, chunk_size, params, batch, v))(vs)


def covariance_sum(loss_fn, chunk_size, params, batch, v, gbar):
  """``sum_i (g_i.v - gbar.v) g_i`` (``n C v``): one jvp and one vjp a chunk.

  Centring with the known ``gbar.v`` keeps the sum exact in one pass, with
  no ``E[uu] - E[u]^2`` cancellation.
  """
  u_bar = optax.tree_utils.tree_vdot(gbar, v)

  def on(part, w):
    losses, jvp_lin = jax.linearize(lambda p: loss_fn(p, part), params)
    u = jvp_lin(v)
    cot = u - u_bar.astype(u.dtype)
    if w is not None:
      cot = cot * w.astype(cot.dtype)
    (out,) = jax.linear_transpose(jvp_lin, params)(
        batching.match_sharding(cot, losses))
    return out

  return batching.fold_chunks(on, batch, chunk_size)


def weighted_grad_sum(loss_fn, chunk_size, params, batch_and_z):
  """``sum_i z_i g_i = G^T z`` for per-example weights ``z``: one vjp a
  chunk (an SGD-noise draw when ``z`` is centred Gaussian)."""

  def on(part, w):
    b, z = part
    losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, b), params)
    z = z.astype(losses.dtype)
    if w is not None:
      z = z * w.astype(z.dtype)
    (out,) = vjp_fn(batching.match_sharding(z, losses))
    return out

  return batching.fold_chunks(on, batch_and_z, chunk_size)


def centred_square_sum(loss_fn, chunk_size, params, batch, gbar):
  """``sum_i (g_i - gbar)^2`` entrywise, from per-example gradients
  vectorised a chunk at a time (``chunk_size x D`` floats at once)."""
  grad_one = jax.grad(batching.single_example_loss(loss_fn))

  def sq(example):
    return jax.tree.map(lambda g, m: jnp.square(g - m),
                        grad_one(params, example), gbar)

  return batching.map_chunks(sq, batch, chunk_size, reduce_sum=True)


def centred_jvp_square_sum(loss_fn, chunk_size, params, batch, v, gbar):
  """``sum_i (g_i.v - gbar.v)^2 = n v^T C v``: one jvp a chunk."""
  u_bar = optax.tree_utils.tree_vdot(gbar, v)

  def on(part, w):
    u = jax.jvp(lambda p: loss_fn(p, part), (params,), (v,))[1]
    return batching.weighted_sum(jnp.square(u - u_bar.astype(u.dtype)), w)

  return batching.fold_chunks(on, batch, chunk_size)


def perturbed_loss_sums(loss_fn, chunk_size, params, batch, noise):
  """``sum_i l_i(theta + nu_s)`` for a stack of perturbations ``nu_s``."""

  def on(part, w):
    return jax.vmap(lambda nu: _weighted_losses(
        loss_fn, jax.tree.map(jnp.add, params, nu), part, w))(noise)

  return batching.fold_chunks(on, batch, chunk_size)


# --------------------------------------------------------------------------
# Means over a batch or a stream
# --------------------------------------------------------------------------


def mean_loss_value(loss_fn, params, data, *, chunk_size=None, n=None):
  """``L(theta)``, the mean loss over a batch or stream."""
  n = n if n is not None else num_examples(data)
  return total(loss_sum, loss_fn, chunk_size, params, data) / n


def mean_grad(loss_fn, params, data, *, chunk_size=None, n=None):
  """``gbar``, the mean gradient over a batch or stream."""
  n = n if n is not None else num_examples(data)
  return scale(total(grad_sum, loss_fn, chunk_size, params, data), 1.0 / n)


def num_examples(data: Any) -> int:
  """``n`` of a batch or a :class:`Batches`."""
  if isinstance(data, Batches):
    return data.num_examples
  return batching.num_examples(data)


def mean_gradient(
    loss_fn: LossFn, params: Params, batch: Any, *,
    chunk_size: int | None = None,
) -> Params:
  """The full-batch gradient ``grad L(theta) = (1/n) sum_i grad l_i``.

  The gradient of GD and of every noise-injected dynamics (paper Eq. 7),
  accumulated ``chunk_size`` examples at a time, so that a full-batch step
  over tens of thousands of images fits in memory (``jax.grad`` of the
  mean loss holds every example's activations at once). Works under
  ``jax.jit`` for a batch in memory; a :class:`Batches` stream is summed
  batch by batch (call it outside ``jax.jit`` then).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters (any pytree).
    batch: pytree of arrays with the examples along axis 0, or a
      :class:`Batches` stream.
    chunk_size: examples per vectorised pass (``None``: all at once).

  Returns:
    The mean gradient, a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.eye(4)}
    >>> anisonoise.mean_gradient(loss_fn, jnp.ones(4), batch,
    ...                          chunk_size=3).tolist()
    [0.25, 0.25, 0.25, 0.25]

  References:
    Zhu et al., ICML 2019, Eq. 7 (the drift of every compared dynamics).
  """
  check_data(loss_fn, params, batch, "mean_gradient")
  batching.check_chunk_size(chunk_size)
  return mean_grad(loss_fn, params, batch, chunk_size=chunk_size)
