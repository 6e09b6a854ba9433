"""Cost and accuracy of the low-rank noises along a training run.

What a user's run pays: ``optax.chain(noise, optax.sgd(lr))`` in a Python
loop over one jitted full-batch step (gradient, noise, update), for
``--steps`` consecutive steps with moving parameters, from initialisation
and from a trained point (``--gd-steps`` of full-batch GD at lr 0.1, the
Fashion-MNIST study's ``theta_GD``, cached under ``--out``). Each step is
timed on its own (``block_until_ready``), compilation excluded (the step
is compiled ahead of time), the cold first refresh included; a GD step
(the same loop without noise) is timed in the same run, and the cost is
the mean step over the mean GD step.

After each refresh the cached vectors ``u_j`` are checked against the
full-batch operator ``M`` (``H``, or ``C`` for ``leading_noise``) at that
step's parameters: captured curvature ``sum_j u_j^T M u_j / sum_{j<=k}
lambda_j(M)``, with the reference from dense float64 ``eigh`` on the
small MLP and from a converged ``top_eigenpairs`` (residual criterion,
``tol=1e-4``) on LeNet. The products of each refresh and its ``converged``
flag are recorded.

Problems: ``lenet`` (``anisonoise.models.LeNet``, 1,200 corrupted
Fashion-MNIST images, lr 0.07), ``lenet_conv`` (the same network as a user
writes it, ``lax.conv`` and ``max_pool``), ``mlp`` (ReLU 784-64-10 on 1,200
random images, lr 0.01) and ``mlp4k`` (tanh 49-64-10, D = 3,850, on 600
Fashion-MNIST images pooled to 7 x 7, lr 0.07, with the dense reference).

Usage: python benchmarks/trajectory.py [--problem lenet] [--start init
       trained] [--cases ...] [--steps 100] [--accuracy] [--out results]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import anisonoise
import _common
import step_cost
from _common import environment, lenet_problem

K = 20


CASES = (
    "hessian_noise(k=20)",
    "hessian_noise(20, batch_size=20, refresh_every=10)",
    "leading_noise(20, batch_size=20, refresh_every=10)",
    "hessian_eigvec_noise(batch_size=20, refresh_every=10)",
)


def make_noise(label: str, key: int = 0, **settings):
  """The transform a label names (the defaults of ``hessian_noise`` and the
  README's recommended calls), with ``settings`` (``tol=...``) added, and
  its refresh period."""
  name, args = label.split("(", 1)
  call = f"anisonoise.{name}({args[:-1]}, key=key, **settings)"
  noise = eval(call, {"anisonoise": anisonoise, "key": key,  # noqa: S307
                      "settings": settings})
  every = 10
  for part in args[:-1].split(","):
    if part.strip().startswith("refresh_every="):
      every = int(part.split("=")[1])
  return noise, every


def mlp4k_problem(n: int = 600, hidden: int = 64, seed: int = 0):
  """A tanh MLP 49-64-10 (D = 3,850) on ``n`` corrupted Fashion-MNIST
  images average-pooled to 7 x 7 (random images without the data)."""
  images, labels, _ = _common.lenet_images(n, seed)
  x = np.asarray(images).reshape(n, 7, 4, 7, 4).mean((2, 4))
  return _common.mlp_problem(x, labels, hidden, activation=jnp.tanh,
                             seed=seed)


PROBLEMS = {
    "lenet": (lambda: lenet_problem(1200), 0.07),
    "lenet_conv": (lambda: lenet_problem(1200, plain_conv=True), 0.07),
    "mlp": (step_cost.mlp_problem, 0.01),
    "mlp4k": (mlp4k_problem, 0.07),
}


def trained_point(name, loss_fn, params, batch, steps, out):
  """Full-batch GD at lr 0.1 for ``steps`` steps from ``params`` (the
  Fashion-MNIST study's GD phase), cached in ``out``."""
  path = os.path.join(out, f"trained_{name}_gd{steps}.npy")
  unravel = ravel_pytree(params)[1]
  if os.path.exists(path):
    return unravel(jnp.asarray(np.load(path)))
  t0 = time.perf_counter()
  params = _common.gd(loss_fn, params, batch, steps, lr=0.1)
  print(f"GD {steps} steps: {time.perf_counter() - t0:.0f} s", flush=True)
  os.makedirs(out, exist_ok=True)
  np.save(path, np.asarray(ravel_pytree(params)[0]))
  return params


def compiled_step(loss_fn, noise, lr, params, batch):
  """``(init, step)``: the jitted full-batch step, compiled ahead of time."""
  tx = optax.chain(noise, optax.sgd(lr)) if noise else optax.sgd(lr)

  def step(params, state, batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               batch=batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  t0 = time.perf_counter()
  fn = jax.jit(step).lower(params, state, batch).compile()
  return state, fn, time.perf_counter() - t0


class Reference:
  """Top-``k`` eigenvalue sums of the full-batch ``H`` or ``C`` and the
  curvature ``sum_j u_j^T M u_j`` that given vectors capture."""

  def __init__(self, loss_fn, batch, dense: bool):
    self.loss_fn, self.batch, self.dense = loss_fn, batch, dense

  def matrix(self, params, of_covariance):
    flat, unravel = ravel_pytree(jax.tree.map(
        lambda x: np.asarray(x, np.float64), params))
    with jax.enable_x64(True):
      batch = jax.tree.map(lambda x: jnp.asarray(
          np.asarray(x, np.float64) if np.issubdtype(
              np.asarray(x).dtype, np.floating) else x), self.batch)
      if of_covariance:
        g = jax.vmap(lambda b: jax.grad(lambda f: self.loss_fn(
            unravel(f), jax.tree.map(lambda a: a[None], b))[0])(
                jnp.asarray(flat)))(batch)
        g = g - g.mean(0)
        return np.asarray(g.T @ g / g.shape[0])
      return np.asarray(jax.hessian(lambda f: jnp.mean(
          self.loss_fn(unravel(f), batch)))(jnp.asarray(flat)))

  def captured(self, params, vectors, k, of_covariance) -> float:
    u = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vectors),
                   np.float64)
    if self.dense:
      m = self.matrix(params, of_covariance)
      top = np.linalg.eigvalsh(m)[::-1][:k].sum()
      return float(np.einsum("id,de,ie->", u, m, u) / top)
    op = (anisonoise.covariance_operator if of_covariance
          else anisonoise.hessian_operator)(self.loss_fn, params, self.batch)
    ref = anisonoise.top_eigenpairs(op, params, k, key=jax.random.key(7),
                                    num_iters=3 * k, tol=1e-4,
                                    max_matvecs=30 * k)
    flat_like = ravel_pytree(params)[1]
    images = np.stack([np.asarray(ravel_pytree(op(flat_like(
        jnp.asarray(row, jnp.float32))))[0], np.float64) for row in u])
    return float(np.sum(u * images) / np.sum(np.asarray(
        ref.eigenvalues, np.float64)))


def run_case(label, noise, every, loss_fn, params, batch, lr, steps,
             reference):
  """Times ``steps`` consecutive steps and checks each refresh."""
  state, step, compile_s = compiled_step(loss_fn, noise, lr, params, batch)
  times, refreshes = [], []
  of_covariance = label.startswith("leading")
  for i in range(steps):
    count = int(state[0].count) if noise else None
    before = params
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, batch))
    times.append(time.perf_counter() - t0)
    if noise is None:
      continue
    s = state[0]
    if count % every == 0:
      row = {"step": i, "products": int(s.num_matvecs),
             "converged": bool(s.converged)}
      if reference is not None:
        k = s.eigenvalues.shape[0]
        row["captured"] = reference.captured(before, s.eigenvectors, k,
                                             of_covariance)
      refreshes.append(row)
  return {"case": label, "compile_s": compile_s, "step_s": times,
          "mean_step_s": float(np.mean(times)), "refreshes": refreshes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problem", choices=sorted(PROBLEMS), default="lenet")
  parser.add_argument("--start", nargs="+", default=["init", "trained"],
                      choices=["init", "trained"])
  parser.add_argument("--cases", nargs="+", default=None,
                      help="labels of CASES to run (default: all)")
  parser.add_argument("--tol", type=float, nargs="+", default=[None],
                      help="the noises' tol, one run each (default: theirs)")
  parser.add_argument("--max-matvecs", type=int, default=None)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--gd-steps", type=int, default=3000)
  parser.add_argument("--accuracy", nargs="*", default=None,
                      help="captured curvature after each refresh, for"
                      " these cases (none named: every case)")
  parser.add_argument("--tag", default="")
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  make, lr = PROBLEMS[args.problem]
  loss_fn, params0, batch = make()
  dim = int(ravel_pytree(params0)[0].size)
  reference = None
  if args.accuracy is not None:
    reference = Reference(loss_fn, batch, dense=dim <= 6000)
  rows = []
  for start in args.start:
    params = params0 if start == "init" else trained_point(
        args.problem, loss_fn, params0, batch, args.gd_steps, args.out)
    gd = run_case("GD", None, 1, loss_fn, params, batch, lr, args.steps,
                  None)
    print(f"{start}: GD {gd['mean_step_s'] * 1e3:.2f} ms/step", flush=True)
    for label, tol in [(c, t) for c in args.cases or CASES for t in args.tol]:
      settings = {} if tol is None else {"tol": tol}
      if args.max_matvecs is not None:
        settings["max_matvecs"] = args.max_matvecs
      noise, every = make_noise(label, **settings)
      checked = reference if (args.accuracy is not None and (
          not args.accuracy or label in args.accuracy)) else None
      res = run_case(label, noise, every, loss_fn, params, batch, lr,
                     args.steps, checked)
      res.update(settings=settings)
      res.update(start=start, ratio_to_gd=res["mean_step_s"]
                 / gd["mean_step_s"], gd_step_s=gd["mean_step_s"])
      rows.append(res)
      caps = [r.get("captured") for r in res["refreshes"]]
      print(f"{start} {label}: {res['ratio_to_gd']:.2f}x GD, products"
            f" {[r['products'] for r in res['refreshes']]}, captured"
            f" {[None if c is None else round(c, 4) for c in caps]}",
            flush=True)
  res = {"env": env, "problem": args.problem, "D": dim, "k": K,
         "steps": args.steps, "gd_steps": args.gd_steps, "rows": rows}
  _common.write_results(args.out, f"trajectory_{args.problem}{args.tag}",
                        res, markdown(res))


def markdown(res) -> str:
  env = res["env"]
  lines = [f"{res['problem']} (D = {res['D']}), {res['steps']} consecutive"
           f" steps; {env['device']}, {env['cpu_count']} cores, jax"
           f" {env['jax']}. Cost: mean step over the mean GD step, the"
           " cold first refresh included, compilation excluded. Captured:"
           " the least and the median over the refreshes after the first"
           " (the first's apart).", "",
           "| start | noise | settings | x GD | products per refresh |"
           " unconverged | captured, first | captured, later (min / median) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    prods = [x["products"] for x in r["refreshes"]]
    caps = [x["captured"] for x in r["refreshes"] if "captured" in x]
    first = f"{caps[0]:.4f}" if caps else "-"
    later = (f"{min(caps[1:]):.4f} / {float(np.median(caps[1:])):.4f}"
             if len(caps) > 1 else "-")
    unconv = sum(not x["converged"] for x in r["refreshes"])
    lines.append(
        f"| {r['start']} | `{r['case']}` |"
        f" {', '.join(f'{a}={b}' for a, b in r['settings'].items()) or '-'} |"
        f" {r['ratio_to_gd']:.2f} |"
        f" {prods[0]} then {min(prods[1:], default='-')}-"
        f"{max(prods[1:], default='-')} (mean {np.mean(prods):.0f}) |"
        f" {unconv} of {len(prods)} | {first} | {later} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()


def cost_table(results: str = os.path.join(os.path.dirname(__file__),
                                           "results")) -> str:
  """The cost and accuracy table of the README, the home page and the
  guide, from the committed ``trajectory_*.json``: x GD per step over 100
  steps (LeNet from initialisation and from ``theta_GD``, the ReLU MLP
  from initialisation), the mean products per refresh on LeNet, and the
  least captured curvature after a warm refresh on the MLP with the dense
  reference."""
  def load(name):
    path = os.path.join(results, f"trajectory_{name}.json")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return json.load(f)["rows"]

  cells = {}
  for name in ("lenet", "mlp", "mlp4k"):
    for r in load(name):
      if r.get("settings"):
        continue  # a tol of the frontier, not the default
      cell = cells.setdefault(r["case"], {})
      cell[f"{name} {r['start']}"] = f"{r['ratio_to_gd']:.1f}"
      if name == "lenet" and r["start"] == "init":
        cell["products"] = (
            f"{np.mean([x['products'] for x in r['refreshes']]):.0f}")
      caps = [x["captured"] for x in r["refreshes"][1:] if "captured" in x]
      if caps and name == "mlp4k":
        cell["captured"] = f"{min(caps):.3f}"
  columns = ("lenet init", "lenet trained", "mlp init", "products",
             "captured")
  lines = ["| call | LeNet, from init | LeNet, from theta_GD | MLP, from"
           " init | products per refresh (LeNet) | captured, least |",
           "|---|---|---|---|---|---|"]
  for case in CASES:
    cell = cells.get(case, {})
    lines.append(f"| `{case}` | "
                 + " | ".join(cell.get(c, "-") for c in columns) + " |")
  return "\n".join(lines)
