"""The noise transforms in the training loops users already have.

The transforms need two extra arguments at update time, ``loss_fn`` and
``batch`` (paper Eq. 7 with ``Sigma_t`` estimated from the loss). Plain
``optax`` and ``nnx.Optimizer.update(model, grads, **extras)`` pass them
on; three places need a small piece:

- Flax Linen's ``TrainState.apply_gradients`` calls ``tx.update`` without
  extras: :class:`NoisyTrainState` is the same state whose
  ``apply_gradients`` passes ``loss_fn`` and ``batch`` on.
- An NNX model with batch statistics and dropout: :func:`nnx_loss` builds
  the ``loss_fn(params, batch)`` over the ``nnx.Param`` state alone,
  evaluated in inference mode.
- ``optax.masked`` / ``optax.partition`` hand their inner transforms only
  the selected parameters: :func:`with_full_params` lets the loss see all
  of them.
- ``optax.MultiSteps`` calls its inner transform on every micro-step:
  :func:`multi_steps` calls it on the real steps only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

from anisonoise._src import batching

Params = Any


class NoisyTrainState(train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` feeds the noise.

  ``TrainState.apply_gradients(grads=g, **kwargs)`` calls
  ``tx.update(g, opt_state, params)`` without extra arguments and passes
  ``kwargs`` to ``.replace()``; this subclass passes ``loss_fn`` and
  ``batch`` to ``tx.update`` (paper Eq. 7: ``Sigma_t`` is estimated from
  them), so every noise transform of the library works in a Linen loop::

    state = anisonoise.NoisyTrainState.create(apply_fn=model.apply,
                                              params=params, tx=tx)
    state = state.apply_gradients(grads=grads, loss_fn=loss_fn, batch=batch)

  ``loss_fn(params, batch)`` returns one loss per example (shape ``(n,)``)
  for ``params`` like ``state.params``. Everything else is ``TrainState``'s
  (``create``, ``replace``, serialization, checkpointing).

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> import flax.linen as nn
    >>> model = nn.Dense(1)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> def loss_fn(p, b):
    ...   return 0.5 * (model.apply({'params': p}, b['x'])[:, 0] - b['y']) ** 2
    >>> tx = optax.chain(anisonoise.hessian_noise(k=2, trace=1e-2),
    ...                  optax.sgd(0.1))
    >>> state = anisonoise.NoisyTrainState.create(apply_fn=model.apply,
    ...                                           params=params, tx=tx)
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(state.params)
    >>> state = state.apply_gradients(grads=grads, loss_fn=loss_fn,
    ...                               batch=batch)
    >>> int(state.step)
    1

  References:
    Zhu et al., ICML 2019, Eq. 7.
  """

  def apply_gradients(self, *, grads, loss_fn=None, batch=None, **kwargs):
    """``TrainState.apply_gradients`` with ``loss_fn`` and ``batch`` passed
    to ``tx.update``.

    Args:
      grads: gradients like ``.params``.
      loss_fn: per-example loss ``(params, batch) -> (n,)`` (the noise's
        estimation); ``None`` for transforms that need none.
      batch: the estimation batch (leading example axis).
      **kwargs: attributes to ``.replace()``, as in ``TrainState``.

    Returns:
      The state with ``step`` incremented and ``params`` and ``opt_state``
      updated.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        loss_fn=loss_fn, batch=batch)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


def nnx_loss(model: nnx.Module,
             loss_fn: Callable[[nnx.Module, Any], jax.Array],
             ) -> Callable[[Params, Any], jax.Array]:
  """The noise's ``loss_fn(params, batch)`` of an NNX model.

  The noise transforms perturb the parameters (``nnx.Param``) only, and
  their ``loss_fn`` is evaluated many times per step (per-example
  gradients, Hessian products); it must be a pure function of those
  parameters. This helper takes the model's other state (BatchNorm's
  running statistics, dropout's RNG counts, any other variable) as it is
  now, in inference mode (``nnx.view(model, deterministic=True,
  use_running_average=True)``: dropout off, BatchNorm with its running
  averages), and returns ``(params, batch) -> loss_fn(model_with(params),
  batch)``. Inference mode makes the per-example losses what the paper's
  ``C`` and ``H`` are defined over: independent of the other examples (no
  batch statistics) and deterministic (no dropout mask), so the noise
  covariance is that of the network as it is evaluated, and no RNG count
  or batch statistic is advanced by the estimation.

  Call it inside the jitted step, where the model is current; the
  ``params`` it takes are ``nnx.state(model, nnx.Param)``, which is what
  ``nnx.Optimizer(model, tx, wrt=nnx.Param).update`` passes to ``tx``::

    noise_loss = anisonoise.nnx_loss(model, per_example_loss)
    optimizer.update(model, grads, loss_fn=noise_loss, batch=batch)

  Args:
    model: the ``nnx.Module`` being trained.
    loss_fn: ``loss_fn(model, batch) -> (n,)``, one loss per example.

  Returns:
    ``loss_fn(params, batch) -> (n,)`` over the ``nnx.Param`` state.

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
    ...                        nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    >>> batch = jnp.ones((8, 3))
    >>> per_example = lambda m, b: m(b).sum(-1)
    >>> loss = anisonoise.nnx_loss(model, per_example)
    >>> loss(nnx.state(model, nnx.Param), batch).shape
    (8,)

  References:
    Zhu et al., ICML 2019, Section 2 (``C`` and ``H`` of the per-example
    losses).
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"nnx_loss: model must be an nnx.Module, got {type(model).__name__};"
        " for a params pytree, pass loss_fn(params, batch) to the transform"
        " directly.")
  graphdef, _, rest = nnx.split(  # type: ignore[misc]  # three parts for two filters
      nnx.view(model, deterministic=True, use_running_average=True,
               raise_if_not_found=False),
      nnx.Param, ...)

  def noise_loss(params, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch)

  return noise_loss


class _FullParamsLoss:
  """``loss_fn`` with the leaves a mask hides filled in from ``full``."""

  fills_masked = True  # read by ``batching.check_loss_and_batch``

  def __init__(self, loss_fn: Callable, full: Params):
    self.loss_fn = loss_fn
    self.full = full

  def __call__(self, params, batch):
    filled = jax.tree.map(
        lambda p, f: f if isinstance(p, optax.MaskedNode) else p,
        params, self.full,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return self.loss_fn(filled, batch)


def with_full_params(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Noise on a subset of the parameters, with the loss of all of them.

  ``optax.masked`` and ``optax.partition`` give their inner transforms the
  selected parameters only (``optax.MaskedNode`` elsewhere), so a noise
  inside them cannot evaluate the loss. Wrapped around the whole masked
  (or partitioned) transform, this passes the full parameters along: the
  inner noise's ``loss_fn`` sees the selected leaves (perturbed and
  differentiated) merged with the others (held fixed). The noise's
  covariance is then the selected block of ``C`` or ``H``:
  ``Sigma_sgd[S, S] = C[S, S] / m`` (paper Eq. 5), the top eigenpairs of
  ``H[S, S]``, and so on; the other leaves get no noise.

  Args:
    tx: a transform that contains ``optax.masked`` or ``optax.partition``
      around noise transforms.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the same state as
    ``tx``; ``update`` takes the same extra arguments.

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p['w'] + p['b'] - b['y']) ** 2
    >>> params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
    >>> noise = anisonoise.hessian_noise(k=2, trace=1e-2)
    >>> tx = optax.chain(
    ...     anisonoise.with_full_params(
    ...         optax.masked(noise, {'w': True, 'b': False})),
    ...     optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params, loss_fn=loss_fn,
    ...                      batch=batch)
    >>> bool(u['b'] == 0), bool(jnp.all(u['w'] != 0))  # noise on w only
    (True, True)

  References:
    Zhu et al., ICML 2019, Eq. 5 and Table 1.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    if loss_fn is not None and params is not None:
      loss_fn = _FullParamsLoss(loss_fn, params)
    return tx.update(updates, state, params, loss_fn=loss_fn, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _split_static(extra: dict) -> tuple[list, Callable[[list], dict]]:
  """``extra``'s array leaves, and a function that puts arrays back among
  its other leaves (functions, ints): the arrays cross a ``lax.cond`` as
  operands, the rest as closed-over Python values."""
  leaves, treedef = jax.tree.flatten(extra)
  is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

  def rebuild(arrays: list) -> dict:
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if a else x
                                        for x, a in zip(leaves, is_array)])

  return [x for x, a in zip(leaves, is_array) if a], rebuild


def multi_steps(
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` that runs ``opt`` on the real steps only.

  ``optax.MultiSteps(opt, k)`` accumulates ``k`` micro-batch gradients and
  lets ``opt`` act on their mean every ``k``-th call; but it calls
  ``opt.update`` on every micro-step and keeps the result of the last one,
  so a noise inside ``opt`` is estimated and drawn ``k`` times per real
  step (a refresh included) and ``k - 1`` of them are thrown away. This
  wrapper has the same state (``optax.MultiStepsState``), the same updates
  and the same ``extra_args`` (``loss_fn``, ``batch``), and skips
  ``opt.update`` at the micro-steps that emit nothing (a ``lax.cond``): the
  noise of paper Eq. 7 is drawn once per real step, from the ``batch``
  given at that step. Under ``jax.vmap`` over states (several seeds), the
  update runs at the micro-steps where some seed emits (the predicate is
  reduced over the seeds, as the transforms' refreshes are).

  Measured (``benchmarks/multi_steps.py``, k = 4, ``hessian_noise`` on the
  test suite's MLP): see ``benchmarks/README.md``, "Gradient
  accumulation".

  Args:
    opt: the transform applied to the accumulated gradient (noise and
      optimizer, e.g. ``optax.chain(anisonoise.hessian_noise(...),
      optax.sgd(lr))``).
    every_k_schedule: ``k``, or a function of the real step count returning
      it, as in ``optax.MultiSteps``.
    **kwargs: the other arguments of ``optax.MultiSteps``
      (``use_grad_mean``, ``should_skip_update_fn``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``optax.MultiStepsState``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, anisonoise
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> batch = {'x': x, 'y': x[:, 0]}
    >>> loss_fn = lambda p, b: 0.5 * (b['x'] @ p - b['y']) ** 2
    >>> tx = anisonoise.multi_steps(
    ...     optax.chain(anisonoise.hessian_noise(k=2, trace=1e-2),
    ...                 optax.sgd(0.1)), every_k_schedule=2)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for step in range(4):
    ...   g = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    ...   u, state = tx.update(g, state, params, loss_fn=loss_fn, batch=batch)
    ...   params = optax.apply_updates(params, u)
    >>> int(state.gradient_step)  # two real steps, two noise draws
    2

  References:
    Zhu et al., ICML 2019, Eq. 7.
  """
  opt = optax.with_extra_args_support(opt)
  real = optax.MultiSteps(opt, every_k_schedule, **kwargs)

  def hold_update(updates, state, params=None, **extra_args):
    """Zeros shaped like ``opt``'s updates, ``state`` unchanged."""
    arrays, rebuild = _split_static(extra_args)
    shapes = jax.eval_shape(
        lambda u, s, p, a: opt.update(u, s, p, **rebuild(a)),
        updates, state, params, arrays)[0]
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), state

  # The same bookkeeping (accumulator, counters) with ``opt`` not called.
  held = optax.MultiSteps(
      optax.GradientTransformationExtraArgs(opt.init, hold_update),
      every_k_schedule, **kwargs)
  k_of = (every_k_schedule if callable(every_k_schedule)
          else lambda _: every_k_schedule)

  def update_fn(updates, state, params=None, **extra_args):
    arrays, rebuild = _split_static(extra_args)
    emit = state.mini_step == k_of(state.gradient_step) - 1

    def run(multi):
      def branch(updates, state, params, arrays):
        return multi.update(updates, state, params, **rebuild(arrays))
      return branch

    return jax.lax.cond(batching.any_over_batch(emit), run(real), run(held),
                        updates, state, params, arrays)

  return optax.GradientTransformationExtraArgs(real.init, update_fn)
