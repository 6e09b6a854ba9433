"""The multiplicative-noise family (Wu et al., ICML 2020) and anticorrelated
noise (Orvieto et al., ICML 2022) as optax transforms.

SGD's noise is the gradient matrix times random weights on the examples:
the minibatch gradient is ``G^T w / n`` with ``w_i = (n/m) 1[i in S]``, so
its deviation from the mean gradient is ``G^T (w - 1) / n``. Any other
random weight vector gives a *multiplicative noise* of the same kind; Wu et
al. (2020) find that its class (Gaussian, Bernoulli, sampling) matters
little as long as the covariance is SGD's. Each draw is one backward pass
with the weights on the per-example losses
(:func:`anisonoise.sample_sgd_noise` is the Gaussian, centred member);
none forms ``C`` or a per-example gradient.

:func:`anticorrelated_noise` wraps any noise transform so that consecutive
draws are anticorrelated (Anti-PGD when the inner noise is isotropic).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from anisonoise._src import batching
from anisonoise._src import covariance
from anisonoise._src import sums
from anisonoise._src.refresh import (
    KeyLike,
    Magnitude,
    add_noise,
    check_step_data,
    key_data,
    scale_to,
    state_key,
    transform_key,
)

Params = Any
WeightsFn = Callable[[jax.Array], jax.Array]


class MultiplicativeNoiseState(NamedTuple):
  """State of :func:`multiplicative_noise`: ``count`` (int32, updates so
  far) and ``rng_key`` (the key of the next draw)."""

  count: chex.Array
  rng_key: chex.Array  # uint32 key data


class AnticorrelatedNoiseState(NamedTuple):
  """State of :func:`anticorrelated_noise`: ``count`` (int32), the wrapped
  transform's state ``inner_state`` and its last draw ``previous`` (a pytree
  like the updates; zero before the first step)."""

  count: chex.Array
  inner_state: Any
  previous: Params


# --------------------------------------------------------------------------
# Weight classes: zero-mean weights of unit variance on the n_e examples of
# the estimation set (n, or the sub-batch's b).
# --------------------------------------------------------------------------


def _gaussian(key, n_e, m, dtype):
  del m
  return jax.random.normal(key, (n_e,), dtype)


def _bernoulli(key, n_e, m, dtype):
  p = m / n_e
  keep = jax.random.bernoulli(key, p, (n_e,)).astype(dtype)
  return (keep / p - 1) * math.sqrt(p / (1 - p))


def _sampling(key, n_e, m, dtype):
  chosen = jax.random.permutation(key, n_e)[:m]
  a = jnp.zeros((n_e,), dtype).at[chosen].set(n_e / m) - 1
  return a * math.sqrt(m * (n_e - 1) / (n_e * (n_e - m)))


_WEIGHTS = {"gaussian": _gaussian, "bernoulli": _bernoulli,
            "sampling": _sampling}
_SUBSAMPLING = ("bernoulli", "sampling")


def _check_weights(weights, centred, batch_size, trace):
  if callable(weights):
    return
  if not isinstance(weights, str) or weights not in _WEIGHTS:
    raise ValueError(
        "multiplicative_noise: weights must be 'gaussian', 'bernoulli',"
        " 'sampling' or a function key -> (n,) weights, got"
        f" {weights!r}.")
  if weights in _SUBSAMPLING:
    # The number of examples picked: a shape, not a schedulable scale.
    batching.check_static("batch_size", batch_size)
  if weights in _SUBSAMPLING and trace is not None:
    raise ValueError(
        f"multiplicative_noise: weights={weights!r} draws minibatches of"
        " batch_size=m examples, so its magnitude is SGD's: give batch_size,"
        " not trace= (or use weights='gaussian' with trace=).")
  if weights == "sampling" and not centred:
    raise ValueError(
        "multiplicative_noise: weights='sampling' sum to zero over the"
        " examples, so their noise is always centred (covariance C/m);"
        " centred=False applies to 'gaussian', 'bernoulli' and your own"
        " weights.")


def _check_user_weights(w, n_e):
  """Shape and dtype of a user's weights, and their values when concrete."""
  shape, dtype = jnp.shape(w), jnp.result_type(w)
  if shape != (n_e,) or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        "multiplicative_noise: weights(key) must return one float weight per"
        f" example of the estimation set, shape ({n_e},), got shape {shape}"
        f" and dtype {dtype}.")
  if not isinstance(w, jax.core.Tracer) and not bool(
      jnp.all(jnp.isfinite(w))):
    raise ValueError(
        "multiplicative_noise: weights(key) returned non-finite values; the"
        " noise would be NaN. Return finite weights.")


def _fisher_trace(loss_fn, params, batch, chunk_size):
  """``Tr(F) = Tr(C) + ||gbar||^2``, ``F = (1/n) sum_i g_i g_i^T``."""
  tr_c = covariance.covariance_trace(loss_fn, params, batch,
                                     chunk_size=chunk_size)
  gbar = sums.mean_grad(loss_fn, params, batch, chunk_size=chunk_size)
  return tr_c + optax.tree_utils.tree_norm(gbar, squared=True)


def multiplicative_noise(
    weights: str | WeightsFn = "gaussian",
    *,
    centred: bool = True,
    batch_size: int | None = None,
    trace: chex.Numeric | None = None,
    replacement: bool = True,
    estimation_size: int | None = None,
    key: KeyLike | None = None,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """M-SGD: SGD's noise as the gradient matrix times random weights.

  With ``G`` the ``n x D`` per-example gradients (rows ``g_i``) and ``v``
  random weights on the ``n`` examples of zero mean and unit variance,

  .. math::
    \\epsilon_t = \\sqrt{s / n}\\; G_t^\\top (v - \\bar v \\mathbf 1)
    \\quad\\text{(centred)}, \\qquad
    \\epsilon_t = \\sqrt{s / n}\\; G_t^\\top v
    \\quad\\text{(uncentred)},

  whose covariance is ``s C`` (``C`` of paper Eq. 5: MSGD-Cov) or ``s F``
  with ``F = (1/n) sum_i g_i g_i^T`` (the Fisher: MSGD-Fisher), where
  ``s = 1/m`` matches the noise of SGD with minibatch ``m = batch_size``
  exactly (paper Eq. 5; ``m = n`` by default), ``s = (n-m)/((n-1) m)``
  that of minibatches drawn without replacement (``replacement=False``,
  as :func:`anisonoise.sgd_noise`), or ``s = T / Tr(C)`` (``T / Tr(F)``)
  for a fixed ``trace=T``. It costs one backward pass with
  the weights on the per-example losses.

  The weight classes and the scale that makes each exact. ``w`` are the
  raw multiplicative weights (``E w_i = 1``: the noisy gradient is
  ``G^T w / n``), ``v`` their normalised deviation with ``E[v v^T]``
  ``= I`` (or ``I - 11^T/n`` for sampling), so that
  ``Cov(G^T v) = G^T G`` or ``G^T (I - 11^T/n) G = n C``:

  * ``"gaussian"``: ``v = z ~ N(0, I_n)``. Centred, ``Cov(G^T (z - zbar))``
    ``= n C``; uncentred ``n F``. With ``s = 1/m`` this is
    :func:`anisonoise.sgd_noise` (centred; the same draw for the same
    key).
  * ``"bernoulli"``: each example kept independently with probability
    ``p = m/n`` and weighted ``1/p`` (``w_i = b_i / p``, ``E w = 1``,
    ``Var w_i = (1-p)/p``; Wu et al.'s MSGD-Bernoulli with ``p = 0.02``,
    weight 50 for ``m = 20`` of ``n = 1000``). Unscaled, ``G^T (w - 1)/n``
    has covariance ``(1-p)/(p n) F = (n-m)/(n m) F``, ``1 - m/n`` of SGD's;
    ``v = (w - 1) sqrt(p/(1-p))`` restores ``F/m`` (and ``C/m`` centred).
    Needs ``m < n``.
  * ``"sampling"``: ``m`` distinct examples, ``w_i = (n/m) 1[i in S]``: the
    noise of an actual minibatch drawn without replacement,
    ``Cov(G^T (w - 1)/n) = (n-m)/((n-1) m) C``; ``v = (w - 1)
    sqrt(m (n-1) / (n (n-m)))`` rescales it to exactly ``C/m``, the noise of
    minibatches drawn with replacement (paper Eq. 5); with
    ``replacement=False`` the draw is an actual minibatch's noise. Always
    centred (``sum_i (w_i - 1) = 0``). Needs ``m < n``.
  * a function ``key -> v`` of your own, returning one weight per example
    (``(n,)``, or ``(b,)`` with ``estimation_size=b``): the noise is
    ``sqrt(s/n) G^T (v - vbar)`` (centred) or ``sqrt(s/n) G^T v``; weights
    with i.i.d. entries of unit variance (and zero mean, uncentred) give
    exactly ``C/m`` (``F/m``).

  With ``estimation_size=b`` the noise is drawn on a random sub-batch ``B``
  of ``b`` of the ``n`` examples, fresh every step (the "-B" variants of Wu
  et al.): one backward pass over ``b`` examples instead of ``n``. Given
  ``B`` the covariance is ``s C_B`` (``s F_B``); over ``B``, ``E F_B = F``
  and ``E C_B = (b-1)/b n/(n-1) C``, so the centred noise is multiplied by
  ``sqrt(b (n-1) / ((b-1) n))`` and both are again exactly ``C/m``
  (``F/m``) on average. Bernoulli and sampling weights then pick ``m`` of
  the ``b`` (``m < b``). With ``trace=T`` the sub-batch's own trace sets
  the scale: every draw has ``E||eps||^2 = T``.

  With ``trace=T``, ``Tr(C)`` (and ``||gbar||^2`` for ``F``) is computed
  exactly every step from per-example gradients, as
  :func:`anisonoise.sgd_noise` does.

  Settings taken from the authors' code (``uuujf/MultiNoise``,
  ``FashionMNIST/``): ``ggd.py`` (MSGD-Fisher) weights the losses by
  ``1 + std z``, ``ggdCov.py`` (MSGD-Cov) by ``1 + std (z - zbar)``,
  ``bgd.py`` (MSGD-Bernoulli) by ``50 Bernoulli(0.02)`` (uncentred), and
  ``gdStoF.py`` / ``gdStoCov.py`` put the Gaussian weights on
  ``noisesize`` examples of a random permutation (the "-B" variants). Their
  scale ``std`` is a flag; here it is derived from ``batch_size``
  (``std = sqrt(n/m)`` for the Gaussian classes).

  Args:
    weights: ``"gaussian"``, ``"bernoulli"``, ``"sampling"`` or a function
      of a PRNG key returning the ``(n,)`` (or ``(b,)``) weights. A wrong
      shape raises a ``ValueError``, and so do non-finite weights when
      ``update`` runs eagerly; under ``jit`` they make the noise (and so
      the update) non-finite, never hidden.
    centred: subtract the weights' mean over the examples (covariance ``C``)
      or not (``F``).
    batch_size: the SGD minibatch size ``m`` whose noise is matched
      (default ``n``; a scalar array may be scheduled with
      ``optax.inject_hyperparams``); also the number of examples Bernoulli
      and sampling weights pick (then a Python int).
    trace: a fixed target ``E||eps||^2`` instead of ``batch_size``
      (Gaussian and your own weights).
    replacement: match SGD with minibatches drawn with (``True``: ``C/m``)
      or without (``False``: ``(n-m)/(n-1) C/m``, ``batch_size`` an int)
      replacement.
    estimation_size: ``b``, draw the noise on a random sub-batch of ``b``
      examples (``2 <= b <= n`` centred, ``1 <= b <= n`` uncentred);
      ``None``: all ``n``.
    key: int seed or PRNG key; ``None``: a stream of its own.
    chunk_size: examples per chunk, for the backward pass (the same draw)
      and, with ``trace``, the exact trace.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs extra
    arguments ``loss_fn`` (``(params, batch) -> (n,)``) and ``batch``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (32, 6))
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> tx = optax.chain(anisonoise.multiplicative_noise(
    ...     'bernoulli', centred=False, batch_size=4, estimation_size=16),
    ...     optax.sgd(0.07))
    >>> state = tx.init(jnp.zeros(6))
    >>> u, state = tx.update(jnp.zeros(6), state, jnp.zeros(6),
    ...                      loss_fn=loss_fn, batch=batch)
    >>> u.shape
    (6,)

  References:
    Wu, Hu, Xiong, Huan, Braverman and Zhu, `On the Noisy Gradient Descent
    that Generalizes as SGD <https://arxiv.org/abs/1906.07405>`_, ICML 2020.

    Zhu et al., ICML 2019, Eqs. 5-7.
  """
  Magnitude(batch_size, trace, replacement)  # checks them
  if not replacement:
    batching.check_static("batch_size", batch_size)
  if not isinstance(centred, bool):
    raise ValueError(f"multiplicative_noise: centred must be True (covariance"
                     f" C) or False (the Fisher F), got {centred!r}.")
  _check_weights(weights, centred, batch_size, trace)
  if estimation_size is not None:
    batching.check_positive_int("multiplicative_noise: estimation_size",
                                estimation_size)
    if centred and estimation_size < 2:
      raise ValueError(
          "multiplicative_noise: a centred noise needs estimation_size >= 2"
          " (one example has no spread about its mean), got"
          f" {estimation_size}.")
  batching.check_chunk_size(chunk_size)
  key0 = transform_key(key)
  who = "multiplicative_noise"

  def init_fn(params):
    batching.check_params(params, who)
    return MultiplicativeNoiseState(jnp.zeros([], jnp.int32), key_data(key0))

  def update_fn(updates, state, params=None, *, loss_fn=None, batch=None,
                **extra_args):
    del extra_args
    batching.check_params(params, who)
    n = check_step_data(loss_fn, params, batch, who)
    # As sgd_noise splits its key: the same key, the same Gaussian draw.
    new_key, weights_key, subset_key = jax.random.split(
        state_key(state.rng_key), 3)
    n_e, correction = n, 1.0
    if estimation_size is not None:
      if estimation_size > n:
        raise ValueError(
            f"{who}: estimation_size={estimation_size} is larger than the"
            f" batch of n={n} examples; use estimation_size <= n.")
      n_e = estimation_size
      chosen = jax.random.permutation(subset_key, n)[:n_e]
      batch = jax.tree.map(lambda x: x[chosen], batch)
      if centred:
        correction = n_e * (n - 1) / ((n_e - 1) * n)
    m = n if batch_size is None else batch_size
    dtype = covariance.weights_dtype(params)
    if callable(weights):
      v = weights(weights_key)
      _check_user_weights(v, n_e)
      v = v.astype(dtype)
    else:
      if weights in _SUBSAMPLING and not m < n_e:
        raise ValueError(
            f"{who}: weights={weights!r} picks m = batch_size = {m} of the"
            f" {n_e} examples of the estimation set; it needs m < {n_e}"
            " (m equal to it draws no noise).")
      v = _WEIGHTS[weights](weights_key, n_e, m, dtype)
    if centred:
      v = v - jnp.mean(v)
    eps = covariance.jacobian_transpose(loss_fn, params, batch,
                                        chunk_size=chunk_size)(v)
    s: jax.Array | float
    if trace is None:
      s = correction * covariance.sgd_scale(n, m, replacement)
    else:
      total = (covariance.covariance_trace(loss_fn, params, batch,
                                           chunk_size=chunk_size)
               if centred else _fisher_trace(loss_fn, params, batch,
                                             chunk_size))
      s = scale_to(jnp.asarray(trace, total.dtype), total)
    factor = jnp.sqrt(s / n_e)
    eps = jax.tree.map(lambda e: (factor * e).astype(e.dtype), eps)
    return add_noise(updates, eps), MultiplicativeNoiseState(
        optax.safe_increment(state.count), key_data(new_key))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def anticorrelated_noise(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Anticorrelated noise: each draw of ``inner`` minus the previous one.

  With ``z_t`` the noise ``inner`` adds at step ``t`` (recovered as its
  output minus the updates it received), the noise added is

  .. math::
    \\epsilon_t = z_t - z_{t-1}, \\quad z_{-1} = 0.

  For independent draws of covariance ``Sigma`` (the inner noise at a fixed
  point), ``Cov(eps_t) = 2 Sigma`` and the lag-one autocovariance is
  ``Cov(eps_t, eps_{t-1}) = -Sigma`` (zero at larger lags); the first step
  adds ``z_0`` alone (covariance ``Sigma``). The perturbations telescope:
  the sum of ``T`` steps' noise is ``z_{T-1}``, so the noise does not
  accumulate as a random walk. With ``inner = isotropic_noise(std)`` this
  is Anti-PGD (Orvieto et al., 2022): their perturbation of the
  parameters ``xi_{t+1} - xi_t``, ``xi ~ N(0, sigma^2 I)``, is
  ``-lr eps_t`` with ``std = sigma / lr`` (the sign does not matter for a
  symmetric noise). Any noise of the library can be made anticorrelated.

  The inner draw is recovered in the updates' dtype: in float32, noise far
  smaller than the gradient loses relative precision (about ``1e-7
  |grad| / |z|``).

  Args:
    inner: a noise transform (``isotropic_noise``, ``sgd_noise``,
      ``multiplicative_noise`` ...). Extra arguments are passed to it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that needs the extra
    arguments ``inner`` needs.

  Example:
    >>> import jax.numpy as jnp, optax, anisonoise
    >>> tx = optax.chain(
    ...     anisonoise.anticorrelated_noise(anisonoise.isotropic_noise(0.1)),
    ...     optax.sgd(0.01))
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> state[0].previous['w'].shape
    (3,)

  References:
    Orvieto, Kersting, Proske, Bach and Lucchi, `Anticorrelated Noise
    Injection for Improved Generalization
    <https://arxiv.org/abs/2202.02831>`_, ICML 2022.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        "anticorrelated_noise wraps a noise transform (an"
        " optax.GradientTransformation such as"
        f" anisonoise.isotropic_noise(0.1)), got {inner!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AnticorrelatedNoiseState(jnp.zeros([], jnp.int32),
                                    inner.init(params),
                                    jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    out, inner_state = inner.update(updates, state.inner_state, params,
                                    **extra_args)
    draw = jax.tree.map(jnp.subtract, out, updates)
    eps = jax.tree.map(lambda z, p: z - p.astype(z.dtype), draw,
                       state.previous)
    previous = jax.tree.map(lambda z, p: z.astype(p.dtype), draw,
                            state.previous)
    return add_noise(updates, eps), AnticorrelatedNoiseState(
        optax.safe_increment(state.count), inner_state, previous)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
