"""How the per-step cost of each dynamics grows with the number of
parameters ``D`` and the estimation batch ``n``.

One-hidden-layer MLPs (784 inputs, 10 classes) of growing width at fixed
``n``, then a fixed width at growing ``n``; every dynamics of Table 1 at
``refresh_every`` (default 10), timed as in ``step_cost.py`` (compile first,
``block_until_ready``, median of ``--repeats`` runs of ``refresh_every``
consecutive steps). The fitted log-log slopes say how the cost scales, so a
user can predict it for their own model from one measurement.

Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` to ``--out``.

Usage: python benchmarks/scaling.py [--widths 8 32 128 512]
       [--batches 300 1200 4800] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from _common import environment, write_results
from step_cost import dynamics, mlp_problem, time_steps


def sweep(configs, refresh, repeats, names):
  rows = []
  for width, n in configs:
    loss_fn, params, batch = mlp_problem(n=n, hidden=width)
    d = int(sum(x.size for x in params.values()))
    for name, (noise, _) in dynamics(refresh).items():
      if names and name not in names:
        continue
      t = time_steps(loss_fn, params, batch, noise, refresh, repeats)[0]
      rows.append({"dynamics": name, "width": width, "D": d, "n": n,
                   "step_s": t})
      print(f"width {width:4d} (D={d:7d}) n={n:5d}  {name:18s} {t:.4f} s",
            flush=True)
  return rows


def slopes(rows, x):
  """Least-squares slope of log(step time) against log(x), per dynamics."""
  out = {}
  for name in dict.fromkeys(r["dynamics"] for r in rows):
    pts = [(r[x], r["step_s"]) for r in rows if r["dynamics"] == name]
    if len(pts) >= 2:
      xs, ts = np.log(np.array(pts, float)).T
      out[name] = float(np.polyfit(xs, ts, 1)[0])
  return out


def plot(res, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, x, label in ((axes[0], "by_D", "D", "parameters D"),
                            (axes[1], "by_n", "n", "estimation batch n")):
    rows = res[key]
    for i, name in enumerate(dict.fromkeys(r["dynamics"] for r in rows)):
      pts = sorted((r[x], r["step_s"]) for r in rows
                   if r["dynamics"] == name)
      xs, ts = np.array(pts).T
      ax.plot(xs, ts, "o-", color=f"C{i}",
              label=f"{name} (slope {res['slopes_' + x][name]:.2f})")
    ax.set(xscale="log", yscale="log", xlabel=label, ylabel="s / step")
    ax.legend(fontsize=7)
  axes[0].set_title(f"n = {res['fixed_n']}, refresh every {res['refresh']}")
  axes[1].set_title(f"width {res['fixed_width']} (D = "
                    f"{res['by_n'][0]['D']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(res) -> str:
  env = res["env"]
  names = list(dict.fromkeys(r["dynamics"] for r in res["by_D"]))
  ds = sorted({r["D"] for r in res["by_D"]})
  ns = sorted({r["n"] for r in res["by_n"]})

  def cell(rows, key, val, name):
    return next(f"{r['step_s'] * 1e3:.1f}" for r in rows
                if r[key] == val and r["dynamics"] == name)

  lines = [f"ms per step, refresh every {res['refresh']}; {env['device']},"
           f" {env['cpu_count']} cores, jax {env['jax']}.", "",
           "| dynamics | " + " | ".join(f"D={d}" for d in ds)
           + " | slope in D | " + " | ".join(f"n={n}" for n in ns)
           + " | slope in n |",
           "|---" * (len(ds) + len(ns) + 3) + "|"]
  for name in names:
    lines.append(
        f"| {name} | "
        + " | ".join(cell(res["by_D"], "D", d, name) for d in ds)
        + f" | {res['slopes_D'][name]:.2f} | "
        + " | ".join(cell(res["by_n"], "n", n, name) for n in ns)
        + f" | {res['slopes_n'][name]:.2f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+",
                      default=[8, 32, 128, 512])
  parser.add_argument("--batches", type=int, nargs="+",
                      default=[300, 1200, 4800])
  parser.add_argument("--fixed-n", type=int, default=1200)
  parser.add_argument("--fixed-width", type=int, default=32)
  parser.add_argument("--refresh", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dynamics", nargs="+", default=None)
  parser.add_argument("--out", default="results/benchmarks")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  by_d = sweep([(w, args.fixed_n) for w in args.widths], args.refresh,
               args.repeats, args.dynamics)
  by_n = sweep([(args.fixed_width, n) for n in args.batches], args.refresh,
               args.repeats, args.dynamics)
  res = {"env": env, "refresh": args.refresh, "fixed_n": args.fixed_n,
         "fixed_width": args.fixed_width, "by_D": by_d, "by_n": by_n,
         "slopes_D": slopes(by_d, "D"), "slopes_n": slopes(by_n, "n")}
  write_results(args.out, "scaling", res, markdown(res))
  plot(res, os.path.join(args.out, "scaling.png"))


if __name__ == "__main__":
  main()
