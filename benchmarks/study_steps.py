"""What the Fashion-MNIST study's long runs pay per step: 100 steps of GD,
GLD leading and GLD Hessian from ``theta_GD``, as the ``long`` preset runs
them (the study's own jitted ``lax.scan`` of its step, its scan length,
its settings: k = 20, refreshed every 10 steps, m = 20), the cold first
refresh included, compilation and evaluations excluded.

Usage: python benchmarks/study_steps.py THETA_GD [--preset long] [--out results]

``THETA_GD``: a study's ``theta_gd.msgpack`` (e.g. from
``python examples/fashion_mnist.py --preset quick --out DIR``: the presets
share the data, the model and the GD phase).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from _common import environment, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples", "noisy_minima"))
import configs  # noqa: E402
import input_pipeline  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

DYNAMICS = ("GLD leading", "GLD Hessian")


def scan_length(cfg) -> int:
  """The steps per jitted call of the study's dynamics phase."""
  return train.scan_length(train.schedule(cfg.steps, cfg.eval_every,
                                          cfg.early_steps,
                                          cfg.early_eval_every))


def markdown(res: dict) -> str:
  lines = [
      f"Fashion-MNIST `{res['preset']}` preset, LeNet, 1,200 images, 100"
      f" steps from theta_GD in scans of {res['scan_length']} (the study's"
      " own step); compilation and evaluations excluded.",
      "",
      "| dynamics | s per 100 steps | x GD | min per 1,000 steps |"
      " products at the last refresh |",
      "|---|---|---|---|---|",
  ]
  for name, r in res["dynamics"].items():
    lines.append(
        f"| {name} | {r['seconds']:.1f} |"
        f" {r['seconds'] / res['dynamics']['GD']['seconds']:.2f} |"
        f" {r['seconds'] * 10 / 60:.1f} | {r.get('num_matvecs', '-')} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("theta_gd")
  parser.add_argument("--preset", default="long")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(env)
  cfg = configs.PRESETS["fashion_mnist"][args.preset]
  seed = 0
  data = input_pipeline.load(cfg, None, seed)
  params0, loss_fn, _ = models.create(cfg, seed)
  theta, _ = train.load_checkpoint(args.theta_gd, params0)
  length = scan_length(cfg)
  res = {"environment": env, "preset": args.preset, "scan_length": length,
         "steps": args.steps, "dynamics": {}}
  for name in ("GD", *DYNAMICS):
    if name == "GD":
      step = train.gd_step(loss_fn, cfg.lr, cfg.chunk_size)
      carry = theta
    else:
      tx = train.make_tx(name, cfg, seed)
      step = train.noise_step(loss_fn, tx, cfg.chunk_size)
      carry = (theta, tx.init(theta))
    advance = train._advance_fn(step)
    jax.block_until_ready(advance(carry, 0, data.train, length=length))
    start = time.perf_counter()
    for t in range(0, args.steps, length):
      carry = advance(carry, t, data.train, length=length)
    jax.block_until_ready(carry)
    row = {"seconds": time.perf_counter() - start}
    if name != "GD":
      row["num_matvecs"] = int(carry[1][0].num_matvecs)
    res["dynamics"][name] = row
    print(name, row, flush=True)
  write_results(args.out, f"study_steps_{args.preset}", res, markdown(res))


if __name__ == "__main__":
  main()
