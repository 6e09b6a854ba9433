"""Peak memory of the diagnostics against ``chunk_size``: a wide MLP, or
the character transformer.

Each (function, chunk size) runs in a fresh process, so that its peak is its
own: resident memory (``ru_maxrss``) on a CPU, the device's
``peak_bytes_in_use`` on a GPU. The default model is a ReLU MLP 784-W-10
(W = 2,560: D = 2,035,210 parameters) on ``n`` random inputs (4,096 by
default: the per-example gradients alone would be n x D floats = 33 GB);
``--model transformer`` is ``anisonoise.models.CharTransformer`` (width W,
4 heads, 4 blocks, 96 tokens) on ``n`` random sequences of
``--seq-len`` tokens, one loss per sequence; float32.

Writes ``memory.json`` and ``memory.md`` to ``--out`` (``--name`` to
rename).

Usage: python benchmarks/memory.py [--n 4096] [--width 2560]
       [--chunks none 256 64] [--functions covariance_trace ...]
       python benchmarks/memory.py --model transformer --n 1024 --width 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

FUNCTIONS = ("covariance_trace", "covariance_diagonal",
             "escape_indicator_stochastic", "hessian_spectrum")


def peak_bytes() -> int:
  """The device's peak allocation where it reports one, else this process's
  peak resident memory."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def transformer_problem(n: int, width: int, seq_len: int):
  """``(loss_fn, params, batch)`` of a CharTransformer (width ``width``, 4
  heads, 4 blocks) on ``n`` random sequences of ``seq_len`` tokens."""
  import jax
  import numpy as np
  from flax import nnx

  from anisonoise import models

  model = models.CharTransformer(96, context=seq_len, dim=width, heads=4,
                                 layers=4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = np.random.default_rng(0).integers(0, 96, (n, seq_len + 1))
  batch = {"x": jax.numpy.asarray(tokens[:, :-1]),
           "y": jax.numpy.asarray(tokens[:, 1:])}

  def loss_fn(p, b):
    return models.sequence_losses(nnx.merge(graphdef, p)(b["x"]), b["y"])

  return loss_fn, params, batch


def child(function: str, chunk: int | None, n: int, width: int,
          model: str = "mlp", seq_len: int = 64) -> dict:
  """Runs one function once (compiled) and reports its time and peak."""
  import jax
  import numpy as np

  import anisonoise
  import _common

  rng = np.random.default_rng(0)
  if model == "transformer":
    loss_fn, params, batch = transformer_problem(n, width, seq_len)
  else:
    x = rng.normal(size=(n, 784)).astype(np.float32)
    loss_fn, params, batch = _common.mlp_problem(x, rng.integers(0, 10, n),
                                                 width)
  key = jax.random.key(0)
  calls = {
      "covariance_trace": lambda p, b: anisonoise.covariance_trace(
          loss_fn, p, b, chunk_size=chunk),
      "covariance_diagonal": lambda p, b: jax.tree.leaves(
          anisonoise.covariance_diagonal(loss_fn, p, b,
                                         chunk_size=chunk))[0].ravel()[0],
      "escape_indicator_stochastic": lambda p, b: anisonoise.escape_indicator(
          loss_fn, p, b, batch_size=100, method="stochastic", key=key,
          num_samples=4, chunk_size=chunk).mean,
      "hessian_spectrum": lambda p, b: anisonoise.hessian_spectrum(
          loss_fn, p, b, num_eigs=5, num_iters=20, key=key,
          chunk_size=chunk).eigenvalues,
  }
  fn = jax.jit(calls[function])
  t0 = time.perf_counter()
  value = jax.block_until_ready(fn(params, batch))
  seconds = time.perf_counter() - t0
  d = sum(v.size for v in jax.tree.leaves(params))
  return {"function": function, "chunk_size": chunk, "n": n, "D": int(d),
          "seconds_with_compile": seconds, "peak_bytes": peak_bytes(),
          "value": np.asarray(value).ravel()[:5].tolist()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--width", type=int, default=2560)
  parser.add_argument("--model", choices=("mlp", "transformer"),
                      default="mlp")
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--name", default="memory")
  parser.add_argument("--chunks", nargs="+", default=["256", "64"],
                      help="chunk sizes; 'none' for the whole batch at once")
  parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS))
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--out", default="results/benchmarks")
  parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    function, chunk = args.child
    print(json.dumps(child(function, None if chunk == "none" else int(chunk),
                           args.n, args.width, args.model, args.seq_len)))
    return

  import _common
  env = _common.environment()
  print(json.dumps(env), flush=True)
  rows = []
  for function in args.functions:
    for chunk in args.chunks:
      row = _common.run_child(
          [sys.executable, os.path.abspath(__file__), "--n", str(args.n),
           "--width", str(args.width), "--model", args.model, "--seq-len",
           str(args.seq_len), "--child", function, chunk],
          args.timeout, function=function, chunk_size=chunk)
      rows.append(row)
      print(json.dumps(row), flush=True)
      res = {"env": env, "n": args.n, "width": args.width,
             "model": args.model, "seq_len": args.seq_len, "rows": rows}
      _common.write_results(args.out, args.name, res, markdown(res),
                            quiet=True)  # after every row
  print(markdown(res))


def markdown(res) -> str:
  env = res["env"]
  what = (f"CharTransformer (width {res['width']}, 4 blocks), n ="
          f" {res['n']} sequences of {res['seq_len']} tokens"
          if res.get("model") == "transformer"
          else f"MLP 784-{res['width']}-10, n = {res['n']}")
  lines = [f"{what}, float32;"
           f" {env['device']}, {env['cpu_count']} cores, jax {env['jax']}."
           " Peak = resident memory of a fresh process (CPU) or the"
           " device's peak allocation (GPU); time includes compilation.", "",
           "| function | chunk_size | D | peak GB | s |",
           "|---|---|---|---|---|"]
  for r in res["rows"]:
    if "failed" in r:
      lines.append(f"| {r['function']} | {r['chunk_size']} | - |"
                   f" failed: {r['failed']} | - |")
      continue
    lines.append(f"| {r['function']} | {r['chunk_size']} | {r['D']:,} |"
                 f" {r['peak_bytes'] / 2**30:.2f} |"
                 f" {r['seconds_with_compile']:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
