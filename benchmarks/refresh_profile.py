"""Where a settled low-rank refresh spends its time.

``hessian_noise(k)`` is refreshed at fixed parameters until two refreshes
in a row have settled (converged at ``min(num_iters, k + 4 + (k + 4) //
2)`` products); then, each jitted
and timed on its own (median of ``--repeats``), in milliseconds and in GD
gradients:

* the transform's refresh (``update`` at ``refresh_every=1``),
* its warm-started eigen-solve (``top_eigenpairs(init_subspace=...)``),
* the Rayleigh-Ritz step on the cached vectors (k products and the dense
  algebra), and with the guarded settled cycle that follows it (and,
  for the guard's cost, with the unguarded 4-direction cycle it
  replaced),
* orthonormalising the k cached vectors alone,
* k Hessian products from one linearisation (``lax.map``),
* the 8 forward-mode probes of ``Tr(C)``.

Usage: python benchmarks/refresh_profile.py [--model mlp|lenet] [--k 20]
       [--n 1200] [--repeats 7] [--out results]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import anisonoise
from anisonoise._src import curvature
from _common import environment, lenet_problem, timeit, write_results
from step_cost import mlp_problem


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=["mlp", "lenet"], default="mlp")
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--n", type=int, default=1200)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  loss_fn, params, batch = (lenet_problem(args.n) if args.model == "lenet"
                            else mlp_problem(args.n))
  k = args.k
  flat = ravel_pytree(params)[0]
  iters = curvature.default_num_iters(k, flat.size)
  settled_size = min(iters, k + curvature.settled_directions(k))
  tx = anisonoise.hessian_noise(k, batch_size=20, key=0)
  update = jax.jit(lambda s, p, b: tx.update(p, s, p, loss_fn=loss_fn,
                                             batch=b)[1])
  state, settled = tx.init(params), 0
  for _ in range(30):  # until two refreshes in a row have settled
    state = update(state, params, batch)
    done = (bool(state.converged)
            and int(state.num_matvecs) == settled_size)
    settled = settled + 1 if done else 0
    if settled == 2:
      break
  cache = state.eigenvectors

  def flat_op(p, b):
    return curvature.flat_operator(anisonoise.hessian_operator(loss_fn, p, b),
                                   params)[0]

  def block(v):
    return jax.vmap(lambda t: ravel_pytree(t)[0])(v)

  def rayleigh_ritz(p, b, v):
    return curvature._rayleigh_ritz(flat_op(p, b), block(v),
                                    jax.random.key(0))

  def settled_cycle(p, b, v):
    return curvature._guarded(
        flat_op(p, b), rayleigh_ritz(p, b, v), jax.random.key(1),
        settled_size, k, 1e-2, True)

  def unguarded_cycle(p, b, v):
    # The settled step before the guard: k + 4 products, no look outside.
    return curvature._recycled_cycle(
        flat_op(p, b), rayleigh_ritz(p, b, v), jax.random.key(1),
        min(iters, k + curvature.SETTLED_DIRECTIONS), True)

  def orthonormalise(v):
    return curvature._orthonormal_rows(block(v), jax.random.key(0))

  parts = {
      "GD gradient": (lambda p, b: jax.grad(
          lambda q: jnp.mean(loss_fn(q, b)))(p), (params, batch)),
      "refresh (update)": (update, (state, params, batch)),
      "warm-started solve": (lambda p, b, v: anisonoise.top_eigenpairs(
          anisonoise.hessian_operator(loss_fn, p, b), p, k,
          key=jax.random.key(1), num_iters=iters, tol=1e-2,
          max_matvecs=iters, init_subspace=v), (params, batch, cache)),
      "Rayleigh-Ritz on the cache": (rayleigh_ritz, (params, batch, cache)),
      "Rayleigh-Ritz + guarded settled cycle": (settled_cycle,
                                                (params, batch, cache)),
      "Rayleigh-Ritz + 4 directions, unguarded (before the guard)": (
          unguarded_cycle, (params, batch, cache)),
      "orthonormalise the cache": (orthonormalise, (cache,)),
      f"{k} products (lax.map)": (lambda p, b, v: jax.lax.map(
          anisonoise.hessian_operator(loss_fn, p, b), v),
                                  (params, batch, cache)),
      "Tr(C), 8 probes": (lambda p, b, key: anisonoise.covariance_trace(
          loss_fn, p, b, method="hutchinson", key=key, num_probes=8),
                          (params, batch, jax.random.key(0))),
  }
  solve_fn, solve_args = parts["warm-started solve"]
  solve_products = int(jax.jit(solve_fn)(*solve_args).num_matvecs)
  seconds = {name: timeit(jax.jit(fn), *a, repeats=args.repeats)
             for name, (fn, a) in parts.items()}
  gd = seconds["GD gradient"]
  res = {"env": env, "model": args.model, "D": int(flat.size), "n": args.n,
         "k": k, "settled_products": int(state.num_matvecs),
         "solve_products": solve_products,
         "seconds": seconds}
  lines = [f"{args.model} (D = {flat.size}, n = {args.n}), hessian_noise({k})"
           f" refreshed at fixed parameters until settled (last refresh:"
           f" {int(state.num_matvecs)} products; the timed solve:"
           f" {solve_products}); {env['device']},"
           f" {env['cpu_count']} cores, jax {env['jax']}.", "",
           "| part | ms | GD gradients |", "|---|---|---|"]
  lines += [f"| {name} | {t * 1e3:.1f} | {t / gd:.1f} |"
            for name, t in seconds.items()]
  write_results(args.out, f"refresh_profile_{args.model}", res,
                "\n".join(lines))


if __name__ == "__main__":
  main()
