"""The linearised Hessian product, staged: the data-only work done once.

``jax.linearize`` of the gradient leaves, in every Hessian-vector product,
operations whose one operand is fixed data (an activation, a pooling
layer's input, a kernel), and XLA:CPU runs three of their kinds slowly:

* weight-gradient convolutions (the kernel is an image-sized activation,
  the output a filter): LeNet's two took 184 and 62 ms as convolutions, 52
  and 49 ms as one matrix product per filter position, and inside an XLA
  loop (a jitted solve's) 774 and 555 ms;
* the max-pooling gradients ``select_and_scatter_add`` and
  ``select_and_gather_add``, which re-derive each window's maximum from the
  pooling layer's input at every product (about 40 ms each on LeNet);
* convolutions whose kernel is not in ``HWIO`` order (the input gradient's
  is ``HWOI``): 56 ms inside a loop against 15 ms on the transposed
  kernel.

:func:`staged` rewrites the product's program once per operator, on a CPU:
a weight-gradient convolution on a fixed image becomes one ``dot_general``
against that image's patches, extracted once; one on a product's own
activations, a ``dot_general`` per filter position on slices (no memory
kept); each non-overlapping max-pool's window maxima become a boolean mask
(the product is then a masked broadcast or sum); kernels are put in
``HWIO`` order. On every backend, each operation on fixed data alone is
evaluated once (but for one that grows it, a broadcast, which each product
computes again where XLA fuses it, so that nothing larger than the data is
held). Measured on the paper's LeNet written with ``lax.conv`` and
``max_pool`` (1,200 images, after 500 GD steps, 2-core x86-64 CPU, jax
0.10.2): a product from ``jax.linearize`` 0.38-0.47 s, staged 0.15 s from
a Python loop and 0.13 s in a ``fori_loop`` (0.72 s there unstaged), to a
relative difference of 3e-8. Patches and masks are held within
:data:`PATCH_BUDGET` times the bytes the linearisation holds (146 MB
against its 66 MB there).

Written here because neither JAX nor XLA offers it: it is a rewrite of the
product's jaxpr, evaluated with each equation's own primitive, so that
anything it does not recognise runs unchanged; a program it cannot stage
(an effect, an API it does not know) falls back to ``jax.linearize``'s
product.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# The patches and masks a staged operator may hold, as a multiple of the
# bytes its linearisation holds (the operator's memory is then at most
# ``1 + PATCH_BUDGET`` times a plain linearisation's); a rewrite that would
# exceed it is skipped and that operation runs as it is.
PATCH_BUDGET = 3.0

_CALLS = ("pjit", "jit", "closed_call", "core_call")
_POOLS = ("select_and_scatter_add", "select_and_gather_add")


def _is_var(a) -> bool:
  return not isinstance(a, jcore.Literal)


def _nbytes(atoms) -> int:
  return sum(int(np.prod(a.aval.shape)) * a.aval.dtype.itemsize
             for a in atoms)


def _array_bytes(arrays) -> int:
  return sum(int(np.prod(jnp.shape(x))) * jnp.result_type(x).itemsize
             for x in arrays)


def _bind(eqn, values):
  params = eqn.primitive.get_bind_params(eqn.params)
  out = eqn.primitive.bind(*values, **params)
  return out if eqn.primitive.multiple_results else [out]


def _inline(closed) -> tuple[list, list, dict]:
  """The equations of ``closed`` with calls (``jit``) inlined: returns the
  equations, the output atoms and the inlined calls' constants."""
  eqns: list = []
  alias: dict = {}
  consts: dict = {}

  def resolve(a):
    while _is_var(a) and a in alias:
      a = alias[a]
    return a

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      inner = eqn.params.get("jaxpr")
      if (eqn.primitive.name in _CALLS and not eqn.effects
          and isinstance(inner, jcore.ClosedJaxpr)):
        consts.update(zip(inner.jaxpr.constvars, inner.consts))
        for iv, ov in zip(inner.jaxpr.invars, eqn.invars):
          alias[iv] = resolve(ov)
        walk(inner.jaxpr)
        for io, oo in zip(inner.jaxpr.outvars, eqn.outvars):
          alias[oo] = resolve(io)
      else:
        eqns.append(eqn.replace(invars=[resolve(a) for a in eqn.invars]))

  walk(closed.jaxpr)
  return eqns, [resolve(a) for a in closed.jaxpr.outvars], consts


# --------------------------------------------------------------------------
# Weight-gradient convolutions as one matrix product against patches
# --------------------------------------------------------------------------


def _conv_plan(eqn) -> dict | None:
  """How a convolution with fixed ``lhs`` becomes ``patches . rhs``: the
  patches' free axes are the output's axes but its feature axis (in the
  output's order), their contracted axes ``rhs``'s axes but its output
  feature axis (in ``rhs``'s order), so the product is one
  ``dot_general`` on both operands as they are laid out."""
  p = eqn.params
  if (p["feature_group_count"] != 1 or p["batch_group_count"] != 1
      or any(d != 1 for d in p["lhs_dilation"])):
    return None
  dn = p["dimension_numbers"]
  rhs_shape = eqn.invars[1].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  nsp = len(rhs_shape) - 2
  return {
      "lhs_spec": tuple(dn.lhs_spec), "rhs_spec": tuple(dn.rhs_spec),
      "out_spec": tuple(dn.out_spec),
      "window": tuple(rhs_shape[dn.rhs_spec[2 + d]] for d in range(nsp)),
      "out": tuple(out_shape[dn.out_spec[2 + d]] for d in range(nsp)),
      "free": tuple(("b", None) if a == dn.out_spec[0]
                    else ("s", dn.out_spec.index(a) - 2)
                    for a in range(len(out_shape)) if a != dn.out_spec[1]),
      "contracted": tuple(("c", None) if a == dn.rhs_spec[1]
                          else ("k", dn.rhs_spec.index(a) - 2)
                          for a in range(len(rhs_shape))
                          if a != dn.rhs_spec[0]),
      "strides": tuple(p["window_strides"]),
      "padding": tuple(tuple(x) for x in p["padding"]),
      "rhs_dilation": tuple(p["rhs_dilation"]),
      "precision": p["precision"],
      "preferred_element_type": p["preferred_element_type"],
  }


def _patch_size(eqn, plan) -> int:
  lhs_shape = eqn.invars[0].aval.shape
  sizes = {"b": lhs_shape[plan["lhs_spec"][0]],
           "c": lhs_shape[plan["lhs_spec"][1]]}
  n = 1
  for kind, d in plan["free"] + plan["contracted"]:
    n *= sizes[kind] if kind in sizes else (
        plan["out"][d] if kind == "s" else plan["window"][d])
  return n


def _patches(lhs: jax.Array, plan: dict) -> jax.Array:
  """``P[free..., contracted...] = lhs[b, c, stride s + dilation k]``
  (zero-padded as the convolution pads), one gather."""
  ls = plan["lhs_spec"]
  pad = [(0, 0)] * lhs.ndim
  for d, (lo, hi) in enumerate(plan["padding"]):
    pad[ls[2 + d]] = (lo, hi)
  lhs = jnp.pad(lhs, pad)
  axes = plan["free"] + plan["contracted"]

  def along(kind, d, values):
    shape = [1] * len(axes)
    shape[axes.index((kind, d))] = len(values)
    return jnp.asarray(values, jnp.int32).reshape(shape)

  index = [None] * lhs.ndim
  index[ls[0]] = along("b", None, np.arange(lhs.shape[ls[0]]))
  index[ls[1]] = along("c", None, np.arange(lhs.shape[ls[1]]))
  for d in range(len(plan["window"])):
    index[ls[2 + d]] = (
        along("s", d, plan["strides"][d] * np.arange(plan["out"][d]))
        + along("k", d, plan["rhs_dilation"][d]
                * np.arange(plan["window"][d])))
  return lhs[tuple(index)]


def _conv_from_patches(patches, rhs, plan):
  nfree = len(plan["free"])
  rhs_axes = tuple(a for a in range(rhs.ndim) if a != plan["rhs_spec"][0])
  out = lax.dot_general(
      patches, rhs, ((tuple(range(nfree, patches.ndim)), rhs_axes), ((), ())),
      precision=plan["precision"],
      preferred_element_type=plan["preferred_element_type"])
  # The output feature axis (last) goes where the convolution puts it.
  perm = list(range(out.ndim - 1))
  perm.insert(plan["out_spec"][1], out.ndim - 1)
  return jnp.transpose(out, perm)


# The most output positions a weight-gradient convolution on a product's
# own operand is written for as slices and matrix products (one each).
MAX_SHIFTS = 64


def _conv_by_shifts(lhs, rhs, plan):
  """The convolution as one ``dot_general`` per output position (a slice
  of ``lhs`` against the whole kernel): for a weight gradient whose image
  operand changes with every product (no patches to keep), and few output
  positions (the filter's)."""
  ls, rs, os_ = plan["lhs_spec"], plan["rhs_spec"], plan["out_spec"]
  pad = [(0, 0)] * lhs.ndim
  for d, (lo, hi) in enumerate(plan["padding"]):
    pad[ls[2 + d]] = (lo, hi)
  lhs = jnp.pad(lhs, pad)
  nsp = len(plan["window"])
  dims = ((tuple(ls[1:]), tuple(rs[1:])), ((), ()))
  rows = []
  for pos in itertools.product(*(range(n) for n in plan["out"])):
    start, limit, step = [0] * lhs.ndim, list(lhs.shape), [1] * lhs.ndim
    for d in range(nsp):
      a = ls[2 + d]
      dil = plan["rhs_dilation"][d]
      start[a] = plan["strides"][d] * pos[d]
      limit[a] = start[a] + dil * (plan["window"][d] - 1) + 1
      step[a] = dil
    rows.append(lax.dot_general(
        lax.slice(lhs, start, limit, step), rhs, dims,
        precision=plan["precision"],
        preferred_element_type=plan["preferred_element_type"]))
  out = jnp.stack(rows).reshape(plan["out"] + rows[0].shape)
  # ``out``'s axes are the output's spatial ones, then its batch and
  # feature ones; axis ``a`` of the convolution's output is
  # ``out_spec.index(a)``.
  where = {0: nsp, 1: nsp + 1, **{2 + d: d for d in range(nsp)}}
  return jnp.transpose(out, [where[os_.index(a)] for a in range(out.ndim)])


def _kernel_order(eqn) -> tuple | None:
  """The transpose that puts a kernel in the spatial-input-output
  order (``HWIO`` for two spatial dimensions), if it is not in it: inside
  an XLA:CPU loop, a convolution whose kernel comes in another order (the
  input gradient's: ``HWOI``) ran 3.7 times slower than the same on the
  transposed kernel (56 against 15 ms on LeNet's second layer), outside
  one as fast."""
  rs = tuple(eqn.params["dimension_numbers"].rhs_spec)
  perm = rs[2:] + (rs[1], rs[0])
  return None if perm == tuple(range(len(rs))) else perm


def _conv_with_kernel(eqn, lhs, kernel, perm):
  dn = eqn.params["dimension_numbers"]
  nd = len(perm)
  rhs_spec = (nd - 1, nd - 2) + tuple(range(nd - 2))
  params = dict(eqn.params, dimension_numbers=lax.ConvDimensionNumbers(
      dn.lhs_spec, rhs_spec, dn.out_spec))
  return lax.conv_general_dilated_p.bind(lhs, kernel, **params)


def _is_weight_gradient(eqn) -> bool:
  """A convolution whose kernel is larger than its output: the weight
  gradient of a convolution layer (its kernel the output gradient, its
  output a filter)."""
  return (np.prod(eqn.invars[1].aval.shape)
          > np.prod(eqn.outvars[0].aval.shape))


# --------------------------------------------------------------------------
# Max-pool gradients as masks
# --------------------------------------------------------------------------


def _pool_plan(eqn) -> tuple | None:
  """Non-overlapping max-pooling windows (strides equal to the window, no
  padding or dilation, ``ge`` selection: the first maximum), else None."""
  p = eqn.params
  window = tuple(p["window_dimensions"])
  if (p["select_prim"] is not lax.ge_p or window != tuple(p["window_strides"])
      or any(lo or hi for lo, hi in p["padding"])
      or any(d != 1 for d in p.get("base_dilation", ()))
      or any(d != 1 for d in p.get("window_dilation", ()))):
    return None
  return window


def _windows(x, window):
  """``x`` cropped to whole windows, as ``(n_0, w_0, n_1, w_1, ...)``."""
  x = x[tuple(slice(0, (n // w) * w) for n, w in zip(x.shape, window))]
  return x.reshape([d for n, w in zip(x.shape, window)
                    for d in (n // w, w)])


def _window_mask(x, window):
  """True at the first maximum of each window (as ``ge`` selects), False
  elsewhere and in the rows no window covers."""
  nd = x.ndim
  perm = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
  y = jnp.transpose(_windows(x, window), perm)
  flat = y.reshape(y.shape[:nd] + (-1,))
  hot = jax.nn.one_hot(jnp.argmax(flat, -1), flat.shape[-1], dtype=bool)
  hot = jnp.transpose(hot.reshape(y.shape), np.argsort(perm).tolist())
  whole = [(n // w) * w for n, w in zip(x.shape, window)]
  return jnp.pad(hot.reshape(whole),
                 [(0, n - c) for n, c in zip(x.shape, whole)])


def _pool_scatter(mask, source, window):
  up = jnp.broadcast_to(
      source.reshape([d for n in source.shape for d in (n, 1)]),
      [d for n, w in zip(source.shape, window) for d in (n, w)])
  up = up.reshape([n * w for n, w in zip(source.shape, window)])
  up = jnp.pad(up, [(0, n - c) for n, c in zip(mask.shape, up.shape)])
  return jnp.where(mask, up, jnp.zeros((), up.dtype))


def _pool_gather(mask, tangent, window):
  y = _windows(jnp.where(mask, tangent, jnp.zeros((), tangent.dtype)),
               window)
  return jnp.sum(y, axis=tuple(range(1, y.ndim, 2)))


# --------------------------------------------------------------------------
# The staged program
# --------------------------------------------------------------------------


class _Program:
  """The product's equations left to run per product; ``held`` names the
  variables whose values the operator holds (fixed data the equations
  read), ``rewrites`` maps an equation's position to ``(kind, index of its
  patches or mask among the held values, plan)``."""

  def __init__(self, invars, outvars, eqns, held, rewrites, tree):
    self.invars, self.outvars, self.eqns = invars, outvars, eqns
    self.held, self.rewrites, self.tree = held, rewrites, tree


def staged(linear_fn: Callable, like: Any, *, patches: bool | None = None
           ) -> tuple[Callable, dict]:
  """``linear_fn`` (a linear map on pytrees like ``like``, closing over its
  data) as a ``jax.tree_util.Partial`` whose leaves are the data it reads
  and whose products skip the data-only work (see the module docstring).

  Args:
    linear_fn: a linear map, e.g. the product ``jax.linearize`` returns.
    like: a pytree with its input's structure, shapes and dtypes.
    patches: rewrite weight-gradient convolutions, max-pool gradients and
      kernels' order (``None``: on a CPU, where they pay).

  Returns:
    ``(operator, info)``: ``info`` counts the rewrites and the bytes held.
  """
  if patches is None:
    patches = jax.default_backend() == "cpu"
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                     jnp.result_type(x)),
                      like)
  closed = jax.make_jaxpr(linear_fn)(spec)
  eqns, outs, inner = _inline(closed)
  env = dict(zip(closed.jaxpr.constvars, closed.consts))
  env.update(inner)
  budget = PATCH_BUDGET * _array_bytes(closed.consts) if patches else 0

  def fixed(a):
    return not _is_var(a) or a in env

  def read(a):
    return a.val if not _is_var(a) else env[a]

  left: list = []
  rewrites: dict[int, tuple[str, int | None, Any]] = {}
  extra: list = []
  used = 0
  recomputed: set = set()
  for eqn in eqns:
    if eqn.effects:
      raise NotImplementedError("an effect in the product")
    if all(fixed(a) for a in eqn.invars):
      env.update(zip(eqn.outvars, _bind(eqn, [read(a) for a in eqn.invars])))
      # What a broadcast (or any growth) makes of fixed data is computed
      # again in each product, where XLA fuses it, rather than held.
      if _nbytes(eqn.outvars) > _nbytes(a for a in eqn.invars if _is_var(a)):
        left.append(eqn)
        recomputed.update(eqn.outvars)
      continue
    name = eqn.primitive.name
    plan: Any = None
    if (name == "conv_general_dilated" and fixed(eqn.invars[0])
        and not fixed(eqn.invars[1]) and _is_weight_gradient(eqn)):
      plan = _conv_plan(eqn)
      size = plan and _patch_size(eqn, plan) * eqn.invars[0].aval.dtype.itemsize
      if plan and used + size <= budget:
        used += size
        rewrites[len(left)] = ("conv", len(extra), plan)
        extra.append(_patches(read(eqn.invars[0]), plan))
    elif (name in _POOLS and fixed(eqn.invars[1])
          and not fixed(eqn.invars[0])):
      plan = _pool_plan(eqn)
      size = np.prod(eqn.invars[1].aval.shape)
      if plan and used + size <= budget:
        used += size
        rewrites[len(left)] = (name, len(extra), plan)
        extra.append(_window_mask(read(eqn.invars[1]), plan))
    if (patches and name == "conv_general_dilated"
        and len(left) not in rewrites and not fixed(eqn.invars[0])
        and _is_weight_gradient(eqn)):
      plan = _conv_plan(eqn)
      if plan and np.prod(plan["out"]) <= MAX_SHIFTS:
        rewrites[len(left)] = ("shifts", None, plan)
    elif patches and name == "conv_general_dilated" and len(
        left) not in rewrites and _kernel_order(eqn) is not None:
      perm = _kernel_order(eqn)
      if fixed(eqn.invars[1]):
        rewrites[len(left)] = ("kernel", len(extra), perm)
        extra.append(jnp.transpose(read(eqn.invars[1]), perm))
      else:
        rewrites[len(left)] = ("kernel", None, perm)
    left.append(eqn)
  held = []
  for i, eqn in enumerate(left):
    kind, j, _ = rewrites.get(i, (None, None, None))
    skip = {"conv": 0, "shifts": None, "kernel": None if j is None else 1,
            None: None}.get(kind, 1)
    for k, a in enumerate(eqn.invars):
      if (k != skip and _is_var(a) and a in env and a not in held
          and a not in recomputed):
        held.append(a)
  held += [a for a in outs if _is_var(a) and a in env and a not in held
           and a not in recomputed]
  program = _Program(closed.jaxpr.invars, outs, left, held, rewrites,
                     jax.tree.structure(like))
  values = [env[a] for a in held] + extra
  info = {"rewrites": len(rewrites), "patch_bytes": int(used),
          "held_bytes": _array_bytes(values)}
  return jax.tree_util.Partial(functools.partial(_run, program), values), info


def _run(program: _Program, values, v):
  env = dict(zip(program.held, values))
  extra = values[len(program.held):]
  env.update(zip(program.invars, jax.tree.leaves(v)))

  def read(a):
    return a.val if not _is_var(a) else env[a]

  for i, eqn in enumerate(program.eqns):
    if i in program.rewrites:
      kind, j, plan = program.rewrites[i]
      if kind == "kernel":
        kernel = (jnp.transpose(read(eqn.invars[1]), plan) if j is None
                  else extra[j])
        out = _conv_with_kernel(eqn, read(eqn.invars[0]), kernel, plan)
      elif kind == "shifts":
        out = _conv_by_shifts(read(eqn.invars[0]), read(eqn.invars[1]), plan)
      elif kind == "conv":
        out = _conv_from_patches(extra[j], read(eqn.invars[1]), plan)
      elif kind == "select_and_scatter_add":
        out = _pool_scatter(extra[j], read(eqn.invars[0]), plan)
      else:
        out = _pool_gather(extra[j], read(eqn.invars[0]), plan)
      env[eqn.outvars[0]] = out
    else:
      env.update(zip(eqn.outvars, _bind(eqn, [read(a) for a in eqn.invars])))
  return jax.tree.unflatten(program.tree, [read(a) for a in program.outvars])
