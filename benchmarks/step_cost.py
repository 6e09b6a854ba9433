"""Per-step cost of each noise dynamics, as a ratio to a plain GD step.

A full-batch step is: loss and gradient, the noise transform's update (with
``loss_fn`` and ``batch`` as extra arguments), ``optax.sgd``. Each dynamics is
timed at ``refresh_every`` 1 and 10, averaged over ``refresh_every``
consecutive jitted steps (so a refresh is counted once per period), median
of ``--repeats``. The matvec floor is GD step + k matvecs / refresh_every
(the issue's definition; Lanczos itself runs ``max(2k, k + 10)`` matvecs),
with the matvec timed as one linearisation plus one product. Each dynamics
that estimates ``Tr(C)`` (or ``diag(C)``) is timed with the library's
default estimator (random probes; deflated for the low-rank noises) and
with ``trace_estimator="exact"`` (per-example gradients, the paper's), in
the same run. The follow-ups' noises (``anisonoise.FAMILY_DYNAMICS``: M-SGD
at ``m = 20``, its "-B" variants on sub-batches of 100, Anti-PGD) have
nothing to refresh and are timed once.

Writes ``step_cost_<model>.json`` and ``.md`` to ``--out``.

Usage: python benchmarks/step_cost.py [--model lenet|mlp] [--repeats 5]
       [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import anisonoise
import _common
from _common import environment, lenet_problem, timeit

M = 20
K = 20
B = 100  # sub-batch of the "-B" noises (the authors' gdStoF.py noisesize)


def mlp_problem(n=1200, d_in=784, hidden=64, seed=0):
  """A ReLU MLP on random inputs (the timings depend on shapes only)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  return _common.mlp_problem(x, rng.integers(0, 10, n), hidden, seed=seed)


# Noises drawn afresh every step, with nothing to refresh: timed once.
UNCACHED = ("GLD const", "GD + SGD noise") + anisonoise.FAMILY_DYNAMICS
ESTIMATING = ("GLD dynamic", "GLD diag", "GLD leading", "GLD Hessian",
              "GLD 1st eigvec(H)")


def dynamics(refresh, chunk_size=None, m=M, k=K, trace_estimator=None,
             family=False):
  """row label -> (transform or None, matvecs per refresh of its floor), the
  noise-injected rows of ``anisonoise.DYNAMICS`` (SGD has no full-batch
  step to time), and with ``family`` those of ``FAMILY_DYNAMICS``; with
  ``trace_estimator``, only those that estimate ``Tr(C)``, with that
  estimator."""
  extra = {} if trace_estimator is None else {
      "trace_estimator": trace_estimator}
  floor = {"GLD leading": k, "GLD Hessian": k, "GLD 1st eigvec(H)": 1}
  label = {"GLD leading": f"GLD leading k={k}",
           "GLD Hessian": f"GLD Hessian k={k}",
           "GLD 1st eigvec(H)": "GLD 1st eigvec"}
  return {
      label.get(name, name): (anisonoise.dynamics_noise(
          name, std=1e-3, k=k, batch_size=m, refresh_every=refresh,
          chunk_size=chunk_size, estimation_size=B, **extra),
                              floor.get(name, 0))
      for name in anisonoise.DYNAMICS + (anisonoise.FAMILY_DYNAMICS
                                         if family else ())
      if name != "SGD" and (trace_estimator is None or name in ESTIMATING)
  }


def make_step(loss_fn, noise):
  """The jitted full-batch step: gradient, noise transform, ``sgd(0.07)``."""
  tx = optax.chain(noise, optax.sgd(0.07)) if noise else optax.sgd(0.07)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch)
    return optax.apply_updates(params, updates), state

  return tx, step


def time_steps(loss_fn, params, batch, noise, steps, repeats, warm=0):
  """Seconds per step over one refresh period, and the products of its
  refresh (low-rank noises; else None). ``warm`` periods are run first,
  each from ``params`` again with the state carried over: the timed
  refresh is then warm-started from a cache converged at these parameters
  (a settled subspace), where 0 times the cold first refresh."""
  tx, step = make_step(loss_fn, noise)

  def run(params, state, batch):
    # Consecutive jitted steps, as a training loop runs them: one refresh
    # (count 0) and steps - 1 cached steps.
    for _ in range(steps):
      params, state = step(params, state, batch)
    return params, state

  state = tx.init(params)
  for _ in range(warm):
    state = run(params, state, batch)[1]
  t = timeit(run, params, state, batch, repeats=repeats) / steps
  # The chain's first state is the noise's (its refresh's products).
  noise_state = run(params, state, batch)[1][0] if noise else None
  products = getattr(noise_state, "num_matvecs", None)
  return t, None if products is None else int(products)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=["lenet", "mlp"], default="lenet")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--refresh", type=int, nargs="+", default=[1, 10])
  parser.add_argument("--n", type=int, default=1200)
  parser.add_argument("--dynamics", nargs="+", default=None,
                      help="a subset of the dynamics (default: all)")
  parser.add_argument("--trace-estimator", nargs="+",
                      default=["default", "exact"],
                      help="Tr(C) estimators to time: the library's default"
                      " and/or 'exact'")
  parser.add_argument("--warm", type=int, nargs="+", default=[0],
                      help="refresh periods run before timing (state"
                      " carried, parameters reset): times a warm-started"
                      " refresh of a settled cache; 0 times the cold one")
  parser.add_argument("--tag", default="", help="suffix of the result files")
  parser.add_argument("--out", default="results/benchmarks")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  loss_fn, params, batch = (lenet_problem(args.n) if args.model == "lenet"
                            else mlp_problem(args.n))
  flat, unravel = ravel_pytree(params)
  v = unravel(jnp.ones_like(flat))
  matvec = jax.jit(lambda p, b, v: anisonoise.hessian_operator(
      loss_fn, p, b)(v))
  t_mv = timeit(matvec, params, batch, v, repeats=args.repeats)
  t_gd = time_steps(loss_fn, params, batch, None, 1, args.repeats)[0]
  print(f"D={flat.size}  GD step {t_gd:.3f} s  linearised HVP {t_mv:.3f} s",
        flush=True)
  rows = []
  for refresh in args.refresh:
    for estimator in args.trace_estimator:
      exact = estimator == "exact"
      table = dynamics(refresh, trace_estimator="exact" if exact else None,
                       family=True)
      for name, (noise, matvecs) in table.items():
        if name == "GD" or (refresh > 1 and name in UNCACHED):
          continue
        if args.dynamics and name not in args.dynamics:
          continue
        for warm in args.warm:
          t, products = time_steps(loss_fn, params, batch, noise, refresh,
                                   args.repeats, warm)
          floor = t_gd + matvecs * t_mv / refresh
          row = {"dynamics": name, "refresh_every": refresh,
                 "trace_estimator": estimator if exact or name not in
                 UNCACHED else "-",
                 "warm": warm, "step_s": t, "ratio_to_gd": t / t_gd,
                 "products": products,
                 "ratio_to_floor": t / floor if matvecs else None}
          rows.append(row)
          floor_txt = f"{row['ratio_to_floor']:.2f}" if matvecs else "-"
          print(f"{name:18s} refresh {refresh:2d} warm {warm}"
                f" {row['trace_estimator']:7s}:"
                f" {t:7.3f} s/step, {t / t_gd:5.2f}x GD, {floor_txt} x floor",
                flush=True)
  res = {"env": env, "model": args.model, "D": int(flat.size), "n": args.n,
         "gd_step_s": t_gd, "matvec_s": t_mv, "rows": rows}
  _common.write_results(args.out, f"step_cost_{args.model}{args.tag}", res,
                        markdown(res))


def markdown(res) -> str:
  env = res["env"]
  lines = [f"{res['model']} (D = {res['D']}, n = {res['n']}): GD step"
           f" {res['gd_step_s']:.4f} s, linearised HVP {res['matvec_s']:.4f}"
           f" s; {env['device']}, {env['cpu_count']} cores, jax"
           f" {env['jax']}. Warm: refresh periods run at the same"
           " parameters before timing (0: the cold first refresh; more: a"
           " warm-started refresh of a settled cache); products: the timed"
           " refresh's.", "",
           "| dynamics | refresh | Tr(C) | warm | s/step | x GD | x floor |"
           " products |",
           "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    floor = "-" if r["ratio_to_floor"] is None else (
        f"{r['ratio_to_floor']:.2f}")
    lines.append(f"| {r['dynamics']} | {r['refresh_every']} |"
                 f" {r.get('trace_estimator', 'exact')} | {r.get('warm', 0)} |"
                 f" {r['step_s']:.4f} | {r['ratio_to_gd']:.2f} | {floor} |"
                 f" {r.get('products') or '-'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
