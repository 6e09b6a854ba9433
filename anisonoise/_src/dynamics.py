"""The compared dynamics of Table 1 (Zhu et al., 2019), by name.

One table, used by every study, benchmark and test that compares the
dynamics: the name of each row of Table 1 (plus SGD itself and GD + exact
SGD noise) and the noise transform that turns a full-batch GD step into it.
The follow-ups' dynamics (M-SGD of Wu et al., 2020; Anti-PGD of Orvieto et
al., 2022) are named in a second tuple, so that the paper's studies keep
comparing Table 1.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from anisonoise._src import family
from anisonoise._src import transforms

DYNAMICS: tuple[str, ...] = (
    "GD", "GLD const", "GLD dynamic", "GLD diag", "GLD leading",
    "GLD Hessian", "GLD 1st eigvec(H)", "SGD", "GD + SGD noise",
)

FAMILY_DYNAMICS: tuple[str, ...] = (
    "MSGD-Cov", "MSGD-Fisher", "MSGD-Bernoulli", "MSGD-Cov-B",
    "MSGD-Fisher-B", "Anti-PGD",
)


def _msgd(weights: str, centred: bool, sub_batch: bool) -> Callable[
    ..., optax.GradientTransformationExtraArgs]:
  """A row of M-SGD: :func:`family.multiplicative_noise` with its weights
  fixed; it takes the factory's other keywords (``estimation_size`` only
  for the "-B" rows)."""

  def row(**settings):
    return family.multiplicative_noise(weights, centred=centred, **settings)

  params = inspect.signature(family.multiplicative_noise).parameters
  row.__signature__ = inspect.Signature([  # type: ignore[attr-defined]  # read by inspect.signature
      p for name, p in params.items()
      if name not in ("weights", "centred")
      and (sub_batch or name != "estimation_size")])
  return row


def _anti_pgd(std, **settings):
  """Anti-PGD: isotropic noise made anticorrelated."""
  return family.anticorrelated_noise(transforms.isotropic_noise(std,
                                                                **settings))


_anti_pgd.__signature__ = inspect.signature(  # type: ignore[attr-defined]  # read by inspect.signature
    transforms.isotropic_noise)


# ``None``: no noise transform (GD; SGD, whose noise is the minibatch's).
_FACTORIES: dict[str, Callable[..., optax.GradientTransformationExtraArgs]
                 | None] = {
    "GD": None,
    "GLD const": transforms.isotropic_noise,
    "GLD dynamic": transforms.dynamic_isotropic_noise,
    "GLD diag": transforms.diagonal_noise,
    "GLD leading": transforms.leading_noise,
    "GLD Hessian": transforms.hessian_noise,
    "GLD 1st eigvec(H)": transforms.hessian_eigvec_noise,
    "SGD": None,
    "GD + SGD noise": transforms.sgd_noise,
    # The authors' FashionMNIST scripts: ggdCov.py, ggd.py, bgd.py,
    # gdStoCov.py, gdStoF.py (uuujf/MultiNoise).
    "MSGD-Cov": _msgd("gaussian", True, False),
    "MSGD-Fisher": _msgd("gaussian", False, False),
    "MSGD-Bernoulli": _msgd("bernoulli", False, False),
    "MSGD-Cov-B": _msgd("gaussian", True, True),
    "MSGD-Fisher-B": _msgd("gaussian", False, True),
    "Anti-PGD": _anti_pgd,
}


def _accepted(factory) -> set[str]:
  return set(inspect.signature(factory).parameters)


def dynamics_noise(
    name: str, *, std: float | None = None, k: int | None = None,
    **settings: Any,
) -> optax.GradientTransformationExtraArgs:
  """The noise transform of one compared dynamics, by its name.

  Chained in front of ``optax.sgd(lr)`` and fed full-batch gradients, the
  transform gives the dynamics named (paper Eq. 7)::

    theta_{t+1} = theta_t - lr (grad L(theta_t) + eps_t),
    eps_t ~ N(0, Sigma_t)

  with ``Sigma_t`` the structure of the row of Table 1. ``"GD"`` and
  ``"SGD"`` return a transform that adds nothing (it passes the updates
  through and ignores the extra arguments): GD is the full-batch gradient
  alone, and SGD's noise is that of the minibatch gradient itself, which
  the training loop provides by computing the gradient on a sampled
  minibatch of ``m`` examples (``E||eps||^2 = Tr(C)/m``, paper Eq. 5)
  rather than on the full batch.

  The follow-ups' dynamics (:data:`FAMILY_DYNAMICS`) are
  :func:`anisonoise.multiplicative_noise` with the weights of Wu et al.
  (2020): ``"MSGD-Cov"`` (Gaussian, centred: ``C/m``), ``"MSGD-Fisher"``
  (Gaussian, uncentred: ``F/m``), ``"MSGD-Bernoulli"`` (Bernoulli,
  uncentred, as their ``bgd.py``), and ``"MSGD-Cov-B"`` /
  ``"MSGD-Fisher-B"`` on a random sub-batch of ``estimation_size``
  examples (required for them); and ``"Anti-PGD"``,
  :func:`anisonoise.anticorrelated_noise` of ``isotropic_noise(std)``.

  One set of settings serves every dynamics of a study: each factory takes
  the keyword arguments it accepts (``batch_size``, ``trace``,
  ``refresh_every``, ``key``, ``chunk_size``, the solver's ``num_iters``,
  ``tol``, ``max_matvecs`` ...) and ignores those that do not apply to its
  structure (``refresh_every`` means nothing to GLD const). A keyword that no
  dynamics accepts is an error.

  Args:
    name: one of :data:`DYNAMICS` or :data:`FAMILY_DYNAMICS`.
    std: the standard deviation of GLD const and Anti-PGD (required for
      them).
    k: the number of eigenpairs of GLD leading and GLD Hessian (required for
      them).
    **settings: keyword arguments of the factories (see above).

  Returns:
    The noise transform; for ``"GD"`` and ``"SGD"`` one that adds nothing.

  Raises:
    ValueError: for an unknown name, a keyword no factory accepts, or a
      missing ``std`` / ``k`` / ``estimation_size``.

  Example:
    >>> import anisonoise
    >>> tx = anisonoise.dynamics_noise('GLD Hessian', k=20, batch_size=20,
    ...                                refresh_every=10, key=3)
    >>> anisonoise.dynamics_noise('GLD const', std=1e-3, batch_size=20)
    GradientTransformationExtraArgs(init=..., update=...)
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(anisonoise.dynamics_noise("SGD"), optax.sgd(0.5))
    >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    >>> u.tolist()  # -lr * (the minibatch gradient given)
    [-0.5, -0.5]
    >>> tx = anisonoise.dynamics_noise('MSGD-Fisher-B', batch_size=20,
    ...                                estimation_size=100)

  References:
    Zhu et al., "The Anisotropic Noise in Stochastic Gradient Descent",
    ICML 2019, Table 1 and Section 5.

    Wu et al., "On the Noisy Gradient Descent that Generalizes as SGD",
    ICML 2020. Orvieto et al., "Anticorrelated Noise Injection for Improved
    Generalization", ICML 2022.
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown dynamics {name!r}; choose from"
                     f" {list(DYNAMICS + FAMILY_DYNAMICS)}.")
  known = set().union(*(_accepted(f) for f in _FACTORIES.values() if f))
  unknown = sorted(set(settings) - known)
  if unknown:
    raise ValueError(f"dynamics_noise: no dynamics takes {unknown}; the"
                     f" factories take {sorted(known - {'std', 'k'})}.")
  factory = _FACTORIES[name]
  if factory is None:
    return optax.with_extra_args_support(optax.identity())
  kwargs = {a: v for a, v in settings.items() if a in _accepted(factory)}
  if name in ("GLD const", "Anti-PGD"):
    if std is None:
      raise ValueError(f"dynamics_noise({name!r}) needs std=, the standard"
                       " deviation of its isotropic noise.")
    return factory(std, **kwargs)
  if name in ("GLD leading", "GLD Hessian"):
    if k is None:
      raise ValueError(f"dynamics_noise({name!r}) needs k=, the number of"
                       " eigenpairs.")
    return factory(k, **kwargs)
  if name.endswith("-B") and kwargs.get("estimation_size") is None:
    raise ValueError(f"dynamics_noise({name!r}) needs estimation_size=, the"
                     " size of the random sub-batch the noise is drawn on.")
  return factory(**kwargs)
