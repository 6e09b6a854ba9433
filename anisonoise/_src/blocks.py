"""Diagnostics on a block of the parameters: which layers carry the
curvature and the noise."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from anisonoise._src.training import _FullParamsLoss

Params = Any
LossFn = Callable[[Params, Any], jax.Array]


def param_block(
    loss_fn: LossFn,
    params: Params,
    mask: Params | Callable[[Params], Params],
) -> tuple[LossFn, Params]:
  """The loss and parameters of a block of ``params``, the rest held fixed.

  Returns ``(block_loss_fn, block_params)`` to pass to any diagnostic in
  place of ``(loss_fn, params)``: ``block_params`` keeps the selected leaves
  and puts ``optax.MaskedNode()`` (no leaves) elsewhere, as ``optax.masked``
  does, and ``block_loss_fn`` fills the others in from ``params``. With
  ``S`` the selected coordinates, every quantity is then the block's:
  ``hessian_spectrum`` gives the eigenpairs of ``H[S, S]``,
  ``escape_indicator`` gives ``Tr(H[S, S] C[S, S]) / m``,
  ``gradient_noise_norms`` the norms of ``g[S]`` and of the noise's ``S``
  part. (The noises take the same blocks through ``optax.masked`` and
  :func:`anisonoise.with_full_params`.)

  The blocks' values do not add up to the whole's in general: the
  eigenvalues of ``H[S, S]`` interlace with ``H``'s, and ``Tr(H C)`` has
  cross-block terms; traces do add up (``Tr H = sum_S Tr H[S, S]``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (n,)``.
    params: the full parameters.
    mask: a pytree of booleans with the structure of ``params`` (or a
      prefix of it: ``True`` on a subtree selects all of it), or a function
      of ``params`` returning one, as ``optax.masked`` takes;
      :func:`param_blocks` makes one per layer.

  Returns:
    ``(block_loss_fn, block_params)``.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> loss_fn = lambda p, b: (b @ p['w'] + p['b']) ** 2
    >>> params = {'w': jnp.ones(2), 'b': jnp.zeros(())}
    >>> f, p = anisonoise.param_block(loss_fn, params, {'w': True, 'b': False})
    >>> spec = anisonoise.hessian_spectrum(f, p, x, num_eigs=2, key=0)
    >>> spec.eigenvalues.shape  # the 2 x 2 block of H on w
    (2,)

  References:
    Zhu et al., ICML 2019, Eq. 9 (``Tr(H Sigma)``) and Section 5 (the
    Hessian spectrum), on a block; Yao et al., PyHessian (2020), per-layer
    eigenvalues.
  """
  tree = mask(params) if callable(mask) else mask

  def select(keep, sub):
    if not isinstance(keep, bool) and not (
        hasattr(keep, "dtype") and keep.shape == ()):
      raise TypeError(
          "param_block: the mask's leaves must be booleans (True selects the"
          f" leaf or subtree), got {type(keep).__name__}.")
    if bool(keep):
      return sub
    return jax.tree.map(lambda _: optax.MaskedNode(), sub)

  try:
    block = jax.tree.map(select, tree, params)
  except ValueError as e:
    raise ValueError(
        "param_block: the mask must have the structure of params, or a"
        f" prefix of it ({e}).") from e
  if not jax.tree.leaves(block):
    raise ValueError("param_block: the mask selects no parameter.")
  return _FullParamsLoss(loss_fn, params), block


def param_blocks(
    params: Params, depth: int = 1, *,
    group: Callable[[str], str | None] | None = None,
) -> dict[str, Params]:
  """One mask per block of ``params``: the leaves grouped by the first
  ``depth`` keys of their paths (or by ``group``), in order of appearance.

  Args:
    params: a pytree (a dict, an ``nnx.State``, ...).
    depth: how many path keys name a block (``1``: the top-level entries,
      e.g. an NNX model's attributes; ``2``: their children, e.g. one entry
      per block of an ``nnx.List``).
    group: instead of ``depth``, a function of a leaf's path (its keys
      joined by ``/``, e.g. ``"blocks/0/attention/query/kernel"``)
      returning its block's name, or ``None`` to leave the leaf out.

  Returns:
    ``{name: mask}``, ``name`` the keys joined by ``/``; each mask is for
    :func:`param_block`.

  Example:
    >>> import jax.numpy as jnp, anisonoise
    >>> params = {'l1': {'w': jnp.ones(3), 'b': jnp.ones(())},
    ...           'l2': {'w': jnp.ones(3)}}
    >>> sorted(anisonoise.param_blocks(params))
    ['l1', 'l2']
  """
  if depth < 1:
    raise ValueError(f"param_blocks: depth must be >= 1, got {depth}.")
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      params)[0]]

  def name(path):
    if group is not None:
      return group("/".join(_key(k) for k in path))
    return "/".join(_key(k) for k in path[:depth])

  names = [b for b in dict.fromkeys(name(p) for p in paths) if b is not None]
  return {b: jax.tree_util.tree_map_with_path(
      lambda path, _, b=b: name(path) == b, params) for b in names}


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)
