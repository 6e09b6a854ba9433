"""The staged Hessian product against the dense Hessian, on convolution and
max-pool layers in the layouts, strides, paddings and dilations users write
(float64), and its fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import anisonoise
from anisonoise._src import curvature, staging

pytestmark = pytest.mark.usefixtures("x64")


def _conv(x, w, layout, **kw):
  lhs, rhs = ("NHWC", "HWIO") if layout == "NHWC" else ("NCHW", "OIHW")
  return lax.conv_general_dilated(x.astype(w.dtype), w,
                                  dimension_numbers=(lhs, rhs, lhs),
                                  **kw)


def _pool(x, layout, window, strides, padding="VALID"):
  dims = (1, *window, 1) if layout == "NHWC" else (1, 1, *window)
  steps = (1, *strides, 1) if layout == "NHWC" else (1, 1, *strides)
  return lax.reduce_window(x, -jnp.inf, lax.max, dims, steps, padding)


def conv_problem(layout, n=6, size=11):
  """A small CNN: a strided, padded convolution, a non-overlapping 2x2
  max-pool on an odd-sized map (a row and a column no window covers), a
  dilated convolution, an overlapping 3x3/2 max-pool (left as it is) and
  a dense layer."""
  keys = jax.random.split(jax.random.key(0), 5)
  hwio = layout == "NHWC"
  shape = (n, size, size, 2) if hwio else (n, 2, size, size)
  w1 = (3, 3, 2, 4) if hwio else (4, 2, 3, 3)
  w2 = (3, 3, 4, 3) if hwio else (3, 4, 3, 3)
  params = {"w1": 0.4 * jax.random.normal(keys[0], w1),
            "w2": 0.4 * jax.random.normal(keys[1], w2),
            "dense": 0.3 * jax.random.normal(keys[2], (3 * 4, 5))}
  batch = {"x": jax.random.normal(keys[3], shape),
           "y": jax.random.randint(keys[4], (n,), 0, 5)}

  def loss_fn(p, b):
    h = jnp.tanh(_conv(b["x"], p["w1"], layout, window_strides=(1, 1),
                       padding=((1, 1), (1, 1))))          # 11 x 11
    h = _pool(h, layout, (2, 2), (2, 2))                 # 5 x 5
    h = jnp.tanh(_conv(h, p["w2"], layout, window_strides=(1, 1),
                       padding="SAME", rhs_dilation=(2, 2)))  # 5 x 5
    h = _pool(h, layout, (3, 3), (2, 2))                 # 2 x 2
    logits = h.reshape(h.shape[0], -1) @ p["dense"]
    return -jax.nn.log_softmax(logits)[jnp.arange(len(b["y"])), b["y"]]

  return loss_fn, params, batch


def dense_hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  mean = lambda f: jnp.mean(loss_fn(unravel(f), batch))  # noqa: E731
  return jax.hessian(mean)(flat), unravel


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_staged_product_equals_the_dense_hessian(layout):
  """Every rewrite (patches of a fixed image, slices of a product's own,
  masks of non-overlapping max-pools, including one on an odd-sized map)
  applied, in both layouts, and the product equals ``H v`` to float64
  rounding."""
  loss_fn, params, batch = conv_problem(layout)
  h, unravel = dense_hessian(loss_fn, params, batch)
  linear = curvature._linearize(loss_fn, params, batch)
  op, info = staging.staged(linear, params, patches=True)
  kinds = sorted(r[0] for r in op.func.args[0].rewrites.values())
  # The first layer's weight gradient against the fixed images (patches),
  # the second's against a product's own activations (slices) and against
  # fixed ones (patches); the 2x2 pool's gradients, forward and back
  # (masks); the overlapping 3x3/2 pool is left as it is.
  assert kinds.count("conv") == 2 and kinds.count("shifts") == 1, kinds
  assert kinds.count("select_and_scatter_add") == 1, kinds
  assert kinds.count("select_and_gather_add") == 1, kinds
  assert 0 < info["patch_bytes"] <= staging.PATCH_BUDGET * info["held_bytes"]
  for seed in range(3):
    v = jax.random.normal(jax.random.key(seed), (h.shape[0],))
    got = ravel_pytree(jax.jit(lambda o, x: o(x))(op, unravel(v)))[0]
    np.testing.assert_allclose(got, h @ v, rtol=1e-10,
                               atol=1e-12 * float(jnp.abs(h @ v).max()))


def test_hessian_operator_is_staged_once_per_loss_fn():
  """``hessian_operator`` stages its product inside one program compiled
  per ``loss_fn``: two calls give operators of one structure, so an eager
  solve's compiled steps serve both; and its products equal the dense
  Hessian's."""
  loss_fn, params, batch = conv_problem("NHWC")
  h, unravel = dense_hessian(loss_fn, params, batch)
  a = anisonoise.hessian_operator(loss_fn, params, batch)
  b = anisonoise.hessian_operator(
      loss_fn, jax.tree.map(lambda x: 1.01 * x, params), batch)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert a.func.func is staging._run  # pylint: disable=no-member
  v = jax.random.normal(jax.random.key(3), (h.shape[0],))
  np.testing.assert_allclose(ravel_pytree(a(unravel(v)))[0], h @ v,
                             rtol=1e-10, atol=1e-12)
  curvature._jit_krylov_chunk.clear_cache()
  anisonoise.hessian_spectrum(loss_fn, params, batch, num_eigs=3, key=0)
  compiled = curvature._jit_krylov_chunk._cache_size()
  held = curvature._last_eager_operator[0]
  anisonoise.hessian_spectrum(loss_fn, jax.tree.map(lambda x: 1.01 * x,
                                                    params),
                              batch, num_eigs=3, key=0)
  assert curvature._last_eager_operator[0] is held
  assert curvature._jit_krylov_chunk._cache_size() == compiled


def test_no_patches_past_the_budget(monkeypatch):
  """With no budget no patches or masks are held (the product of a weight
  gradient on its own operand needs none, a kernel put in order its own
  size), and the product is still exact."""
  monkeypatch.setattr(staging, "PATCH_BUDGET", 0.0)
  loss_fn, params, batch = conv_problem("NHWC")
  h, unravel = dense_hessian(loss_fn, params, batch)
  op, info = staging.staged(curvature._linearize(loss_fn, params, batch),
                            params, patches=True)
  assert info["patch_bytes"] == 0
  # Left: the slices and the kernels put in order (a kernel's size).
  assert {r[0] for r in op.func.args[0].rewrites.values()} <= {"shifts",
                                                               "kernel"}
  v = jax.random.normal(jax.random.key(4), (h.shape[0],))
  np.testing.assert_allclose(ravel_pytree(op(unravel(v)))[0], h @ v,
                             rtol=1e-10, atol=1e-12)


def test_staged_product_under_vmap_and_in_bfloat16():
  """Under ``vmap`` over points each product equals that point's; with
  bfloat16 parameters the product runs and agrees with the plain
  linearisation's in float32 to bfloat16's rounding."""
  loss_fn, params, batch = conv_problem("NHWC")
  points = jax.tree.map(lambda x: jnp.stack([x, 0.9 * x]), params)
  v = jax.tree.map(jnp.ones_like, params)
  both = jax.vmap(lambda p: anisonoise.hessian_operator(loss_fn, p, batch)(v)
                  )(points)
  for i in range(2):
    p = jax.tree.map(lambda x: x[i], points)
    one = anisonoise.hessian_operator(loss_fn, p, batch)(v)
    np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda x: x[i],
                                                          both))[0],
                               ravel_pytree(one)[0], rtol=1e-10, atol=1e-12)
  with jax.enable_x64(False):
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    b32 = {"x": batch["x"].astype(jnp.float32),
           "y": batch["y"].astype(jnp.int32)}
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    v16 = jax.tree.map(jnp.ones_like, p16)
    got = anisonoise.hessian_operator(loss_fn, p16, b32)(v16)
    ref = curvature._linearize(loss_fn, p16, b32)(v16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    got, ref = (ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float32),
                                          t))[0] for t in (got, ref))
    assert float(jnp.linalg.norm(got - ref)) <= 2e-2 * float(
        jnp.linalg.norm(ref))


def test_products_it_cannot_stage_fall_back(monkeypatch):
  """A debug callback in the loss runs in the forward pass, outside the
  product, which is staged; an unhashable ``loss_fn`` (no cache key) or a
  program the staging refuses gets ``jax.linearize``'s product. Every
  product is exact."""
  loss_fn, params, batch = conv_problem("NHWC")
  h, unravel = dense_hessian(loss_fn, params, batch)
  v = jax.random.normal(jax.random.key(5), (h.shape[0],))

  def noisy(p, b):
    out = loss_fn(p, b)
    jax.debug.callback(lambda *_: None, out)
    return out

  class Unhashable:
    __hash__ = None

    def __call__(self, p, b):
      return loss_fn(p, b)

  def refuse(*args, **kwargs):
    raise NotImplementedError("an effect in the product")

  def check(fn, is_staged):
    op = anisonoise.hessian_operator(fn, params, batch)
    assert (getattr(op.func, "func", None) is staging._run) == is_staged
    np.testing.assert_allclose(ravel_pytree(op(unravel(v)))[0], h @ v,
                               rtol=1e-10, atol=1e-12)

  check(noisy, True)
  check(Unhashable(), False)
  monkeypatch.setattr(staging, "staged", refuse)
  check(lambda p, b: loss_fn(p, b), False)


def test_the_plain_conv_lenet_product_is_staged_on_cpu():
  """What the staging relies on still holds on this JAX: the benchmarks'
  LeNet written with ``lax.conv`` and ``max_pool`` gets the staged product
  (not the ``jax.linearize`` fallback), with its 9 rewrites (weight-
  gradient convolutions, max-pool gradients, kernels' order). A JAX
  upgrade that changes the jaxprs fails here, loudly, rather than making
  every product slower unseen."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                  "benchmarks"))
  from _common import lenet_problem

  if jax.default_backend() != "cpu":
    pytest.skip("the rewrites are the CPU's")
  loss_fn, params, batch = lenet_problem(16, plain_conv=True)
  op = anisonoise.hessian_operator(loss_fn, params, batch)
  assert getattr(op.func, "func", None) is staging._run
  _, info = staging.staged(curvature._linearize(loss_fn, params, batch),
                           params)
  assert info["rewrites"] == 9, info
