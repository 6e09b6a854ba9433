"""What a block of Hessian products costs, one at a time or batched.

The subspace solve of the low-rank noises (``top_eigenpairs(criterion=
"subspace")``) applies the operator to blocks of rows
(``curvature.apply_rows``). This times, per vector and as a ratio to a GD
step on the same batch, the staged linearised product (``hessian_operator``)
applied to a block of ``--block`` random vectors:

* ``single``: one jitted product per call (a Python loop's cost);
* ``lax.map``: the block in one program, one product at a time;
* ``vmap``: the block in one program, batched.

Problems: the library's LeNet (``lenet``, 1,200 images), the same network
written with ``lax.conv`` (``lenet_conv``), a ReLU MLP 784-64-10 on 1,200
images (``mlp``) and, with ``--vgg``, VGG11 on ``--vgg-n`` images.

Usage: python benchmarks/block_products.py [--problems lenet mlp]
       [--block 20] [--out results]
"""

from __future__ import annotations

import argparse
import json

import jax
from jax.flatten_util import ravel_pytree

import _common
import scale
import step_cost
from _common import environment, timeit
from anisonoise._src import curvature
from trajectory import PROBLEMS


def measure(loss_fn, params, batch, block: int, repeats: int) -> dict:
  tx, gd = step_cost.make_step(loss_fn, None)
  t_gd = timeit(gd, params, tx.init(params), batch, repeats=repeats)
  op = jax.jit(lambda p, b: curvature.hessian_operator(loss_fn, p, b))(
      params, batch)
  mv = curvature.flat_operator(op, params)[0]
  d = ravel_pytree(params)[0].size
  rows = jax.random.normal(jax.random.key(0), (block, d))
  one = jax.jit(lambda op, x: op(x))
  t_single = timeit(one, mv, rows[0], repeats=repeats)
  t_map = timeit(jax.jit(lambda op, x: jax.lax.map(op, x)), mv, rows,
                 repeats=repeats) / block
  t_vmap = timeit(jax.jit(lambda op, x: jax.vmap(op)(x)), mv, rows,
                  repeats=repeats) / block
  return {"D": int(d), "gd_step_s": t_gd,
          "single_gd": t_single / t_gd, "map_gd": t_map / t_gd,
          "vmap_gd": t_vmap / t_gd, "vmap_gain": t_single / t_vmap,
          "default": "lax.map" if jax.default_backend() == "cpu" else "vmap"}
  # (curvature.apply_rows: the subspace solve's choice on this backend)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", nargs="+", default=["lenet", "lenet_conv",
                                                        "mlp"])
  parser.add_argument("--vgg", action="store_true")
  parser.add_argument("--vgg-n", type=int, default=500)
  parser.add_argument("--block", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tag", default="")
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  rows = {}
  problems = {p: PROBLEMS[p][0] for p in args.problems}
  if args.vgg:
    problems["vgg11"] = lambda: scale.vgg_problem(args.vgg_n)
  for name, make in problems.items():
    rows[name] = measure(*make(), args.block, args.repeats)
    print(name, json.dumps(rows[name]), flush=True)
  res = {"env": env, "block": args.block, "rows": rows}
  _common.write_results(args.out, f"block_products{args.tag}", res,
                        markdown(res))


def markdown(res) -> str:
  env = res["env"]
  lines = [f"A block of {res['block']} staged Hessian products, per vector"
           f" in GD steps; {env['device']}, {env['cpu_count']} cores, jax"
           f" {env['jax']}.", "",
           "| model | D | GD step (s) | one per call | lax.map | vmap |"
           " vmap's gain | the solve uses |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in res["rows"].items():
    lines.append(f"| {name} | {r['D']:,} | {r['gd_step_s']:.4f} |"
                 f" {r['single_gd']:.2f} | {r['map_gd']:.2f} |"
                 f" {r['vmap_gd']:.2f} | {r['vmap_gain']:.2f}x |"
                 f" {r['default']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
