"""Compile and run time of a jitted ``hessian_noise(k=20)`` step, with the
Lanczos recursion unrolled and under ``fori_loop``.

One child process per (model, path), so compilation caches do not carry
over. The models: the paper's LeNet as ``anisonoise.models.LeNet`` (conv2
as one matmul) and as a user writes it (``lax.conv``), on ``n`` images.

  python compile_time.py --n 1200 --out results
  python compile_time.py --paths loop --repeats 0 --tag _loop  # compile only
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import optax

import _common


def child(model: str, unroll: bool, n: int, repeats: int) -> dict:
  import anisonoise
  from anisonoise._src import curvature

  curvature._UNROLL_LIMIT = 64 if unroll else 0
  loss_fn, params, batch = _common.lenet_problem(
      n, plain_conv=model == "plain_conv")
  tx = optax.chain(anisonoise.hessian_noise(k=20), optax.sgd(0.05))
  state = tx.init(params)

  @jax.jit
  def step(p, s, b):
    g = jax.grad(lambda q: loss_fn(q, b).mean())(p)
    u, s = tx.update(g, s, p, loss_fn=loss_fn, batch=b)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  compiled = step.lower(params, state, batch).compile()
  compile_s = time.perf_counter() - t0
  run_s = (_common.timeit(compiled, params, state, batch, repeats=repeats)
           if repeats else float("nan"))
  return {"model": model, "unroll": unroll, "n": n, "compile_s": compile_s,
          "step_s": run_s}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=1200)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="results")
  ap.add_argument("--timeout", type=float, default=900)
  ap.add_argument("--models", nargs="+", default=["lenet", "plain_conv"])
  ap.add_argument("--paths", nargs="+", default=["loop", "unroll"])
  ap.add_argument("--tag", default="", help="suffix of the result files")
  ap.add_argument("--child", nargs=2)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(child(a.child[0], a.child[1] == "unroll", a.n,
                           a.repeats)))
    return
  rows = []
  for model in a.models:
    for path in a.paths:
      rows.append(_common.run_child(
          [sys.executable, __file__, "--n", str(a.n), "--repeats",
           str(a.repeats), "--child", model, path], timeout=a.timeout,
          model=model, unroll=path == "unroll", n=a.n))
      print(json.dumps(rows[-1]), flush=True)
  res = {"environment": _common.environment(), "rows": rows}
  lines = ["| model | Lanczos | compile (s) | step (s) |", "|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {'unrolled' if r['unroll'] else 'fori_loop'} |"
        f" {r.get('compile_s', float('nan')):.1f} |"
        f" {r.get('step_s', float('nan')):.2f} |"
        + (f" {r['failed']}" if "failed" in r else ""))
  _common.write_results(a.out, f"compile_time_n{a.n}{a.tag}", res,
                        "\n".join(lines))


if __name__ == "__main__":
  main()
