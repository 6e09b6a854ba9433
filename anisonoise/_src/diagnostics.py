"""The paper's diagnostics of escaping, as pure functions on the engine.

All model-based diagnostics take the library's ``loss_fn(params, batch) ->
(n,)`` / ``batch`` convention and are built on the engine (per-example
gradients, ``C v``, ``H v``, Lanczos); none forms ``H`` or ``C``. Each takes
``chunk_size`` (examples per vectorised chunk, for every pass over the
data) and accepts an :class:`anisonoise.Batches` stream in place of
``batch`` (then it runs eagerly, one compiled program per batch shape).
Monte Carlo estimators return a :class:`MonteCarloEstimate` (mean and
standard error).
Dense-matrix helpers (:func:`ou_escape_efficiency`, :func:`escape_ratio`)
serve the theory of Sections 3.1-3.2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from jax.typing import ArrayLike
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src import covariance
from anisonoise._src import curvature
from anisonoise._src import estimators
from anisonoise._src.estimators import MonteCarloEstimate
from anisonoise._src import sums
from anisonoise._src.batching import Batch, LossFn, Params


def _check_batch_size(batch_size) -> None:
  if batch_size is not None:
    batching.check_positive_int("batch_size", batch_size)


# --------------------------------------------------------------------------
# Escape indicator Tr(H Sigma)
# --------------------------------------------------------------------------


def escape_indicator(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    batch_size: int | None = None,
    method: str = "exact",
    key: estimators.KeyLike | None = None,
    num_samples: int = 100,
    chunk_size: int | None = None,
) -> jax.Array | MonteCarloEstimate:
  """The escape indicator ``Tr(H Sigma_sgd)`` of paper Eqs. 11 and 13.

  .. math::
    \\mathrm{Tr}(H \\Sigma^{sgd}) = \\frac{1}{m n} \\sum_{i=1}^n
    (g_i - \\bar g)^\\top H (g_i - \\bar g)

  ``method="exact"`` evaluates the sum with one Hessian-vector product per
  example (per-example gradients in chunks, HVPs from one linearisation), so
  it costs ``n`` HVPs, each over the whole batch, taken ``chunk_size`` at a
  time (default: as many as the stochastic method's probes, 1 on a CPU and
  8 on an accelerator, so ``n`` such examples' activations at once, not
  ``n^2``): the choice for small batches (on the paper's LeNet with 1,200
  images, chunks of 100 asked for 72 GB). ``method="stochastic"``
  averages ``eps^T H eps`` over ``eps ~ N(0, Sigma_sgd)`` drawn matrix-free
  (:func:`sgd_noise_sampler`, linearised once): one transposed linear pass
  and one HVP per sample (vectorised by backend, ``probe_chunk``), and an
  unbiased estimate whatever ``n`` is. With ``chunk_size`` every product is
  summed chunk by chunk; ``"exact"`` then also takes the examples
  ``chunk_size`` at a time (``chunk_size^2`` examples' activations at once).
  On a device mesh ``"exact"`` all-gathers each chunk's centred per-example
  gradients (``chunk_size x D`` floats) to apply the whole batch's ``H``;
  ``"stochastic"`` reduces only products.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch (``H`` and ``C`` are taken over it), or an
      :class:`anisonoise.Batches` stream (``"stochastic"`` only).
    batch_size: the SGD minibatch size ``m`` (default ``n``).
    method: ``"exact"`` or ``"stochastic"``.
    key: int seed or PRNG key (``"stochastic"`` only).
    num_samples: number of draws (``"stochastic"`` only).
    chunk_size: examples per chunk, for every pass.

  Returns:
    A scalar (``"exact"``) or a :class:`MonteCarloEstimate`.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [2., 0.]])}
    >>> float(anisonoise.escape_indicator(loss_fn, jnp.ones(2), batch))
    2.8125

  References:
    Zhu et al., ICML 2019, Eqs. 11 and 13.
  """
  _check_batch_size(batch_size)
  batching.check_chunk_size(chunk_size)
  key = estimators.check_method(
      "escape_indicator", method,
      {"exact": "a Hessian product per example",
       "stochastic": "SGD-noise draws"},
      random="stochastic", key=key, num_samples=num_samples,
      samples_name="num_samples")
  n = sums.check_data(loss_fn, params, batch, "escape_indicator")
  m = n if batch_size is None else batch_size
  h_op = curvature.hessian_operator(loss_fn, params, batch,
                                    chunk_size=chunk_size)
  if method == "exact":
    if isinstance(batch, sums.Batches):
      raise ValueError(
          "escape_indicator(method='exact') needs the batch in memory (it"
          " takes one Hessian product per example); for a Batches stream"
          " use method='stochastic' with a key.")
    centred = covariance.centred_grad_fn(loss_fn, params, batch, chunk_size)

    def on_chunk(part, w):
      # A chunk's centred gradients meet H of the whole batch: on a mesh
      # they are all-gathered (chunk_size x D floats), the one exchange the
      # exact method needs; method="stochastic" moves no gradients.
      g = batching.replicate(jax.vmap(centred)(part))
      quads = jax.vmap(lambda v: optax.tree_utils.tree_vdot(v, h_op(v)))(g)
      return batching.weighted_sum(quads, w)

    # Without chunk_size, the examples' products are still taken a few at
    # a time (all n at once would hold n^2 examples' activations).
    # Sharded along the examples, a pass holds at least one per device.
    per_pass = (estimators.probe_chunk()
                * batching.example_shards(jax.tree.leaves(batch)[0])
                if chunk_size is None else chunk_size)
    total = batching.fold_chunks(on_chunk, batch, per_pass)
    return total / (m * n)
  draw = covariance.sgd_noise_sampler(loss_fn, params, batch, batch_size=m,
                                      chunk_size=chunk_size)

  def one(k):
    eps = draw(k)
    return optax.tree_utils.tree_vdot(eps, h_op(eps))

  assert key is not None  # check_method refused method="stochastic" without
  samples = estimators.map_probes(one, jax.random.split(key, num_samples),
                                  batch)
  return estimators.mean_and_sem(samples)


def hessian_trace(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    method: str = "exact",
    key: estimators.KeyLike | None = None,
    num_probes: int = 100,
    chunk_size: int | None = None,
) -> jax.Array | MonteCarloEstimate:
  """``Tr(H)``, exactly from ``D`` HVPs or by Hutchinson's estimator.

  ``method="exact"`` applies ``H`` to every unit vector (``D`` products: small
  models only), built 64 at a time (no ``D x D`` identity is formed);
  ``method="hutchinson"`` averages ``v^T H v`` over Rademacher probes and
  returns a :class:`MonteCarloEstimate`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    method: ``"exact"`` or ``"hutchinson"``.
    key: int seed or PRNG key (``"hutchinson"`` only).
    num_probes: number of probes (``"hutchinson"`` only).
    chunk_size: examples per chunk, for every Hessian product.

  Returns:
    A scalar, or a :class:`MonteCarloEstimate`.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [0., 2.]])}
    >>> float(anisonoise.hessian_trace(loss_fn, jnp.zeros(2), batch))
    2.5
  """
  key = estimators.check_method(
      "hessian_trace", method,
      {"exact": "D Hessian products", "hutchinson": "random probes"},
      random="hutchinson", key=key, num_samples=num_probes)
  batching.check_chunk_size(chunk_size)
  sums.check_data(loss_fn, params, batch, "hessian_trace")
  h_op = curvature.hessian_operator(loss_fn, params, batch,
                                    chunk_size=chunk_size)

  if method == "exact":
    return _exact_hessian_trace(loss_fn, params, batch, chunk_size, h_op)

  def quad(v):
    return jnp.vdot(ravel_pytree(v)[0], ravel_pytree(h_op(v))[0])

  assert key is not None  # check_method refused method="hutchinson" without
  return estimators.hutchinson(quad, params, key, num_probes, batch)


_BASIS_CHUNK = 64


def _exact_hessian_trace(loss_fn, params, batch, chunk_size, h_op):
  """``sum_j e_j^T H e_j``, the unit vectors made ``_BASIS_CHUNK`` at a time."""
  flat, unravel = ravel_pytree(params)
  d = flat.size

  def unit(j):
    return unravel(jax.nn.one_hot(j, d, dtype=flat.dtype))

  if not isinstance(batch, sums.Batches):
    def diag_entry(j):
      return ravel_pytree(h_op(unit(j)))[0][j]

    return jnp.sum(batching.map_chunks(diag_entry, jnp.arange(d),
                                       _BASIS_CHUNK, unroll=False))
  n = batch.num_examples
  total = jnp.zeros([], flat.dtype)
  for start in range(0, d, _BASIS_CHUNK):
    idx = jnp.arange(start, min(start + _BASIS_CHUNK, d))
    hv = sums.total(sums.hvp_sum_many, loss_fn, chunk_size, params, batch,
                    jax.vmap(unit)(idx))
    rows = jax.vmap(lambda t: ravel_pytree(t)[0])(hv)
    total = total + jnp.sum(rows[jnp.arange(idx.size), idx]) / n
  return total


def _trace_h(loss_fn, params, batch, method, key, num_probes, chunk_size):
  tr = hessian_trace(loss_fn, params, batch, method=method, key=key,
                     num_probes=num_probes, chunk_size=chunk_size)
  return tr.mean if isinstance(tr, MonteCarloEstimate) else tr


def isotropic_escape_indicator(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    batch_size: int | None = None,
    hessian_trace_method: str = "exact",
    key: estimators.KeyLike | None = None,
    num_probes: int = 100,
    chunk_size: int | None = None,
) -> jax.Array:
  """``Tr(H Sigma_bar)`` for the isotropic equivalent of SGD's noise.

  .. math::
    \\bar\\Sigma = \\frac{\\mathrm{Tr}\\,\\Sigma^{sgd}}{D} I, \\qquad
    \\mathrm{Tr}(H\\bar\\Sigma) = \\frac{\\mathrm{Tr}(\\Sigma^{sgd})\\,
    \\mathrm{Tr}(H)}{D}

  (Proposition 1). ``Tr(Sigma_sgd) = Tr(C)/m`` is exact (per-example
  gradients); ``Tr(H)`` is exact (``D`` HVPs) or Hutchinson
  (``hessian_trace_method="hutchinson"`` with ``key``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    batch_size: the SGD minibatch size ``m`` (default ``n``).
    hessian_trace_method: ``"exact"`` or ``"hutchinson"``.
    key: int seed or PRNG key for Hutchinson.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass.

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [2., 0.]])}
    >>> float(anisonoise.isotropic_escape_indicator(loss_fn, jnp.ones(2),
    ...                                             batch))
    1.40625

  References:
    Zhu et al., ICML 2019, Proposition 1.
  """
  _check_batch_size(batch_size)
  n = sums.check_data(loss_fn, params, batch, "isotropic_escape_indicator")
  m = n if batch_size is None else batch_size
  tr_sigma = covariance.covariance_trace(loss_fn, params, batch,
                                         chunk_size=chunk_size) / m
  tr_h = _trace_h(loss_fn, params, batch, hessian_trace_method, key,
                  num_probes, chunk_size)
  return tr_sigma * tr_h / batching.num_params(params)


def escape_ratio(h: ArrayLike, sigma: ArrayLike) -> jax.Array:
  """Proposition 1's ratio ``Tr(H Sigma) / Tr(H Sigma_bar)`` for matrices.

  .. math::
    \\frac{\\mathrm{Tr}(H\\Sigma)}{\\mathrm{Tr}(H\\bar\\Sigma)} =
    \\frac{D\\,\\mathrm{Tr}(H\\Sigma)}{\\mathrm{Tr}(H)\\,\\mathrm{Tr}(\\Sigma)}
    = O(a D^{2d-1})

  Args:
    h: symmetric ``(D, D)`` Hessian.
    sigma: symmetric ``(D, D)`` noise covariance.

  Returns:
    The ratio (1 for isotropic ``H``).

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> h = jnp.diag(jnp.array([1., 0.]))
    >>> float(anisonoise.escape_ratio(h, h))
    2.0

  References:
    Zhu et al., ICML 2019, Proposition 1 (Eq. 17).
  """
  hm, sm = _check_pair(h, sigma)
  d = hm.shape[0]
  return d * jnp.sum(hm * sm) / (jnp.trace(hm) * jnp.trace(sm))


# --------------------------------------------------------------------------
# Projection coefficient, gradient vs noise norms
# --------------------------------------------------------------------------


def projection_coefficient(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: estimators.KeyLike,
    num_iters: int = 30,
    hessian_trace_method: str = "exact",
    num_probes: int = 100,
    chunk_size: int | None = None,
) -> jax.Array:
  """The projection coefficient of Proposition 1, Eq. 16 (Fig. 5 middle).

  .. math::
    a = \\frac{u_1^\\top \\Sigma u_1\\, \\mathrm{Tr} H}{\\lambda_1\\,
    \\mathrm{Tr}\\,\\Sigma}

  with ``(lambda_1, u_1)`` the top Hessian eigenpair (Lanczos) and
  ``Sigma = C / m``; ``m`` cancels. ``u_1^T C u_1 = ||G u_1 - mean||^2 / n``
  is one forward-mode product.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    key: int seed or PRNG key (Lanczos start; Hutchinson probes).
    num_iters: Lanczos iterations for ``(lambda_1, u_1)``.
    hessian_trace_method: ``"exact"`` (``D`` HVPs) or ``"hutchinson"``.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass.

  Returns:
    A scalar ``a``.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [2., 0.]])}
    >>> round(float(anisonoise.projection_coefficient(
    ...     loss_fn, jnp.ones(2), batch, key=jax.random.key(0),
    ...     num_iters=2)), 4)
    1.0

  References:
    Zhu et al., ICML 2019, Eq. 16 and Fig. 5.
  """
  batching.check_chunk_size(chunk_size)
  sums.check_data(loss_fn, params, batch, "projection_coefficient")
  eig_key, tr_key = jax.random.split(estimators.canonical_key(key))
  d = batching.num_params(params)
  top = curvature.top_eigenpairs(
      curvature.hessian_operator(loss_fn, params, batch,
                                 chunk_size=chunk_size), params, 1,
      key=eig_key, num_iters=min(num_iters, d),
      unroll=curvature.lanczos_unroll(batch, chunk_size, min(num_iters, d)))
  u1 = jax.tree.map(lambda v: v[0], top.eigenvectors)
  lam1 = top.eigenvalues[0]
  u_c_u = covariance.quadratic_form(loss_fn, params, batch,
                                    chunk_size=chunk_size)(u1)
  tr_c = covariance.covariance_trace(loss_fn, params, batch,
                                     chunk_size=chunk_size)
  tr_h = _trace_h(loss_fn, params, batch, hessian_trace_method, tr_key,
                  num_probes, chunk_size)
  return u_c_u * tr_h / (lam1 * tr_c)


class GradientNoiseNorms(NamedTuple):
  """``||grad L||`` and the expected SGD noise norm ``sqrt(Tr Sigma_sgd)``."""

  gradient_norm: jax.Array
  noise_norm: jax.Array


def gradient_noise_norms(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    batch_size: int | None = None,
    chunk_size: int | None = None,
) -> GradientNoiseNorms:
  """Mean-gradient norm against the expected noise norm (App. C.1, Fig. 7).

  .. math::
    \\|\\nabla L\\| \\quad\\text{vs}\\quad
    \\sqrt{\\mathbb E\\|\\epsilon\\|^2} = \\sqrt{\\mathrm{Tr}\\,\\Sigma^{sgd}}

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    batch_size: the SGD minibatch size ``m`` (default ``n``).
    chunk_size: examples per chunk, for every pass.

  Returns:
    A :class:`GradientNoiseNorms`.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: b['x'] @ w
    >>> batch = {'x': jnp.array([[3., 0.], [1., 0.]])}
    >>> r = anisonoise.gradient_noise_norms(loss_fn, jnp.zeros(2), batch)
    >>> round(float(r.gradient_norm), 4), round(float(r.noise_norm), 4)
    (2.0, 0.7071)
  """
  _check_batch_size(batch_size)
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "gradient_noise_norms")
  m = n if batch_size is None else batch_size
  g = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size, n=n)
  gnorm = jnp.sqrt(optax.tree_utils.tree_vdot(g, g))
  tr_c = covariance.covariance_trace(loss_fn, params, batch,
                                     chunk_size=chunk_size)
  return GradientNoiseNorms(gnorm, jnp.sqrt(tr_c / m))


# --------------------------------------------------------------------------
# Sharpness
# --------------------------------------------------------------------------


def expected_sharpness(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: estimators.KeyLike,
    delta: float = 0.01,
    num_samples: int = 1000,
    samples_per_chunk: int = 10,
    chunk_size: int | None = None,
) -> MonteCarloEstimate:
  """Expected sharpness ``E_nu[L(theta + nu)] - L(theta)`` (App. D.3, Eq. 88).

  .. math::
    \\frac{1}{M}\\sum_{j=1}^M L(\\theta + \\nu_j) - L(\\theta), \\quad
    \\nu_j \\sim N(0, \\delta^2 I)

  The ``M`` perturbed losses are ``vmap``-ed ``samples_per_chunk`` at a time
  (memory ``samples_per_chunk`` copies of the activations: on the paper's
  LeNet with 1,200 images, 10 take about 1.8 GB and 100 ran out of 24 GB),
  each over the examples ``chunk_size`` at a time. The ``nu_j`` depend on
  ``key`` only, so evaluations with one key share them (common random
  numbers).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the batch on which ``L`` is the mean loss, or an
      :class:`anisonoise.Batches` stream.
    key: int seed or PRNG key.
    delta: perturbation standard deviation (> 0; the paper uses 0.01).
    num_samples: ``M`` (the paper uses 1,000).
    samples_per_chunk: perturbations evaluated at once.
    chunk_size: examples per chunk (``None``: all at once).

  Returns:
    A :class:`MonteCarloEstimate` of the sharpness.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.eye(3)}
    >>> s = anisonoise.expected_sharpness(loss_fn, jnp.zeros(3), batch,
    ...                                   key=jax.random.key(0), delta=0.1)
    >>> bool(abs(s.mean - 0.1**2 / 2 * 1.0) < 4 * s.stderr)
    True

  References:
    Neyshabur et al., Exploring generalization in deep learning, 2017, Eq. 7;
    Zhu et al., ICML 2019, App. D.3.
  """
  if not isinstance(delta, jax.core.Tracer) and not float(delta) > 0:
    raise ValueError(f"delta must be > 0, got {delta!r}.")
  batching.check_positive_int("num_samples", num_samples)
  batching.check_positive_int("samples_per_chunk", samples_per_chunk)
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "expected_sharpness")
  flat, unravel = ravel_pytree(params)
  base = sums.mean_loss_value(loss_fn, params, batch, chunk_size=chunk_size,
                              n=n)

  def perturbation(k):
    return unravel(jax.random.normal(k, flat.shape, flat.dtype) * delta)

  keys = jax.random.split(estimators.canonical_key(key), num_samples)
  if isinstance(batch, sums.Batches):
    parts = []
    for start in range(0, num_samples, samples_per_chunk):
      noise = jax.vmap(perturbation)(keys[start:start + samples_per_chunk])
      parts.append(sums.total(sums.perturbed_loss_sums, loss_fn, chunk_size,
                              params, batch, noise) / n - base)
    return estimators.mean_and_sem(jnp.concatenate(parts))

  def perturbed(k):
    shifted = jax.tree.map(jnp.add, params, perturbation(k))
    return sums.mean_loss_value(loss_fn, shifted, batch,
                                chunk_size=chunk_size, n=n) - base

  # Forward passes only: a loop costs no time here and bounds the memory.
  return estimators.mean_and_sem(batching.map_chunks(
      perturbed, keys, samples_per_chunk, unroll=False))


# --------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------


class HessianSpectrum(NamedTuple):
  """Top Hessian eigenvalues (descending), their Lanczos residuals, the
  number of Hessian products run and whether the tolerance was met (see
  :class:`anisonoise.EigenResult`)."""

  eigenvalues: jax.Array
  residual_norms: jax.Array
  num_matvecs: jax.Array
  converged: jax.Array


def hessian_spectrum(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    num_eigs: int,
    key: estimators.KeyLike,
    num_iters: int | None = None,
    tol: float | None = 1e-3,
    max_matvecs: int | None = None,
    unroll: bool | None = None,
    chunk_size: int | None = None,
) -> HessianSpectrum:
  """The top ``num_eigs`` eigenvalues of the Hessian (Fig. 5 left).

  Thick-restart Lanczos (:func:`anisonoise.top_eigenpairs`) on
  Hessian-vector products (from one linearisation, or chunk by chunk with
  ``chunk_size``), restarted until every
  residual is at most ``tol`` times the largest ``|lambda_j|`` found: each
  eigenvalue is then within that of one of the Hessian's. The Krylov basis
  holds ``num_iters`` vectors (default ``min(D, 2 num_eigs + 20)``); the
  solve runs in float32 at least, so bfloat16 models work. Called eagerly
  (as an offline diagnostic usually is), the Krylov steps run as compiled
  chunks of 4 that take the operator's data as arguments, from a Python
  loop: no product runs inside an XLA loop, where XLA:CPU runs some
  convolutions several times slower; the chunks compile once per
  ``loss_fn``, and a later call with the same ``loss_fn`` reuses them.
  Under ``jax.jit`` the steps run in ``lax`` loops; both give the same
  numbers. The products are staged (see
  :func:`anisonoise.hessian_operator`). ``benchmarks/peers.py`` times both
  against PyHessian: on LeNet written with ``lax.conv`` and ``max_pool``
  (1,200 images, 2-core CPU) the top 20 took 60 products, 0.13 s each,
  eager or jitted, about 6 times faster than PyHessian.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    num_eigs: how many eigenvalues (largest algebraic first).
    key: int seed or PRNG key for the start vector.
    num_iters: Krylov basis size (products of the first cycle).
    tol: residual tolerance relative to the largest ``|lambda_j|``;
      ``None``: one cycle.
    max_matvecs: budget of Hessian products (default ``10 num_iters``);
      check ``converged`` in the result.
    unroll: see :func:`top_eigenpairs`; ``None``: a stream unrolls (its
      products run eagerly), chunked products loop, else the backend's
      default.
    chunk_size: examples per chunk, for every Hessian product.

  Returns:
    A :class:`HessianSpectrum`.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.diag(jnp.array([1., 2., 3.]))}
    >>> s = anisonoise.hessian_spectrum(loss_fn, jnp.zeros(3), batch,
    ...                                 num_eigs=2, key=jax.random.key(0))
    >>> [round(float(x), 4) for x in s.eigenvalues]
    [3.0, 1.3333]
  """
  d = batching.num_params(params)
  if num_iters is None:
    num_iters = min(d, 2 * num_eigs + 20)
  if unroll is None or isinstance(batch, sums.Batches):
    unroll = curvature.lanczos_unroll(batch, chunk_size, num_iters)
  res = curvature.top_eigenpairs(
      curvature.hessian_operator(loss_fn, params, batch,
                                 chunk_size=chunk_size), params, num_eigs,
      key=estimators.canonical_key(key), num_iters=num_iters, tol=tol,
      max_matvecs=max_matvecs, unroll=unroll)
  return HessianSpectrum(res.eigenvalues, res.residual_norms,
                         res.num_matvecs, res.converged)


class SpectralDensity(NamedTuple):
  """A spectral density by stochastic Lanczos quadrature.

  Attributes:
    grid: ``(G,)`` eigenvalue grid.
    density: ``(G,)`` Gaussian-smoothed density on the grid (integrates to 1).
    nodes: ``(num_probes, num_iters)`` Ritz values of each probe.
    weights: ``(num_probes, num_iters)`` their quadrature weights (each row
      sums to 1).
    sigma: the smoothing width.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array
  sigma: jax.Array


def spectral_density(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: estimators.KeyLike,
    num_probes: int = 8,
    num_iters: int = 60,
    grid_size: int = 1000,
    sigma: float | None = None,
    chunk_size: int | None = None,
) -> SpectralDensity:
  """The Hessian eigenvalue density by stochastic Lanczos quadrature.

  .. math::
    \\rho(x) \\approx \\frac{1}{P}\\sum_{p=1}^P \\sum_{j=1}^{m}
    \\tau^{(p)}_j\\, \\mathcal N(x; \\theta^{(p)}_j, \\sigma^2)

  For each Rademacher probe ``v`` (``||v||^2 = D``), ``m`` Lanczos steps from
  ``v`` give Ritz values ``theta_j`` and weights ``tau_j`` (squared first
  components of the tridiagonal's eigenvectors); ``sum_j tau_j theta_j^r =
  v^T H^r v / D`` for ``r < 2m``, so the density's moments estimate
  ``Tr(H^r)/D`` (the Gaussian smoothing adds ``sigma^2`` to the second).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or an :class:`anisonoise.Batches` stream.
    key: int seed or PRNG key for the probes.
    num_probes: number of probes ``P``.
    num_iters: Lanczos steps per probe ``m`` (at most ``D``).
    grid_size: number of grid points.
    sigma: smoothing width (default: 1% of the spectral range).
    chunk_size: examples per chunk, for every Hessian product.

  Returns:
    A :class:`SpectralDensity`.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.diag(jnp.array([1., 2., 3.]))}
    >>> s = anisonoise.spectral_density(loss_fn, jnp.zeros(3), batch,
    ...                                 key=jax.random.key(0), num_iters=3)
    >>> round(float(jnp.mean(jnp.sum(s.weights * s.nodes, axis=1))), 4)
    1.5556

  References:
    Ghorbani, Krishnan and Xiao, An investigation into neural net
    optimization via Hessian eigenvalue density, ICML 2019; Lin, Saad and
    Yang, Approximating spectral densities of large matrices, 2016.
  """
  batching.check_positive_int("num_probes", num_probes)
  d = batching.num_params(params)
  if not 1 <= num_iters <= d:
    raise ValueError(f"num_iters must be in [1, D={d}], got {num_iters}.")
  batching.check_chunk_size(chunk_size)
  h_op = curvature.hessian_operator(loss_fn, params, batch,
                                    chunk_size=chunk_size)
  unroll = curvature.lanczos_unroll(batch, chunk_size, num_iters)
  mv, dtype, _ = curvature.flat_operator(h_op, params)

  def probe(k):
    v0 = jax.random.rademacher(k, (d,), dtype)
    krylov = curvature.build_krylov(mv, v0, num_iters, unroll)
    theta, y = jnp.linalg.eigh(krylov.matrix())
    return theta, jnp.square(y[0])

  nodes, weights = estimators.map_probes(
      probe, jax.random.split(estimators.canonical_key(key), num_probes),
      batch)
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  span = jnp.maximum(hi - lo, 1e-12 * jnp.maximum(1.0, jnp.abs(hi)))
  width = 0.01 * span if sigma is None else jnp.asarray(sigma, dtype)
  grid = jnp.linspace(lo - 5 * width, hi + 5 * width, grid_size,
                      dtype=dtype)
  z = (grid[:, None] - nodes.reshape(-1)[None, :]) / width
  kern = jnp.exp(-0.5 * z**2) / (width * math.sqrt(2 * math.pi))
  density = kern @ weights.reshape(-1) / num_probes
  return SpectralDensity(grid, density, nodes, weights, width)


# --------------------------------------------------------------------------
# Ornstein-Uhlenbeck escape efficiency
# --------------------------------------------------------------------------


def _check_pair(h_in: ArrayLike, sigma_in: ArrayLike,
                ) -> tuple[jax.Array, jax.Array]:
  h = jnp.asarray(h_in)
  sigma = jnp.asarray(sigma_in)
  for name, a in (("H", h), ("Sigma", sigma)):
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
      raise ValueError(f"{name} must be a square matrix, got shape {a.shape}.")
  if h.shape != sigma.shape:
    raise ValueError(
        f"H and Sigma must have the same shape, got {h.shape} and"
        f" {sigma.shape}.")
  for name, a in (("H", h), ("Sigma", sigma)):
    if not isinstance(a, jax.core.Tracer):
      a_np = np.asarray(a)
      scale = max(np.abs(a_np).max(), np.finfo(a_np.dtype).tiny)
      if np.abs(a_np - a_np.T).max() > 1e-6 * scale:
        raise ValueError(
            f"{name} must be symmetric; symmetrise it, e.g. ({name} +"
            f" {name}.T) / 2.")
  return h, sigma


class OUEscapeEfficiency(NamedTuple):
  """Eq. 13: the closed form and its small-``t`` approximation."""

  value: jax.Array
  small_t: jax.Array


def ou_escape_efficiency(
    h: ArrayLike, sigma: ArrayLike, t: ArrayLike
) -> OUEscapeEfficiency:
  """Escape efficiency of the Ornstein-Uhlenbeck process (paper Eq. 13).

  For ``d theta = -H theta dt + Sigma^{1/2} dW``, ``theta_0 = 0`` and
  ``L(theta) = theta^T H theta / 2``:

  .. math::
    \\mathbb E[L(\\theta_t) - L(\\theta_0)] = \\tfrac14
    \\mathrm{Tr}\\big((I - e^{-2Ht})\\Sigma\\big) \\approx
    \\tfrac t2 \\mathrm{Tr}(H\\Sigma)

  Args:
    h: symmetric ``(D, D)`` Hessian (positive semi-definite).
    sigma: symmetric ``(D, D)`` diffusion covariance.
    t: time, a scalar or an array of times.

  Returns:
    An :class:`OUEscapeEfficiency` with the closed form and the small-``t``
    form, each shaped like ``t``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> r = anisonoise.ou_escape_efficiency(jnp.eye(2), jnp.eye(2), 1e-4)
    >>> bool(jnp.isclose(r.value, r.small_t, rtol=1e-3))
    True

  References:
    Zhu et al., ICML 2019, Eq. 13 and App. A.2.
  """
  hm, sm = _check_pair(h, sigma)
  t = jnp.asarray(t, dtype=hm.dtype)
  lam, u = jnp.linalg.eigh(hm)
  s_diag = jnp.einsum("ij,jk,ki->i", u.T, sm, u)  # diag of U^T Sigma U
  decay = -jnp.expm1(-2.0 * lam * t[..., None])
  value = 0.25 * jnp.sum(decay * s_diag, axis=-1)
  small = 0.5 * t * jnp.sum(hm * sm)
  return OUEscapeEfficiency(value, small)
