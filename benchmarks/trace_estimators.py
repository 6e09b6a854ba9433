"""Accuracy and cost of the ``Tr(C)`` estimators the noises refresh with.

The structured noises scale to ``T = Tr(C) / m`` at every refresh. This
compares, on the MLP 784-64-10 of ``step_cost.py --model mlp`` trained by
GD (lr 0.1) on 1,200 Fashion-MNIST images (1,000 true and 200 random labels,
the paper's Section 5.3 set) from initialisation to a global minimum:

* the relative standard deviation of one probe, from the dense per-example
  gradients (so exact, not sampled): plain Rademacher probes
  (``trace_estimator="hutchinson"``: ``2 (||C||_F^2 - sum_j C_jj^2)``), and
  probes deflated by the top-k eigenvectors of ``C`` (GLD leading's
  ``"deflated"``) or of the Hessian (GLD Hessian's): the same formula for
  ``P C P``, with the in-span fraction of the trace that deflation takes
  exactly;
* the cost of each estimate in GD steps (full-batch loss and gradient),
  median of ``--repeats``: the exact per-example pass, ``num_probes``
  forward-mode probes, ``num_probes`` backward-mode probes (the diagonal's),
  and GLD Hessian's deflated estimate (``k`` forward-mode products for the
  in-span part plus ``num_probes`` projected probes; GLD leading's costs
  the projected probes only, its in-span part being its Ritz values).

Usage: python benchmarks/trace_estimators.py [--steps 0 300 3000] [--k 20]
       [--out results]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import anisonoise
from _common import environment, mlp_problem, timeit, write_results
from anisonoise import data


def fashion_mnist_mlp(n_clean: int, n_corrupt: int, hidden: int = 64):
  images, labels = data.load_fashion_mnist("train")
  train = data.corrupted_training_set(images, labels, num_clean=n_clean,
                                      num_corrupt=n_corrupt, seed=0)
  return mlp_problem(train.x, train.y, hidden)


def probe_spread(g_c: jax.Array, basis: jax.Array | None) -> dict:
  """One Rademacher probe's relative standard deviation on ``P C P``
  (``P = I - Q Q^T``; ``Q = basis``, orthonormal columns, or none), from the
  centred per-example gradients ``g_c`` (``n x D``), through the ``n x n``
  Gram matrix (the same nonzero spectrum as ``C``)."""
  n = g_c.shape[0]
  tr = float(jnp.sum(g_c**2) / n)
  if basis is not None:
    g_c = g_c - (g_c @ basis) @ basis.T
  gram = g_c @ g_c.T / n
  diag_c = jnp.sum(g_c**2, axis=0) / n
  var = 2 * (jnp.sum(gram**2) - jnp.sum(diag_c**2))
  return {"rel_sd": float(jnp.sqrt(var)) / tr,
          "in_span": 1 - float(jnp.trace(gram)) / tr}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[0, 300, 3000])
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--num-probes", type=int, default=8)
  parser.add_argument("--clean", type=int, default=1000)
  parser.add_argument("--corrupt", type=int, default=200)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  loss_fn, params, batch = fashion_mnist_mlp(args.clean, args.corrupt)
  n = args.clean + args.corrupt
  k, probes = args.k, args.num_probes

  @jax.jit
  def gd(p, b):
    g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
    return jax.tree.map(lambda a, c: a - args.lr * c, p, g)

  @jax.jit
  def centred_grads(p, b):
    g = jax.vmap(lambda x, y: ravel_pytree(jax.grad(
        lambda q: loss_fn(q, {"x": x[None], "y": y[None]})[0])(p))[0])(
            b["x"], b["y"])
    return g - jnp.mean(g, axis=0)

  def costs(p):
    key = jax.random.key(0)
    basis = jax.tree.map(lambda x: jnp.stack([x] * k), p)
    fns = {
        "exact": lambda p, b: anisonoise.covariance_trace(loss_fn, p, b),
        "forward probes": lambda p, b: anisonoise.covariance_trace(
            loss_fn, p, b, method="hutchinson", key=key, num_probes=probes),
        "backward probes": lambda p, b: anisonoise.covariance_diagonal(
            loss_fn, p, b, method="hutchinson", key=key, num_probes=probes),
        f"deflated by {k} (GLD Hessian's)": lambda p, b: (
            anisonoise.covariance_trace(
                loss_fn, p, b, method="hutchinson", key=key,
                num_probes=probes, deflate=basis)),
    }
    t_gd = timeit(gd, p, batch, repeats=args.repeats)
    return t_gd, {name: timeit(jax.jit(f), p, batch, repeats=args.repeats)
                  / t_gd for name, f in fns.items()}

  t_gd, cost = costs(params)
  rows = []
  p, done = params, 0
  for target in sorted(args.steps):
    while done < target:
      p = gd(p, batch)
      done += 1
    g_c = centred_grads(p, batch)
    _, _, vt = jnp.linalg.svd(g_c, full_matrices=False)
    top_h = anisonoise.top_eigenpairs(
        anisonoise.hessian_operator(loss_fn, p, batch), p, k,
        key=jax.random.key(1), tol=1e-3)
    h_basis = jnp.linalg.qr(jax.vmap(lambda v: ravel_pytree(v)[0])(
        top_h.eigenvectors).T)[0]
    acc = float(jnp.mean(jnp.argmax(jax.vmap(
        lambda x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])(
            batch["x"]), -1) == batch["y"]))
    row = {"step": target, "train_acc": acc,
           "trace_c": float(jnp.sum(g_c**2) / n),
           "plain": probe_spread(g_c, None),
           "C": probe_spread(g_c, vt[:k].T),
           "H": probe_spread(g_c, h_basis)}
    rows.append(row)
    print(row, flush=True)
  res = {"env": env, "n": n, "D": int(ravel_pytree(params)[0].size), "k": k,
         "num_probes": probes, "gd_step_s": t_gd, "cost_in_gd_steps": cost,
         "rows": rows}
  write_results(args.out, "trace_estimators", res, markdown(res))


def markdown(res) -> str:
  env, k, p = res["env"], res["k"], res["num_probes"]
  lines = [
      f"MLP 784-64-10 (D = {res['D']}), {res['n']} Fashion-MNIST images"
      f" (random labels on 1/6); {env['device']}, {env['cpu_count']} cores,"
      f" jax {env['jax']}. One probe's relative standard deviation (exact,"
      f" from the per-example gradients); with {p} probes divide by"
      f" sqrt({p}).", "",
      f"| GD step | train acc | Tr(C) | plain | deflated, top {k} of C"
      f" (in span) | deflated, top {k} of H (in span) |",
      "|---|---|---|---|---|---|"]
  for r in res["rows"]:
    lines.append(
        f"| {r['step']} | {r['train_acc']:.3f} | {r['trace_c']:.4g} |"
        f" {r['plain']['rel_sd']:.3f} | {r['C']['rel_sd']:.3f}"
        f" ({r['C']['in_span']:.2f}) | {r['H']['rel_sd']:.3f}"
        f" ({r['H']['in_span']:.2f}) |")
  lines += ["", f"Cost in GD steps ({res['gd_step_s'] * 1e3:.2f} ms), at"
            " initialisation:", "", "| estimate | x GD step |", "|---|---|"]
  lines += [f"| {name} | {c:.2f} |" for name, c in
            res["cost_in_gd_steps"].items()]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
