"""Hessian-vector products and top-k eigenpairs of symmetric operators.

The Hessian ``H`` is that of the mean loss over the estimation batch,
``L(theta) = mean_i l_i(theta)``; ``H v`` is forward-over-reverse
(``jax.jvp`` of ``jax.grad``). :func:`hessian_operator` linearises the
gradient once and reuses that linear map for every product, which removes the
forward pass and the gradient's own work from each matvec.

Eigen-solver: Lanczos with full reorthogonalisation (classical Gram-Schmidt,
applied twice) on raveled parameters, then ``eigh`` of the tridiagonal matrix.
Why it is written here rather than taken from matfree
(``matfree.eig.eigh_partial(matfree.decomp.tridiag_sym(..., reortho="full"))``):
matfree drives the Krylov recursion with ``lax.fori_loop`` and offers no way
to unroll it, and on a CPU a matvec inside an XLA loop runs several times
slower than the same matvec outside one when the model has convolutions.
Measured with ``benchmarks/solver_overhead.py`` (2-core x86-64 CPU, jax
0.10.2, LeNet with 11,330 parameters on 1,200 images, conv2 still a
``lax.conv``, top-20 from 40 Lanczos steps): one
linearisation plus 40 Hessian products alone took 7.46 s; this solver
unrolled 7.28 s (overhead -2%: the reorthogonalisation costs less than the
timing noise), the same code under ``fori_loop`` 48.9 s, matfree 50.6 s.
Hence, on a CPU, the recursion is unrolled at trace time when it is short
(``unroll=None`` unrolls up to 64 iterations) and uses ``fori_loop``
otherwise; on other backends it always loops (one compiled matvec). The
two paths run the same arithmetic. The returned residual norms ``|beta_m y_{m,j}|``
are the Lanczos bounds on ``||A v_j - lambda_j v_j||``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src import sums
from anisonoise._src.batching import Batch, LossFn, Params

Matvec = Callable[[Params], Params]

_UNROLL_LIMIT = 64


def default_lanczos_unroll(num_iters: int) -> bool:
  """Unroll the Krylov recursion on a CPU up to ``_UNROLL_LIMIT`` steps
  (see the measurement above); elsewhere ``fori_loop``, which compiles one
  matvec whatever the number of steps."""
  return jax.default_backend() == "cpu" and num_iters <= _UNROLL_LIMIT


def hvp(loss_fn: LossFn, params: Params, batch: Batch, v: Params, *,
        chunk_size: int | None = None) -> Params:
  """One Hessian-vector product ``H v`` of the mean loss (forward-over-reverse).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or a :class:`anisonoise.Batches` stream.
    v: a pytree like ``params``.
    chunk_size: examples per chunk (``None``: all at once); the product is
      summed chunk by chunk, so memory is set by the chunk.

  Returns:
    ``H v``, a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [0., 2.]])}
    >>> anisonoise.hvp(loss_fn, jnp.zeros(2), batch, jnp.ones(2)).tolist()
    [0.5, 2.0]
  """
  batching.check_chunk_size(chunk_size)
  return hessian_operator(loss_fn, params, batch, chunk_size=chunk_size,
                          linearize=False)(v)


def hessian_operator(loss_fn: LossFn, params: Params, batch: Batch, *,
                     chunk_size: int | None = None,
                     linearize: bool = True) -> Matvec:
  """The matrix-free product ``v -> H v``, linearised once and reused.

  With the whole batch in one pass (``chunk_size=None``) the gradient is
  linearised once and every product reuses it (no forward pass per
  product; the linearisation holds the batch's activations). With a
  ``chunk_size`` smaller than the batch, or a :class:`anisonoise.Batches`
  stream, nothing is stored: each product is a forward-over-reverse pass
  over the chunks, ``sum_chunks H_chunk v / n``, and memory is set by the
  chunk.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)`` per-example losses.
    params: the point ``theta``.
    batch: the estimation batch, or a :class:`anisonoise.Batches` stream.
    chunk_size: examples per chunk (``None``: all at once).
    linearize: linearise once when the batch is one pass (``False``: one
      plain forward-over-reverse product per call).

  Returns:
    A linear function mapping a pytree like ``params`` to ``H v``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> loss_fn = lambda w, b: 0.5 * (b['x'] @ w) ** 2
    >>> batch = {'x': jnp.array([[1., 0.], [0., 2.]])}
    >>> hv = anisonoise.hessian_operator(loss_fn, jnp.zeros(2), batch)
    >>> hv(jnp.array([1., 0.])).tolist()
    [0.5, 0.0]
  """
  batching.check_chunk_size(chunk_size)
  n = sums.check_data(loss_fn, params, batch, "hessian_operator")
  if sums.is_single_pass(batch, chunk_size):
    grad_fn = jax.grad(batching.mean_loss(loss_fn, batch))
    if linearize:
      return jax.linearize(grad_fn, params)[1]
    return lambda v: jax.jvp(grad_fn, (params,), (v,))[1]
  return lambda v: sums.scale(
      sums.total(sums.hvp_sum, loss_fn, chunk_size, params,
                 batch, v),
      1.0 / n)


class EigenResult(NamedTuple):
  """Top-k eigenpairs of a symmetric operator.

  Attributes:
    eigenvalues: ``(k,)`` largest algebraic eigenvalues, in descending order.
    eigenvectors: a pytree like the operator's input whose leaves have a
      leading axis of size ``k``; entry ``j`` is the unit eigenvector of
      ``eigenvalues[j]``.
    residual_norms: ``(k,)`` Lanczos estimates of
      ``||A v_j - lambda_j v_j||`` (small means converged).
  """

  eigenvalues: jax.Array
  eigenvectors: Params
  residual_norms: jax.Array


def _lanczos_step(mv, j, carry):
  basis, alphas, betas = carry
  q = basis[j]
  w = mv(q)
  alpha = jnp.vdot(q, w)
  scale = jnp.linalg.norm(w)
  # Full reorthogonalisation against every stored vector (rows beyond j are
  # zero and drop out), twice for numerical orthogonality (CGS2).
  w = w - basis.T @ (basis @ w)
  w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  # Breakdown (an invariant subspace is exhausted): stop adding directions;
  # later rows stay zero and only add zero Ritz values.
  ok = beta > 16 * jnp.finfo(w.dtype).eps * scale
  q_next = w / jnp.where(ok, beta, 1.0)
  # A small beta amplifies the rounding left in w: one more pass on the
  # normalised vector restores orthogonality to working precision.
  q_next = q_next - basis.T @ (basis @ q_next)
  q_norm = jnp.linalg.norm(q_next)
  q_next = jnp.where(ok, q_next / jnp.where(ok, q_norm, 1.0), 0.0)
  basis = basis.at[j + 1].set(q_next)
  alphas = alphas.at[j].set(alpha)
  betas = betas.at[j].set(jnp.where(ok, beta, 0.0))
  return basis, alphas, betas


def _lanczos(matvec, unravel, v0, num_iters, unroll):
  """``num_iters`` Lanczos steps from ``v0`` (flat): basis rows, diagonal and
  off-diagonal (the last entry is the residual ``beta_m``)."""
  dim = v0.size
  dtype = v0.dtype

  def mv(x):
    return ravel_pytree(matvec(unravel(x)))[0].astype(dtype)

  v0 = v0 / jnp.linalg.norm(v0)
  basis = jnp.zeros((num_iters + 1, dim), dtype).at[0].set(v0)
  carry = (basis, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype))
  if unroll:
    for j in range(num_iters):
      carry = _lanczos_step(mv, j, carry)
  else:
    carry = jax.lax.fori_loop(
        0, num_iters, lambda j, c: _lanczos_step(mv, j, c), carry
    )
  return carry


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
  """The dense symmetric tridiagonal matrix of Lanczos coefficients."""
  off = betas[: alphas.size - 1]
  return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def top_eigenpairs(
    matvec: Matvec,
    like: Params,
    k: int,
    *,
    key: jax.Array,
    num_iters: int | None = None,
    init_vector: Params | None = None,
    unroll: bool | None = None,
) -> EigenResult:
  """Top-k (largest algebraic) eigenpairs of a symmetric linear operator.

  Runs ``num_iters`` steps of Lanczos with full reorthogonalisation on the
  raveled pytree, then takes the Ritz pairs of the tridiagonal matrix
  ``T = Q^T A Q``.

  Args:
    matvec: a symmetric linear map on pytrees like ``like`` (for example
      :func:`hessian_operator` or :func:`covariance_operator`).
    like: a pytree with the operator's input structure, shapes and dtypes.
    k: number of eigenpairs, ``1 <= k <= num_iters``.
    key: PRNG key for the random start vector.
    num_iters: Krylov dimension (number of matvecs), ``k <= num_iters <= D``.
      Defaults to ``min(D, max(2 k, k + 10))``.
    init_vector: optional start vector (a pytree like ``like``), e.g. the
      previous top eigenvector for a warm start; ``key`` is then unused.
    unroll: unroll the recursion at trace time (``True``) or use
      ``lax.fori_loop`` (``False``); ``None`` unrolls up to 64 iterations
      on a CPU and loops elsewhere.

  Returns:
    An :class:`EigenResult`.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> A = jnp.diag(jnp.arange(1., 11.))
    >>> res = anisonoise.top_eigenpairs(lambda v: A @ v, jnp.zeros(10), 2,
    ...                                 key=jax.random.key(0), num_iters=10)
    >>> [round(float(x), 4) for x in res.eigenvalues]
    [10.0, 9.0]
  """
  flat, unravel = ravel_pytree(like)
  dim = flat.size
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}.")
  if k > dim:
    raise ValueError(
        f"k={k} eigenpairs asked of an operator on {dim} parameters; k must"
        f" be at most {dim}."
    )
  if num_iters is None:
    num_iters = min(dim, max(2 * k, k + 10))
  if not isinstance(num_iters, int) or not k <= num_iters <= dim:
    raise ValueError(
        f"num_iters must be an int with k={k} <= num_iters <= D={dim}, got"
        f" {num_iters!r}."
    )
  if unroll is None:
    unroll = default_lanczos_unroll(num_iters)

  dtype = flat.dtype
  if init_vector is None:
    v0 = jax.random.normal(key, (dim,), dtype)
  else:
    v0 = ravel_pytree(init_vector)[0].astype(dtype)
  basis, alphas, betas = _lanczos(matvec, unravel, v0, num_iters, unroll)

  evals, evecs = jnp.linalg.eigh(tridiagonal(alphas, betas))
  order = jnp.arange(num_iters - 1, num_iters - 1 - k, -1)
  top_vals = evals[order]
  top_y = evecs[:, order]  # (num_iters, k)
  vecs = top_y.T @ basis[:num_iters]  # (k, D)
  residuals = jnp.abs(betas[-1] * top_y[-1])
  return EigenResult(top_vals, jax.vmap(unravel)(vecs), residuals)
