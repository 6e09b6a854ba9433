"""Hessian-vector products and top-k eigenpairs of symmetric operators.

The Hessian ``H`` is that of the mean loss over the estimation batch,
``L(theta) = mean_i l_i(theta)``; ``H v`` is forward-over-reverse
(``jax.jvp`` of ``jax.grad``). :func:`hessian_operator` linearises the
gradient once and reuses that linear map for every product, which removes the
forward pass and the gradient's own work from each matvec.

Eigen-solver: thick-restart Lanczos with full reorthogonalisation
(classical Gram-Schmidt, applied twice) on raveled parameters, ``eigh`` of
the projected matrix, restarts until the top-k residuals meet a tolerance.
Why it is written here rather than taken from matfree
(``matfree.eig.eigh_partial(matfree.decomp.tridiag_sym(..., reortho="full"))``):
matfree has no restarts (its accuracy is that of a fixed Krylov size), drives
the recursion with ``lax.fori_loop`` and offers no way to unroll it, and on a
CPU a matvec inside an XLA loop runs several times slower than the same
matvec outside one when the model has convolutions.
Measured with ``benchmarks/solver_overhead.py`` (2-core x86-64 CPU, jax
0.10.2, LeNet with 11,330 parameters on 1,200 images, conv2 still a
``lax.conv``, top-20 from 40 Lanczos steps): one
linearisation plus 40 Hessian products alone took 7.46 s; this solver
unrolled 7.28 s (overhead -2%: the reorthogonalisation costs less than the
timing noise), the same code under ``fori_loop`` 48.9 s, matfree 50.6 s.
Unrolled, though, each step is compiled anew (a ``hessian_noise(k=20)``
step on the library's LeNet compiled in 268 s unrolled, 42 s looped, and
ran faster looped), so by default (``unroll=None``) the recursion uses
``fori_loop`` on every backend (one compiled matvec); ``unroll=True``
unrolls it at trace time, which pays for models with ``lax.conv`` on a
CPU. The
two paths run the same arithmetic. The returned residual norms
``|beta_m y_{m,j}|`` are the Lanczos bounds on ``||A v_j - lambda_j v_j||``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src import staging
from anisonoise._src import sums
from anisonoise._src.batching import Batch, LossFn, Params

Matvec = Callable[[Params], Params]

# The longest recursion unrolled by default on a CPU: none. Unrolling was
# kept for convolution products (they run several times slower inside
# XLA:CPU loops), but every unrolled step is compiled anew: a jitted
# ``hessian_noise(k=20)`` step (40 products) on the paper's LeNet
# (``anisonoise.models.LeNet``, 1,200 images, 2-core CPU shared with other
# jobs) compiled in 268 s unrolled and 42 s looped, and ran in 81 s and
# 47 s (``benchmarks/compile_time.py``). ``unroll=True`` and streamed
# batches still unroll.
_UNROLL_LIMIT = 0

# New Krylov directions a warm-started solve adds when the Rayleigh-Ritz
# step on its start block already meets ``tol`` (a settled subspace, e.g. a
# refresh near a minimum), before the guard's (:func:`settled_directions`).
# They are a short Lanczos run on the complement of the block, so an
# eigenvalue that has risen above the block's (the complement's extreme
# one) still enters; the rest of the budget is not spent.
SETTLED_DIRECTIONS = 4


def default_lanczos_unroll(num_iters: int) -> bool:
  """Unroll the Krylov recursion on a CPU up to ``_UNROLL_LIMIT`` steps
  (none: see the measurement above); elsewhere ``fori_loop``, which
  compiles one matvec whatever the number of steps."""
  return jax.default_backend() == "cpu" and num_iters <= _UNROLL_LIMIT


def default_num_iters(k: int, dim: int) -> int:
  """The default Krylov basis size for ``k`` eigenpairs on ``D = dim``
  parameters: ``min(D, max(2 k, k + 10))``."""
  return min(dim, max(2 * k, k + 10))


def check_tol(tol: float | None) -> None:
  """``tol`` must be positive, or ``None`` (one cycle, no restarts); a
  traced ``tol`` (``optax.inject_hyperparams``) is checked when it is
  concrete."""
  if isinstance(tol, jax.core.Tracer):
    return
  if tol is not None and not tol > 0:
    raise ValueError(f"tol must be positive (or None), got {tol!r}.")


def lanczos_unroll(batch: Batch, chunk_size: int | None,
                   num_iters: int) -> bool:
  """The unroll choice for a solve over ``batch``: a stream unrolls (its
  products run eagerly, outside any loop); chunked products loop (their
  chunks are a loop already, so unrolling buys no speed, and 40 unrolled
  copies of a chunked VGG11 Hessian product took 165 s to compile on the
  2-core CPU); otherwise :func:`default_lanczos_unroll`."""
  if isinstance(batch, sums.Batches):
    return True
  if chunk_size is not None:
    return False
  return default_lanczos_unroll(num_iters)


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
  product; the linearisation holds the batch's activations). The product
  is then staged (``anisonoise._src.staging``): the work on data alone is
  done once, and on a CPU the weight-gradient convolutions and max-pool
  gradients, which XLA:CPU runs slowly, become matrix products against
  patches and masks kept with the operator (at most 3 times the
  linearisation's memory more): on LeNet written with ``lax.conv`` and
  ``max_pool`` (1,200 images) a product took 0.16 s against 0.38-0.47 s.
  The linearisation is compiled once per ``loss_fn``. With a
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
  # Every operator but a stream's is a ``jax.tree_util.Partial`` whose
  # leaves are its data (the linearisation's residuals, or the point and
  # the batch): an eager solve passes it to one jitted Krylov step as an
  # argument (see :func:`_extend`).
  if sums.is_single_pass(batch, chunk_size):
    if linearize:
      return _linearized_hessian(loss_fn, params, batch)
    return jax.tree_util.Partial(functools.partial(_plain_hvp, loss_fn),
                                 params, batch)
  if isinstance(batch, sums.Batches):
    return lambda v: _chunked_hvp(loss_fn, chunk_size, n, params, batch, v)
  return jax.tree_util.Partial(
      functools.partial(_chunked_hvp, loss_fn, chunk_size, n), params, batch)


def _linearize(loss_fn, params, batch):
  grad_fn = jax.grad(batching.mean_loss(loss_fn, batch))
  return jax.linearize(grad_fn, params)[1]


@functools.partial(jax.jit, static_argnums=0)
def _staged_hessian(loss_fn, params, batch):
  return staging.staged(_linearize(loss_fn, params, batch), params)[0]


def _linearized_hessian(loss_fn, params, batch) -> Matvec:
  """The linearised product, staged (:func:`anisonoise._src.staging.staged`:
  its data-only work done once) inside one program compiled per
  ``loss_fn``: the operator's structure is then the same from call to call
  with the same ``loss_fn``, and so are the compiled programs of an eager
  solve on it (:func:`_steps`). Two cases get ``jax.linearize``'s product
  instead, as documented and tested: a ``loss_fn`` that cannot be a static
  argument (unhashable), and a product the staging refuses
  (``NotImplementedError``: an effect in it). Any other error surfaces:
  a JAX upgrade that breaks what the staging reads must not fall back to
  the slower product unseen (``tests/test_staging.py`` also checks that
  the plain-convolution LeNet's product is staged)."""
  try:
    hash(loss_fn)
  except TypeError:
    return _linearize(loss_fn, params, batch)
  try:
    return _staged_hessian(loss_fn, params, batch)
  except NotImplementedError:
    return _linearize(loss_fn, params, batch)


def _plain_hvp(loss_fn, params, batch, v):
  grad_fn = jax.grad(batching.mean_loss(loss_fn, batch))
  return jax.jvp(grad_fn, (params,), (v,))[1]


def _chunked_hvp(loss_fn, chunk_size, n, params, batch, v):
  return sums.scale(
      sums.total(sums.hvp_sum, loss_fn, chunk_size, params, batch, v),
      1.0 / n)


class EigenResult(NamedTuple):
  """Top-k eigenpairs of a symmetric operator.

  Attributes:
    eigenvalues: ``(k,)`` largest algebraic eigenvalues, in descending order.
    eigenvectors: a pytree like the operator's input whose leaves have a
      leading axis of size ``k``; entry ``j`` is the unit eigenvector of
      ``eigenvalues[j]``.
    residual_norms: ``(k,)`` Lanczos estimates of
      ``||A v_j - lambda_j v_j||`` (small means converged). Each bounds the
      distance from ``eigenvalues[j]`` to the nearest eigenvalue of ``A``.
    num_matvecs: the number of products the solver ran (an int scalar).
    converged: whether every ``residual_norms[j] <= tol * max_j |theta_j|``
      (the largest Ritz value's magnitude, the operator's scale), and, for
      a settled warm start, no eigenvalue was seen above the block's k-th
      (a bool scalar; always checked, whatever ``tol``).
  """

  eigenvalues: jax.Array
  eigenvectors: Params
  residual_norms: jax.Array
  num_matvecs: jax.Array
  converged: jax.Array


class Krylov(NamedTuple):
  """An orthonormal Krylov basis and the operator projected on it.

  Step ``j`` applies the operator to row ``j`` and appends what is left of
  ``A q_j`` after orthogonalisation as row ``j + 1``.

  Attributes:
    basis: ``(m + 1, D)`` orthonormal rows (rows not yet reached are zero).
    projected: ``(m + 1, m)``; column ``j`` holds the coefficients of
      ``A q_j`` on every row: ``A Q_m = Q projected`` (up to rounding, once
      the ``m`` steps have run).
  """

  basis: jax.Array
  projected: jax.Array

  def matrix(self) -> jax.Array:
    """``T = Q_m^T A Q_m`` (``m x m``), symmetrised from its upper
    triangle (tridiagonal after a cold start, an arrowhead plus a
    tridiagonal after a thick restart)."""
    m = self.projected.shape[1]
    upper = jnp.triu(self.projected[:m])
    return upper + jnp.triu(upper, 1).T

  def residual_norms(self, y: jax.Array) -> jax.Array:
    """``||A Q_m y_j - theta_j Q_m y_j||`` for Ritz vectors ``y`` (columns):
    the part of ``A Q_m y_j`` outside ``Q_m``."""
    m = self.projected.shape[1]
    return jnp.linalg.norm(self.projected[m:] @ y, axis=0)


def _krylov_step(mv, j, krylov: Krylov) -> Krylov:
  """Applies the operator to row ``j`` and appends the orthogonalised
  remainder as row ``j + 1``."""
  basis, projected = krylov
  w = mv(basis[j])
  scale = jnp.linalg.norm(w)
  # Full reorthogonalisation against every stored vector (rows not yet
  # reached are zero and drop out), twice for numerical orthogonality
  # (CGS2). The coefficients are column j of Q^T A Q.
  h = basis @ w
  w = w - basis.T @ h
  h2 = basis @ w
  w = w - basis.T @ h2
  h = h + h2
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
  column = h.at[j + 1].set(jnp.where(ok, beta, 0.0))
  return Krylov(basis.at[j + 1].set(q_next),
                projected.at[:, j].set(column))


def _extend(mv, krylov: Krylov, start: int, stop: int, unroll: bool):
  """Krylov steps ``start .. stop - 1``: see :func:`_steps`."""
  return _steps(_krylov_step, _jit_krylov_chunk, mv, start, stop, krylov,
                unroll)


# The Krylov steps one compiled program of an eager solve runs (unrolled).
# On LeNet written with ``lax.conv`` (1,200 images, 2-core CPU, staged
# products), 8 products took 0.158 s each as 8 programs, 0.149 s as 4
# programs of 2 and 0.133 s as 2 of 4 (0.135 s in one ``fori_loop``).
CHUNK = 4


def _chunk(step, mv, j, carry, n: int):
  for i in range(n):
    carry = step(mv, j + i, carry)
  return carry


_jit_krylov_chunk = jax.jit(functools.partial(_chunk, _krylov_step),
                            static_argnums=3)


def _eager_operator(mv, carry) -> bool:
  """Whether a recursion runs eagerly (its carry is concrete) on an
  operator whose data are its pytree leaves (a
  ``jax.tree_util.Partial``, as :func:`hessian_operator` builds)."""
  return (isinstance(mv, jax.tree_util.Partial)
          and _is_concrete(jax.tree.leaves(carry)[0])
          and all(isinstance(x, (jax.Array, np.ndarray, float, int))
                  and _is_concrete(x) for x in jax.tree.leaves(mv)))


_last_eager_operator: list = []


def _hold_one_operator(mv) -> None:
  """Keeps the eager steps' compiled programs of one operator only.

  An operator's structure (its ``jax.tree_util.Partial``'s function)
  is the same from call to call for one ``loss_fn`` (the linearisation is
  compiled once per ``loss_fn``), so a later solve on the same loss reuses
  the compiled steps; another operator (a new ``loss_fn``, or a
  ``covariance_operator``) drops the previous one's programs, so that
  diagnostics called with fresh closures do not keep one executable per
  call."""
  tree = jax.tree.structure(mv)
  if _last_eager_operator != [tree]:
    for fn in (_jit_krylov_chunk, _jit_grow_chunk, _jit_apply,
               _jit_subspace_chunk, _jit_apply_rows):
      fn.clear_cache()  # type: ignore[attr-defined]  # jit's, untyped
    _last_eager_operator[:] = [tree]


def _steps(step, jitted_chunk, mv, start: int, stop: int, carry,
           unroll: bool):
  """``carry = step(mv, j, carry)`` for ``j = start .. stop - 1``.

  Called eagerly on a pytree operator, a Python loop over one jitted
  program of :data:`CHUNK` steps (unrolled; ``jitted_chunk``) that takes
  the operator's data as arguments: its products run outside
  any XLA loop (convolutions run several times slower inside XLA:CPU
  loops) and nothing is folded into the program as a constant. On the
  paper's LeNet written with ``lax.conv`` (1,200 images, 2-core CPU, top
  20 from 40 products, compilation included) this took 23-24 s, and the
  same 40 steps as one jitted ``fori_loop`` with the operator's data as
  arguments 119-120 s, before the products were staged
  (:func:`hessian_operator`); staged, 8 linearised products took 0.15 s
  each from a Python loop and 0.23 s in a ``fori_loop`` (0.72 s unstaged).
  Under a trace (``jit``, ``vmap``): unrolled at trace time (``unroll``)
  or a ``fori_loop``.
  """
  if _eager_operator(mv, carry):
    _hold_one_operator(mv)
    j = start
    while j < stop:
      n = min(CHUNK, stop - j)
      carry = jitted_chunk(mv, j, carry, n)
      sums.wait_if_across_processes(carry)
      j += n
    return carry
  if unroll:
    for j in range(start, stop):
      carry = step(mv, j, carry)
    return carry
  return jax.lax.fori_loop(start, stop, lambda j, c: step(mv, j, c), carry)


def build_krylov(mv: Callable[[jax.Array], jax.Array], v0: jax.Array,
                 num_iters: int, unroll: bool) -> Krylov:
  """``num_iters`` Lanczos steps with full reorthogonalisation from ``v0``
  on a flat matvec: the one Krylov recursion behind :func:`top_eigenpairs`
  and stochastic Lanczos quadrature."""
  return _extend(mv, _start_krylov(v0, num_iters), 0, num_iters, unroll)


def _start_krylov(v0: jax.Array, num_iters: int) -> Krylov:
  """An empty basis of ``num_iters`` steps whose first row is ``v0``
  normalised."""
  basis = jnp.zeros((num_iters + 1, v0.size), v0.dtype)
  basis = basis.at[0].set(v0 / jnp.linalg.norm(v0))
  return Krylov(basis, jnp.zeros((num_iters + 1, num_iters), v0.dtype))


def solve_dtype(dtype) -> jnp.dtype:
  """The dtype an eigen-solve runs and stores its eigenvectors in: the
  parameters' promoted with float32 (float32 for bfloat16 or float16
  parameters, which ``eigh`` does not take and whose rounding, 4e-3 for
  bfloat16, would spoil the basis's orthogonality; float64 stays
  float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _flat_apply(unravel, in_dtype, dtype, matvec, x):
  return ravel_pytree(matvec(unravel(x.astype(in_dtype))))[0].astype(dtype)


@functools.lru_cache(maxsize=64)
def _flat_apply_for(treedef, leaves, in_dtype, dtype):
  """The flat map's function for parameters of one structure, the same
  object from call to call (so that the operator's structure, and the
  compiled steps of an eager solve keyed on it, are too)."""
  sizes = [math.prod(shape) for shape, _ in leaves]
  cuts = np.cumsum(sizes)[:-1].tolist()

  def unravel(x):
    parts = jnp.split(x, cuts) if cuts else [x]
    return jax.tree.unflatten(treedef, [
        part.reshape(shape).astype(leaf_dtype)
        for part, (shape, leaf_dtype) in zip(parts, leaves)])

  return functools.partial(_flat_apply, unravel, in_dtype, dtype)


def flat_operator(matvec: Matvec, like: Params):
  """``matvec`` on raveled vectors in :func:`solve_dtype`: returns the flat
  map (each leaf cast to ``like``'s dtype before the product; a
  ``jax.tree_util.Partial`` with ``matvec``'s leaves when ``matvec`` is
  one), that dtype and the ``unravel`` of a solve's vectors (leaves in
  that dtype)."""
  leaves, treedef = jax.tree.flatten(like)
  in_dtype = (jnp.result_type(*leaves) if leaves else jnp.float32)
  dtype = solve_dtype(in_dtype)
  apply = _flat_apply_for(treedef, tuple(
      (tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves),
      jnp.dtype(in_dtype), jnp.dtype(dtype))
  mv: Callable
  if isinstance(matvec, jax.tree_util.Partial):
    mv = jax.tree_util.Partial(apply, matvec)
  else:
    mv = functools.partial(apply, matvec)
  unravel_out = ravel_pytree(jax.tree.map(
      lambda x: jnp.asarray(x).astype(dtype), like))[1]
  return mv, dtype, unravel_out


class _Ritz(NamedTuple):
  values: jax.Array     # (m,) descending
  vectors: jax.Array    # (m, m) columns in the basis's coordinates
  residuals: jax.Array  # (m,) ||A u_j - theta_j u_j||


def _ritz(krylov: Krylov) -> _Ritz:
  evals, evecs = jnp.linalg.eigh(krylov.matrix())
  evals, evecs = evals[::-1], evecs[:, ::-1]
  return _Ritz(evals, evecs, krylov.residual_norms(evecs))


def _scale(ritz) -> jax.Array:
  """The largest ``|theta_j|``: the operator's scale as far as the Ritz
  values see it (``|theta_1|`` alone is near zero when the top eigenvalue
  is, and no residual could pass relative to it)."""
  return jnp.max(jnp.abs(ritz.values))


def _converged(ritz, k: int, tol) -> jax.Array:
  return jnp.all(ritz.residuals[:k] <= tol * _scale(ritz))


def _thick_restart(krylov: Krylov, ritz: _Ritz, keep: int) -> Krylov:
  """Keeps the top ``keep`` Ritz vectors and the residual direction: the
  basis becomes ``[u_1 .. u_keep, q_m, 0 ...]`` with ``diag(theta)`` as the
  projected operator on the kept part (Wu and Simon's thick restart:
  ``A u_i`` lies in the span of ``u_i`` and ``q_m``, so its column needs no
  product; the coupling is filled in when the next step applies the
  operator to ``q_m``, now row ``keep``)."""
  m = krylov.projected.shape[1]
  basis = jnp.zeros_like(krylov.basis)
  basis = basis.at[:keep].set(ritz.vectors[:, :keep].T @ krylov.basis[:m])
  basis = basis.at[keep].set(krylov.basis[m])
  projected = jnp.zeros_like(krylov.projected)
  idx = jnp.arange(keep)
  projected = projected.at[idx, idx].set(ritz.values[:keep])
  return Krylov(basis, projected)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _orthogonalise(basis: jax.Array, w: jax.Array) -> jax.Array:
  """``w`` without its part in the span of the rows of ``basis`` (zero rows
  drop out), normalised (CGS2); zero if nothing is left."""
  scale = jnp.linalg.norm(w)
  w = w - basis.T @ (basis @ w)
  w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  ok = beta > 16 * jnp.finfo(w.dtype).eps * scale
  return jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0)


class _Recycled(NamedTuple):
  values: jax.Array     # (m,) Ritz values, descending
  vectors: jax.Array    # (m, D) Ritz vectors (rows)
  residuals: jax.Array  # (m,) ||A u_j - theta_j u_j||, computed
  images: jax.Array     # (m, D) A u_j


def _rayleigh_ritz(mv, block: jax.Array, key: jax.Array) -> _Recycled:
  """The Ritz pairs of ``A`` on the span of ``block``'s rows (orthonormalised
  in order; a zero row, an empty cache, gets a random direction instead):
  ``b`` products."""
  basis = _orthonormal_rows(block, key)
  if _eager_operator(mv, basis):
    # Eagerly, each product outside an XLA loop (see :func:`_steps`).
    _hold_one_operator(mv)
    images = jnp.stack([_jit_apply(mv, row) for row in basis])
  else:
    images = jax.lax.map(mv, basis)
  return _ritz_pairs(basis, images)


_jit_apply = jax.jit(lambda mv, x: mv(x))


def _orthonormal_rows(block: jax.Array, key: jax.Array) -> jax.Array:
  """``block``'s rows orthonormalised in order (CGS2); a zero row gets a
  random direction instead."""
  b, dim = block.shape
  rand = jax.random.normal(key, (b, dim), block.dtype)
  basis = jnp.zeros((b, dim), block.dtype)
  for i in range(b):
    row = jnp.where(jnp.linalg.norm(block[i]) > 0, block[i], rand[i])
    basis = basis.at[i].set(_orthogonalise(basis, row))
  return basis


def _ritz_pairs(basis: jax.Array, images: jax.Array) -> _Recycled:
  t = basis @ images.T
  evals, evecs = jnp.linalg.eigh(0.5 * (t + t.T))
  evals, evecs = evals[::-1], evecs[:, ::-1]
  u = evecs.T @ basis
  au = evecs.T @ images
  res = jnp.linalg.norm(au - evals[:, None] * u, axis=1)
  return _Recycled(evals, u, res, au)


def _recycled_cycle(mv, pairs: _Recycled, key: jax.Array, num_iters: int,
                    unroll: bool, random_start: bool = False) -> _Recycled:
  """Rayleigh-Ritz on ``[V, K]``: the ``b`` Ritz vectors ``V`` of ``pairs``
  (orthonormal, their images known, so they cost no product) and
  ``num_iters - b`` Krylov directions grown from their block residual.
  Subspace recycling: a refresh keeps what earlier refreshes found, so
  that along a slowly changing operator the accuracy builds up across
  refreshes instead of starting over. ``random_start``: the Krylov part
  starts from a random direction instead (see :func:`_grow`)."""
  basis, images = _grow(mv, pairs, key, num_iters, unroll, random_start)
  return _ritz_pairs(basis, images)


def _grow(mv, pairs: _Recycled, key: jax.Array, num_iters: int,
          unroll: bool, random_start: bool) -> tuple[jax.Array, jax.Array]:
  """The basis ``[V, K]`` of :func:`_recycled_cycle` and its images
  (``num_iters`` rows each). With ``random_start`` the Krylov part ``K``
  is a Lanczos run from a random direction on the complement of ``V``
  (each new vector is orthogonalised against ``V``: Lanczos on
  ``(I - V^T V) A (I - V^T V)``), which finds that operator's extreme
  eigenvalues first."""
  b, dim = pairs.vectors.shape
  basis = jnp.zeros((num_iters + 1, dim), pairs.vectors.dtype)
  basis = basis.at[:b].set(pairs.vectors)
  images = jnp.zeros((num_iters, dim), pairs.vectors.dtype)
  images = images.at[:b].set(pairs.images)
  # The block residual A V - V diag(theta), summed, starts the Krylov part
  # (where V drifts, the directions it drifts to), with a random part so
  # that an invariant block still grows.
  rand = jax.random.normal(key, (dim,), basis.dtype)
  if random_start:
    start = rand
  else:
    start = jnp.sum(pairs.images - pairs.values[:, None] * pairs.vectors, 0)
    start = start + 1e-3 * jnp.linalg.norm(start) * rand / jnp.sqrt(dim)
    start = jnp.where(jnp.linalg.norm(start) > 0, start, rand)
  basis = basis.at[b].set(_orthogonalise(basis, start))

  carry = _steps(_grow_step, _jit_grow_chunk, mv, b, num_iters,
                 (basis, images), unroll)
  return carry[0][:num_iters], carry[1]


def _grow_step(mv, j, carry):
  """One step of :func:`_grow`: the image of row ``j`` and, orthogonalised
  against every row, row ``j + 1`` (none past the last image's row)."""
  basis, images = carry
  w = mv(basis[j])
  images = images.at[j].set(w)
  nxt = _orthogonalise(basis, w)
  basis = basis.at[j + 1].set(jnp.where(j + 1 < images.shape[0], nxt, 0.0))
  return basis, images


_jit_grow_chunk = jax.jit(functools.partial(_chunk, _grow_step),
                          static_argnums=3)


def settled_directions(b: int) -> int:
  """The Krylov directions a settled warm start adds to its ``b`` cached
  vectors: :data:`SETTLED_DIRECTIONS` plus a guard of half the settled
  cost, ``(b + SETTLED_DIRECTIONS) // 2`` more, so that a settled refresh
  costs at most 1.5 times ``b + SETTLED_DIRECTIONS`` products."""
  return SETTLED_DIRECTIONS + (b + SETTLED_DIRECTIONS) // 2


def _guarded(mv, pairs: _Recycled, key: jax.Array, size: int, k: int,
             tol: float, unroll: bool) -> tuple[_Recycled, jax.Array]:
  """The settled step with its guard: Rayleigh-Ritz on the cached block
  ``V`` (``pairs``) plus a Lanczos run ``K`` from a random start on the
  complement of ``V`` (``size - b`` products). Residuals certify that the
  returned pairs are eigenpairs, not that they are the top ones: an
  eigenvalue that rose in a direction orthogonal to ``V`` leaves ``V``'s
  pairs untouched. ``K`` sees outside the block, and the top eigenvalue
  of the operator compressed to ``K`` (a lower bound on the complement's
  top one, and close to it when that one stands out) must stay below the
  k-th cached value (within ``tol``). Returns the Ritz pairs on
  ``[V, K]`` and whether the guard passed."""
  b = pairs.vectors.shape[0]
  basis, images = _grow(mv, pairs, key, size, unroll, random_start=True)
  outside = basis[b:] @ images[b:].T
  top_outside = jnp.linalg.eigvalsh(0.5 * (outside + outside.T))[-1]
  passed = top_outside <= pairs.values[k - 1] + tol * _scale(pairs)
  return _ritz_pairs(basis, images), passed


def top_eigenpairs(
    matvec: Matvec,
    like: Params,
    k: int,
    *,
    key: jax.Array,
    num_iters: int | None = None,
    tol: float | None = 1e-3,
    max_matvecs: int | None = None,
    init_vector: Params | None = None,
    init_subspace: Params | None = None,
    unroll: bool | None = None,
    criterion: str = "residual",
) -> EigenResult:
  """Top-k (largest algebraic) eigenpairs of a symmetric linear operator.

  Thick-restart Lanczos (Wu and Simon, 2000) with full reorthogonalisation
  on the raveled pytree: a Krylov basis of ``num_iters`` vectors, the Ritz
  pairs of ``T = Q^T A Q``, and, until every one of the top ``k`` has a
  residual ``||A v_j - theta_j v_j|| <= tol max_j |theta_j|`` or
  ``max_matvecs``
  products are spent, a restart that keeps the best Ritz vectors and
  extends them with new Krylov directions. Each residual bounds the
  distance of its ``theta_j`` to an eigenvalue of ``A``, so with
  ``tol=1e-3`` every returned eigenvalue is within ``1e-3 ||A||`` of one
  of ``A``'s (the scale is the largest ``|theta_j|``, not ``|theta_1|``,
  which may be near zero). The solve runs, and returns its eigenvectors,
  in float32 at least (float64 for float64 parameters) whatever the
  parameters' dtype; each product gets its leaves in their own dtypes.
  The result says how many products were run and whether the tolerance
  was met; run eagerly with a ``tol``, a miss is also a
  ``RuntimeWarning``.

  Why restarts rather than a longer recursion: the accuracy of a fixed
  Krylov size depends on the spectrum it meets (flat or clustered tops
  need several times ``2 k`` steps), and a basis of ``m`` vectors costs
  ``m D`` memory; restarts reach the tolerance in a basis of fixed size.

  Args:
    matvec: a symmetric linear map on pytrees like ``like`` (for example
      :func:`hessian_operator` or :func:`covariance_operator`).
    like: a pytree with the operator's input structure, shapes and dtypes.
    k: number of eigenpairs, ``1 <= k <= num_iters``.
    key: PRNG key for the random start vector.
    num_iters: Krylov basis size ``m`` (products of the first cycle),
      ``k <= m <= D``. Defaults to ``min(D, max(2 k, k + 10))``.
    tol: residual tolerance relative to ``max_j |theta_j|``; ``None`` runs one
      cycle of ``num_iters`` products and only reports ``converged``.
    max_matvecs: budget of products, at least ``num_iters``; defaults to
      ``10 num_iters``. A restart that would exceed it is not run.
    init_vector: optional start vector (a pytree like ``like``) in place of
      the random one; ``key`` is then unused.
    init_subspace: optional warm start from ``b < num_iters`` vectors (a
      pytree like ``like`` whose leaves have a leading axis ``b``; for
      instance a previous result's ``eigenvectors``; zero rows are replaced
      by random ones): each cycle is then a Rayleigh-Ritz step on these
      vectors (the current top ``b`` Ritz vectors after the first cycle)
      plus ``num_iters - b`` Krylov directions grown from their residual,
      ``num_iters`` products per cycle. Along a slowly changing operator
      (a training trajectory) the accuracy accumulates from solve to
      solve. With a ``tol`` and ``b >= k``, a block whose own Ritz pairs
      already meet it (a settled subspace) gets only a short Lanczos run
      from a random start outside it, ``4 + (b + 4) // 2`` directions
      (``b + 4 + (b + 4) // 2`` products in all, at most 1.5 times
      ``b + 4``), whose top Ritz value on the complement must stay below
      the block's k-th (to ``tol``): an eigenvalue that rose orthogonally
      to the block leaves the block's residuals small, and only a look
      outside it can see it. If it does not stay below, the full cycles
      run from the top ``b`` pairs of that step.
    unroll: unroll each cycle at trace time (``True``) or use
      ``lax.fori_loop`` (``False``); ``None`` loops (unrolled steps are
      each compiled; unrolling pays for ``lax.conv`` models on a CPU,
      whose products run slower inside XLA:CPU loops). Restarts run in a
      ``lax.while_loop`` under ``jit`` and in a Python loop when called
      eagerly.
    criterion: what ``tol`` bounds. ``"residual"`` (the description
      above): every one of the top ``k`` pairs, for an accurate
      spectrum. ``"subspace"``: the top-``k`` eigen*space* and its
      curvature, all the low-rank noises need (the covariance
      ``U Lambda U^T`` is the same for any basis of a cluster of equal
      eigenvalues). A block Rayleigh-Ritz solve: the start block
      (``init_subspace``'s rows, zero rows random, plus one random row;
      1 to 4 random rows without it), then chunks of 4 products on the
      residuals ``A u_j - theta_j u_j`` of the top-``k`` Ritz vectors
      with the largest norms (until each of a warm start's ``k`` has had
      its turn) and Krylov directions (the images of the rows added
      last), in a basis of ``num_iters`` rows restarted on its top
      ``k + (num_iters - k) // 2`` Ritz vectors, until the sum of the
      top-``k`` Ritz values gains at most ``tol * 4 / k`` times
      ``sum_j |theta_j|`` over a chunk (``converged``: ``tol`` is the gain
      the whole top ``k`` would make at that rate), or ``max_matvecs`` is
      spent. The Ritz sum is the curvature
      ``sum_j u_j^T A u_j`` the vectors capture, never above the top
      ``k`` eigenvalues' sum, and grows as the solve goes on: a small
      gain is a stall, not a proof of the missing part (what the noises
      capture along a run is measured in ``benchmarks/trajectory.py``).
      The start block costs ``k + 1`` products, each chunk 4;
      ``residual_norms`` are estimated from Gram matrices (to about
      ``sqrt(eps)`` of the scale); ``tol=None`` fills the basis once.
      ``init_vector`` and ``unroll`` do not apply.

  Returns:
    An :class:`EigenResult`.

  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> A = jnp.diag(jnp.arange(1., 11.))
    >>> res = anisonoise.top_eigenpairs(lambda v: A @ v, jnp.zeros(10), 2,
    ...                                 key=jax.random.key(0), num_iters=10)
    >>> [round(float(x), 4) for x in res.eigenvalues]
    [10.0, 9.0]
    >>> bool(res.converged), int(res.num_matvecs)
    (True, 10)

  References:
    Wu and Simon, `Thick-restart Lanczos method for large symmetric
    eigenvalue problems <https://doi.org/10.1137/S0895479898334605>`_,
    SIAM J. Matrix Anal. Appl. 22(2), 2000.
  """
  # Products see the parameters' own dtypes; the solve and the returned
  # eigenvectors are in ``dtype`` (float32 at least) whatever those are.
  mv, dtype, unravel_out = flat_operator(matvec, like)
  dim = batching.num_params(like)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}.")
  if k > dim:
    raise ValueError(
        f"k={k} eigenpairs asked of an operator on {dim} parameters; k must"
        f" be at most {dim}."
    )
  if num_iters is None:
    num_iters = default_num_iters(k, dim)
  if not isinstance(num_iters, int) or not k <= num_iters <= dim:
    raise ValueError(
        f"num_iters must be an int with k={k} <= num_iters <= D={dim}, got"
        f" {num_iters!r}."
    )
  check_tol(tol)
  if max_matvecs is None:
    max_matvecs = 10 * num_iters
  if not isinstance(max_matvecs, int) or max_matvecs < num_iters:
    raise ValueError(
        f"max_matvecs must be an int >= num_iters={num_iters}, got"
        f" {max_matvecs!r}."
    )
  if unroll is None:
    unroll = default_lanczos_unroll(num_iters)
  if criterion == "subspace":
    if init_vector is not None:
      raise ValueError('init_vector does not apply to criterion="subspace";'
                       " give init_subspace (a block of start vectors).")
    return _subspace_eigenpairs(mv, unravel_out, dtype, dim, k, key,
                                num_iters, tol, max_matvecs, init_subspace)
  if criterion != "residual":
    raise ValueError('criterion must be "residual" (every top-k pair) or'
                     f' "subspace" (the top-k space), got {criterion!r}.')

  if init_subspace is not None:
    if init_vector is not None:
      raise ValueError("give init_vector or init_subspace, not both.")
    return _recycled_eigenpairs(mv, unravel_out, init_subspace, k, key,
                                num_iters, tol, max_matvecs, unroll, dtype)
  if init_vector is None:
    v0 = jax.random.normal(key, (dim,), dtype)
  else:
    v0 = ravel_pytree(init_vector)[0].astype(dtype)

  krylov = _extend(mv, _start_krylov(v0, num_iters), 0, num_iters, unroll)
  ritz, used = _ritz(krylov), jnp.asarray(num_iters, jnp.int32)
  check = 1e-3 if tol is None else tol
  # Keep k plus half of the rest (at least one new direction per cycle):
  # more kept vectors converge the k-th pair faster per product.
  keep = min(num_iters - 1, k + (num_iters - k) // 2)
  if tol is not None and keep >= k and num_iters < dim:
    per_cycle = num_iters - keep

    def more(carry):
      _, ritz, used = carry
      return (~_converged(ritz, k, tol)) & (used + per_cycle <= max_matvecs)

    def cycle(carry):
      krylov, ritz, used = carry
      krylov = _extend(mv, _thick_restart(krylov, ritz, keep), keep,
                       num_iters, unroll)
      return krylov, _ritz(krylov), used + per_cycle

    krylov, ritz, used = _restarts(more, cycle, (krylov, ritz, used),
                                   _is_concrete(krylov.projected))

  converged = _converged(ritz, k, check)
  _warn_unconverged(tol, converged, ritz, k, check, used)
  vecs = ritz.vectors[:, :k].T @ krylov.basis[:num_iters]  # (k, D)
  return EigenResult(ritz.values[:k], jax.vmap(unravel_out)(vecs),
                     ritz.residuals[:k], used, converged)


def _restarts(more, cycle, carry, eager: bool):
  """``cycle`` while ``more``: a Python loop when called eagerly (each
  cycle's products run as they come), a ``lax.while_loop`` under jit."""
  if eager:
    while bool(more(carry)):
      carry = cycle(carry)
    return carry
  return jax.lax.while_loop(more, cycle, carry)


def _warn_unconverged(tol, converged, ritz, k, check, used) -> None:
  if tol is not None and _is_concrete(converged) and not bool(converged):
    warnings.warn(
        f"top_eigenpairs: the top {k} Ritz pairs did not reach residual"
        f" <= {check:g} max |theta| within {int(used)} products (largest"
        f" residual / max |theta| ="
        f" {float(jnp.max(ritz.residuals[:k]) / _scale(ritz)):.2e})."
        " Raise max_matvecs or num_iters, or loosen tol.",
        RuntimeWarning, stacklevel=3)


def _recycled_eigenpairs(mv, unravel, init_subspace, k, key, num_iters, tol,
                         max_matvecs, unroll, dtype) -> EigenResult:
  """:func:`top_eigenpairs` warm-started from ``init_subspace``: a
  Rayleigh-Ritz step on it (``b`` products); then, if its top ``k`` pairs
  already meet ``tol`` (a settled subspace), the guarded step of
  :func:`_guarded` only (:func:`settled_directions` new directions), else,
  or if the guard saw an eigenvalue above the block's, recycled cycles
  (:func:`_recycled_cycle`) until the tolerance or the budget."""
  block = jax.vmap(lambda t: ravel_pytree(t)[0])(init_subspace).astype(dtype)
  b, dim = block.shape
  if not 1 <= b < num_iters:
    raise ValueError(f"init_subspace holds {b} vectors; it needs 1 <= b <"
                     f" num_iters={num_iters}.")
  keys = jax.random.split(key, 4)
  pairs = _rayleigh_ritz(mv, block, keys[0])
  check = 1e-3 if tol is None else tol
  # Restarts keep k plus half of the rest, as the thick restart does; their
  # images are known, so a restart costs num_iters - keep products.
  keep = max(b, min(num_iters - 1, k + (num_iters - k) // 2))
  eager = _is_concrete(pairs.values)

  def full(pairs, spent):
    ritz = _recycled_cycle(mv, pairs, keys[2], num_iters, unroll)
    used = spent + num_iters - b
    if tol is not None:
      def more(carry):
        ritz, used, _ = carry
        return ((~_converged(ritz, k, tol))
                & (used + num_iters - keep <= max_matvecs))

      def cycle(carry):
        ritz, used, key = carry
        key, sub = jax.random.split(key)
        ritz = _recycled_cycle(mv, jax.tree.map(lambda x: x[:keep], ritz),
                               sub, num_iters, unroll)
        return ritz, used + num_iters - keep, key

      ritz, used, _ = _restarts(more, cycle, (ritz, used, keys[3]), eager)
    return jax.tree.map(lambda x: x[:k], ritz), used

  if tol is None or b < k:
    ritz, used = full(pairs, jnp.asarray(b, jnp.int32))
  else:
    size = min(num_iters, b + settled_directions(b))

    def settle(pairs):
      ritz, passed = _guarded(mv, pairs, keys[1], size, k, tol, unroll)
      return (jax.tree.map(lambda x: x[:b], ritz), passed,
              jnp.asarray(size, jnp.int32))

    def unsettled(pairs):
      return pairs, jnp.asarray(False), jnp.asarray(b, jnp.int32)

    # A settled block (its own pairs meet tol) gets the guarded step; if
    # the guard sees an eigenvalue above the block's, the full cycles run
    # from the top b pairs of that step (which hold its direction).
    if eager:
      start = (settle if bool(_converged(pairs, k, tol)) else unsettled)(
          pairs)
    else:
      # Under jax.vmap (seeds) each predicate is reduced over the seeds, so
      # that a cond stays a cond (a batched one runs both branches); the
      # branch taken then selects per seed, which is exact.
      due = _converged(pairs, k, tol)
      start = jax.lax.cond(
          batching.any_over_batch(due),
          lambda p: batching.where_tree(due, settle(p), unsettled(p)),
          unsettled, pairs)
    start_pairs, passed, spent = start

    def done(pairs, spent):
      return jax.tree.map(lambda x: x[:k], pairs), spent

    if eager:
      ritz, used = (done if bool(passed) else full)(start_pairs, spent)
    else:
      ritz, used = jax.lax.cond(
          batching.any_over_batch(~passed),
          lambda p, s: batching.where_tree(passed, done(p, s), full(p, s)),
          done, start_pairs, spent)
  converged = _converged(ritz, k, check)
  _warn_unconverged(tol, converged, ritz, k, check, used)
  return EigenResult(ritz.values, jax.vmap(unravel)(ritz.vectors),
                     ritz.residuals, used, converged)


# --------------------------------------------------------------------------
# The subspace solve (``criterion="subspace"``), the low-rank noises' own
# --------------------------------------------------------------------------

# Products a subspace solve adds between two checks of its stopping rule.
SUBSPACE_CHUNK = 4
# Random rows a subspace solve adds to its start block: a look outside the
# cached vectors, where an eigenvalue may have risen since they were found.
EXTRA_ROWS = 1


class _Subspace(NamedTuple):
  """The state of a subspace solve: ``m`` rows of an orthonormal basis
  ``Q`` (the first ``live`` in use), their images ``W = A Q``, and
  ``T = Q W^T`` and ``G = W W^T``, kept as rows are added so that the
  Ritz values and residual norms come from ``m x m`` matrices; the
  top-``k`` Ritz sum, its gain over the last chunk, the products spent
  and the key of the random rows."""

  basis: jax.Array
  images: jax.Array
  t: jax.Array
  g: jax.Array
  live: jax.Array
  ritz_sum: jax.Array
  scale: jax.Array
  gain: jax.Array
  used: jax.Array
  key: jax.Array
  fresh: jax.Array


def apply_rows(mv, rows: jax.Array) -> jax.Array:
  """``A x`` for each row ``x`` of ``rows``, inside one program: a
  ``jax.vmap``'d product on accelerators, a ``lax.map`` (one product at a
  time) on a CPU, where batching ran slower per vector on the library's
  LeNet (``benchmarks/block_products.py``)."""
  if jax.default_backend() != "cpu":
    return jax.vmap(mv)(rows)
  return jax.lax.map(mv, rows)


_jit_apply_rows = jax.jit(apply_rows)


def _live_ritz(state: _Subspace):
  """Ritz values (descending), vectors (columns, in basis coordinates)
  and squared residual norms ``||A u - theta u||^2 = y^T G y - theta^2``
  of the live rows; dead rows get values below the spectrum, so that they
  never enter the top ones."""
  m = state.t.shape[0]
  live = jnp.arange(m) < state.live
  both = live[:, None] & live[None, :]
  t = jnp.where(both, state.t, 0.0)
  below = 1.0 + 2.0 * m * jnp.max(jnp.abs(t))
  evals, evecs = jnp.linalg.eigh(t - jnp.diag(jnp.where(live, 0.0, below)))
  evals, evecs = evals[::-1], evecs[:, ::-1]
  g = jnp.where(both, state.g, 0.0)
  res2 = jnp.einsum("li,lm,mi->i", evecs, g, evecs) - evals ** 2
  return evals, evecs, jnp.where(live, jnp.maximum(res2, 0.0), 0.0)


def _top_sums(evals: jax.Array, live, k: int):
  """``sum_{j<=k} theta_j`` and ``sum_{j<=k} |theta_j|`` over live rows."""
  top = jnp.where(jnp.arange(k) < live, evals[:k], 0.0)
  return jnp.sum(top), jnp.sum(jnp.abs(top))


def _add_rows(mv, state: _Subspace, rows: jax.Array) -> _Subspace:
  """Orthogonalises ``rows`` against the basis and each other (CGS2; a row
  with nothing left becomes zero and adds nothing), applies the operator
  to them and appends them and their images at row ``live``."""
  c = rows.shape[0]
  at = state.live + jnp.arange(c)
  basis = state.basis
  for i in range(c):
    basis = basis.at[at[i]].set(_orthogonalise(basis, rows[i]), mode="drop")
  new = basis[jnp.minimum(at, basis.shape[0] - 1)]
  imgs = apply_rows(mv, new)
  images = state.images.at[at].set(imgs, mode="drop")
  cross_t = basis @ imgs.T         # column at[i] of T, every row
  cross_g = images @ imgs.T        # column at[i] of G
  t = state.t.at[:, at].set(cross_t, mode="drop")
  t = t.at[at, :].set(cross_t.T, mode="drop")
  g = state.g.at[:, at].set(cross_g, mode="drop")
  g = g.at[at, :].set(cross_g.T, mode="drop")
  return state._replace(basis=basis, images=images, t=t, g=g,
                        live=state.live + c, used=state.used + c)


def _restart(state: _Subspace, keep: int) -> _Subspace:
  """Keeps the top ``keep`` Ritz vectors and their images (no product)."""
  evals, evecs, _ = _live_ritz(state)
  y = evecs[:, :keep]
  m = state.t.shape[0]
  zeros = jnp.zeros((m, m), state.t.dtype)
  return state._replace(
      basis=jnp.zeros_like(state.basis).at[:keep].set(y.T @ state.basis),
      images=jnp.zeros_like(state.images).at[:keep].set(y.T @ state.images),
      t=zeros.at[:keep, :keep].set(jnp.diag(evals[:keep])),
      g=zeros.at[:keep, :keep].set(y.T @ state.g @ y),
      live=jnp.asarray(keep, state.live.dtype),
      fresh=jnp.maximum(state.fresh, 1))


def _subspace_chunk(mv, state: _Subspace, k: int, chunk: int,
                    keep: int) -> _Subspace:
  """One step of a subspace solve: ``chunk`` new rows and their products.

  While ``fresh`` chunks remain (after the start block: one for random
  rows, ``ceil(k / chunk)`` for a warm start, so that every cached
  direction can be corrected; one after a restart), the residuals
  ``A u_j - theta_j u_j`` of the ``chunk`` top-``k`` Ritz vectors with
  the largest residual norms (each corrects its Ritz vector to first
  order); then the images of the rows added last (block Lanczos with a
  block of ``chunk``: from random rows, residuals alone captured less
  for the same products, ``benchmarks/README.md``). Both are
  orthogonalised against the basis. A restart comes first when the basis
  is full. Returns the state with the new top-``k`` Ritz sum and its
  gain."""
  m = state.t.shape[0]
  state = jax.lax.cond(state.live + chunk > m, lambda s: _restart(s, keep),
                       lambda s: s, state)
  evals, evecs, res2 = _live_ritz(state)
  # Among the top max(k, chunk): with k < chunk the next Ritz vectors'
  # residuals fill the chunk.
  order = jnp.argsort(-res2[:max(k, chunk)], stable=True)[:chunk]
  y = evecs[:, order]
  resid = y.T @ state.images - evals[order][:, None] * (y.T @ state.basis)
  last = state.images[jnp.maximum(state.live - chunk, 0) + jnp.arange(chunk)]
  rows = jnp.where(state.fresh > 0, resid, last)
  # A row at rounding level (an invariant subspace) is replaced by a
  # random direction, so that the basis still grows.
  key, sub = jax.random.split(state.key)
  rand = jax.random.normal(sub, rows.shape, rows.dtype)
  floor = 32 * jnp.finfo(rows.dtype).eps * jnp.max(jnp.abs(evals[:k]))
  small = jnp.linalg.norm(rows, axis=1) <= floor
  rows = jnp.where(small[:, None], rand, rows)
  state = _add_rows(mv, state._replace(key=key), rows)
  new_sum, scale = _top_sums(_live_ritz(state)[0], state.live, k)
  return state._replace(ritz_sum=new_sum, scale=scale,
                        gain=new_sum - state.ritz_sum,
                        fresh=jnp.maximum(state.fresh - 1, 0))


_jit_subspace_chunk = jax.jit(_subspace_chunk, static_argnums=(2, 3, 4))


def _subspace_done(state: _Subspace, k: int, tol) -> jax.Array:
  """The stopping rule: at least ``k`` rows, and the top-``k`` Ritz sum
  gained at most ``tol * 4 / k`` of ``sum_{j<=k} |theta_j|`` over the
  last chunk of 4 products (``tol`` is the whole top-k's gain at that
  rate). Reads the state only: an ``eigh`` in the ``while_loop``'s
  condition hung XLA:CPU (jax 0.10.2) under ``jax.vmap`` over 8,000
  seeds."""
  chunk = min(SUBSPACE_CHUNK, k)
  return (state.live >= k) & (state.gain <= tol * state.scale * chunk / k)


def _subspace_eigenpairs(mv, unravel, dtype, dim: int, k: int,
                         key: jax.Array, num_iters: int, tol,
                         max_matvecs: int, init_subspace) -> EigenResult:
  """:func:`top_eigenpairs` with ``criterion="subspace"``: Rayleigh-Ritz on
  the start block (``init_subspace``'s ``b`` rows, zero rows random, and
  :data:`EXTRA_ROWS` random rows; 1 to 4 random rows without one, so
  that whole chunks fill the basis), then chunks of
  :data:`SUBSPACE_CHUNK` residual directions
  (:func:`_subspace_chunk`) in a basis of ``num_iters`` rows, restarted on
  its top ``k + (num_iters - k) // 2`` Ritz vectors when full, until
  :func:`_subspace_done` holds or ``max_matvecs`` is spent."""
  k_rows, k_loop = jax.random.split(key)
  if init_subspace is None:
    # 1 to 4 random rows, so that whole chunks fill the basis exactly.
    c = SUBSPACE_CHUNK
    block = jnp.zeros((num_iters - c * ((num_iters - 1) // c), dim), dtype)
  else:
    block = jax.vmap(lambda t: ravel_pytree(t)[0])(init_subspace).astype(
        dtype)
    block = jnp.concatenate([block, jnp.zeros((EXTRA_ROWS, dim), dtype)])
  s = max(1, min(block.shape[0], num_iters))
  start = _orthonormal_rows(block[:s], k_rows)
  eager = _eager_operator(mv, start)
  if eager:
    _hold_one_operator(mv)
    images = _jit_apply_rows(mv, start)
  else:
    images = apply_rows(mv, start)
  m = num_iters
  chunk = min(SUBSPACE_CHUNK, m - s)
  chunk_of = max(1, chunk)
  t = jnp.zeros((m, m), dtype).at[:s, :s].set(start @ images.T)
  g = jnp.zeros((m, m), dtype).at[:s, :s].set(images @ images.T)
  state = _Subspace(
      basis=jnp.zeros((m, dim), dtype).at[:s].set(start),
      images=jnp.zeros((m, dim), dtype).at[:s].set(images),
      t=0.5 * (t + t.T), g=g, live=jnp.asarray(s, jnp.int32),
      ritz_sum=jnp.zeros([], dtype), scale=jnp.zeros([], dtype),
      gain=jnp.asarray(jnp.inf, dtype),
      used=jnp.asarray(s, jnp.int32), key=k_loop,
      fresh=jnp.asarray(1 if init_subspace is None else -(-k // chunk_of),
                        jnp.int32))
  ritz_sum, scale = _top_sums(_live_ritz(state)[0], s, k)
  state = state._replace(ritz_sum=ritz_sum, scale=scale)
  check = 1e-3 if tol is None else tol
  if chunk > 0 and s < dim:
    keep = min(m - chunk, k + (m - k) // 2)

    def more(state):
      # A basis that spans the whole space holds the exact eigenpairs.
      if tol is None:  # fill the basis once
        return (state.live + chunk <= m) & (state.live < dim)
      return (~_subspace_done(state, k, tol)) & (
          state.used + chunk <= max_matvecs) & (state.live < dim)

    if eager:
      while bool(more(state)):
        state = _jit_subspace_chunk(mv, state, k, chunk, keep)
    else:
      state = jax.lax.while_loop(
          more, lambda st: _subspace_chunk(mv, st, k, chunk, keep), state)
  evals, evecs, res2 = _live_ritz(state)
  converged = (state.live >= dim) | _subspace_done(state, k, check)
  if tol is not None and _is_concrete(converged) and not bool(converged):
    warnings.warn(
        f"top_eigenpairs: the top-{k} Ritz sum still gained"
        f" {float(state.gain):.2e} over the last {chunk} products after"
        f" {int(state.used)} (tol {check:g} of the sum). Raise max_matvecs"
        " or loosen tol.", RuntimeWarning, stacklevel=3)
  vecs = _fix_signs(evecs[:, :k].T @ state.basis)
  return EigenResult(evals[:k], jax.vmap(unravel)(vecs),
                     jnp.sqrt(res2[:k]), state.used, converged)


def _fix_signs(vecs: jax.Array) -> jax.Array:
  """Each row's sign fixed by its inner product with a fixed irregular
  vector (``cos(0.7071 i)``), positive: the same eigenvector whatever
  rounding (eager or jitted, one device or a mesh) chose its sign, so that
  the noise's draws along it are the same."""
  probe = jnp.cos(0.7071 * jnp.arange(vecs.shape[1], dtype=vecs.dtype))
  return vecs * jnp.where(vecs @ probe < 0, -1.0, 1.0)[:, None]
