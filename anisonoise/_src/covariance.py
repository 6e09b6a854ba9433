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

``chunk_size`` bounds *every* pass: with it, ``C v`` and a noise draw run
one chunk at a time too (a pass over the data per product instead of one
stored linearisation), so peak memory is set by the chunk, not by ``n``;
and each function also takes an :class:`anisonoise.Batches` stream in place
of ``batch``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src import estimators
from anisonoise._src import sums
from anisonoise._src.batching import Batch, LossFn, Params

Matvec = Callable[[Params], Params]



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
  batching.check_chunk_size(chunk_size)
  n = batching.check_loss_and_batch(loss_fn, params, batch, "per_example_grads")
  del n
  grad_one = jax.grad(batching.single_example_loss(loss_fn))
  return batching.map_chunks(lambda ex: grad_one(params, ex), batch,
                             chunk_size)


def centred_grad_fn(
    loss_fn: LossFn, params: Params, batch: Batch,
    chunk_size: int | None = None,
) -> Callable[[Batch], Params]:
  """``example -> g_i - gbar``: one example's gradient minus the batch mean.

  The mean gradient is computed once, here (in chunks of ``chunk_size``);
  subtracting it inside the chunk loops avoids the cancellation of
  ``E[g^2] - gbar^2`` in float32.
  """
  gbar = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size)
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
    method: str = "exact",
    key: estimators.KeyLike | None = None,
    num_probes: int = 8,
) -> Params:
  """The diagonal of the gradient covariance ``C`` (paper Eq. 5, times m).

  .. math::
    \\mathrm{diag}(C) = \\frac{1}{n} \\sum_i (g_i - \\bar g)^{\\odot 2}
    = \\frac{1}{n} \\mathbb E_z\\big[(G^\\top (z - \\bar z))^{\\odot 2}\\big]

  ``method="exact"`` forms the per-example gradients in chunks, subtracting
  the mean gradient inside the chunk loop.
  ``method="hutchinson"`` averages ``(G^T (z - mean(z)))^2 / n`` over
  ``num_probes`` Rademacher weight vectors ``z`` on the examples: each probe
  is one backward pass (the cost of an SGD-noise draw), and no per-example
  gradient is formed. It is unbiased; entry ``d`` has variance
  ``2 ((sum_i a_i^2)^2 - sum_i a_i^4) / (n^2 num_probes)`` with
  ``a_i = (g_i - gbar)_d``, so its relative standard deviation is at most
  ``sqrt(2 / num_probes)`` (less where a few examples dominate the entry),
  and the sum (an estimate of ``Tr(C)``) has variance
  ``2 (||A||_F^2 - sum_i A_ii^2) / num_probes`` with ``A`` the centred
  gradients' Gram matrix over ``n``. Because a noise covariance is linear
  in the diagonal, noise drawn from the estimate has, averaged over the
  probes, exactly the covariance ``diag(C) / m``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: pytree of arrays with the examples along axis 0, or a
      :class:`anisonoise.Batches` stream.
    chunk_size: examples per vectorised chunk (memory ``chunk_size x D``
      exact; one chunk's activations per probe with ``"hutchinson"``).
    method: ``"exact"`` or ``"hutchinson"``.
    key: int seed or PRNG key (``"hutchinson"`` only, required there).
    num_probes: number of probes for ``"hutchinson"``.

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
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "covariance_diagonal")
  key = estimators.check_method("covariance_diagonal", method, _METHODS,
                          random="hutchinson", key=key,
                          num_samples=num_probes)
  if method == "hutchinson":
    transposed = jacobian_transpose(loss_fn, params, batch,
                                    chunk_size=chunk_size)
    dtype = jnp.result_type(*jax.tree.leaves(params))

    def probe(k):
      z = jax.random.rademacher(k, (n,), dtype)
      return jax.tree.map(jnp.square, transposed(z - jnp.mean(z)))

    assert key is not None  # check_method refused method="hutchinson" without
    squares = estimators.map_probes(probe, jax.random.split(key, num_probes),
                                    batch)
    return jax.tree.map(lambda x: jnp.mean(x, axis=0) / n, squares)
  gbar = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size, n=n)
  total = sums.total(sums.centred_square_sum, loss_fn, chunk_size, params,
                     batch, gbar)
  return sums.scale(total, 1.0 / n)


def covariance_trace(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    method: str = "exact",
    chunk_size: int | None = None,
    key: estimators.KeyLike | None = None,
    num_probes: int = 32,
    deflate: Params | None = None,
    in_span: jax.Array | None = None,
) -> jax.Array:
  """The trace of the gradient covariance, ``Tr(C) = m Tr(Sigma_sgd)``.

  ``method="exact"`` sums :func:`covariance_diagonal`. ``method="hutchinson"``
  averages ``v^T C v = ||G v - mean(G v)||^2 / n`` over Rademacher probes
  ``v``: each probe is a single forward-mode product ``G v`` (one ``jvp``,
  no backward pass), so this is the cheap choice when per-example gradients
  are too costly. With Rademacher probes its variance is
  ``2 (||C||_F^2 - sum_j C_jj^2) / num_probes`` (the diagonal adds no
  variance), at most ``2 sum_j gamma_j^2 / num_probes`` for eigenvalues
  ``gamma_j``: the relative standard deviation is about
  ``sqrt(2 / (r num_probes))`` for a covariance of effective rank
  ``r = Tr(C)^2 / ||C||_F^2``.

  With ``deflate`` (``k`` orthonormal vectors ``Q``, e.g. eigenvectors of
  ``C`` or of the Hessian), the part of the trace in their span is computed
  exactly and the probes only see the rest (the variance reduction of
  Hutch++, Meyer et al., 2021):

  .. math::
    \\mathrm{Tr}(C) = \\sum_{j=1}^k q_j^\\top C q_j
    + \\mathbb E_v\\big[v^\\top P C P v\\big], \\quad P = I - Q Q^\\top,

  at ``k`` more forward-mode products; the variance is the formula above
  for ``P C P``, small when ``Q`` spans the top of ``C``. Measured on an
  MLP 784-64-10 on 1,200 Fashion-MNIST images (1,000 + 200 random labels),
  from initialisation to a global minimum, one probe's relative standard
  deviation is 0.25-0.40 plain, 0.03-0.07 deflated by the top 20 Hessian
  eigenvectors (``benchmarks/README.md``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: pytree of arrays with the examples along axis 0.
    method: ``"exact"`` or ``"hutchinson"``.
    chunk_size: examples per chunk, for every pass.
    key: int seed or PRNG key for ``"hutchinson"`` (required there).
    num_probes: number of probes for ``"hutchinson"``.
    deflate: ``"hutchinson"`` only: a pytree like ``params`` whose leaves
      have a leading axis of size ``k``, ``k`` orthonormal vectors
      (the ``eigenvectors`` of :func:`anisonoise.top_eigenpairs`).
    in_span: with ``deflate``, the in-span part ``sum_j q_j^T C q_j`` when
      the caller knows it (the sum of ``C``'s Ritz values, for Ritz vectors
      of ``covariance_operator``), saving its ``k`` products.

  Returns:
    A scalar ``Tr(C)``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[1., 2.], [-1., -2.]])}
    >>> float(anisonoise.covariance_trace(loss_fn, jnp.zeros(2), batch))
    5.0

  References:
    Meyer, Musco, Musco and Woodruff, `Hutch++: Optimal Stochastic Trace
    Estimation <https://arxiv.org/abs/2010.09649>`_, SOSA 2021.
  """
  key = estimators.check_method("covariance_trace", method, _METHODS,
                          random="hutchinson", key=key,
                          num_samples=num_probes)
  if in_span is not None and deflate is None:
    raise ValueError("covariance_trace: in_span= is the part of the trace"
                     " in the span of deflate=; give both.")
  if method == "exact":
    if deflate is not None:
      raise ValueError("covariance_trace: deflate= applies to"
                       " method='hutchinson' (the exact trace needs none).")
    diag = covariance_diagonal(loss_fn, params, batch, chunk_size=chunk_size)
    return optax.tree_utils.tree_sum(diag)
  batching.check_chunk_size(chunk_size)
  sums.check_data(loss_fn, params, batch, "covariance_trace")
  form = quadratic_form(loss_fn, params, batch, chunk_size=chunk_size)
  assert key is not None  # check_method refused method="hutchinson" without
  if deflate is None:
    return estimators.hutchinson(form, params, key, num_probes, batch).mean
  if in_span is None:
    # The basis may be in a wider dtype than params (a solve's float32
    # eigenvectors of bfloat16 params); the form takes params' dtypes.
    in_span = jnp.sum(estimators.map_probes(
        lambda q: form(jax.tree.map(lambda x, p: x.astype(p.dtype), q,
                                    params)), deflate, batch))
  return in_span + complement_trace(form, deflate, params, key, num_probes,
                                    batch)


def complement_trace(form: Callable[[Params], jax.Array], basis: Params,
                     like: Params, key: jax.Array, num_probes: int,
                     data: Batch) -> jax.Array:
  """Hutchinson's estimate of ``Tr(P A P)``, ``P = I - Q Q^T``, from the
  quadratic form of ``A`` and the orthonormal ``basis`` ``Q`` (leaves with
  a leading axis ``k``): Rademacher probes projected off ``Q``."""
  flat_q = jax.vmap(lambda q: ravel_pytree(q)[0])(basis)
  _, unravel = ravel_pytree(like)

  def projected(v):
    flat = ravel_pytree(v)[0]
    wide = flat.astype(jnp.promote_types(flat.dtype, flat_q.dtype))
    return form(unravel(
        (wide - flat_q.T @ (flat_q @ wide)).astype(flat.dtype)))

  return estimators.hutchinson(projected, like, key, num_probes, data).mean


_METHODS = {"exact": "per-example gradients", "hutchinson": "random probes"}


def quadratic_form(
    loss_fn: LossFn, params: Params, batch: Batch, *,
    chunk_size: int | None = None,
) -> Callable[[Params], jax.Array]:
  """``v -> v^T C v = ||G v - mean(G v)||^2 / n``: forward mode only.

  One linearisation for a batch in one pass; otherwise ``gbar`` once and a
  jvp per chunk, centred with ``gbar.v`` (exact in one pass).
  """
  n = sums.check_data(loss_fn, params, batch, "quadratic_form")
  if sums.is_single_pass(batch, chunk_size):
    _, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)

    def form(v):
      u = jvp_lin(v)
      return jnp.sum(jnp.square(u - jnp.mean(u))) / n

    return form
  gbar = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size, n=n)
  return lambda v: sums.total(sums.centred_jvp_square_sum, loss_fn,
                              chunk_size, params, batch, v,
                              gbar) / n


def covariance_operator(
    loss_fn: LossFn, params: Params, batch: Batch, *,
    chunk_size: int | None = None,
) -> Matvec:
  """The matrix-free product ``v -> C v``.

  .. math::
    C v = \\frac{1}{n} G^\\top (G v - \\overline{G v}\\,\\mathbf 1)

  The per-example loss vector is linearised once (``jax.linearize``); each
  product then costs one forward-mode and one reverse-mode linear pass,
  reusing the stored linearisation, and never forms ``C`` or any ``g_i``.
  With ``chunk_size`` (or a stream) nothing is stored: ``gbar`` is computed
  once and each product is one pass over the chunks,
  ``sum_i (g_i.v - gbar.v) g_i / n``, a jvp and a vjp per chunk.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta`` at which ``C`` is taken.
    batch: the estimation batch, or a :class:`anisonoise.Batches` stream.
    chunk_size: examples per chunk (``None``: one linearised pass).

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
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "covariance_operator")
  if not sums.is_single_pass(batch, chunk_size):
    gbar = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size, n=n)
    return lambda v: sums.scale(sums.total(
        sums.covariance_sum, loss_fn, chunk_size, params, batch,
        v, gbar),
                                1.0 / n)
  losses, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)
  vjp_lin = jax.linear_transpose(jvp_lin, params)

  def matvec(v):
    u = jvp_lin(v)
    (out,) = vjp_lin(batching.match_sharding((u - jnp.mean(u)) / n, losses))
    return out

  return matvec


def check_replacement(replacement: Any) -> None:
  if not isinstance(replacement, bool):
    raise ValueError(
        "replacement must be True (minibatches drawn with replacement, SGD"
        " noise C/m, paper Eq. 5) or False (without, (n-m)/(n-1) C/m), got"
        f" {replacement!r}.")


def sgd_scale(n: int, m: int, replacement: bool) -> float:
  """The factor ``s`` of SGD's noise covariance ``s C`` for minibatches of
  ``m`` of the ``n`` examples: ``1/m`` drawn with replacement (paper Eq.
  5), ``(n - m) / ((n - 1) m)`` without (0 at ``m = n``: full-batch GD)."""
  if replacement:
    return 1.0 / m
  if batching.is_int(m) and m > n:
    raise ValueError(
        f"batch_size={m} is larger than the batch of n={n} examples;"
        " minibatches drawn without replacement (replacement=False) hold at"
        " most n examples.")
  return 0.0 if n == 1 else (n - m) / ((n - 1) * m)


def _sgd_scale_of(who, n, batch_size, replacement):
  """``s`` for ``batch_size`` (checked; default ``n``) and
  ``replacement``."""
  if isinstance(batch_size, (jax.Array, np.ndarray)) and replacement is True:
    # A scheduled noise scale (optax.inject_hyperparams): s = 1/m, any m > 0.
    return 1.0 / batch_size
  if batch_size is not None:
    batch_size = batching.check_positive_int(f"{who}: batch_size",
                                             batch_size)
  check_replacement(replacement)
  return sgd_scale(n, n if batch_size is None else batch_size, replacement)


def sgd_noise_sampler(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    batch_size: int | None = None,
    replacement: bool = True,
    chunk_size: int | None = None,
) -> Callable[[jax.Array], Params]:
  """``key -> eps ~ N(0, C/m)``, linearised once for many draws.

  The same draw as :func:`sample_sgd_noise`, but the per-example loss vector
  is linearised once and every draw is one transposed linear pass; use it
  for Monte Carlo loops (it ``vmap``-s over keys).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: the estimation batch, or a :class:`anisonoise.Batches` stream.
    batch_size: the minibatch size ``m`` (default ``n``), an int >= 1.
    replacement: as in :func:`sample_sgd_noise`: ``C/m`` (``True``) or
      ``(n-m)/(n-1) C/m`` (``False``).
    chunk_size: examples per chunk (``None``: one linearised pass; with a
      chunk size every draw is a pass over the chunks).

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
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "sgd_noise_sampler")
  s = _sgd_scale_of("sgd_noise_sampler", n, batch_size, replacement)
  if not sums.is_single_pass(batch, chunk_size):
    return lambda key: _chunked_noise(loss_fn, params, batch, key, n, s,
                                      chunk_size)
  transposed = jacobian_transpose(loss_fn, params, batch)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  return lambda key: transposed(_centred_normal(key, n, s, dtype))


def jacobian_transpose(
    loss_fn: LossFn, params: Params, batch: Batch, *,
    chunk_size: int | None = None,
) -> Callable[[jax.Array], Params]:
  """``w -> G^T w = sum_i w_i g_i`` for per-example weights ``w`` (``(n,)``).

  One linearisation of the per-example loss vector and a transposed linear
  pass per call for a batch in one pass; otherwise a vjp per chunk (or per
  batch of a stream). Centred ``w`` gives ``G_c^T w``.
  """
  if not sums.is_single_pass(batch, chunk_size):
    return lambda w: sums.total(sums.weighted_grad_sum, loss_fn, chunk_size,
                                params, batch, per_example=w)
  losses, jvp_lin = jax.linearize(lambda p: loss_fn(p, batch), params)
  vjp_lin = jax.linear_transpose(jvp_lin, params)

  def apply(w):
    (out,) = vjp_lin(batching.match_sharding(w.astype(losses.dtype), losses))
    return out

  return apply


def _centred_normal(key, n, s, dtype):
  """``(z - mean(z)) sqrt(s / n)``, ``z ~ N(0, I_n)``: the weights of an
  SGD-noise draw ``G^T z`` of covariance ``s C``."""
  z = jax.random.normal(estimators.canonical_key(key), (n,), dtype=dtype)
  return (z - jnp.mean(z)) * jnp.sqrt(jnp.asarray(s / n, dtype))


def weights_dtype(params: Params):
  """The dtype of random weights on the examples: the parameters' widest,
  float32 at least (bfloat16 weights would round every draw)."""
  return jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)),
                           jnp.float32)


def _chunked_noise(loss_fn, params, batch, key, n, s, chunk_size):
  """``G^T z`` by :func:`jacobian_transpose`, the one weighted backward
  pass: in one pass, or chunk by chunk (batch by batch) with the same
  ``z``, so the same number."""
  z = _centred_normal(key, n, s, weights_dtype(params))
  return jacobian_transpose(loss_fn, params, batch, chunk_size=chunk_size)(z)


def sample_sgd_noise(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    key: estimators.KeyLike,
    *,
    batch_size: int | None = None,
    replacement: bool = True,
    chunk_size: int | None = None,
) -> Params:
  """An exact draw from ``N(0, C/m)``, the SGD noise of paper Eq. 5.

  .. math::
    \\epsilon = \\sqrt{\\tfrac{s}{n}}\\, G^\\top (z - \\bar z \\mathbf 1),
    \\quad z \\sim N(0, I_n),

  whose covariance is ``s G_c^T G_c / n = s C``: ``s = 1/m`` for minibatches
  of ``m`` drawn with replacement (paper Eq. 5), ``s = (n-m) / ((n-1) m)``
  without (``replacement=False``: the exact covariance of the mean of
  ``m`` distinct examples, 7.7% smaller at ``n = 40``, ``m = 4``, zero at
  ``m = n``). It costs one backward pass with random weights on the
  per-example losses.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: parameters pytree.
    batch: the estimation batch.
    key: int seed or PRNG key.
    batch_size: the minibatch size ``m`` whose noise is drawn (default
      ``n``), an int >= 1 (at most ``n`` without replacement).
    replacement: minibatches drawn with (``True``) or without (``False``)
      replacement.
    chunk_size: examples per chunk (the backward pass runs chunk by chunk;
      the draw is the same).

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
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "sample_sgd_noise")
  s = _sgd_scale_of("sample_sgd_noise", n, batch_size, replacement)
  return _chunked_noise(loss_fn, params, batch, key, n, s, chunk_size)
