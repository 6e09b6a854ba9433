"""The per-example gradient covariance, matrix-free.

Notation (shared with the paper, Eq. 5): per-example gradients ``g_i``, their
mean ``gbar``, the covariance

.. math::
  C = \\frac{1}{n} \\sum_{i=1}^n (g_i - \\bar g)(g_i - \\bar g)^\\top,

and the SGD noise covariance for minibatch size ``m``, ``Sigma_sgd = C / m``.

With ``G`` the ``n x D`` Jacobian of the per-example loss vector,
``G v`` is one ``jax.jvp`` and ``G^T u`` one ``jax.vjp`` of
``loss_fn(params, batch)``. Hence ``C v = G^T (Gv - mean(Gv)) / n`` and an
exact draw from ``N(0, C/m)`` is ``G^T (z - mean(z)) / sqrt(m n)`` with
``z ~ N(0, I_n)``: one backward pass, and neither ``C`` nor the per-example
gradients are ever formed.

Exact traces and diagonals need the per-example gradients themselves; they
are computed by ``vmap`` in chunks of ``chunk_size`` examples, reduced chunk
by chunk so that ``n x D`` floats need not be in memory at once.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src.batching import Batch, LossFn, Params

Matvec = Callable[[Params], Params]

# Random probes or samples vectorised at once by the stochastic estimators.
# 1: on the conv-free LeNet (1,200 images, CPU) vectorising HVPs costs more
# than it saves: stochastic Tr(H Sigma) with 64 samples took 34.7 s in
# chunks of 8 and 14.5 s one at a time (16 samples: 8.0 s against 3.6 s).
PROBE_CHUNK = 1


def _check_chunk_size(chunk_size: int | None) -> None:
  if chunk_size is not None and (
      not isinstance(chunk_size, int) or chunk_size < 1
  ):
    raise ValueError(
        f"chunk_size must be a positive int or None (all examples at once),"
        f" got {chunk_size!r}."
    )


def per_example_grads(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
) -> Params:
  """Per-example gradients ``g_i``, stacked along a new leading axis.

  Each example's loss is differentiated on its own (``vmap`` of ``grad`` over
  single-example batches). ``chunk_size`` examples are processed at once
  (:func:`anisonoise.map_chunks`), which bounds the activation memory; the
  result itself is ``n x D``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: pytree of arrays with the examples along axis 0.
    chunk_size: examples per vectorised chunk; ``None`` processes all at once.

  Returns:
    A pytree like ``params`` whose leaves have a leading axis of size ``n``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w - b['y']) ** 2
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> anisonoise.per_example_grads(loss_fn, jnp.ones(3), batch).shape
    (3, 3)
  """
  _check_chunk_size(chunk_size)
  n = batching.check_loss_and_batch(loss_fn, params, batch, "per_example_grads")
  del n
  grad_one = jax.grad(batching.single_example_loss(loss_fn))
  return batching.map_chunks(lambda ex: grad_one(params, ex), batch,
                             chunk_size)


def centred_grad_fn(
    loss_fn: LossFn, params: Params, batch: Batch
) -> Callable[[Batch], Params]:
  """``example -> g_i - gbar``: one example's gradient minus the batch mean.

  The mean gradient is computed once, here; subtracting it inside the chunk
  loops avoids the cancellation of ``E[g^2] - gbar^2`` in float32.
  """
  gbar = jax.grad(batching.mean_loss(loss_fn, batch))(params)
  grad_one = jax.grad(batching.single_example_loss(loss_fn))

  def centred(example):
    return jax.tree.map(jnp.subtract, grad_one(params, example), gbar)

  return centred


def covariance_diagonal(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
) -> Params:
  """Exact diagonal of the gradient covariance ``C`` (paper Eq. 5, times m).

  .. math::
    \\mathrm{diag}(C) = \\frac{1}{n} \\sum_i (g_i - \\bar g)^{\\odot 2}

  The mean gradient is subtracted inside the chunk loop
  (:func:`centred_grad_fn`).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: pytree of arrays with the examples along axis 0.
    chunk_size: examples per vectorised chunk (memory ``chunk_size x D``).

  Returns:
    A pytree like ``params``. Its sum is ``Tr(C)``; divide by ``m`` for the
    diagonal of ``Sigma_sgd``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 0.], [-1., 0.]])}
    >>> anisonoise.covariance_diagonal(loss_fn, jnp.zeros(2), batch).tolist()
    [1.0, 0.0]
  """
  _check_chunk_size(chunk_size)
  n = batching.check_loss_and_batch(
      loss_fn, params, batch, "covariance_diagonal"
  )
  centred = centred_grad_fn(loss_fn, params, batch)

  def centred_square(example):
    return jax.tree.map(jnp.square, centred(example))

  total = batching.map_chunks(centred_square, batch, chunk_size,
                              reduce_sum=True)
  return jax.tree.map(lambda x: x / n, total)


def _rademacher_like(key: jax.Array, flat: jax.Array) -> jax.Array:
  return jax.random.rademacher(key, flat.shape, dtype=flat.dtype)


def covariance_trace(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    method: str = "exact",
    chunk_size: int | None = None,
    key: jax.Array | None = None,
    num_probes: int = 32,
) -> jax.Array:
  """The trace of the gradient covariance, ``Tr(C) = m Tr(Sigma_sgd)``.

  ``method="exact"`` sums :func:`covariance_diagonal`. ``method="hutchinson"``
  averages ``v^T C v = ||G v - mean(G v)||^2 / n`` over Rademacher probes
  ``v``: each probe is a single forward-mode product ``G v`` (one ``jvp``,
  no backward pass), so this is the cheap choice when per-example gradients
  are too costly. Its relative standard error is about
  ``sqrt(2 sum_j gamma_j^2) / (Tr(C) sqrt(num_probes))``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: pytree of arrays with the examples along axis 0.
    method: ``"exact"`` or ``"hutchinson"``.
    chunk_size: examples per chunk for ``"exact"``.
    key: PRNG key for ``"hutchinson"`` (required there).
    num_probes: number of probes for ``"hutchinson"``.

  Returns:
    A scalar ``Tr(C)``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 2.], [-1., -2.]])}
    >>> float(anisonoise.covariance_trace(loss_fn, jnp.zeros(2), batch))
    5.0
  """
  if method == "exact":
    diag = covariance_diagonal(loss_fn, params, batch, chunk_size=chunk_size)
    return optax.tree_utils.tree_sum(diag)
  if method != "hutchinson":
    raise ValueError(
        f"method must be 'exact' or 'hutchinson', got {method!r}."
    )
  if key is None:
    raise ValueError("covariance_trace(method='hutchinson') needs a PRNG key.")
  batching.check_positive_int("num_probes", num_probes)
  n = batching.check_loss_and_batch(loss_fn, params, batch, "covariance_trace")
  flat, unravel = ravel_pytree(params)
  _, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)

  def quad(k):
    u = jvp_lin(unravel(_rademacher_like(k, flat)))
    return jnp.sum(jnp.square(u - jnp.mean(u))) / n

  keys = jax.random.split(key, num_probes)
  return jnp.mean(batching.map_chunks(quad, keys, PROBE_CHUNK))


def covariance_operator(
    loss_fn: LossFn, params: Params, batch: Batch
) -> Matvec:
  """The matrix-free product ``v -> C v``.

  .. math::
    C v = \\frac{1}{n} G^\\top (G v - \\overline{G v}\\,\\mathbf 1)

  The per-example loss vector is linearised once (``jax.linearize``); each
  product then costs one forward-mode and one reverse-mode linear pass,
  reusing the stored linearisation, and never forms ``C`` or any ``g_i``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta`` at which ``C`` is taken.
    batch: the estimation batch.

  Returns:
    A function mapping a pytree like ``params`` to ``C v`` (same structure).

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 0.], [-1., 0.]])}
    >>> cv = anisonoise.covariance_operator(loss_fn, jnp.zeros(2), batch)
    >>> cv(jnp.array([1., 1.])).tolist()
    [1.0, 0.0]
  """
  n = batching.check_loss_and_batch(
      loss_fn, params, batch, "covariance_operator"
  )
  _, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)
  vjp_lin = jax.linear_transpose(jvp_lin, params)

  def matvec(v):
    u = jvp_lin(v)
    (out,) = vjp_lin((u - jnp.mean(u)) / n)
    return out

  return matvec


def sgd_noise_sampler(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    batch_size: int | None = None,
) -> Callable[[jax.Array], Params]:
  """``key -> eps ~ N(0, C/m)``, linearised once for many draws.

  The same draw as :func:`sample_sgd_noise`, but the per-example loss vector
  is linearised once and every draw is one transposed linear pass; use it
  for Monte Carlo loops (it ``vmap``-s over keys).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: the estimation batch.
    batch_size: the minibatch size ``m`` (default ``n``).

  Returns:
    A function of a PRNG key returning a pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 0.], [-1., 0.]])}
    >>> draw = anisonoise.sgd_noise_sampler(loss_fn, jnp.zeros(2), batch)
    >>> jax.vmap(draw)(jax.random.split(jax.random.key(0), 3)).shape
    (3, 2)
  """
  n = batching.check_loss_and_batch(loss_fn, params, batch,
                                    "sgd_noise_sampler")
  m = n if batch_size is None else batch_size
  losses, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)
  vjp_lin = jax.linear_transpose(jvp_lin, params)

  def draw(key):
    z = jax.random.normal(key, (n,), dtype=losses.dtype)
    (eps,) = vjp_lin((z - jnp.mean(z)) / math.sqrt(m * n))
    return eps

  return draw


def sample_sgd_noise(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    key: jax.Array,
    *,
    batch_size: int | None = None,
) -> Params:
  """An exact draw from ``N(0, C/m)``, the SGD noise of paper Eq. 5.

  .. math::
    \\epsilon = \\frac{1}{\\sqrt{m n}} G^\\top (z - \\bar z \\mathbf 1),
    \\quad z \\sim N(0, I_n),

  whose covariance is ``G_c^T G_c / (m n) = C / m``. It costs one backward
  pass with random weights on the per-example losses.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: the estimation batch.
    key: PRNG key.
    batch_size: the minibatch size ``m`` whose noise is drawn (default ``n``).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 0.], [-1., 0.]])}
    >>> eps = anisonoise.sample_sgd_noise(
    ...     loss_fn, jnp.zeros(2), batch, jax.random.key(0), batch_size=1)
    >>> float(eps[1])
    0.0
  """
  n = batching.check_loss_and_batch(loss_fn, params, batch, "sample_sgd_noise")
  m = n if batch_size is None else batch_size
  losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
  z = jax.random.normal(key, (n,), dtype=losses.dtype)
  z = (z - jnp.mean(z)) / math.sqrt(m * n)
  (eps,) = vjp_fn(z)
  return eps
