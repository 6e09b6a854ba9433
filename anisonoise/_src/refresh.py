"""The machinery of the refreshed noises, shared by every factory of
``transforms.py``.

One home for each part: the states and their cached factors (a state is
``count``, ``rng_key``, ``num_rejected`` and a nested factor, as optax's
Sophia nests its estimator's state); the target magnitude (paper Eq. 14);
how ``Tr(C)`` and ``diag(C)`` are estimated at a refresh; the low-rank
eigen-solve with its warm start; the cached-and-refreshed transform
itself, and the low-rank family built on it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from anisonoise._src import batching
from anisonoise._src import covariance
from anisonoise._src import curvature
from anisonoise._src import estimators
from anisonoise._src import sums
from anisonoise._src.estimators import KeyLike, canonical_key

Params = Any


# --------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------


class IsotropicNoiseState(NamedTuple):
  """State of :func:`isotropic_noise`: ``count`` (int32, updates so far) and
  ``rng_key``.

  In every state of the library ``rng_key`` is the raw data of the PRNG key
  of the next draw (``uint32``, ``jax.random.key_data``; the key itself is
  ``jax.random.wrap_key_data(state.rng_key)``), so that the states are plain
  arrays that ``flax.serialization`` and orbax write and read back.
  """

  count: chex.Array  # int32, number of updates so far
  rng_key: chex.Array  # uint32 key data


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
  ``H`` (Hessian) at the last refresh, in float32 at least whatever the
  parameters' dtype (float64 under x64); ``residual_norms`` their
  residuals, ``num_matvecs`` the operator products that refresh's solve
  ran and ``converged`` whether its stopping rule held before its budget
  was spent (the captured curvature ``sum_j u_j^T M u_j`` gained at most
  ``tol * 4 / k`` of itself over its last 4 products,
  ``top_eigenpairs(criterion="subspace")``; ``True`` before the first
  refresh).
  The noise covariance is ``trace * sum_j c_j v_j v_j^T / sum_j c_j`` with
  ``c_j = max(lambda_j, 0)`` (and ``c = (1, 0, ...)`` for the
  1st-eigenvector noise, ``0`` when ``lambda_1 <= 0``).
  """

  trace: chex.Array
  eigenvalues: chex.Array
  eigenvectors: Params
  residual_norms: chex.Array
  num_matvecs: chex.Array
  converged: chex.Array


def _forward_fields(cls: type, factor_type: Any) -> type:
  """Makes the factor's fields readable on the state (``state.trace`` for
  ``state.factor.trace``), as they were documented and logged."""
  for name in factor_type._fields:

    def get(self, name: str = name) -> Any:
      return getattr(self.factor, name)

    setattr(cls, name, property(get, doc=f"``factor.{name}``."))
  return cls


class DynamicIsotropicNoiseState(NamedTuple):
  """State of :func:`dynamic_isotropic_noise`: ``count``, ``rng_key``,
  ``num_rejected`` (refreshes discarded for non-finite values) and the
  cached :class:`TraceFactor` (``state.trace`` reads ``factor.trace``)."""

  count: chex.Array
  rng_key: chex.Array  # uint32 key data
  num_rejected: chex.Array
  factor: TraceFactor


class DiagonalNoiseState(NamedTuple):
  """State of :func:`diagonal_noise`: ``count``, ``rng_key``,
  ``num_rejected`` and the cached :class:`DiagonalFactor` (``state.trace``
  and ``state.diagonal`` read its fields)."""

  count: chex.Array
  rng_key: chex.Array  # uint32 key data
  num_rejected: chex.Array
  factor: DiagonalFactor


class LowRankNoiseState(NamedTuple):
  """State of :func:`leading_noise`, :func:`hessian_noise` and
  :func:`hessian_eigvec_noise`: ``count``, ``rng_key``, ``num_rejected``,
  ``num_unconverged`` (refreshes whose eigen-solve spent its budget
  before its stopping rule held; their pairs are used all the same) and the
  cached :class:`LowRankFactor` (``state.trace``, ``state.eigenvalues``,
  ``state.eigenvectors``, ``state.residual_norms``, ``state.num_matvecs``
  and ``state.converged``, the last refresh's flag, read its fields)."""

  count: chex.Array
  rng_key: chex.Array  # uint32 key data
  num_rejected: chex.Array
  num_unconverged: chex.Array
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
  rng_key: chex.Array  # uint32 key data


# --------------------------------------------------------------------------
# Construction-time validation
# --------------------------------------------------------------------------


def transform_key(key: KeyLike | None) -> jax.Array:
  """The key of a transform: ``key`` canonicalised, or with ``key=None`` a
  stream of its own (:func:`estimators.default_key`)."""
  return estimators.default_key() if key is None else canonical_key(key)


def key_data(key: jax.Array) -> jax.Array:
  """What a state stores of ``key``: its raw ``uint32`` data."""
  return jax.random.key_data(key)


def state_key(rng_key: jax.Array) -> jax.Array:
  """The typed key of a state's ``rng_key``: its raw data wrapped, or a
  typed key put there by the user (``state._replace(rng_key=key)``)."""
  if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
    return rng_key
  return jax.random.wrap_key_data(rng_key)


def _check_magnitude(batch_size: int | None, trace: Any) -> None:
  if batch_size is not None and trace is not None:
    raise ValueError(
        "give either batch_size (match the noise of SGD with that minibatch"
        " size, trace Tr(C)/m) or trace (a fixed Tr(Sigma)), not both."
    )
  if isinstance(batch_size, (jax.Array, np.ndarray)):
    # A scheduled noise scale (optax.inject_hyperparams): any m > 0.
    if jnp.ndim(batch_size) != 0 or (
        not isinstance(batch_size, jax.core.Tracer)
        and not float(batch_size) > 0):
      raise ValueError(
          f"batch_size must be a positive scalar (the SGD minibatch size m"
          f" whose noise trace Tr(C)/m is matched), got {batch_size!r}.")
  elif batch_size is not None:
    if not batching.is_int(batch_size):
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


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_loss_and_params(loss_fn: Any, params: Params, batch: Any,
                          who: str) -> int:
  """``batching.check_loss_and_batch``, after refusing parameters that
  ``optax.masked`` / ``optax.partition`` cut down to a subset unless
  ``loss_fn`` fills the rest back in (``anisonoise.with_full_params``)."""
  if (any(map(_is_masked, jax.tree.leaves(params, is_leaf=_is_masked)))
      and not getattr(loss_fn, "fills_masked", False)):
    raise ValueError(
        f"{who} is inside optax.masked or optax.partition, which give it the"
        " selected parameters only, so its loss_fn cannot be evaluated."
        " Wrap the masked (or partitioned) transform in"
        " anisonoise.with_full_params(...): the loss then sees every"
        " parameter, and the noise has the covariance of the selected block.")
  return batching.check_loss_and_batch(loss_fn, params, batch, who)


def check_step_data(loss_fn, params, batch, who: str) -> int:
  """:func:`batching.check_loss_and_batch` for a transform's ``update``,
  which needs its batch in memory (a step runs under ``jax.jit``)."""
  if isinstance(batch, sums.Batches):
    raise ValueError(
        f"{who}: update takes the estimation batch in memory (a pytree of"
        " arrays), not a Batches stream: a training step runs under jax.jit,"
        " which cannot iterate over a stream. Pass the minibatch or an"
        " estimation batch, with chunk_size= to bound the memory of each"
        " pass.")
  return check_loss_and_params(loss_fn, params, batch, who)


def check_k(k: int, params: Params, who: str) -> None:
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


def add_noise(updates: optax.Updates, eps: Params) -> optax.Updates:
  return jax.tree.map(lambda u, e: u + e.astype(u.dtype), updates, eps)


def scale_to(target: jax.Array, total: jax.Array) -> jax.Array:
  """``target / total``, and 0 where ``total`` is not positive (no noise
  rather than a division by zero when the factor is empty)."""
  ok = total > 0
  return jnp.where(ok, target / jnp.where(ok, total, 1), 0)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass(frozen=True)
class Magnitude:
  """The target trace ``T`` (paper Eq. 14): ``Tr(C) / m`` with
  ``m = batch_size`` (default ``n``, the batch passed), ``(n - m) / (n - 1)``
  times that for minibatches drawn without replacement, or a fixed
  ``trace``."""

  batch_size: int | None
  trace: Any
  replacement: bool = True

  def __post_init__(self):
    _check_magnitude(self.batch_size, self.trace)
    covariance.check_replacement(self.replacement)
    if batching.is_int(self.batch_size):
      object.__setattr__(self, "batch_size",
                         int(self.batch_size))  # type: ignore[arg-type]  # is_int checked it

  @property
  def fixed(self) -> bool:
    return self.trace is not None

  def target(self, trace_c: jax.Array, n: int) -> jax.Array:
    if self.trace is not None:
      return jnp.asarray(self.trace, dtype=jnp.result_type(trace_c))
    m = n if self.batch_size is None else self.batch_size
    return trace_c * covariance.sgd_scale(n, m, self.replacement)


TRACE_ESTIMATORS = {
    "exact": "per-example gradients",
    "hutchinson": "random probes, no per-example gradients",
    "deflated": ("the refresh's eigenvectors' part exactly, probes for the"
                 " rest"),
}


@dataclasses.dataclass(frozen=True)
class TraceEstimation:
  """How ``Tr(C)`` (or ``diag(C)``) is obtained at a refresh: one of
  :data:`TRACE_ESTIMATORS` with its probes and chunking."""

  method: str
  num_probes: int
  chunk_size: int | None
  allowed: tuple[str, ...] = ("exact", "hutchinson")

  def __post_init__(self):
    if self.method not in self.allowed:
      choices = ", ".join(f"{m!r} ({TRACE_ESTIMATORS[m]})"
                          for m in self.allowed)
      raise ValueError(f"trace_estimator must be one of {choices}; got"
                       f" {self.method!r}.")
    batching.check_positive_int("num_probes", self.num_probes)
    batching.check_chunk_size(self.chunk_size)

  def trace(self, loss_fn, params, batch, key, basis=None, in_span=None):
    """``Tr(C)``; ``"deflated"`` projects the probes off ``basis`` and adds
    ``in_span`` (``sum_j q_j^T C q_j`` when the caller knows it, e.g. Ritz
    values of ``C``) or computes that part (``k`` forward products)."""
    deflated = self.method == "deflated"
    return covariance.covariance_trace(
        loss_fn, params, batch, key=key, num_probes=self.num_probes,
        method="hutchinson" if deflated else self.method,
        chunk_size=self.chunk_size, deflate=basis if deflated else None,
        in_span=in_span if deflated else None)

  def diagonal(self, loss_fn, params, batch, key):
    """``diag(C)``, exact or from backward-mode probes."""
    return covariance.covariance_diagonal(
        loss_fn, params, batch, method=self.method, key=key,
        num_probes=self.num_probes, chunk_size=self.chunk_size)


# A refresh's default budget of products, in units of its basis size:
# ``5 num_iters`` (200 for k = 20), a cap a refresh reaches only when its
# stopping rule has not held (``converged`` is then False).
BUDGET_CYCLES = 5


@dataclasses.dataclass(frozen=True)
class Solver:
  """The eigen-solve of a low-rank refresh (``top_eigenpairs`` settings)."""

  k: int
  num_iters: int | None
  tol: float | None
  max_matvecs: int | None

  def __post_init__(self):
    object.__setattr__(self, "k", batching.check_positive_int("k", self.k))
    if self.num_iters is not None:
      object.__setattr__(self, "num_iters", batching.check_positive_int(
          "num_iters", self.num_iters))
      if self.num_iters < self.k:
        raise ValueError(f"num_iters={self.num_iters} must be >= k={self.k}.")
    curvature.check_tol(self.tol)
    if self.max_matvecs is not None:
      object.__setattr__(self, "max_matvecs", batching.check_positive_int(
          "max_matvecs", self.max_matvecs))
      # A refresh's first cycle takes num_iters products (default
      # max(2k, k + 10), fewer only on a model with fewer parameters).
      cycle = (max(2 * self.k, self.k + 10) if self.num_iters is None
               else self.num_iters)
      if self.max_matvecs < cycle:
        raise ValueError(
            f"max_matvecs={self.max_matvecs} is below the {cycle} products"
            f" of one Lanczos cycle (num_iters={self.num_iters}, k={self.k});"
            f" use max_matvecs >= {cycle}, or a smaller num_iters (>= k)"
            " with it.")

  def solve(self, operator, params, batch, chunk_size, key, old):
    """The top-k eigenspace (``top_eigenpairs(criterion="subspace")``):
    warm-started from the cached eigenvectors once there are any, from
    random rows at the first refresh."""
    del batch, chunk_size
    d = batching.num_params(params)
    iters = (curvature.default_num_iters(self.k, d) if self.num_iters is None
             else min(self.num_iters, d))
    solve = functools.partial(
        curvature.top_eigenpairs, operator, params, self.k, key=key,
        num_iters=iters, tol=self.tol,
        max_matvecs=(BUDGET_CYCLES * iters if self.max_matvecs is None
                     else self.max_matvecs),
        criterion="subspace")
    if iters <= self.k:
      return solve()
    # Under jax.vmap (seeds) the predicate is reduced over the seeds, so the
    # cond stays a cond and one solve runs; a seed whose cache is still
    # empty while another's is not is then warm-started from its zero
    # cache, which top_eigenpairs fills with random rows.
    return jax.lax.cond(
        batching.any_over_batch(old.num_matvecs > 0),
        lambda: solve(init_subspace=old.eigenvectors), solve)


def refreshing_transform(
    who: str,
    init_factor: Callable[[Params], NamedTuple],
    estimate: Callable[..., NamedTuple],
    draw: Callable[[NamedTuple, jax.Array, Params], Params],
    state_type: Any,
    refresh_every: int,
    key: KeyLike | None,
    needs_loss: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """The one home of the cached-and-refreshed noises.

  ``init_factor(params)`` gives a zero factor of the right shapes,
  ``estimate(params, loss_fn, batch, key, old)`` a fresh one (``old``, the
  cached factor, can warm-start it) and ``draw(factor, key, params)`` a
  noise sample. The state is ``state_type(count, rng_key, num_rejected,
  factor)``, with ``num_unconverged`` before ``factor`` where the state
  has that field (the factor then has ``converged``).
  """
  counts_unconverged = "num_unconverged" in state_type._fields
  refresh_every = batching.check_positive_int("refresh_every", refresh_every)
  key = transform_key(key)

  def init_fn(params):
    batching.check_params(params, who)
    extra = ({"num_unconverged": jnp.zeros([], jnp.int32)}
             if counts_unconverged else {})
    return state_type(count=jnp.zeros([], jnp.int32), rng_key=key_data(key),
                      num_rejected=jnp.zeros([], jnp.int32),
                      factor=init_factor(params), **extra)

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, who)
    if needs_loss:
      check_step_data(loss_fn, params, batch, who)
    new_key, refresh_key, noise_key = jax.random.split(
        state_key(state.rng_key), 3)
    old = state.factor

    def refresh():
      return estimate(params, loss_fn, batch, refresh_key, old)

    if refresh_every == 1:
      is_refresh = jnp.array(True)
      new = refresh()
    else:
      is_refresh = state.count % refresh_every == 0

      def refresh_due():
        # Exact per seed under vmap: seeds not due keep their factor.
        return batching.where_tree(is_refresh, refresh(), old)

      new = jax.lax.cond(batching.any_over_batch(is_refresh), refresh_due,
                         lambda: old)
    ok = _all_finite(new)
    factor = batching.where_tree(ok, new, old)
    eps = draw(factor, noise_key, params)
    extra = {}
    if counts_unconverged:
      extra["num_unconverged"] = state.num_unconverged + jnp.logical_and(
          is_refresh, ~new.converged).astype(jnp.int32)
    new_state = state_type(
        **extra,
        count=optax.safe_increment(state.count),
        rng_key=key_data(new_key),
        num_rejected=state.num_rejected
        + jnp.logical_and(is_refresh, ~ok).astype(jnp.int32),
        factor=factor,
    )
    return add_noise(updates, eps), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dtype_of(params: Params) -> Any:
  return jnp.result_type(*jax.tree.leaves(params))


def normal_like(key: jax.Array, params: Params) -> Params:
  """Standard normals shaped like ``params``, each leaf in its dtype, drawn
  in float32 at least: bfloat16 and float32 parameters get the same draws
  from the same key, rounded (``jax.random.normal`` in bfloat16 draws
  other numbers; the norm of a ``diagonal_noise`` draw on a ResNet then
  differed by 13% between the two, against 1% drawn this way)."""
  return optax.tree_utils.tree_random_like(
      key, params, lambda k, shape, dtype: jax.random.normal(
          k, shape, jnp.promote_types(dtype, jnp.float32)).astype(dtype))


# --------------------------------------------------------------------------
# The low-rank family
# --------------------------------------------------------------------------


def low_rank_transform(
    who: str, operator: Callable, weights: Callable[[jax.Array], jax.Array],
    solver: Solver, magnitude: Magnitude, estimation: TraceEstimation,
    refresh_every: int, key: KeyLike, of_covariance: bool,
) -> optax.GradientTransformationExtraArgs:
  """The one home of the low-rank noises: ``trace * sum_j w_j v_j v_j^T /
  sum_j w_j`` from the top-k eigenpairs of ``operator`` (``C`` when
  ``of_covariance``, whose eigenvalues are then the in-span part of a
  deflated trace, or ``H``)."""
  k = solver.k

  def init_factor(params):
    check_k(k, params, who)
    # The solve's dtype (float32 at least), whatever the parameters' are.
    dtype = curvature.solve_dtype(dtype_of(params))
    return LowRankFactor(
        jnp.zeros([], dtype),
        jnp.zeros([k], dtype),
        jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), dtype), params),
        jnp.zeros([k], dtype),
        jnp.zeros([], jnp.int32),
        jnp.array(True),
    )

  def estimate(params, loss_fn, batch, key, old):
    check_k(k, params, who)
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
                         res.residual_norms,
                         jnp.asarray(res.num_matvecs, jnp.int32),
                         jnp.asarray(res.converged, bool))

  def draw(factor, key, params):
    # U diag(sqrt(s w)) U^T xi with xi ~ N(0, I_D) drawn in the full
    # space: covariance U diag(s w) U^T, as sum_j sqrt(s w_j) z_j u_j, but
    # the same draw whatever signs, or rotations inside a cluster of equal
    # weights, the solve gave U (one device, a mesh, several processes).
    del params
    w = weights(factor.eigenvalues)
    scale = scale_to(factor.trace, jnp.sum(w))
    xi = normal_like(key, jax.tree.map(lambda v: v[0], factor.eigenvectors))
    along = jax.vmap(lambda u: optax.tree_utils.tree_vdot(u, xi))(
        factor.eigenvectors)
    coef = jnp.sqrt(scale * w) * along
    return jax.tree.map(
        lambda v: jnp.tensordot(coef.astype(v.dtype), v, axes=1),
        factor.eigenvectors,
    )

  return refreshing_transform(
      who, init_factor, estimate, draw, LowRankNoiseState, refresh_every, key)
