"""VGG11 (9,750,922 parameters) at scale: step cost, compile time, top-20
Hessian eigenpairs and peak memory against ``chunk_size``.

On synthetic 32 x 32 x 3 images (timings depend on shapes only), float32:
- the compile time and per-step cost of a full-batch GD step and of each
  dynamics (refresh ``--refresh``, k = 20, m = 100), every pass in chunks of
  ``--chunk-size`` examples;
- ``hessian_spectrum(num_eigs=20)``, jitted and eagerly: time, Krylov size,
  eigenvalues and their residual norms;
- peak memory of one refresh pass (exact ``Tr(C)`` and one ``H v``) against
  ``--memory-chunks``, each in a fresh process (host RSS on a CPU, the
  device's peak allocation on a GPU);
- with ``--mesh``, the same step on a mesh of all local devices (the batch
  sharded along the examples).

Defaults fit this 2-core CPU (n = 64, one repeat); on a GPU use
``--n 5000 --chunk-size 250`` (``benchmarks/gpu_check.sh``).

Writes ``scale.json`` and ``scale.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import anisonoise
import _common
import memory
import step_cost
from anisonoise.models import VGG11, VGG11_NUM_PARAMS

M = 100  # the SGD minibatch of the SVHN / CIFAR-10 studies (App. D.4)


def vgg_problem(n: int, seed: int = 0):
  """(loss_fn, params, batch) of VGG11 on ``n`` random images."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=(n, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  graphdef, params = nnx.split(VGG11(10, rngs=nnx.Rngs(seed)), nnx.Param)

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def time_dynamics(loss_fn, params, batch, noise, steps, repeats):
  """(compile seconds, median seconds per step over ``steps`` steps).

  Compiled ahead of time (``lower().compile()``, timed on its own), so the
  timed runs need no warm-up: at VGG11 size on a CPU a refresh takes
  minutes.
  """
  tx, step = step_cost.make_step(loss_fn, noise)
  state = tx.init(params)
  t0 = time.perf_counter()
  compiled = step.lower(params, state, batch).compile()
  compile_s = time.perf_counter() - t0

  def run():
    p, s = params, state
    for _ in range(steps):
      p, s = compiled(p, s, batch)
    return p, s

  return compile_s, _common.timeit(run, repeats=repeats,
                                   warmup=False) / steps


def memory_child(chunk, n):
  loss_fn, params, batch = vgg_problem(n)
  v = jax.tree.map(jnp.ones_like, params)
  f = jax.jit(lambda p, b, v: (
      anisonoise.covariance_trace(loss_fn, p, b, chunk_size=chunk),
      anisonoise.hvp(loss_fn, p, b, v, chunk_size=chunk)["fc3"]["bias"]))
  t0 = time.perf_counter()
  jax.block_until_ready(f(params, batch, v))
  return {"chunk_size": chunk, "seconds_with_compile":
          time.perf_counter() - t0, "peak_bytes": memory.peak_bytes()}


def _chunk(text: str) -> int | None:
  return None if text.lower() == "none" else int(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--chunk-size", type=_chunk, default=32,
                      help="examples per chunk, or 'none' (one pass)")
  parser.add_argument("--refresh", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--dynamics", nargs="+", default=None)
  parser.add_argument("--eigs", type=int, default=20)
  parser.add_argument("--eig-iters", type=int, default=None)
  parser.add_argument("--memory-chunks", nargs="*", default=["8", "32"])
  parser.add_argument("--mesh", action="store_true",
                      help="also time GD and GLD Hessian on a mesh of all"
                      " devices")
  parser.add_argument("--out", default="results/benchmarks")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(memory_child(_chunk(args.child), args.n)))
    return

  env = _common.environment()
  print(json.dumps(env), flush=True)
  loss_fn, params, batch = vgg_problem(args.n)
  d = anisonoise._src.batching.num_params(params)
  assert d == VGG11_NUM_PARAMS, d
  res = {"env": env, "n": args.n, "D": d, "chunk_size": args.chunk_size,
         "refresh_every": args.refresh, "m": M, "rows": []}

  def save():  # after every row: a run cut short keeps what it measured
    _common.write_results(args.out, "scale", res, markdown(res), quiet=True)

  table = step_cost.dynamics(args.refresh, args.chunk_size, m=M)
  for name, (noise, _) in table.items():
    if args.dynamics and name not in args.dynamics and name != "GD":
      continue
    steps = 1 if noise is None or name in ("GLD const", "GD + SGD noise") \
        else args.refresh
    compile_s, step_s = time_dynamics(loss_fn, params, batch, noise, steps,
                                      args.repeats)
    row = {"dynamics": name, "compile_s": compile_s, "step_s": step_s}
    row["ratio_to_gd"] = row["step_s"] / res["rows"][0]["step_s"] \
        if res["rows"] else 1.0
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()

  if args.eigs:
    spec = jax.jit(lambda p, b: anisonoise.hessian_spectrum(
        loss_fn, p, b, num_eigs=args.eigs, num_iters=args.eig_iters,
        key=jax.random.key(0), chunk_size=args.chunk_size))
    t0 = time.perf_counter()
    compiled = spec.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, batch))
    res["spectrum"] = {
        "num_eigs": args.eigs,
        "num_iters": args.eig_iters or min(d, 2 * args.eigs + 20),
        "seconds": time.perf_counter() - t0,
        "compile_s": compile_s,
        "num_matvecs": int(out.num_matvecs),
        "converged": bool(out.converged),
        "eigenvalues": np.asarray(out.eigenvalues).tolist(),
        "residual_norms": np.asarray(out.residual_norms).tolist()}
    # The same call eagerly, as an offline diagnostic is called (its
    # Krylov steps compile once per call, included).
    t0 = time.perf_counter()
    eager = jax.block_until_ready(anisonoise.hessian_spectrum(
        loss_fn, params, batch, num_eigs=args.eigs, num_iters=args.eig_iters,
        key=jax.random.key(0), chunk_size=args.chunk_size))
    res["spectrum"].update(
        eager_seconds=time.perf_counter() - t0,
        eager_num_matvecs=int(eager.num_matvecs),
        eager_max_diff=float(np.max(np.abs(
            np.asarray(eager.eigenvalues) - np.asarray(out.eigenvalues)))))
    print(json.dumps(res["spectrum"]), flush=True)
    save()

  if args.mesh:  # on one device too: the mesh path itself is what is timed
    # Auto axes: jax 0.10 has no Explicit-sharding rule for a convolution
    # under vmap (the per-example passes), see anisonoise.models._conv.
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data")))
    res["mesh"] = {"devices": jax.device_count(), "rows": []}
    with jax.set_mesh(mesh):
      for name in ("GD", "GLD Hessian k=20"):
        noise = table[name][0]
        compile_s, step_s = time_dynamics(
            loss_fn, params, sharded, noise,
            1 if noise is None else args.refresh, args.repeats)
        res["mesh"]["rows"].append({"dynamics": name, "compile_s": compile_s,
                                    "step_s": step_s})
        save()
    print(json.dumps(res["mesh"]), flush=True)

  res["memory"] = []
  for chunk in args.memory_chunks:
    row = _common.run_child(
        [sys.executable, os.path.abspath(__file__), "--n", str(args.n),
         "--child", chunk], chunk_size=chunk)
    res["memory"].append(row)
    print(json.dumps(row), flush=True)
    save()
  print(markdown(res))


def markdown(res) -> str:
  env = res["env"]
  lines = [f"VGG11 (D = {res['D']:,}), n = {res['n']} synthetic images,"
           f" chunk_size {res['chunk_size']}, refresh {res['refresh_every']},"
           f" m = {res['m']}, k = 20; {env['device']}"
           f" ({env['backend']}), {env['cpu_count']} cores, jax"
           f" {env['jax']}.", "",
           "| dynamics | compile s | s/step | x GD |", "|---|---|---|---|"]
  for r in res["rows"]:
    lines.append(f"| {r['dynamics']} | {r['compile_s']:.1f} |"
                 f" {r['step_s']:.3f} | {r['ratio_to_gd']:.2f} |")
  if "spectrum" in res:
    s = res["spectrum"]
    steps = (f"basis {s['num_iters']}, {s['num_matvecs']} products,"
             f" converged {s['converged']}" if "num_matvecs" in s
             else f"{s['num_iters']} Lanczos steps")
    lines += ["", f"Top {s['num_eigs']} Hessian eigenpairs"
              f" ({steps}): {s['seconds']:.1f} s"
              f" (compiled in {s['compile_s']:.1f} s);"
              f" lambda_1 = {s['eigenvalues'][0]:.4g}, lambda_"
              f"{s['num_eigs']} = {s['eigenvalues'][-1]:.4g}; largest"
              f" residual / lambda_1 ="
              f" {max(s['residual_norms']) / abs(s['eigenvalues'][0]):.2e}."]
  if "mesh" in res:
    lines += ["", f"On a mesh of {res['mesh']['devices']} devices:", "",
              "| dynamics | compile s | s/step |", "|---|---|---|"]
    for r in res["mesh"]["rows"]:
      lines.append(f"| {r['dynamics']} | {r['compile_s']:.1f} |"
                   f" {r['step_s']:.3f} |")
  if res.get("memory"):
    lines += ["", "Peak memory of exact Tr(C) + one H v:", "",
              "| chunk_size | peak GB | s (with compile) |", "|---|---|---|"]
    for r in res["memory"]:
      if "failed" in r:
        lines.append(f"| {r['chunk_size']} | failed: {r['failed']} | - |")
      else:
        lines.append(f"| {r['chunk_size']} |"
                     f" {r['peak_bytes'] / 2**30:.2f} |"
                     f" {r['seconds_with_compile']:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
