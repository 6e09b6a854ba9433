"""Does a warm start pay along a run? On a LeNet-5 as users write it.

The model: ``nnx.Conv`` (5x5, 6 and 16 channels, VALID) with ``max_pool``
and three ``nnx.Linear`` layers (D = 44,426), on 600 corrupted
Fashion-MNIST images. At initialisation a cold top-20 subspace solve of
the Hessian (``top_eigenpairs(criterion="subspace")``, the low-rank
noises' solve, ``tol`` 3e-3); then ``--gd-steps`` GD steps at lr 0.07;
at the new point, the curvature the stale cache captures, a solve
warm-started from it (``init_subspace``) and a cold one: products and
captured curvature ``sum_j u_j^T H u_j / sum_{j<=20} lambda_j`` against
a converged solve (``trajectory.Reference``). Repeated over
``--intervals`` such intervals, each warm start from the previous warm
solve, as the noises refresh.

Usage: python benchmarks/warm_vs_cold.py [--intervals 2] [--gd-steps 10]
       [--out results]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import anisonoise
from _common import environment, lenet_images, write_results
from trajectory import Reference

K = 20


class LeNet5(nnx.Module):
  """LeNet-5 as a user writes it in Flax NNX (28x28x1 inputs)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 6, (5, 5), padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
    self.fc1 = nnx.Linear(256, 120, rngs=rngs)
    self.fc2 = nnx.Linear(120, 84, rngs=rngs)
    self.fc3 = nnx.Linear(84, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def problem(n: int = 600):
  images, labels, _ = lenet_images(n)
  graphdef, params = nnx.split(LeNet5(nnx.Rngs(0)), nnx.Param)

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, {"x": jnp.asarray(images),
                           "y": jnp.asarray(labels)}


def solve(loss_fn, params, batch, init=None):
  op = anisonoise.hessian_operator(loss_fn, params, batch)
  return anisonoise.top_eigenpairs(
      op, params, K, key=jax.random.key(1), num_iters=2 * K, tol=3e-3,
      max_matvecs=10 * K, criterion="subspace", init_subspace=init)


def markdown(res: dict) -> str:
  lines = [
      f"LeNet-5 with `nnx.Conv` (D = {res['num_params']:,}), {res['n']}"
      f" images, top-{K} Hessian subspace, tol 3e-3; captured against a"
      f" converged solve; {res['gd_steps']} GD steps (lr 0.07) between"
      " points.",
      "",
      "| point | stale cache captured | warm products | warm captured |"
      " cold products | cold captured |",
      "|---|---|---|---|---|---|",
      f"| init | - | - | - | {res['init']['products']} |"
      f" {res['init']['captured']:.4f} |",
  ]
  for r in res["points"]:
    lines.append(
        f"| step {r['step']} | {r['stale']:.4f} | {r['warm_products']} |"
        f" {r['warm_captured']:.4f} | {r['cold_products']} |"
        f" {r['cold_captured']:.4f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--intervals", type=int, default=2)
  parser.add_argument("--gd-steps", type=int, default=10)
  parser.add_argument("--n", type=int, default=600)
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(env)
  loss_fn, params, batch = problem(args.n)
  ref = Reference(loss_fn, batch, dense=False)
  grad = jax.jit(jax.grad(lambda p, b: jnp.mean(loss_fn(p, b))))
  cold = solve(loss_fn, params, batch)
  res = {"environment": env, "n": args.n, "gd_steps": args.gd_steps,
         "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
         "init": {"products": int(cold.num_matvecs),
                  "captured": ref.captured(params, cold.eigenvectors, K,
                                           False)},
         "points": []}
  print(res["init"], flush=True)
  cache, step = cold.eigenvectors, 0
  for _ in range(args.intervals):
    for _ in range(args.gd_steps):
      params = jax.tree.map(lambda p, g: p - 0.07 * g, params,
                            grad(params, batch))
    step += args.gd_steps
    warm = solve(loss_fn, params, batch, init=cache)
    cold = solve(loss_fn, params, batch)
    row = {"step": step,
           "stale": ref.captured(params, cache, K, False),
           "warm_products": int(warm.num_matvecs),
           "warm_captured": ref.captured(params, warm.eigenvectors, K, False),
           "cold_products": int(cold.num_matvecs),
           "cold_captured": ref.captured(params, cold.eigenvectors, K, False)}
    print(row, flush=True)
    res["points"].append(row)
    cache = warm.eigenvectors
  write_results(args.out, "warm_vs_cold_lenet5", res, markdown(res))


if __name__ == "__main__":
  main()
