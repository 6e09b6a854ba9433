"""Accuracy of the low-rank noises' cached eigenpairs along a GD trajectory.

GLD Hessian and GLD leading refresh their top-k eigenpairs every
``refresh_every`` steps with ``max(2k, k + 10)`` products (the default,
``tol=None``). From the second refresh on, each solve is warm-started from
the cached eigenvectors (``top_eigenpairs(init_subspace=...)``). This
follows plain GD (the noise is drawn but not applied, so that every variant
sees the same parameters) and, at each refresh, compares

* the transform's cached eigenvalues (warm-started),
* a cold solve of the same size from a random vector (the behaviour before
  warm starts),

with a converged reference at the same parameters (dense ``eigh`` of the
Hessian or of ``C`` for the MLP; ``top_eigenpairs`` at ``tol=1e-4`` for
LeNet): the error is ``max_j |lambda_j - lambda_j^ref| / lambda_1^ref``.

Problems: a tanh MLP 32-48-48-10 (D = 4,426) on 512 random inputs with
random labels near its initialisation (a flat top spectrum), k = 10; the
paper's LeNet on 1,200 corrupted Fashion-MNIST images, k = 20. lr 0.07.

Usage: python benchmarks/warm_start.py [--problem mlp|lenet|both]
       [--refreshes 8] [--out results]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import anisonoise
from _common import environment, gd, lenet_problem, write_results


def tanh_mlp_problem(n=512, hidden=48, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 32)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, n))
  sizes = [32, hidden, hidden, 10]
  keys = jax.random.split(jax.random.key(seed), 3)
  params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a),
             "b": jnp.zeros(b)} for k, a, b in zip(keys, sizes, sizes[1:])]

  def loss_fn(p, b):
    h = b["x"]
    for layer in p[:-1]:
      h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ p[-1]["w"] + p[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, {"x": x, "y": y}


def dense_reference(loss_fn, params, batch, k):
  """Top-k eigenvalues of the dense Hessian and of the dense ``C``."""
  flat, unravel = ravel_pytree(params)
  h = jax.hessian(lambda f: jnp.mean(loss_fn(unravel(f), batch)))(flat)
  g = jax.vmap(lambda b: jax.grad(lambda f: loss_fn(
      unravel(f), jax.tree.map(lambda x: x[None], b))[0])(flat))(batch)
  g = g - g.mean(0)
  c = g.T @ g / g.shape[0]
  def top(m):
    return np.sort(np.linalg.eigvalsh(np.asarray(m, np.float64)))[
        ::-1][:k]
  return {"GLD Hessian": top(h), "GLD leading": top(c)}


_REFERENCE_SOLVES = {}


def solver_reference(loss_fn, params, batch, k):
  """Top-k eigenvalues from ``top_eigenpairs`` at ``tol=1e-4`` (compiled
  once per problem)."""
  out = {}
  for name, op in (("GLD Hessian", anisonoise.hessian_operator),
                   ("GLD leading", anisonoise.covariance_operator)):
    solve = _REFERENCE_SOLVES.setdefault(
        (loss_fn, name, k), jax.jit(lambda p, b, op=op: (
            anisonoise.top_eigenpairs(
                op(loss_fn, p, b), p, k, key=jax.random.key(99),
                num_iters=2 * k + 40, tol=1e-4, max_matvecs=40 * k))))
    out[name] = np.asarray(solve(params, batch).eigenvalues, np.float64)
  return out


def trajectory(loss_fn, params, batch, k, lr, refresh_every, refreshes,
               reference, tol=None, max_matvecs=None):
  names = ("GLD Hessian", "GLD leading")
  txs = {n: anisonoise.dynamics_noise(n, k=k, batch_size=20,
                                      refresh_every=refresh_every, key=1,
                                      tol=tol, max_matvecs=max_matvecs)
         for n in names}
  ops = {"GLD Hessian": anisonoise.hessian_operator,
         "GLD leading": anisonoise.covariance_operator}
  states = {n: txs[n].init(params) for n in names}

  @jax.jit
  def step(params, states, batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    new = {n: txs[n].update(grads, states[n], params, loss_fn=loss_fn,
                            batch=batch)[1] for n in names}
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), new

  cold = {n: jax.jit(lambda p, b, key, op=ops[n]: anisonoise.top_eigenpairs(
      op(loss_fn, p, b), p, k, key=key, tol=None)) for n in names}
  rows = []
  for r in range(refreshes):
    before = params
    for _ in range(refresh_every):
      params, states = step(params, states, batch)
    ref = reference(loss_fn, before, batch, k)
    row = {"refresh": r + 1, "step": r * refresh_every}
    for n in names:
      lam = ref[n]
      warm = np.asarray(states[n].eigenvalues, np.float64)
      c = cold[n](before, batch, jax.random.key(r))
      row[n] = {
          "lambda_1": float(lam[0]), "lambda_k": float(lam[-1]),
          "warm_error": float(np.max(np.abs(warm - lam)) / lam[0]),
          "cold_error": float(np.max(np.abs(
              np.asarray(c.eigenvalues, np.float64) - lam)) / lam[0]),
          "matvecs": int(c.num_matvecs),
          "warm_matvecs": int(states[n].num_matvecs),
      }
    rows.append(row)
    print(row, flush=True)
  return rows


def markdown(res: dict) -> str:
  out = []
  for prob in res["problems"]:
    out.append(f"{prob['name']} (D = {prob['num_params']}, k = {prob['k']},"
               f" refresh every {prob['refresh_every']}, from GD step"
               f" {prob.get('skip', 0)}, transforms' tol"
               f" {prob.get('tol')}, max_matvecs {prob.get('max_matvecs')};"
               f" cold: one cycle of {prob['matvecs']} products): error"
               " max_j |lambda_j - lambda_j^ref| / lambda_1^ref, warm"
               " products in brackets.")
    out.append("")
    out.append("| refresh | Hessian: warm | Hessian: cold | leading: warm"
               " | leading: cold |")
    out.append("|---|---|---|---|---|")
    for r in prob["rows"]:
      h, c = r["GLD Hessian"], r["GLD leading"]
      out.append(f"| {r['refresh']} | {h['warm_error']:.2e}"
                 f" ({h.get('warm_matvecs', prob['matvecs'])}) |"
                 f" {h['cold_error']:.2e} | {c['warm_error']:.2e}"
                 f" ({c.get('warm_matvecs', prob['matvecs'])}) |"
                 f" {c['cold_error']:.2e} |")
    out.append("")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problem", default="both",
                      choices=("mlp", "lenet", "both"))
  parser.add_argument("--refreshes", type=int, default=8)
  parser.add_argument("--refresh-every", type=int, default=10)
  parser.add_argument("--n", type=int, default=None,
                      help="examples (default: 512 for the MLP, 1,200 for"
                      " LeNet)")
  parser.add_argument("--hidden", type=int, default=48,
                      help="the MLP's hidden width")
  parser.add_argument("--tol", type=float, default=None,
                      help="the transforms' tol (default: theirs)")
  parser.add_argument("--max-matvecs", type=int, default=None,
                      help="the transforms' max_matvecs (default: theirs)")
  parser.add_argument("--skip", type=int, default=0,
                      help="GD steps before the first refresh (0: from"
                      " initialisation)")
  parser.add_argument("--reference", choices=("dense", "solver"),
                      default=None, help="converged reference: dense eigh"
                      " (the MLP's default) or top_eigenpairs at tol 1e-4")
  parser.add_argument("--tag", default="", help="suffix of the result files")
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(env)
  problems = []
  todo = ["mlp", "lenet"] if args.problem == "both" else [args.problem]
  for name in todo:
    t0 = time.perf_counter()
    if name == "mlp":
      loss_fn, params, batch = tanh_mlp_problem(args.n or 512, args.hidden)
      k = 10
      reference = (solver_reference if args.reference == "solver"
                   else dense_reference)
      label = f"tanh MLP 32-{args.hidden}-{args.hidden}-10"
    else:
      loss_fn, params, batch = lenet_problem(args.n or 1200)
      k, reference, label = 20, solver_reference, "LeNet, 1,200 images"
    params = gd(loss_fn, params, batch, args.skip, lr=0.07)
    rows = trajectory(loss_fn, params, batch, k, 0.07, args.refresh_every,
                      args.refreshes, reference, args.tol, args.max_matvecs)
    problems.append({
        "name": label, "k": k, "refresh_every": args.refresh_every,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "matvecs": rows[0]["GLD Hessian"]["matvecs"], "rows": rows,
        "tol": args.tol, "max_matvecs": args.max_matvecs, "skip": args.skip,
        "seconds": time.perf_counter() - t0})
  res = {"environment": env, "problems": problems}
  write_results(args.out, ("warm_start" if args.problem == "both" else
                           f"warm_start_{args.problem}") + args.tag, res,
                markdown(res))


if __name__ == "__main__":
  main()
