"""Eigen-solver overhead beyond its matvecs, on the paper's LeNet.

For ``num_iters`` Lanczos steps on Hessian-vector products of LeNet
(11,330 parameters, 1,200 images) this times

* one full HVP (``anisonoise.hvp``, jitted, forward-over-reverse),
* the floor: one linearisation plus ``num_iters`` applications of it,
* ``anisonoise.top_eigenpairs`` unrolled and with ``lax.fori_loop``,
* matfree's ``eigh_partial(tridiag_sym(num_iters, reortho="full"))``,

and reports each solver's overhead relative to the floor.

Usage: python benchmarks/solver_overhead.py [--num-iters 40] [--k 20]
"""

from __future__ import annotations

import argparse
import json

import jax
from jax.flatten_util import ravel_pytree
from matfree import decomp, eig

import anisonoise
from _common import environment, lenet_problem, timeit


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-iters", type=int, default=40)
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--n", type=int, default=1200)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env))
  loss_fn, params, batch = lenet_problem(args.n)
  flat, unravel = ravel_pytree(params)
  m = args.num_iters
  key = jax.random.key(0)
  v = unravel(jax.random.normal(key, flat.shape, flat.dtype))

  hvp = jax.jit(lambda p, b, v: anisonoise.hvp(loss_fn, p, b, v))

  @jax.jit
  def floor(p, b, v):
    op = anisonoise.hessian_operator(loss_fn, p, b)
    out = v
    for _ in range(m):
      out = op(out)
    return out

  def solver(unroll):
    @jax.jit
    def run(p, b, key):
      op = anisonoise.hessian_operator(loss_fn, p, b)
      return anisonoise.top_eigenpairs(op, p, args.k, key=key, num_iters=m,
                                       unroll=unroll)
    return run

  @jax.jit
  def matfree_solver(p, b, key):
    op = anisonoise.hessian_operator(loss_fn, p, b)
    v0 = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    vals, vecs = eig.eigh_partial(decomp.tridiag_sym(m, reortho="full"))(
        op, v0)
    return vals[-args.k:], vecs

  r = args.repeats
  t_hvp = timeit(hvp, params, batch, v, repeats=r)
  t_floor = timeit(floor, params, batch, v, repeats=r)
  t_unroll = timeit(solver(True), params, batch, key, repeats=r)
  t_fori = timeit(solver(False), params, batch, key, repeats=r)
  t_matfree = timeit(matfree_solver, params, batch, key, repeats=r)
  res = {
      "num_iters": m, "k": args.k, "n": args.n, "D": int(flat.size),
      "hvp_s": t_hvp, "floor_s": t_floor,
      "floor_per_matvec_s": t_floor / m,
      "anisonoise_unrolled_s": t_unroll,
      "anisonoise_fori_loop_s": t_fori,
      "matfree_s": t_matfree,
      "overhead_unrolled": t_unroll / t_floor - 1,
      "overhead_fori_loop": t_fori / t_floor - 1,
      "overhead_matfree": t_matfree / t_floor - 1,
      "overhead_vs_full_hvps_unrolled": t_unroll / (m * t_hvp) - 1,
      "env": env,
  }
  for key_, val in res.items():
    if key_ != "env":
      print(f"{key_:32s} {val:.4g}" if isinstance(val, float) else
            f"{key_:32s} {val}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
