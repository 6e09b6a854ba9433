"""The noise structures of Table 1 (Zhu et al., 2019) as optax transforms.

Each factory returns an ``optax.GradientTransformationExtraArgs`` that adds
``eps_t ~ N(0, Sigma_t)`` to the incoming updates (the mean gradient), so that
a later member of the chain applies the learning rate (paper Eq. 7)::

  theta_{t+1} = theta_t - lr (grad L(theta_t) + eps_t)

  tx = optax.chain(anisonoise.hessian_noise(k=20), optax.sgd(0.07))
  updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                             batch=batch)

Magnitude (paper Eq. 14): every structured noise is scaled to a target trace
``T = Tr(Sigma_t)``: ``T = Tr(C) / m`` with ``m = batch_size`` (the trace of
the noise of SGD with minibatch size ``m``), or ``T = trace`` when a fixed
trace is given, or ``m = n`` (the size of the batch passed) when neither is.

Estimation: ``Tr(C)`` and ``diag(C)`` are estimated at each refresh
without per-example gradients by default (``trace_estimator``): random
probes, one forward- or backward-mode pass each, whose estimates are
unbiased. The noise covariance is linear in them, so the noise drawn has,
averaged over the probes, exactly the target covariance; each refresh's
spread is documented per factory, and ``trace_estimator="exact"`` gives the
per-example computation (the paper's). Which is cheaper depends on the
model and the backend: on this project's 2-core CPU the exact pass cost
90-140 gradient evaluations on an MLP 784-64-10 (8 probes: about 4) but
about 1.2 on the paper's LeNet (8 probes: about 3.5), whose per-example
gradients are small (``benchmarks/README.md``).

Caching: the covariance factor (trace, diagonal or eigenpairs) is
re-estimated when ``count % refresh_every == 0`` and kept in the state in
between; the Gaussian draw is fresh every step.

Keys: each transform built with ``key=None`` (the default) draws from a
stream of its own, ``fold_in(key(0), j)`` for the ``j``-th such transform
built in the process: ``optax.chain(isotropic_noise(0.1),
isotropic_noise(0.1))`` adds two independent noises, and different noises
never share their Gaussian coefficients, while a script that builds its
transforms in the same order draws the same numbers on every run. Pass
``key=`` (an int seed, a NumPy or JAX integer, traced ones under
``jax.vmap`` over seeds included, a typed key or a raw ``uint32[2]`` key)
to fix a stream whatever else the program builds. The state's
``rng_key`` holds the raw key data (``jax.random.key_data``) so that a
state is plain arrays for ``flax.serialization`` and orbax.

Layouts: the same key gives the same noise on one device, on a device
mesh and across processes (``jax.distributed``), to the rounding of the
reordered sums. The low-rank noises draw ``xi ~ N(0, I_D)`` in the full
space and add ``U diag(sqrt(s w)) U^T xi`` (covariance ``s U diag(w)
U^T``): the draw does not depend on the signs the solve gave the cached
eigenvectors, nor on how it turned them inside a cluster of equal
eigenvalues. It does depend on the top-k *space*, which rounding can move
only where ``lambda_k`` is close to ``lambda_{k+1}`` (compare
``state.eigenvalues[-1]`` with the ``k+1``-th eigenvalue of
:func:`anisonoise.hessian_spectrum`), or where a refresh's stopping rule
(``tol``) sits at its threshold on one layout and not on another.

Seeds under ``jax.vmap``: mapping a jitted step over the states of several
seeds keeps the refresh a ``lax.cond`` (its predicate is reduced over the
seeds, and seeds not due keep their factor), so S seeds cost about S
times one seed on refresh and non-refresh steps alike
(``benchmarks/README.md``).

Non-finite values: if a re-estimated factor (or its target trace) contains a
NaN or an infinity, it is discarded, the previous factor is kept and
``state.num_rejected`` is incremented; the noise is then drawn from the
previous factor (zero noise if there was none yet). Non-finite incoming
updates are passed on unchanged in kind (``nan + eps`` is ``nan``): the
transform never hides a broken gradient.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from anisonoise._src import batching
from anisonoise._src import covariance
from anisonoise._src import curvature
from anisonoise._src.refresh import (
    DiagonalFactor,
    DiagonalNoiseState,
    DynamicIsotropicNoiseState,
    IsotropicNoiseState,
    KeyLike,
    Magnitude,
    SgdNoiseState,
    Solver,
    TraceEstimation,
    TraceFactor,
    add_noise,
    check_step_data,
    dtype_of,
    key_data,
    low_rank_transform,
    normal_like,
    refreshing_transform,
    scale_to,
    state_key,
    transform_key,
)

# --------------------------------------------------------------------------
# GLD constant
# --------------------------------------------------------------------------


def isotropic_noise(
    std: chex.Numeric, *, key: KeyLike | None = None
) -> optax.GradientTransformationExtraArgs:
  """GLD constant: adds ``eps ~ N(0, std^2 I)`` to the updates (paper Eq. 3).

  .. math::
    \\theta_{t+1} = \\theta_t - \\eta (\\nabla L(\\theta_t) + \\epsilon_t),
    \\quad \\epsilon_t \\sim N(0, \\varrho^2 I)

  Unlike ``optax.add_noise`` the standard deviation is constant in time (no
  annealing), as in Table 1's "GLD constant".

  Args:
    std: the standard deviation ``varrho`` (>= 0; may be a traced scalar).
    key: seed of the draws: an int (Python, NumPy or JAX integer,
      traced ones too, e.g. ``jax.vmap`` over seeds), a typed PRNG key or a
      raw ``uint32[2]`` key, which reproduce exactly; ``None`` (default): a
      stream of its own, never shared with another transform (see the
      module docstring, "Keys").

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs neither
    ``loss_fn`` nor ``batch`` (extra arguments are ignored).

  Example:
    >>> import jax.numpy as jnp, optax, anisonoise
    >>> tx = optax.chain(anisonoise.isotropic_noise(1e-3), optax.sgd(0.07))
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> updates['w'].shape
    (3,)

  References:
    Zhu et al., `The Anisotropic Noise in Stochastic Gradient Descent
    <https://arxiv.org/abs/1803.00195>`_, ICML 2019 (Table 1).
  """
  if not isinstance(std, jax.core.Tracer):
    if jnp.ndim(std) != 0 or not float(std) >= 0:
      raise ValueError(
          f"std must be a non-negative scalar standard deviation, got {std!r}."
      )
  key0 = transform_key(key)

  def init_fn(params):
    del params
    return IsotropicNoiseState(jnp.zeros([], jnp.int32), key_data(key0))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    new_key, noise_key = jax.random.split(state_key(state.rng_key))
    eps = jax.tree.map(lambda z: std * z, normal_like(noise_key, updates))
    return add_noise(updates, eps), IsotropicNoiseState(
        optax.safe_increment(state.count), key_data(new_key)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# GLD dynamic
# --------------------------------------------------------------------------


def dynamic_isotropic_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    refresh_every: int = 1,
    key: KeyLike | None = None,
    trace_estimator: str = "hutchinson",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD dynamic: isotropic noise with the trace of SGD's noise.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\tfrac{T_t}{D} I\\big), \\quad
    T_t = \\mathrm{Tr}(\\Sigma^{sgd}_t) = \\mathrm{Tr}(C_t)/m

  (Table 1, magnitude matched by Eq. 14.) ``Tr(C_t)`` is estimated by
  default with ``num_probes`` forward-mode Rademacher probes (about 0.6 of
  a gradient evaluation each): unbiased, relative standard deviation about
  ``sqrt(2 / (r num_probes))`` for a covariance of effective rank
  ``r = Tr(C)^2 / ||C||_F^2`` (see :func:`anisonoise.covariance_trace`;
  0.09-0.14 with 8 probes on an MLP from initialisation to a global
  minimum). The noise covariance is linear in the estimate, so averaged
  over the probes it is exactly ``T_t / D I``.

  Args:
    batch_size: SGD minibatch size ``m`` whose noise trace is matched;
      default ``n``, the size of the batch passed to ``update``.
    trace: a fixed target trace instead (then ``loss_fn``/``batch`` are not
      needed). Not together with ``batch_size``.
    replacement: the SGD whose noise trace is matched draws its
      minibatches with replacement (``True``: ``Tr(C)/m``, paper Eq. 5) or
      without (``False``: ``(n-m)/(n-1) Tr(C)/m``).
    refresh_every: re-estimate ``Tr(C)`` every this many steps.
    key: seed of the draws: an int (Python, NumPy or JAX integer,
      traced ones too, e.g. ``jax.vmap`` over seeds), a typed PRNG key or a
      raw ``uint32[2]`` key, which reproduce exactly; ``None`` (default): a
      stream of its own, never shared with another transform (see the
      module docstring, "Keys").
    trace_estimator: ``"hutchinson"`` (forward-mode probes) or ``"exact"``
      (per-example gradients, 90-140 gradient evaluations on an MLP of
      50,000 parameters).
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass over the batch.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` (``(params, batch) -> (n,)``) and ``batch`` unless
    ``trace`` is given. The state's ``trace`` is the target in use.

  Example:
    >>> import jax.numpy as jnp, optax, anisonoise
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p['w'] - b['y']) ** 2
    >>> batch = {'x': jnp.eye(4), 'y': jnp.arange(4.)}
    >>> params = {'w': jnp.zeros(4)}
    >>> tx = optax.chain(anisonoise.dynamic_isotropic_noise(
    ...     batch_size=2, trace_estimator='exact'), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params, loss_fn=loss_fn,
    ...                      batch=batch)
    >>> round(float(state[0].trace), 4)  # Tr(C)/2 = (3/16)(0+1+4+9)/2
    1.3125

  References:
    Zhu et al., ICML 2019, Table 1 and Eq. 14.
  """
  magnitude = Magnitude(batch_size, trace, replacement)
  estimation = TraceEstimation(trace_estimator, num_probes, chunk_size)

  def init_factor(params):
    return TraceFactor(jnp.zeros([], dtype_of(params)))

  def estimate(params, loss_fn, batch, key, old):
    del old
    dtype = dtype_of(params)
    if magnitude.fixed:
      return TraceFactor(jnp.asarray(trace, dtype))
    tr_c = estimation.trace(loss_fn, params, batch, key)
    return TraceFactor(magnitude.target(tr_c, batching.num_examples(batch))
                       .astype(dtype))

  def draw(factor, key, params):
    std = jnp.sqrt(factor.trace / batching.num_params(params))
    return jax.tree.map(lambda z: std * z, normal_like(key, params))

  return refreshing_transform(
      "dynamic_isotropic_noise", init_factor, estimate, draw,
      DynamicIsotropicNoiseState, refresh_every, key,
      needs_loss=not magnitude.fixed,
  )


# --------------------------------------------------------------------------
# GLD diagonal
# --------------------------------------------------------------------------


def diagonal_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    refresh_every: int = 1,
    key: KeyLike | None = None,
    trace_estimator: str = "hutchinson",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD diagonal: noise with the diagonal of SGD's covariance.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\sigma_t\\, \\mathrm{diag}(C_t)\\big), \\quad
    \\sigma_t = T_t / \\mathrm{Tr}(C_t)

  With ``batch_size=m`` this is ``diag(Sigma_sgd) = diag(C)/m`` (Table 1);
  with ``trace=T`` the diagonal is rescaled to trace ``T``. By default
  ``diag(C)`` is estimated from ``num_probes`` backward passes with
  Rademacher weights on the examples (:func:`anisonoise.covariance_diagonal`,
  ``method="hutchinson"``): unbiased, each entry's relative standard
  deviation at most ``sqrt(2 / num_probes)``. With ``batch_size`` the noise
  covariance is linear in the estimate, so averaged over the probes it is
  exactly ``diag(C)/m``; ``trace_estimator="exact"`` forms the per-example
  gradients in chunks instead.

  Args:
    batch_size: SGD minibatch size ``m`` (default ``n``).
    trace: fixed target trace instead of ``batch_size``.
    replacement: the SGD whose noise trace is matched draws its
      minibatches with replacement (``True``: ``Tr(C)/m``, paper Eq. 5) or
      without (``False``: ``(n-m)/(n-1) Tr(C)/m``).
    refresh_every: re-estimate ``diag(C)`` every this many steps.
    key: seed of the draws: an int (Python, NumPy or JAX integer,
      traced ones too, e.g. ``jax.vmap`` over seeds), a typed PRNG key or a
      raw ``uint32[2]`` key, which reproduce exactly; ``None`` (default): a
      stream of its own, never shared with another transform (see the
      module docstring, "Keys").
    trace_estimator: how ``diag(C)`` (and so its trace) is obtained:
      ``"hutchinson"`` (backward-mode probes) or ``"exact"``.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass over the batch.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` and ``batch``.

  Example:
    >>> import jax.numpy as jnp, optax, anisonoise
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': jnp.eye(4), 'y': jnp.arange(4.)}
    >>> tx = anisonoise.diagonal_noise(trace=1.0)
    >>> state = tx.init(jnp.zeros(4))
    >>> u, state = tx.update(jnp.zeros(4), state, jnp.zeros(4),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> float(state.trace)
    1.0

  References:
    Zhu et al., ICML 2019, Table 1.
  """
  magnitude = Magnitude(batch_size, trace, replacement)
  estimation = TraceEstimation(trace_estimator, num_probes, chunk_size)

  def init_factor(params):
    return DiagonalFactor(jnp.zeros([], dtype_of(params)),
                          jax.tree.map(jnp.zeros_like, params))

  def estimate(params, loss_fn, batch, key, old):
    del old
    diag = estimation.diagonal(loss_fn, params, batch, key)
    tr_c = optax.tree_utils.tree_sum(diag)
    target = magnitude.target(tr_c, batching.num_examples(batch))
    return DiagonalFactor(target.astype(jnp.result_type(tr_c)), diag)

  def draw(factor, key, params):
    scale = scale_to(factor.trace, optax.tree_utils.tree_sum(factor.diagonal))
    return jax.tree.map(
        lambda d, z: jnp.sqrt(scale * d) * z,
        factor.diagonal,
        normal_like(key, params),
    )

  return refreshing_transform(
      "diagonal_noise", init_factor, estimate, draw, DiagonalNoiseState,
      refresh_every, key,
  )


# --------------------------------------------------------------------------
# Low rank: GLD leading, GLD Hessian, GLD 1st eigvec(H)
# --------------------------------------------------------------------------


def _low_rank(who: str, k: int, operator: Callable, weights: Callable,
              of_covariance: bool, batch_size, trace, replacement,
              refresh_every, key,
              num_iters, tol, max_matvecs, trace_estimator, num_probes,
              chunk_size) -> optax.GradientTransformationExtraArgs:
  """The public low-rank factories' arguments, checked and typed."""
  return low_rank_transform(
      who, operator, weights, Solver(k, num_iters, tol, max_matvecs),
      Magnitude(batch_size, trace, replacement),
      TraceEstimation(trace_estimator, num_probes, chunk_size,
                       allowed=("deflated", "hutchinson", "exact")),
      refresh_every, key, of_covariance)


def _clip(eigenvalues):
  return jnp.maximum(eigenvalues, 0)


def _first_only(eigenvalues):
  # No positive curvature, no noise: as hessian_noise's clipped weights.
  return jnp.zeros_like(eigenvalues).at[0].set(
      (eigenvalues[0] > 0).astype(eigenvalues.dtype))


def _covariance_op(loss_fn, params, batch, chunk_size):
  return covariance.covariance_operator(loss_fn, params, batch,
                                        chunk_size=chunk_size)


def _hessian_op(loss_fn, params, batch, chunk_size):
  return curvature.hessian_operator(loss_fn, params, batch,
                                    chunk_size=chunk_size)


_LOW_RANK_ARGS_DOC = """
  Args:
    {k}batch_size: SGD minibatch size ``m`` whose noise trace ``Tr(C)/m`` is
      matched (default ``n``, the size of the batch passed to ``update``).
    trace: fixed target trace ``E||eps||^2`` instead of ``batch_size``.
    replacement: the SGD whose noise trace is matched draws its
      minibatches with replacement (``True``: ``Tr(C)/m``, paper Eq. 5) or
      without (``False``: ``(n-m)/(n-1) Tr(C)/m``).
    refresh_every: re-estimate the eigenpairs (and the trace) every this many
      steps; noise is drawn every step from the cached factor. Default 10,
      the paper's period (Section 5.3); 1 re-solves at every step.
    num_iters: rows of the solve's basis (default ``max(2k, k + 10)``, at
      most ``D``): its memory, ``2 num_iters D`` floats (rows and their
      images).
    tol: when a refresh stops: once the curvature its vectors capture,
      ``sum_j u_j^T M u_j`` (``M`` the operator, ``H`` or ``C``), gains at
      most ``tol * 4 / k`` of itself over the last 4 products
      (``top_eigenpairs(criterion="subspace")``). It bounds a stall, not
      the distance to the top-k space; what the default captures along
      training runs, and what each ``tol`` costs, is on the benchmarks
      page. The noise needs the top-k *space* and its curvature, not each
      eigenvector: a solve is not slowed by eigenvalues clustered inside
      the top k. The first refresh starts from 1 to 4 random rows;
      later ones from the cached eigenvectors plus one random row
      (``k + 1`` products), then add the residuals of the cached
      directions and Krylov directions 4 products at a time.
      ``None``: one basis' worth of products (``num_iters``), no check.
    max_matvecs: most products a refresh may run (default
      ``5 num_iters``, 200 for k = 20); ``state.num_matvecs`` holds what
      the last refresh ran, ``state.converged`` whether it stopped by
      ``tol`` rather than by this budget, and ``state.num_unconverged``
      how many refreshes hit the budget (their vectors are used all the
      same).
    trace_estimator: how ``Tr(C)`` is estimated at a refresh (every one
      is unbiased, and the noise covariance is linear in it):
      ``"deflated"`` (GLD leading's default): the part in the span of the
      refresh's eigenvectors exactly (free for ``C``'s own eigenpairs, their
      Ritz values; ``k`` more forward-mode products for the Hessian's) plus
      ``num_probes`` Rademacher probes projected off them (Hutch++'s
      variance reduction, :func:`anisonoise.covariance_trace` with
      ``deflate``); ``"hutchinson"`` (the Hessian noises' default):
      ``num_probes`` plain forward-mode probes; ``"exact"``: per-example
      gradients. The spread of each estimator is measured on the
      benchmarks page.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass over the batch (the
      trace and every product of the eigen-solve); ``None``: all at once.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` (``(params, batch) -> (n,)``) and ``batch``. The
    state (:class:`LowRankNoiseState`) holds the eigenvalues, eigenvectors
    (float32 at least, whatever the parameters' dtype; the noise is
    returned in each parameter's dtype), residual norms, the trace in use,
    the last refresh's ``converged`` flag and ``num_unconverged``.
"""


def leading_noise(
    k: int,
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    refresh_every: int = 10,
    key: KeyLike | None = None,
    num_iters: int | None = None,
    tol: float | None = 3e-3,
    max_matvecs: int | None = None,
    trace_estimator: str = "deflated",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD leading: the top-k eigenpairs of SGD's covariance, rescaled.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\sigma_t \\textstyle\\sum_{j=1}^k
    \\gamma_j v_j v_j^\\top\\big), \\quad
    \\sigma_t = T_t / \\textstyle\\sum_j \\gamma_j

  with ``(gamma_j, v_j)`` the leading eigenpairs of ``C`` (Table 1), found by
  Lanczos on the matrix-free product ``C v`` (one ``jvp`` + one ``vjp``).
  """ + _LOW_RANK_ARGS_DOC.format(
      k="k: number of leading eigenpairs, 1 <= k <= D.\n    "
  ) + """
  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (32, 6))
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> tx = optax.chain(anisonoise.leading_noise(2, batch_size=4),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(6))
    >>> u, state = tx.update(jnp.zeros(6), state, jnp.zeros(6),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> state[0].eigenvalues.shape
    (2,)

  References:
    Zhu et al., ICML 2019, Table 1.
  """
  return _low_rank("leading_noise", k, _covariance_op, _clip, True,
                   batch_size, trace, replacement, refresh_every, key,
                   num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


def hessian_noise(
    k: int,
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    refresh_every: int = 10,
    key: KeyLike | None = None,
    num_iters: int | None = None,
    tol: float | None = 3e-3,
    max_matvecs: int | None = None,
    trace_estimator: str = "hutchinson",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD Hessian: the top-k eigenpairs of the Hessian, rescaled.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\sigma_t \\textstyle\\sum_{j=1}^k
    \\lambda_j^+ u_j u_j^\\top\\big), \\quad
    \\sigma_t = T_t / \\textstyle\\sum_j \\lambda_j^+

  with ``(lambda_j, u_j)`` the largest algebraic eigenpairs of ``H`` and
  ``lambda^+ = max(lambda, 0)`` (negative curvature gets no noise). If every
  ``lambda_j <= 0`` the noise is zero. Lanczos on Hessian-vector products
  from one linearisation of the gradient.
  """ + _LOW_RANK_ARGS_DOC.format(
      k="k: number of Hessian eigenpairs, 1 <= k <= D.\n    "
  ) + """
  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (32, 6))
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> tx = optax.chain(anisonoise.hessian_noise(k=2, trace=0.01),
    ...                  optax.sgd(0.07))
    >>> state = tx.init(jnp.zeros(6))
    >>> u, state = tx.update(jnp.zeros(6), state, jnp.zeros(6),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> bool(state[0].eigenvalues[0] >= state[0].eigenvalues[1])
    True

  References:
    Zhu et al., ICML 2019, Table 1 and Section 5.3 (k = 20, refreshed every
    10 steps).
  """
  return _low_rank("hessian_noise", k, _hessian_op, _clip, False,
                   batch_size, trace, replacement, refresh_every, key,
                   num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


def hessian_eigvec_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    refresh_every: int = 10,
    key: KeyLike | None = None,
    num_iters: int | None = None,
    tol: float | None = 3e-3,
    max_matvecs: int | None = None,
    trace_estimator: str = "hutchinson",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD 1st eigvec(H): all the noise along the top Hessian eigenvector.

  .. math::
    \\epsilon_t \\sim N\\big(0, T_t\\, u_1 u_1^\\top\\big)

  ``u_1`` is the eigenvector of the largest algebraic eigenvalue of ``H``;
  ``Sigma* = Tr(Sigma) u_1 u_1^T`` maximises the escape indicator
  ``Tr(H Sigma)`` under the trace constraint (Section 3.2). If
  ``lambda_1 <= 0`` (no positive curvature) the noise is zero, as that of
  :func:`hessian_noise` when every ``lambda_j <= 0``.
  """ + _LOW_RANK_ARGS_DOC.format(k="") + """
  Example:
    >>> import jax, jax.numpy as jnp, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (32, 6))
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> tx = anisonoise.hessian_eigvec_noise(trace=0.01)
    >>> state = tx.init(jnp.zeros(6))
    >>> u, state = tx.update(jnp.zeros(6), state, jnp.zeros(6),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> state.eigenvectors.shape
    (1, 6)

  References:
    Zhu et al., ICML 2019, Table 1 and Section 3.2.
  """
  return _low_rank("hessian_eigvec_noise", 1, _hessian_op, _first_only, False,
                   batch_size, trace, replacement, refresh_every, key,
                   num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


# --------------------------------------------------------------------------
# GD + exact SGD noise
# --------------------------------------------------------------------------


def sgd_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    key: KeyLike | None = None,
    trace_estimator: str = "hutchinson",
    num_probes: int = 8,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GD + exact SGD noise: ``eps ~ N(0, C/m)`` drawn without forming ``C``.

  .. math::
    \\epsilon_t = \\sqrt{\\tfrac{s}{n}}\\, G_t^\\top (z - \\bar z\\mathbf 1),
    \\quad z \\sim N(0, I_n), \\quad \\mathrm{Cov}(\\epsilon_t) =
    \\Sigma^{sgd}_t = s\\, C_t

  with ``s = 1/m`` for minibatches of ``m`` drawn with replacement (paper
  Eqs. 5-6) and ``s = (n - m) / ((n - 1) m)`` without (``replacement=False``;
  7.7% smaller at ``n = 40``, ``m = 4``; zero at ``m = n``): the Gaussian
  limit of the minibatch noise, at one extra backward pass per step. With
  ``trace=T`` the same structure is rescaled to ``Cov = T C / Tr(C)`` (the
  full-covariance member of Table 1 at a fixed magnitude, as in the paper's
  2D example). ``Tr(C)`` is then estimated every step, by default with
  ``num_probes`` forward-mode probes (no per-example gradient, no ``n x D``
  memory; relative standard deviation about ``sqrt(2 / (r num_probes))``
  for a covariance of effective rank ``r``, see
  :func:`anisonoise.covariance_trace`). The scale ``T / Tr(C)`` is a ratio,
  so its average over the probes exceeds the exact one by about the
  estimate's squared relative standard deviation (1% at 0.1);
  ``trace_estimator="exact"`` forms the per-example gradients instead
  (``n x D`` floats at once unless ``chunk_size`` bounds them).

  It is the Gaussian, centred member of the multiplicative-noise family
  (:func:`anisonoise.multiplicative_noise`, which gives the same draw for
  the same key).

  Args:
    batch_size: the minibatch size ``m`` (default ``n``).
    trace: a fixed target trace instead of ``batch_size``.
    replacement: minibatches drawn with replacement (``True``, the paper's
      ``C/m``) or without (``False``, ``(n-m)/(n-1) C/m``).
    key: seed of the draws: an int (Python, NumPy or JAX integer,
      traced ones too, e.g. ``jax.vmap`` over seeds), a typed PRNG key or a
      raw ``uint32[2]`` key, which reproduce exactly; ``None`` (default): a
      stream of its own, never shared with another transform (see the
      module docstring, "Keys").
    trace_estimator: how ``Tr(C)`` is obtained with ``trace``:
      ``"hutchinson"`` (forward-mode probes) or ``"exact"``.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for the draw (a backward pass chunk by
      chunk, the same number) and ``Tr(C)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` and ``batch``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (32, 6))
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> tx = optax.chain(anisonoise.sgd_noise(batch_size=20), optax.sgd(0.07))
    >>> state = tx.init(jnp.zeros(6))
    >>> u, state = tx.update(jnp.zeros(6), state, jnp.zeros(6),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> u.shape
    (6,)

  References:
    Zhu et al., ICML 2019, Eqs. 5-7.
  """
  magnitude = Magnitude(batch_size, trace, replacement)
  estimation = TraceEstimation(trace_estimator, num_probes, chunk_size)
  key0 = transform_key(key)

  def init_fn(params):
    batching.check_params(params, "sgd_noise")
    return SgdNoiseState(jnp.zeros([], jnp.int32), key_data(key0))

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, "sgd_noise")
    check_step_data(loss_fn, params, batch, "sgd_noise")
    new_key, noise_key, trace_key = jax.random.split(
        state_key(state.rng_key), 3)
    if trace is None:
      eps = covariance.sample_sgd_noise(
          loss_fn, params, batch, noise_key, batch_size=magnitude.batch_size,
          replacement=replacement, chunk_size=chunk_size,
      )
    else:
      eps = covariance.sample_sgd_noise(loss_fn, params, batch, noise_key,
                                        batch_size=1,
                                        chunk_size=chunk_size)  # N(0, C)
      tr_c = estimation.trace(loss_fn, params, batch, trace_key)
      scale = scale_to(jnp.asarray(trace, tr_c.dtype), tr_c)
      eps = jax.tree.map(lambda e: jnp.sqrt(scale).astype(e.dtype) * e, eps)
    return add_noise(updates, eps), SgdNoiseState(
        optax.safe_increment(state.count), key_data(new_key)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
