"""Fig. 2 of Zhu et al. (ICML 2019): escaping a sharp minimum in 2D.

The loss surface of App. D.1 has a sharp minimum near (1, 1) and a flat one
near (-1, -1). Every dynamics starts at (1, 1) and runs 500 steps of
``theta <- theta - lr (grad + eps)`` with lr 0.005; all noise is
trace-matched so that the per-step parameter perturbation ``lr eps`` has
expected squared norm 0.01 (``Tr(Sigma) = 0.01 / lr^2``), covariances
re-estimated every step. A run succeeds when both final coordinates are
below -0.5. Each dynamics is 100 runs, each with a fresh data set (the
authors' recipe), computed as one jitted call: ``vmap`` over runs, ``scan``
over steps.

Usage: python examples/fig2_toy.py [--out results/fig2] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import anisonoise

ANGLE = math.pi / 4
LR = 0.005
STEPS = 500
SQ_NORM = 0.01  # E||lr eps||^2 per step
TRACE = SQ_NORM / LR**2
N_DATA = 100


def make_data(key: jax.Array, n: int = N_DATA) -> jax.Array:
  """The authors' data: ``(randn(n, 2) * [sqrt 10, 1]) @ K * 1e-2``."""
  c, s = math.cos(ANGLE), math.sin(ANGLE)
  k = jnp.array([[c, -s], [s, c]])
  z = jax.random.normal(key, (n, 2)) * jnp.array([math.sqrt(10.0), 1.0])
  return (z @ k) * 1e-2


def loss_fn(w: jax.Array, batch: dict) -> jax.Array:
  """Per-example losses of App. D.1: the smaller of a sharp and a flat bowl."""
  x = batch["x"]
  c, s = math.cos(ANGLE), math.sin(ANGLE)
  s1 = w[0] - 1.0 - x[:, 0]
  s2 = w[1] - 1.0 - x[:, 1]
  sharp = 10.0 * (s1 * c - s2 * s) ** 2 + 100.0 * (s1 * c + s2 * s) ** 2
  flat = (w[0] - x[:, 0] + 1.0) ** 2 + (w[1] - x[:, 1] + 1.0) ** 2
  return jnp.minimum(sharp, flat)


@functools.cache
def dynamics() -> dict[str, optax.GradientTransformationExtraArgs]:
  """The compared noise transforms (GD's adds nothing), built once so that
  repeated runs reuse the compiled simulations."""
  # With a fixed trace GLD dynamic is GLD const, and SGD is GD + SGD noise.
  return {name: anisonoise.dynamics_noise(name, std=math.sqrt(TRACE / 2),
                                         k=2, trace=TRACE)
          for name in anisonoise.DYNAMICS
          if name not in ("GLD dynamic", "SGD")}


def simulate(noise, key: jax.Array, num_runs: int):
  """``num_runs`` runs of one dynamics: final points, trajectories of run 0
  and the per-step mean of ``eps^T H eps`` (an unbiased ``Tr(H Sigma_t)``)."""
  tx = optax.chain(noise, optax.sgd(LR))
  w0 = jnp.ones(2)

  def one_run(run_key):
    data_key, noise_key = jax.random.split(run_key)
    batch = {"x": make_data(data_key)}
    state = tx.init(w0)
    if hasattr(state[0], "rng_key"):  # GD's transform has no key
      state = ((state[0]._replace(rng_key=jax.random.key_data(noise_key)),)
               + tuple(state[1:]))

    def step(carry, _):
      w, state = carry
      grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(w)
      updates, state = tx.update(grads, state, w, loss_fn=loss_fn,
                                 batch=batch)
      eps = -updates / LR - grads
      ind = jnp.vdot(eps, anisonoise.hvp(loss_fn, w, batch, eps))
      w = optax.apply_updates(w, updates)
      return (w, state), (w, ind)

    (w, _), (traj, ind) = jax.lax.scan(step, (w0, state), None, STEPS)
    return w, traj, ind

  final, traj, ind = jax.vmap(one_run)(jax.random.split(key, num_runs))
  return final, traj[0], jnp.mean(ind, axis=0)


_jitted_simulate = jax.jit(simulate, static_argnums=(0, 2))


def wilson_interval(successes: int, n: int, z: float = 1.96):
  """95% Wilson score interval of a binomial proportion."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z**2 / n
  centre = (p + z**2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def run(out: str, seed: int = 0, num_runs: int = 100, plot: bool = True):
  """Runs every dynamics, writes ``fig2.json`` (and PNGs), returns results."""
  from tqdm import tqdm

  os.makedirs(out, exist_ok=True)
  key = jax.random.key(seed)
  results, trajectories = {}, {}
  sim = _jitted_simulate
  items = list(dynamics().items())
  for i, (name, noise) in enumerate(tqdm(items, desc="dynamics")):
    final, traj, ind = sim(noise, jax.random.fold_in(key, i), num_runs)
    final = np.asarray(final)
    ok = int(np.sum(np.all(final < -0.5, axis=1)))
    lo, hi = wilson_interval(ok, num_runs)
    results[name] = {
        "success_rate": ok / num_runs,
        "successes": ok,
        "runs": num_runs,
        "ci95": [lo, hi],
        "mean_tr_h_sigma": np.asarray(ind).tolist(),
    }
    trajectories[name] = np.asarray(traj)
  summary = {
      "experiment": "fig2_toy",
      "seed": seed,
      "lr": LR,
      "steps": STEPS,
      "trace": TRACE,
      "expected_sq_step_noise": SQ_NORM,
      "dynamics": results,
  }
  with open(os.path.join(out, "fig2.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if plot:
    plot_figure(summary, trajectories, out, seed)
  return summary


def plot_figure(summary, trajectories, out, seed):
  """Fig. 2's three panels, written to ``fig2.png``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(summary["dynamics"])
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  g = np.linspace(-2.0, 2.0, 201)
  ww = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
  batch = {"x": make_data(jax.random.key(seed))}
  z = np.asarray(jax.vmap(lambda w: jnp.mean(loss_fn(w, batch)))(
      jnp.asarray(ww))).reshape(201, 201)
  ax = axes[0]
  ax.contourf(g, g, np.log1p(z), levels=30, cmap="Greys")
  for name in names:
    t = np.vstack([[1.0, 1.0], trajectories[name]])
    ax.plot(t[:, 0], t[:, 1], lw=0.8, label=name)
  ax.set(xlim=(-2, 2), ylim=(-2, 2), xlabel="w1", ylabel="w2",
         title="one trajectory per dynamics")
  ax.legend(fontsize=7)
  ax = axes[1]
  rates = [summary["dynamics"][n]["success_rate"] for n in names]
  ci = np.array([summary["dynamics"][n]["ci95"] for n in names])
  err = np.abs(ci.T - np.array(rates))
  ax.bar(range(len(names)), rates, yerr=err, capsize=3,
         color=[f"C{i}" for i in range(len(names))])
  ax.set_xticks(range(len(names)), names, rotation=35, ha="right",
                fontsize=8)
  ax.set(ylim=(0, 1), ylabel="success rate (100 runs)",
         title="escape to the flat minimum")
  ax = axes[2]
  for i, name in enumerate(names):
    if name == "GD":
      continue
    curve = np.asarray(summary["dynamics"][name]["mean_tr_h_sigma"])
    ax.plot(np.arange(1, curve.size + 1), np.maximum(curve, 1e-12),
            color=f"C{i}", lw=1, label=name)
  ax.set(yscale="log", xlabel="iteration", ylabel="mean Tr(H_t Sigma_t)",
         title="escape indicator")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "fig2.png"), dpi=120)
  plt.close(fig)


def markdown_table(summary) -> str:
  rows = ["| dynamics | success rate | 95% interval |"
          " mean Tr(H Sigma), first 50 steps |",
          "|---|---|---|---|"]
  for name, r in summary["dynamics"].items():
    lo, hi = r["ci95"]
    early = float(np.mean(r["mean_tr_h_sigma"][:50]))
    rows.append(f"| {name} | {r['success_rate']:.2f} | [{lo:.2f}, {hi:.2f}]"
                f" | {early:.3g} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/fig2")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--runs", type=int, default=100)
  args = parser.parse_args()
  t0 = time.perf_counter()
  summary = run(args.out, args.seed, args.runs)
  print(markdown_table(summary))
  print(f"\nwrote {args.out}/fig2.json and fig2.png in"
        f" {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
