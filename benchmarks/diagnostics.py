"""Time of each diagnostic on the paper's LeNet (11,330 params, 1,200 images).

Random initialisation, random images of Fashion-MNIST's shape. Each function
is jitted, run once to compile, then timed (median of ``--repeats``).

Usage: python benchmarks/diagnostics.py [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import anisonoise
from _common import environment, lenet_problem, timeit


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1200)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--json", default=None)
  parser.add_argument("--skip-exact", action="store_true",
                      help="skip the exact Tr(H Sigma) (n HVPs)")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  loss_fn, params, batch = lenet_problem(args.n)
  key = jax.random.key(0)
  m = 20
  cases = {
      "escape_indicator_stochastic_100": lambda p, b: (
          anisonoise.escape_indicator(loss_fn, p, b, batch_size=m,
                                      method="stochastic", key=key,
                                      num_samples=100)),
      "isotropic_escape_indicator_hutchinson_100": lambda p, b: (
          anisonoise.isotropic_escape_indicator(
              loss_fn, p, b, batch_size=m,
              hessian_trace_method="hutchinson", key=key, num_probes=100)),
      "projection_coefficient_hutchinson_100": lambda p, b: (
          anisonoise.projection_coefficient(
              loss_fn, p, b, key=key, num_iters=30,
              hessian_trace_method="hutchinson", num_probes=100)),
      "expected_sharpness_M1000": lambda p, b: (
          anisonoise.expected_sharpness(loss_fn, p, b, key=key,
                                        num_samples=1000,
                                        samples_per_chunk=10)),
      "hessian_spectrum_top20": lambda p, b: anisonoise.hessian_spectrum(
          loss_fn, p, b, num_eigs=20, key=key),
      "spectral_density_8x60": lambda p, b: anisonoise.spectral_density(
          loss_fn, p, b, key=key, num_probes=8, num_iters=60),
      "gradient_noise_norms": lambda p, b: anisonoise.gradient_noise_norms(
          loss_fn, p, b, batch_size=m, chunk_size=200),
  }
  if not args.skip_exact:
    cases["escape_indicator_exact"] = lambda p, b: (
        anisonoise.escape_indicator(loss_fn, p, b, batch_size=m,
                                    chunk_size=100))
  results = {}
  for name, fn in cases.items():
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(params, batch))
    first = time.perf_counter() - t0
    t = timeit(jitted, params, batch, repeats=args.repeats)
    results[name] = {"seconds": t, "first_call_seconds": first}
    print(f"{name:45s} {t:9.2f} s  (first call incl. compile {first:.1f} s)",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "env": env, "n": args.n}, f, indent=2)


if __name__ == "__main__":
  main()
