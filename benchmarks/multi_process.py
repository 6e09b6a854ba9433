"""What crossing processes costs: 2 processes x 1 device against 1 process
x 2 devices, on this machine.

Each layout runs ``tests/multiprocess_worker.py --time`` (processes joined
by ``jax.distributed`` on localhost, CPU collectives through gloo; one
process is joined too, so that both layouts run the same program): the
paper's LeNet on 1,024 images split along the examples, a jitted GD +
``hessian_noise(20, batch_size=20)`` step (median over 20 consecutive
steps with two refreshes, three runs), a GD step and a jitted top-5
``hessian_spectrum``. The ratio of the two layouts is the overhead of the
collectives between processes; the bytes all-reduced per gradient and per
Hessian product are read from the compiled programs.

Usage: python benchmarks/multi_process.py [--out results]
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import environment, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests"))
from multiprocess_worker import launch  # noqa: E402

LAYOUTS = {"1 process x 2 devices": (1, 2), "2 processes x 1 device": (2, 1)}


def markdown(res: dict) -> str:
  rows = res["layouts"]
  base = rows["1 process x 2 devices"]
  lines = [
      f"LeNet (D = {base['num_params']:,}), 1,024 images split along the"
      f" examples; {res['environment']['backend']},"
      f" {res['environment']['cpu_count']} cores, jax"
      f" {res['environment']['jax']}. Seconds (median); ratio: 2 processes"
      " over 1 process.",
      "",
      "| layout | GD step s | GD + hessian_noise step s | x GD |"
      " hessian_spectrum (top 5) s |",
      "|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
        f"| {name} | {r['gd_step_s']:.4f} | {r['hessian_noise_step_s']:.4f}"
        f" | {r['hessian_noise_step_s'] / r['gd_step_s']:.2f} |"
        f" {r['hessian_spectrum_s']:.3f} |")
  two = rows["2 processes x 1 device"]
  lines.append(
      f"| ratio | {two['gd_step_s'] / base['gd_step_s']:.2f} |"
      f" {two['hessian_noise_step_s'] / base['hessian_noise_step_s']:.2f}"
      f" | | {two['hessian_spectrum_s'] / base['hessian_spectrum_s']:.2f} |")
  lines += [
      "",
      f"All-reduced per gradient: {two['all_reduce_bytes_gradient']:,}"
      f" bytes; per Hessian product: {two['all_reduce_bytes_hvp']:,} bytes"
      " (read from the compiled programs).",
  ]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(env)
  layouts = {}
  for name, (processes, devices) in LAYOUTS.items():
    results = launch("--time", num_processes=processes,
                     devices_each=devices, timeout=1200)
    layouts[name] = results[0]
    print(name, layouts[name], flush=True)
  res = {"environment": env, "layouts": layouts}
  write_results(args.out, "multi_process", res, markdown(res))


if __name__ == "__main__":
  main()
