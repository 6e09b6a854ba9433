"""Monte Carlo estimators: one home for the estimate type, the mapping of
random probes and Hutchinson's trace estimator.

Used by the engine (``covariance_trace``) and the diagnostics
(``hessian_trace``, the stochastic ``escape_indicator``,
``expected_sharpness``, ``spectral_density``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from anisonoise._src import batching
from anisonoise._src import sums
from anisonoise._src.batching import Params

# Random probes or samples vectorised at once by the stochastic estimators
# on a CPU. 1: on the conv-free LeNet (1,200 images) vectorising HVPs costs
# more than it saves: stochastic Tr(H Sigma) with 64 samples took 34.7 s in
# chunks of 8 and 14.5 s one at a time (16 samples: 8.0 s against 3.6 s).
PROBE_CHUNK = 1
# Elsewhere (GPU, TPU) sequential products are launch-bound and vectorised
# ones cheap; 8 probes at once hold 8 copies of the activations.
ACCELERATOR_PROBE_CHUNK = 8


KeyLike = int | jax.Array  # NumPy integers too (see canonical_key)

_KEY_HELP = (
    "an int seed (Python or NumPy integer, or a JAX integer scalar, traced"
    " ones included), a typed PRNG key (jax.random.key(0)) or a raw uint32[2]"
    " key (jax.random.PRNGKey(0))")


def canonical_key(key: KeyLike, who: str = "key") -> jax.Array:
  """The typed PRNG key of ``key``: the one canonicaliser of every ``key=``
  argument of the library (transforms and diagnostics alike).

  Accepts what ``optax``'s ``canonicalize_key`` accepts: an int seed (also a
  NumPy integer or a JAX integer scalar, traced ones included, so that
  ``jax.vmap`` over seeds works), a typed key (returned as is) or a raw
  ``uint32[2]`` key (wrapped). Booleans and anything else are refused.
  """
  if isinstance(key, (bool, np.bool_)):
    raise ValueError(f"{who} must be {_KEY_HELP}; got the bool {key!r}.")
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  if isinstance(key, np.ndarray):
    key = jnp.asarray(key)
  if isinstance(key, (jax.Array, jax.core.Tracer)):
    dtype = key.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ():
      return key
    if (jnp.issubdtype(dtype, jnp.integer) and key.shape == ()
        and dtype != jnp.bool_):
      return jax.random.key(key)
    if dtype == jnp.uint32 and key.shape == (2,):
      return jax.random.wrap_key_data(key)
  raise ValueError(f"{who} must be {_KEY_HELP}; got {key!r}.")


_default_streams = itertools.count()


def default_key() -> jax.Array:
  """A key of its own for a transform constructed with ``key=None``:
  ``fold_in(key(0), j)`` for the ``j``-th such construction in the process.
  Two transforms never share a stream, and a script that builds its
  transforms in the same order draws the same numbers on every run."""
  return jax.random.fold_in(jax.random.key(0), next(_default_streams))


class MonteCarloEstimate(NamedTuple):
  """A Monte Carlo mean and its standard error (sample sd / sqrt(N))."""

  mean: jax.Array
  stderr: jax.Array


def mean_and_sem(samples: jax.Array) -> MonteCarloEstimate:
  """The mean of ``samples`` (along axis 0) and its standard error; NaN
  for one sample, which has no spread to estimate (not a misleading 0)."""
  num = samples.shape[0]
  sd = jnp.std(samples, ddof=1) if num > 1 else jnp.full_like(samples[0],
                                                               jnp.nan)
  return MonteCarloEstimate(jnp.mean(samples), sd / math.sqrt(num))


def check_method(who: str, method: str, methods: dict[str, str], *,
                 random: str, key: Any, num_samples: Any,
                 samples_name: str = "num_probes") -> jax.Array | None:
  """One home of an estimator choice's checks: ``method`` is one of
  ``methods`` (name -> what it uses, quoted in the error), and the random
  one (``random``) has a PRNG ``key`` and ``num_samples >= 1`` (called
  ``samples_name`` in the caller's signature). Returns ``key`` as a typed
  key (:func:`canonical_key`), ``None`` when none was given."""
  if method not in methods:
    choices = " or ".join(f"{m!r} ({what})" for m, what in methods.items())
    raise ValueError(f"{who}: method must be {choices}, got {method!r}.")
  if method == random:
    if key is None:
      raise ValueError(f"{who}(method={random!r}) needs a PRNG key"
                       " (key=0 or key=jax.random.key(0)).")
    batching.check_positive_int(samples_name, num_samples)
  return None if key is None else canonical_key(key)


def probe_chunk() -> int:
  """Probes vectorised at once on this backend (see :data:`PROBE_CHUNK`)."""
  return PROBE_CHUNK if jax.default_backend() == "cpu" else (
      ACCELERATOR_PROBE_CHUNK)


def map_probes(fn: Callable[[jax.Array], Any], keys: jax.Array,
               data: Any) -> Any:
  """``fn`` on every key (or every entry along axis 0 of a pytree):
  vectorised in :func:`probe_chunk` chunks for a
  batch in memory, a Python loop for a stream (whose products run eagerly).
  """
  if isinstance(data, sums.Batches):
    num = jax.tree.leaves(keys)[0].shape[0]
    outs = [fn(jax.tree.map(lambda x: x[i], keys)) for i in range(num)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return batching.map_chunks(fn, keys, probe_chunk())


def hutchinson(quadratic_form: Callable[[Params], jax.Array], like: Params,
               key: jax.Array, num_probes: int,
               data: Any) -> MonteCarloEstimate:
  """Hutchinson's estimate of ``Tr(A)`` from ``v -> v^T A v``.

  The mean of ``v^T A v`` over ``num_probes`` Rademacher probes ``v``
  (entries +-1, pytrees like ``like``): unbiased, with variance
  ``2 (||A||_F^2 - sum_j A_jj^2) / num_probes`` (the diagonal adds none).
  ``data`` (the batch or stream the form sums over) decides how the probes
  are mapped (:func:`map_probes`).
  """
  flat, unravel = ravel_pytree(like)

  def probe(k):
    return quadratic_form(unravel(jax.random.rademacher(k, flat.shape,
                                                        flat.dtype)))

  return mean_and_sem(map_probes(probe, jax.random.split(key, num_probes),
                                 data))
