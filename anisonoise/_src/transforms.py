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

Non-finite values: if a re-estimated factor (or its target trace) contains a
NaN or an infinity, it is discarded, the previous factor is kept and
``state.num_rejected`` is incremented; the noise is then drawn from the
previous factor (zero noise if there was none yet). Non-finite incoming
updates are passed on unchanged in kind (``nan + eps`` is ``nan``): the
transform never hides a broken gradient.
"""

from __future__ import annotations

import dataclasses
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


class TraceFactor(NamedTuple):
  """The cached factor of :func:`dynamic_isotropic_noise`: the target
  ``Tr(Sigma_t)`` in use."""

  trace: chex.Array


class DiagonalFactor(NamedTuple):
  """The cached factor of :func:`diagonal_noise`: ``diag(C)`` (a pytree
  like params, exact or estimated) at the last refresh and the target
  trace; the noise covariance is ``trace / sum(diagonal) * diag(diagonal)``.
  """

  trace: chex.Array
  diagonal: Params


class LowRankFactor(NamedTuple):
  """The cached factor of the low-rank noises.

  ``eigenvalues`` (``(k,)``, descending) and ``eigenvectors`` (params-like
  leaves with a leading ``k`` axis) are the eigenpairs of ``C`` (leading) or
  ``H`` (Hessian) at the last refresh; ``residual_norms`` their residuals.
  The noise covariance is ``trace * sum_j c_j v_j v_j^T / sum_j c_j`` with
  ``c_j = max(lambda_j, 0)`` (and ``c = (1, 0, ...)`` for the
  1st-eigenvector noise).
  """

  trace: chex.Array
  eigenvalues: chex.Array
  eigenvectors: Params
  residual_norms: chex.Array


def _forward_fields(cls: type, factor_type: type) -> type:
  """Makes the factor's fields readable on the state (``state.trace`` for
  ``state.factor.trace``), as they were documented and logged."""
  for name in factor_type._fields:
    setattr(cls, name, property(
        lambda self, name=name: getattr(self.factor, name),
        doc=f"``factor.{name}``."))
  return cls


class DynamicIsotropicNoiseState(NamedTuple):
  """State of :func:`dynamic_isotropic_noise`: ``count``, ``rng_key``,
  ``num_rejected`` (refreshes discarded for non-finite values) and the
  cached :class:`TraceFactor` (``state.trace`` reads ``factor.trace``)."""

  count: chex.Array
  rng_key: chex.PRNGKey
  num_rejected: chex.Array
  factor: TraceFactor


class DiagonalNoiseState(NamedTuple):
  """State of :func:`diagonal_noise`: ``count``, ``rng_key``,
  ``num_rejected`` and the cached :class:`DiagonalFactor` (``state.trace``
  and ``state.diagonal`` read its fields)."""

  count: chex.Array
  rng_key: chex.PRNGKey
  num_rejected: chex.Array
  factor: DiagonalFactor


class LowRankNoiseState(NamedTuple):
  """State of :func:`leading_noise`, :func:`hessian_noise` and
  :func:`hessian_eigvec_noise`: ``count``, ``rng_key``, ``num_rejected``
  and the cached :class:`LowRankFactor` (``state.trace``,
  ``state.eigenvalues``, ``state.eigenvectors`` and
  ``state.residual_norms`` read its fields)."""

  count: chex.Array
  rng_key: chex.PRNGKey
  num_rejected: chex.Array
  factor: LowRankFactor


_forward_fields(DynamicIsotropicNoiseState, TraceFactor)
_forward_fields(DiagonalNoiseState, DiagonalFactor)
_forward_fields(LowRankNoiseState, LowRankFactor)
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


@dataclasses.dataclass(frozen=True)
class _Magnitude:
  """The target trace ``T`` (paper Eq. 14): ``Tr(C) / m`` with
  ``m = batch_size`` (default ``n``, the batch passed), or a fixed
  ``trace``."""

  batch_size: int | None
  trace: Any

  def __post_init__(self):
    _check_magnitude(self.batch_size, self.trace)

  @property
  def fixed(self) -> bool:
    return self.trace is not None

  def target(self, trace_c: jax.Array, n: int) -> jax.Array:
    if self.trace is not None:
      return jnp.asarray(self.trace, dtype=jnp.result_type(trace_c))
    return trace_c / (n if self.batch_size is None else self.batch_size)


_TRACE_ESTIMATORS = {
    "exact": "per-example gradients",
    "hutchinson": "random probes, no per-example gradients",
    "deflated": ("the refresh's eigenvectors' part exactly, probes for the"
                 " rest"),
}


@dataclasses.dataclass(frozen=True)
class _TraceEstimation:
  """How ``Tr(C)`` (or ``diag(C)``) is obtained at a refresh: one of
  :data:`_TRACE_ESTIMATORS` with its probes and chunking."""

  method: str
  num_probes: int
  chunk_size: int | None
  allowed: tuple[str, ...] = ("exact", "hutchinson")

  def __post_init__(self):
    if self.method not in self.allowed:
      choices = ", ".join(f"{m!r} ({_TRACE_ESTIMATORS[m]})"
                          for m in self.allowed)
      raise ValueError(f"trace_estimator must be one of {choices}; got"
                       f" {self.method!r}.")
    batching.check_positive_int("num_probes", self.num_probes)
    batching.check_chunk_size(self.chunk_size)

  def trace(self, loss_fn, params, batch, key, basis=None, in_span=None):
    """``Tr(C)``; ``"deflated"`` projects the probes off ``basis`` and adds
    ``in_span`` (``sum_j q_j^T C q_j`` when the caller knows it, e.g. Ritz
    values of ``C``) or computes that part (``k`` forward products)."""
    if self.method == "deflated":
      if in_span is None:
        return covariance.covariance_trace(
            loss_fn, params, batch, method="hutchinson", key=key,
            num_probes=self.num_probes, chunk_size=self.chunk_size,
            deflate=basis)
      form = covariance.quadratic_form(loss_fn, params, batch,
                                       chunk_size=self.chunk_size)
      return in_span + covariance.complement_trace(
          form, basis, params, key, self.num_probes, batch)
    return covariance.covariance_trace(
        loss_fn, params, batch, method=self.method, key=key,
        num_probes=self.num_probes, chunk_size=self.chunk_size)

  def diagonal(self, loss_fn, params, batch, key):
    """``diag(C)``, exact or from backward-mode probes."""
    return covariance.covariance_diagonal(
        loss_fn, params, batch, method=self.method, key=key,
        num_probes=self.num_probes, chunk_size=self.chunk_size)


@dataclasses.dataclass(frozen=True)
class _Solver:
  """The eigen-solve of a low-rank refresh (``top_eigenpairs`` settings)."""

  k: int
  num_iters: int | None
  tol: float | None
  max_matvecs: int | None

  def __post_init__(self):
    batching.check_positive_int("k", self.k)
    if self.num_iters is not None:
      batching.check_positive_int("num_iters", self.num_iters)
      if self.num_iters < self.k:
        raise ValueError(f"num_iters={self.num_iters} must be >= k={self.k}.")
    curvature.check_tol(self.tol)
    if self.max_matvecs is not None:
      batching.check_positive_int("max_matvecs", self.max_matvecs)

  def solve(self, operator, params, batch, chunk_size, key, old):
    """Top-k eigenpairs; warm-started from the cached eigenvectors (subspace
    recycling) once there are any, a cold Lanczos solve at the first
    refresh."""
    d = batching.num_params(params)
    iters = (curvature.default_num_iters(self.k, d) if self.num_iters is None
             else min(self.num_iters, d))
    solve = functools.partial(
        curvature.top_eigenpairs, operator, params, self.k, key=key,
        num_iters=iters, tol=self.tol, max_matvecs=self.max_matvecs,
        unroll=curvature.lanczos_unroll(batch, chunk_size, iters))
    if iters == self.k:
      return solve()
    return jax.lax.cond(
        jnp.any(old.residual_norms != 0) | jnp.any(old.eigenvalues != 0),
        lambda: solve(init_subspace=old.eigenvectors), solve)


def _refreshing_transform(
    who: str,
    init_factor: Callable[[Params], NamedTuple],
    estimate: Callable[..., NamedTuple],
    draw: Callable[[NamedTuple, jax.Array, Params], Params],
    state_type: type,
    refresh_every: int,
    key: KeyLike,
    needs_loss: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """The one home of the cached-and-refreshed noises.

  ``init_factor(params)`` gives a zero factor of the right shapes,
  ``estimate(params, loss_fn, batch, key, old)`` a fresh one (``old``, the
  cached factor, can warm-start it) and ``draw(factor, key, params)`` a
  noise sample. The state is ``state_type(count, rng_key, num_rejected,
  factor)``.
  """
  batching.check_positive_int("refresh_every", refresh_every)
  key = _canonical_key(key)

  def init_fn(params):
    batching.check_params(params, who)
    return state_type(count=jnp.zeros([], jnp.int32), rng_key=key,
                      num_rejected=jnp.zeros([], jnp.int32),
                      factor=init_factor(params))

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, who)
    if needs_loss:
      batching.check_loss_and_batch(loss_fn, params, batch, who)
    new_key, refresh_key, noise_key = jax.random.split(state.rng_key, 3)
    old = state.factor

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
    new_state = state_type(
        count=optax.safe_increment(state.count),
        rng_key=new_key,
        num_rejected=state.num_rejected
        + jnp.logical_and(is_refresh, ~ok).astype(jnp.int32),
        factor=factor,
    )
    return _add(updates, eps), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _dtype(params: Params) -> Any:
  return jnp.result_type(*jax.tree.leaves(params))


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


def dynamic_isotropic_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
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
    refresh_every: re-estimate ``Tr(C)`` every this many steps.
    key: int seed or PRNG key.
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
  magnitude = _Magnitude(batch_size, trace)
  estimation = _TraceEstimation(trace_estimator, num_probes, chunk_size)

  def init_factor(params):
    return TraceFactor(jnp.zeros([], _dtype(params)))

  def estimate(params, loss_fn, batch, key, old):
    del old
    dtype = _dtype(params)
    if magnitude.fixed:
      return TraceFactor(jnp.asarray(trace, dtype))
    tr_c = estimation.trace(loss_fn, params, batch, key)
    return TraceFactor(magnitude.target(tr_c, batching.num_examples(batch))
                       .astype(dtype))

  def draw(factor, key, params):
    std = jnp.sqrt(factor.trace / batching.num_params(params))
    return jax.tree.map(lambda z: std * z, _normal_like(key, params))

  return _refreshing_transform(
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
    refresh_every: int = 1,
    key: KeyLike = 0,
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
    refresh_every: re-estimate ``diag(C)`` every this many steps.
    key: int seed or PRNG key.
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
  magnitude = _Magnitude(batch_size, trace)
  estimation = _TraceEstimation(trace_estimator, num_probes, chunk_size)

  def init_factor(params):
    return DiagonalFactor(jnp.zeros([], _dtype(params)),
                          jax.tree.map(jnp.zeros_like, params))

  def estimate(params, loss_fn, batch, key, old):
    del old
    diag = estimation.diagonal(loss_fn, params, batch, key)
    tr_c = optax.tree_utils.tree_sum(diag)
    target = magnitude.target(tr_c, batching.num_examples(batch))
    return DiagonalFactor(target.astype(jnp.result_type(tr_c)), diag)

  def draw(factor, key, params):
    scale = _scale_to(factor.trace, optax.tree_utils.tree_sum(factor.diagonal))
    return jax.tree.map(
        lambda d, z: jnp.sqrt(scale * d) * z,
        factor.diagonal,
        _normal_like(key, params),
    )

  return _refreshing_transform(
      "diagonal_noise", init_factor, estimate, draw, DiagonalNoiseState,
      refresh_every, key,
  )


# --------------------------------------------------------------------------
# Low rank: GLD leading, GLD Hessian, GLD 1st eigvec(H)
# --------------------------------------------------------------------------


def _low_rank_transform(
    who: str, operator: Callable, weights: Callable[[jax.Array], jax.Array],
    solver: _Solver, magnitude: _Magnitude, estimation: _TraceEstimation,
    refresh_every: int, key: KeyLike, of_covariance: bool,
) -> optax.GradientTransformationExtraArgs:
  """The one home of the low-rank noises: ``trace * sum_j w_j v_j v_j^T /
  sum_j w_j`` from the top-k eigenpairs of ``operator`` (``C`` when
  ``of_covariance``, whose eigenvalues are then the in-span part of a
  deflated trace, or ``H``)."""
  k = solver.k

  def init_factor(params):
    _check_k(k, params, who)
    dtype = _dtype(params)
    return LowRankFactor(
        jnp.zeros([], dtype),
        jnp.zeros([k], dtype),
        jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), p.dtype), params),
        jnp.zeros([k], dtype),
    )

  def estimate(params, loss_fn, batch, key, old):
    _check_k(k, params, who)
    eig_key, trace_key = jax.random.split(key)
    res = solver.solve(
        operator(loss_fn, params, batch, chunk_size=estimation.chunk_size),
        params, batch, estimation.chunk_size, eig_key, old)
    if magnitude.fixed:
      tr_c = jnp.zeros([], res.eigenvalues.dtype)
    else:
      # The Ritz values of C are its quadratic form on the Ritz vectors.
      in_span = jnp.sum(res.eigenvalues) if of_covariance else None
      tr_c = estimation.trace(loss_fn, params, batch, trace_key,
                              basis=res.eigenvectors, in_span=in_span)
    target = magnitude.target(tr_c, batching.num_examples(batch))
    return LowRankFactor(target.astype(res.eigenvalues.dtype),
                         res.eigenvalues, res.eigenvectors,
                         res.residual_norms)

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
      who, init_factor, estimate, draw, LowRankNoiseState, refresh_every, key)


def _low_rank(who: str, k: int, operator: Callable, weights: Callable,
              of_covariance: bool, batch_size, trace, refresh_every, key,
              num_iters, tol, max_matvecs, trace_estimator, num_probes,
              chunk_size) -> optax.GradientTransformationExtraArgs:
  """The public low-rank factories' arguments, checked and typed."""
  return _low_rank_transform(
      who, operator, weights, _Solver(k, num_iters, tol, max_matvecs),
      _Magnitude(batch_size, trace),
      _TraceEstimation(trace_estimator, num_probes, chunk_size,
                       allowed=("deflated", "hutchinson", "exact")),
      refresh_every, key, of_covariance)


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
    trace_estimator: how ``Tr(C)`` is estimated at a refresh (every one
      is unbiased, and the noise covariance is linear in it):
      ``"deflated"`` (GLD leading's default): the part in the span of the
      refresh's eigenvectors exactly (free for ``C``'s own eigenpairs, their
      Ritz values; ``k`` more forward-mode products for the Hessian's) plus
      ``num_probes`` Rademacher probes projected off them (Hutch++'s
      variance reduction, :func:`anisonoise.covariance_trace` with
      ``deflate``); ``"hutchinson"`` (the Hessian noises' default):
      ``num_probes`` plain forward-mode probes; ``"exact"``: per-example
      gradients. On an MLP 784-64-10 from initialisation to a global
      minimum one probe's relative standard deviation was 0.03-0.04
      deflated by C's top 20, 0.04-0.07 by H's, 0.26-0.40 plain
      (``benchmarks/README.md``).
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
                   batch_size, trace, refresh_every, key, num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


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
                   batch_size, trace, refresh_every, key, num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


def hessian_eigvec_noise(
    *,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    refresh_every: int = 1,
    key: KeyLike = 0,
    num_iters: int | None = None,
    tol: float | None = None,
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
  return _low_rank("hessian_eigvec_noise", 1, _hessian_op, _first_only, False,
                   batch_size, trace, refresh_every, key, num_iters, tol,
                   max_matvecs,
                   trace_estimator, num_probes, chunk_size)


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
