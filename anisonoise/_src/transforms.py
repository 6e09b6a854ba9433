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

Caching: the covariance factor (trace, diagonal or eigenpairs) is
re-estimated when ``count % refresh_every == 0`` and kept in the state in
between; the Gaussian draw is fresh every step.

Non-finite values: if a re-estimated factor (or its target trace) contains a
NaN or an infinity, it is discarded, the previous factor is kept and
``state.num_rejected`` is incremented; the noise is then drawn from the
previous factor (zero noise if there was none yet). Non-finite incoming
updates are passed on unchanged in kind (``nan + eps`` is ``nan``): the
transform never hides a broken gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from anisonoise._src import batching
from anisonoise._src import covariance
from anisonoise._src import curvature

Params = Any
KeyLike = int | jax.Array


# --------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------


class IsotropicNoiseState(NamedTuple):
  """State of :func:`isotropic_noise`."""

  count: chex.Array  # int32, number of updates so far
  rng_key: chex.PRNGKey


class DynamicIsotropicNoiseState(NamedTuple):
  """State of :func:`dynamic_isotropic_noise`.

  ``trace`` is the target ``Tr(Sigma_t)`` in use; ``num_rejected`` counts
  refreshes discarded for non-finite values.
  """

  count: chex.Array
  rng_key: chex.PRNGKey
  trace: chex.Array
  num_rejected: chex.Array


class DiagonalNoiseState(NamedTuple):
  """State of :func:`diagonal_noise`.

  ``diagonal`` is ``diag(C)`` (a pytree like params) at the last refresh; the
  noise covariance is ``trace / sum(diagonal) * diag(diagonal)``.
  """

  count: chex.Array
  rng_key: chex.PRNGKey
  trace: chex.Array
  diagonal: Params
  num_rejected: chex.Array


class LowRankNoiseState(NamedTuple):
  """State of :func:`leading_noise`, :func:`hessian_noise` and
  :func:`hessian_eigvec_noise`.

  ``eigenvalues`` (``(k,)``, descending) and ``eigenvectors`` (params-like
  leaves with a leading ``k`` axis) are the eigenpairs of ``C`` (leading) or
  ``H`` (Hessian) at the last refresh; ``residual_norms`` their Lanczos
  residuals. The noise covariance is
  ``trace * sum_j c_j v_j v_j^T / sum_j c_j`` with ``c_j = max(lambda_j, 0)``
  (and ``c = (1, 0, ...)`` for the 1st-eigenvector noise).
  """

  count: chex.Array
  rng_key: chex.PRNGKey
  trace: chex.Array
  eigenvalues: chex.Array
  eigenvectors: Params
  residual_norms: chex.Array
  num_rejected: chex.Array


LeadingNoiseState = LowRankNoiseState
HessianNoiseState = LowRankNoiseState
HessianEigvecNoiseState = LowRankNoiseState


class SgdNoiseState(NamedTuple):
  """State of :func:`sgd_noise`."""

  count: chex.Array
  rng_key: chex.PRNGKey


# --------------------------------------------------------------------------
# Construction-time validation
# --------------------------------------------------------------------------


def _canonical_key(key: KeyLike) -> jax.Array:
  if isinstance(key, int) and not isinstance(key, bool):
    return jax.random.key(key)
  if not isinstance(key, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        "key must be an int seed or a PRNG key (jax.random.key(0)), got"
        f" {key!r}."
    )
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise ValueError(
      "key must be an int seed or a PRNG key (jax.random.key(0)), got"
      f" {key!r}."
  )


def _check_magnitude(batch_size: int | None, trace: Any) -> None:
  if batch_size is not None and trace is not None:
    raise ValueError(
        "give either batch_size (match the noise of SGD with that minibatch"
        " size, trace Tr(C)/m) or trace (a fixed Tr(Sigma)), not both."
    )
  if batch_size is not None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if batch_size <= 0:
      raise ValueError(
          f"batch_size must be >= 1 (the SGD minibatch size m whose noise"
          f" trace Tr(C)/m is matched), got {batch_size}."
      )
  if trace is not None and not isinstance(trace, jax.core.Tracer):
    if jnp.ndim(trace) != 0 or not float(trace) >= 0:
      raise ValueError(
          f"trace must be a non-negative scalar (the target E||eps||^2), got"
          f" {trace!r}."
      )


def _check_k(k: int, params: Params, who: str) -> None:
  d = batching.num_params(params)
  if k > d:
    raise ValueError(
        f"{who}: k={k} eigenpairs asked of a model with D={d} parameters;"
        f" use k <= {d} (k = D is the full covariance, as in the paper's 2D"
        " example)."
    )


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------


def _add(updates: optax.Updates, eps: Params) -> optax.Updates:
  return jax.tree.map(lambda u, e: u + e.astype(u.dtype), updates, eps)


def _scale_to(target: jax.Array, total: jax.Array) -> jax.Array:
  """``target / total``, and 0 where ``total`` is not positive (no noise
  rather than a division by zero when the factor is empty)."""
  ok = total > 0
  return jnp.where(ok, target / jnp.where(ok, total, 1), 0)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _target_trace(trace_c, n, batch_size, trace):
  """``T = Tr(C)/m`` (m = batch_size or n) or the fixed ``trace``."""
  if trace is not None:
    return jnp.asarray(trace, dtype=jnp.result_type(trace_c))
  m = n if batch_size is None else batch_size
  return trace_c / m


def _estimate_trace_c(loss_fn, params, batch, key, opts):
  return covariance.covariance_trace(
      loss_fn,
      params,
      batch,
      method=opts["trace_estimator"],
      chunk_size=opts["chunk_size"],
      key=key,
      num_probes=opts["num_probes"],
  )


def _check_trace_estimator(trace_estimator: str, num_probes: int) -> None:
  if trace_estimator not in ("exact", "hutchinson"):
    raise ValueError(
        "trace_estimator must be 'exact' (per-example gradients) or"
        f" 'hutchinson' (forward-mode probes), got {trace_estimator!r}."
    )
  batching.check_positive_int("num_probes", num_probes)


def _refreshing_transform(
    who: str,
    factor_type: type,
    init_factor: Callable[[Params], NamedTuple],
    estimate: Callable[..., NamedTuple],
    draw: Callable[[NamedTuple, jax.Array, Params], Params],
    make_state: Callable[..., NamedTuple],
    refresh_every: int,
    key: KeyLike,
    needs_loss: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transform whose covariance factor is cached and refreshed.

  ``init_factor(params)`` gives a zero ``factor_type`` of the right shapes,
  ``estimate(params, loss_fn, batch, key, old)`` a fresh one (``old``, the
  cached factor, can warm-start it) and
  ``draw(factor, key, params)`` a noise sample. The factor is a NamedTuple
  whose fields, together with ``count``, ``rng_key`` and ``num_rejected``,
  are passed to ``make_state``.
  """
  key = _canonical_key(key)

  def init_fn(params):
    batching.check_params(params, who)
    factor = init_factor(params)
    return make_state(
        count=jnp.zeros([], jnp.int32),
        rng_key=key,
        num_rejected=jnp.zeros([], jnp.int32),
        **factor._asdict(),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, who)
    if needs_loss:
      batching.check_loss_and_batch(loss_fn, params, batch, who)
    new_key, refresh_key, noise_key = jax.random.split(state.rng_key, 3)
    old = factor_type(**{f: getattr(state, f) for f in factor_type._fields})

    def refresh(_):
      return estimate(params, loss_fn, batch, refresh_key, old)

    if refresh_every == 1:
      is_refresh = jnp.array(True)
      new = refresh(None)
    else:
      is_refresh = state.count % refresh_every == 0
      new = jax.lax.cond(is_refresh, refresh, lambda _: old, None)
    ok = _all_finite(new)
    factor = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    eps = draw(factor, noise_key, params)
    new_state = make_state(
        count=optax.safe_increment(state.count),
        rng_key=new_key,
        num_rejected=state.num_rejected
        + jnp.logical_and(is_refresh, ~ok).astype(jnp.int32),
        **factor._asdict(),
    )
    return _add(updates, eps), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _normal_like(key: jax.Array, params: Params) -> Params:
  return optax.tree_utils.tree_random_like(key, params, jax.random.normal)


# --------------------------------------------------------------------------
# GLD constant
# --------------------------------------------------------------------------


def isotropic_noise(
    std: chex.Numeric, *, key: KeyLike = 0
) -> optax.GradientTransformationExtraArgs:
  """GLD constant: adds ``eps ~ N(0, std^2 I)`` to the updates (paper Eq. 3).

  .. math::
    \\theta_{t+1} = \\theta_t - \\eta (\\nabla L(\\theta_t) + \\epsilon_t),
    \\quad \\epsilon_t \\sim N(0, \\varrho^2 I)

  Unlike ``optax.add_noise`` the standard deviation is constant in time (no
  annealing), as in Table 1's "GLD constant".

  Args:
    std: the standard deviation ``varrho`` (>= 0; may be a traced scalar).
    key: int seed or PRNG key.

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
  key0 = _canonical_key(key)

  def init_fn(params):
    del params
    return IsotropicNoiseState(jnp.zeros([], jnp.int32), key0)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    new_key, noise_key = jax.random.split(state.rng_key)
    eps = jax.tree.map(lambda z: std * z, _normal_like(noise_key, updates))
    return _add(updates, eps), IsotropicNoiseState(
        optax.safe_increment(state.count), new_key
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# GLD dynamic
# --------------------------------------------------------------------------


class _TraceFactor(NamedTuple):
  trace: jax.Array


def dynamic_isotropic_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    trace_estimator: str = "exact",
    num_probes: int = 32,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD dynamic: isotropic noise with the trace of SGD's noise.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\tfrac{T_t}{D} I\\big), \\quad
    T_t = \\mathrm{Tr}(\\Sigma^{sgd}_t) = \\mathrm{Tr}(C_t)/m

  (Table 1, magnitude matched by Eq. 14.)

  Args:
    batch_size: SGD minibatch size ``m`` whose noise trace is matched;
      default ``n``, the size of the batch passed to ``update``.
    trace: a fixed target trace instead (then ``loss_fn``/``batch`` are not
      needed). Not together with ``batch_size``.
    refresh_every: re-estimate ``Tr(C)`` every this many steps.
    key: int seed or PRNG key.
    trace_estimator: ``"exact"`` (per-example gradients) or ``"hutchinson"``
      (``num_probes`` forward-mode probes).
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
    >>> tx = optax.chain(anisonoise.dynamic_isotropic_noise(batch_size=2),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params, loss_fn=loss_fn,
    ...                      batch=batch)
    >>> round(float(state[0].trace), 4)  # Tr(C)/2 = (3/16)(0+1+4+9)/2
    1.3125

  References:
    Zhu et al., ICML 2019, Table 1 and Eq. 14.
  """
  _check_magnitude(batch_size, trace)
  batching.check_positive_int("refresh_every", refresh_every)
  _check_trace_estimator(trace_estimator, num_probes)
  opts = dict(trace_estimator=trace_estimator, num_probes=num_probes,
              chunk_size=chunk_size)
  who = "dynamic_isotropic_noise"

  def init_factor(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return _TraceFactor(jnp.zeros([], dtype))

  def estimate(params, loss_fn, batch, key, old):
    del old
    dtype = jnp.result_type(*jax.tree.leaves(params))
    if trace is not None:
      return _TraceFactor(jnp.asarray(trace, dtype))
    n = batching.num_examples(batch)
    tr_c = _estimate_trace_c(loss_fn, params, batch, key, opts)
    return _TraceFactor(_target_trace(tr_c, n, batch_size, None).astype(dtype))

  def draw(factor, key, params):
    std = jnp.sqrt(factor.trace / batching.num_params(params))
    return jax.tree.map(lambda z: std * z, _normal_like(key, params))

  return _refreshing_transform(
      who, _TraceFactor, init_factor, estimate, draw,
      DynamicIsotropicNoiseState,
      refresh_every, key, needs_loss=trace is None,
  )


# --------------------------------------------------------------------------
# GLD diagonal
# --------------------------------------------------------------------------


class _DiagFactor(NamedTuple):
  trace: jax.Array
  diagonal: Params


def diagonal_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD diagonal: noise with the diagonal of SGD's covariance.

  .. math::
    \\epsilon_t \\sim N\\big(0, \\sigma_t\\, \\mathrm{diag}(C_t)\\big), \\quad
    \\sigma_t = T_t / \\mathrm{Tr}(C_t)

  With ``batch_size=m`` this is exactly ``diag(Sigma_sgd) = diag(C)/m``
  (Table 1); with ``trace=T`` the diagonal is rescaled to trace ``T``.
  ``diag(C)`` is exact, from per-example gradients computed in chunks.

  Args:
    batch_size: SGD minibatch size ``m`` (default ``n``).
    trace: fixed target trace instead of ``batch_size``.
    refresh_every: re-estimate ``diag(C)`` every this many steps.
    key: int seed or PRNG key.
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
  _check_magnitude(batch_size, trace)
  batching.check_positive_int("refresh_every", refresh_every)
  batching.check_chunk_size(chunk_size)

  def init_factor(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return _DiagFactor(jnp.zeros([], dtype), jax.tree.map(jnp.zeros_like,
                                                          params))

  def estimate(params, loss_fn, batch, key, old):
    del key, old
    n = batching.num_examples(batch)
    diag = covariance.covariance_diagonal(
        loss_fn, params, batch, chunk_size=chunk_size
    )
    tr_c = optax.tree_utils.tree_sum(diag)
    target = _target_trace(tr_c, n, batch_size, trace)
    return _DiagFactor(target.astype(jnp.result_type(tr_c)), diag)

  def draw(factor, key, params):
    scale = _scale_to(factor.trace, optax.tree_utils.tree_sum(factor.diagonal))
    return jax.tree.map(
        lambda d, z: jnp.sqrt(scale * d) * z,
        factor.diagonal,
        _normal_like(key, params),
    )

  return _refreshing_transform(
      "diagonal_noise", _DiagFactor, init_factor, estimate, draw,
      DiagonalNoiseState,
      refresh_every, key,
  )


# --------------------------------------------------------------------------
# Low rank: GLD leading, GLD Hessian, GLD 1st eigvec(H)
# --------------------------------------------------------------------------


class _LowRankFactor(NamedTuple):
  trace: jax.Array
  eigenvalues: jax.Array
  eigenvectors: Params
  residual_norms: jax.Array


def _low_rank_transform(
    who: str,
    k: int,
    operator: Callable,
    weights: Callable[[jax.Array], jax.Array],
    batch_size, trace, refresh_every, key, opts, num_iters,
) -> optax.GradientTransformationExtraArgs:
  """Noise ``trace * sum_j w_j v_j v_j^T / sum_j w_j`` from top-k eigenpairs."""
  batching.check_positive_int("k", k)
  _check_magnitude(batch_size, trace)
  batching.check_positive_int("refresh_every", refresh_every)
  _check_trace_estimator(opts["trace_estimator"], opts["num_probes"])
  if num_iters is not None:
    batching.check_positive_int("num_iters", num_iters)
    if num_iters < k:
      raise ValueError(f"num_iters={num_iters} must be >= k={k}.")
  curvature.check_tol(opts["tol"])
  if opts["max_matvecs"] is not None:
    batching.check_positive_int("max_matvecs", opts["max_matvecs"])

  def init_factor(params):
    _check_k(k, params, who)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return _LowRankFactor(
        jnp.zeros([], dtype),
        jnp.zeros([k], dtype),
        jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), p.dtype), params),
        jnp.zeros([k], dtype),
    )

  def estimate(params, loss_fn, batch, key, old):
    _check_k(k, params, who)
    eig_key, trace_key = jax.random.split(key)
    d = batching.num_params(params)
    iters = (curvature.default_num_iters(k, d) if num_iters is None
             else min(num_iters, d))
    solve = functools.partial(
        curvature.top_eigenpairs,
        operator(loss_fn, params, batch, chunk_size=opts["chunk_size"]),
        params, k, key=eig_key, num_iters=iters, tol=opts["tol"],
        max_matvecs=opts["max_matvecs"],
        unroll=curvature.lanczos_unroll(batch, opts["chunk_size"], iters))
    if iters > k:
      # Warm start from the cached eigenvectors (subspace recycling) once
      # there are any; the first refresh is a cold Lanczos solve.
      res = jax.lax.cond(
          jnp.any(old.residual_norms != 0) | jnp.any(old.eigenvalues != 0),
          lambda: solve(init_subspace=old.eigenvectors), solve)
    else:
      res = solve()
    n = batching.num_examples(batch)
    if trace is None:
      tr_c = _estimate_trace_c(loss_fn, params, batch, trace_key, opts)
    else:
      tr_c = jnp.zeros([], res.eigenvalues.dtype)
    target = _target_trace(tr_c, n, batch_size, trace)
    return _LowRankFactor(
        target.astype(res.eigenvalues.dtype), res.eigenvalues,
        res.eigenvectors, res.residual_norms,
    )

  def draw(factor, key, params):
    del params
    w = weights(factor.eigenvalues)
    scale = _scale_to(factor.trace, jnp.sum(w))
    z = jax.random.normal(key, (k,), factor.eigenvalues.dtype)
    coef = jnp.sqrt(scale * w) * z
    return jax.tree.map(
        lambda v: jnp.tensordot(coef.astype(v.dtype), v, axes=1),
        factor.eigenvectors,
    )

  return _refreshing_transform(
      who, _LowRankFactor, init_factor, estimate, draw, LowRankNoiseState,
      refresh_every, key,
  )


def _clip(eigenvalues):
  return jnp.maximum(eigenvalues, 0)


def _first_only(eigenvalues):
  return jnp.zeros_like(eigenvalues).at[0].set(1)


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
    refresh_every: re-estimate the eigenpairs (and the trace) every this many
      steps; noise is drawn every step.
    key: int seed or PRNG key (start vectors and draws).
    num_iters: Lanczos basis size (matvecs per refresh without ``tol``);
      default ``max(2k, k + 10)``, at most ``D``. From the second refresh
      on, the solve is warm-started from the cached eigenvectors
      (``top_eigenpairs(init_subspace=...)``: a Rayleigh-Ritz step on them
      plus ``num_iters - k`` new Krylov directions), so that the accuracy
      builds up across refreshes at the same number of products.
    tol: if set, restart Lanczos at each refresh until every cached pair
      has residual ``<= tol |lambda_1|`` (its eigenvalue is then within
      that of the operator's), up to ``max_matvecs``; ``None`` (default):
      ``num_iters`` products per refresh, accuracy as it comes (see
      ``residual_norms`` in the state).
    max_matvecs: budget of products per refresh with ``tol`` (default
      ``10 num_iters``).
    trace_estimator: ``"exact"`` (per-example gradients) or ``"hutchinson"``.
    num_probes: Hutchinson probes.
    chunk_size: examples per chunk, for every pass over the batch (the
      trace and every product of the eigen-solve); ``None``: all at once.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` (``(params, batch) -> (n,)``) and ``batch``. The
    state (:class:`LowRankNoiseState`) holds the eigenvalues, eigenvectors,
    residual norms and the trace in use.
"""


def leading_noise(
    k: int,
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    num_iters: int | None = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    trace_estimator: str = "exact",
    num_probes: int = 32,
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
  opts = dict(trace_estimator=trace_estimator, num_probes=num_probes,
              chunk_size=chunk_size, tol=tol, max_matvecs=max_matvecs)
  return _low_rank_transform(
      "leading_noise", k, _covariance_op, _clip, batch_size, trace,
      refresh_every, key, opts, num_iters,
  )


def hessian_noise(
    k: int,
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    num_iters: int | None = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    trace_estimator: str = "exact",
    num_probes: int = 32,
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
  opts = dict(trace_estimator=trace_estimator, num_probes=num_probes,
              chunk_size=chunk_size, tol=tol, max_matvecs=max_matvecs)
  return _low_rank_transform(
      "hessian_noise", k, _hessian_op, _clip, batch_size, trace,
      refresh_every, key, opts, num_iters,
  )


def hessian_eigvec_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    num_iters: int | None = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    trace_estimator: str = "exact",
    num_probes: int = 32,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GLD 1st eigvec(H): all the noise along the top Hessian eigenvector.

  .. math::
    \\epsilon_t \\sim N\\big(0, T_t\\, u_1 u_1^\\top\\big)

  ``u_1`` is the eigenvector of the largest algebraic eigenvalue of ``H``;
  ``Sigma* = Tr(Sigma) u_1 u_1^T`` maximises the escape indicator
  ``Tr(H Sigma)`` under the trace constraint (Section 3.2).
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
  opts = dict(trace_estimator=trace_estimator, num_probes=num_probes,
              chunk_size=chunk_size, tol=tol, max_matvecs=max_matvecs)
  return _low_rank_transform(
      "hessian_eigvec_noise", 1, _hessian_op, _first_only, batch_size, trace,
      refresh_every, key, opts, num_iters,
  )


# --------------------------------------------------------------------------
# GD + exact SGD noise
# --------------------------------------------------------------------------


def sgd_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    key: KeyLike = 0,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GD + exact SGD noise: ``eps ~ N(0, C/m)`` drawn without forming ``C``.

  .. math::
    \\epsilon_t = \\frac{1}{\\sqrt{m n}} G_t^\\top (z - \\bar z\\mathbf 1),
    \\quad z \\sim N(0, I_n), \\quad \\mathrm{Cov}(\\epsilon_t) =
    \\Sigma^{sgd}_t = C_t / m

  (paper Eqs. 5-6): the Gaussian limit of the minibatch noise, at one extra
  backward pass per step. With ``trace=T`` the same structure is rescaled to
  ``Cov = T C / Tr(C)`` (the full-covariance member of Table 1 at a fixed
  magnitude, as in the paper's 2D example); ``Tr(C)`` is then computed
  exactly every step from per-example gradients.

  Args:
    batch_size: the minibatch size ``m`` (default ``n``).
    trace: a fixed target trace instead of ``batch_size``.
    key: int seed or PRNG key.
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
  _check_magnitude(batch_size, trace)
  batching.check_chunk_size(chunk_size)
  key0 = _canonical_key(key)

  def init_fn(params):
    batching.check_params(params, "sgd_noise")
    return SgdNoiseState(jnp.zeros([], jnp.int32), key0)

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, "sgd_noise")
    batching.check_loss_and_batch(loss_fn, params, batch, "sgd_noise")
    new_key, noise_key = jax.random.split(state.rng_key)
    if trace is None:
      eps = covariance.sample_sgd_noise(
          loss_fn, params, batch, noise_key, batch_size=batch_size,
          chunk_size=chunk_size,
      )
    else:
      eps = covariance.sample_sgd_noise(loss_fn, params, batch, noise_key,
                                        batch_size=1,
                                        chunk_size=chunk_size)  # N(0, C)
      tr_c = covariance.covariance_trace(loss_fn, params, batch,
                                         chunk_size=chunk_size)
      scale = _scale_to(jnp.asarray(trace, tr_c.dtype), tr_c)
      eps = jax.tree.map(lambda e: jnp.sqrt(scale).astype(e.dtype) * e, eps)
    return _add(updates, eps), SgdNoiseState(
        optax.safe_increment(state.count), new_key
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
