"""The library on several processes joined by ``jax.distributed``.

Every process runs this file (``launch`` starts them on this machine, as a
cluster's launcher would on several): it joins the others on
``127.0.0.1:PORT``, builds its own share of the examples with
``jax.make_array_from_process_local_data`` on a mesh of every device of
every process, and runs each case there and on one of its own devices
alone. It prints one JSON object: for each case, the largest relative
difference of the multi-process result to the one-device one (float32),
the noise's own difference where there is a draw, and seconds.

Cases (``tests/test_multiprocess.py`` runs the default set): GD +
``sgd_noise`` and GD + ``hessian_noise`` (a refresh inside the steps, its
default ``tol``) for 3 jitted steps; ``hessian_spectrum`` and
``escape_indicator``, eager and jitted; an orbax checkpoint of the
training state written by both processes and read back, after which the
next step equals the uninterrupted one; ``hessian_spectrum`` over a
``Batches`` stream whose every batch each process builds from its own
rows. ``--all`` adds every transform (the seven of Table 1,
``multiplicative_noise``, ``anticorrelated_noise``) and every diagnostic.
``--time`` times a jitted GLD Hessian step and a jitted ``hessian_spectrum``
instead (``benchmarks/multi_process.py``).

Usage (one process of ``--num-processes``):
  python multiprocess_worker.py --port P --process-id I --num-processes N
      --out DIR [--all | --time]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

# Exit status of a process that could not join the others.
CONNECT_FAILED = 3
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# The launcher (no JAX here: the children start it with their own flags)
# --------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port free on localhost now (the OS's choice)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(*args: str, num_processes: int = 2, devices_each: int = 2,
           timeout: float = 240.0, env: dict | None = None) -> list[dict]:
  """Runs this worker in ``num_processes`` local processes of
  ``devices_each`` CPU devices each; returns each one's JSON.

  A port taken between its choice and the coordinator's bind is retried
  once with another. Raises ``RuntimeError`` with each process's last
  output when a process fails, cannot connect, or runs past ``timeout``
  seconds (then every process is aborted, and its output ends with the
  Python stack of each of its threads)."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  env.pop("JAX_ENABLE_X64", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(
      [*flags, f"--xla_force_host_platform_device_count={devices_each}"])
  for attempt in range(2):
    port = free_port()
    # Output to files, not pipes: a process blocked on a full pipe would
    # stall the collectives of the others.
    logs = [tempfile.TemporaryFile("w+") for _ in range(2 * num_processes)]
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
         "--port", str(port), "--process-id", str(i),
         "--num-processes", str(num_processes), *args],
        env=env, stdout=logs[2 * i], stderr=logs[2 * i + 1], text=True)
             for i in range(num_processes)]
    start = time.monotonic()
    try:
      for p in procs:
        p.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
      # SIGABRT first: each process's faulthandler writes where it hangs.
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGABRT)
      for p in procs:
        try:
          p.wait(timeout=10)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
    outs = []
    for f in logs:
      f.seek(0)
      outs.append(f.read())
      f.close()
    codes = [p.returncode for p in procs]
    errs = [f"process {i} (exit {c}):\n{outs[2 * i + 1][-3000:]}"
            for i, c in enumerate(codes)]
    if any(c is None or c < 0 for c in codes):
      raise RuntimeError(
          f"{num_processes} processes on 127.0.0.1:{port} ran past"
          f" {timeout:.0f} s and were aborted; their last output:\n"
          + "\n---\n".join(errs))
    if all(c == 0 for c in codes):
      # The last line: anything else printed (by orbax, by JAX) before it.
      return [json.loads(outs[2 * i].strip().splitlines()[-1])
              for i in range(num_processes)]
    if CONNECT_FAILED in codes and attempt == 0:
      continue  # the port was taken meanwhile: another one
    raise RuntimeError(
        f"{num_processes} processes joined by jax.distributed on"
        f" 127.0.0.1:{port} failed:\n" + "\n---\n".join(errs))
  raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--out", default=None)
  parser.add_argument("--all", action="store_true")
  parser.add_argument("--time", action="store_true")
  args = parser.parse_args(argv)
  # A process that hangs prints every thread's Python stack when the
  # launcher aborts it (SIGABRT), into the error launch() raises.
  faulthandler.enable(all_threads=True)

  import jax

  # CPU collectives across processes go through gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{args.port}"
  try:
    jax.distributed.initialize(address, num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=60)
  except Exception as e:  # noqa: BLE001 -- reported, then a clear exit
    print(f"process {args.process_id} could not join {address}:"
          f" {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(CONNECT_FAILED)
  from anisonoise._src import curvature
  curvature._UNROLL_LIMIT = 0  # looped Krylov, as the suite runs it
  result = (timings(args) if args.time else cases(args))
  json.dump(result, sys.stdout)
  sys.stdout.flush()
  jax.distributed.shutdown()


def _layout():
  """The mesh of every device of every process, and the two ways of
  placing data on it: this process's rows of the examples, and a value
  every process holds whole (replicated)."""
  import jax
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Auto,))
  pid, count = jax.process_index(), jax.process_count()

  def own_rows(tree):
    def put(x):
      x = np.asarray(x)
      per = x.shape[0] // count
      return jax.make_array_from_process_local_data(
          jax.NamedSharding(mesh, jax.P("data")), x[pid * per:(pid + 1) * per])
    return jax.tree.map(put, tree)

  def replicated(tree):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        jax.NamedSharding(mesh, jax.P()), np.asarray(x)), tree)

  return mesh, own_rows, replicated


def local(tree):
  """A replicated result as NumPy (this process's copy)."""
  import jax

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      assert x.is_fully_replicated, x.sharding
      x = x.addressable_data(0)
    return np.asarray(x)
  return jax.tree.map(get, tree)


def _steps(tx, loss_fn, params, batch, steps=3, lr=0.1):
  """``steps`` jitted steps of GD + ``tx``'s noise: the noise of each and
  the final parameters and state."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def step(p, s, b):
    g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
    zeros = jax.tree.map(jnp.zeros_like, p)
    noise, s = tx.update(zeros, s, p, loss_fn=loss_fn, batch=b)
    return jax.tree.map(lambda a, x, e: a - lr * (x + e), p, g, noise), s, noise

  state, noises = tx.init(params), []
  for _ in range(steps):
    params, state, noise = step(params, state, batch)
    noises.append(noise)
  return noises, params, state, step


def transforms(full: bool):
  import anisonoise
  txs = {
      "sgd_noise": anisonoise.sgd_noise(batch_size=4, key=0),
      "hessian_noise": anisonoise.hessian_noise(3, batch_size=8,
                                                refresh_every=2, key=0),
  }
  if full:
    txs.update({
        "isotropic_noise": anisonoise.isotropic_noise(1e-2, key=0),
        "dynamic_isotropic_noise": anisonoise.dynamic_isotropic_noise(
            batch_size=4, refresh_every=2, key=0),
        "diagonal_noise": anisonoise.diagonal_noise(
            batch_size=4, refresh_every=2, key=0),
        "leading_noise": anisonoise.leading_noise(3, batch_size=8,
                                                  refresh_every=2, key=0),
        "hessian_eigvec_noise": anisonoise.hessian_eigvec_noise(
            batch_size=8, refresh_every=2, key=0),
        "multiplicative_noise": anisonoise.multiplicative_noise(
            batch_size=4, key=0),
        "anticorrelated_noise": anisonoise.anticorrelated_noise(
            anisonoise.hessian_noise(3, batch_size=8, refresh_every=2,
                                     key=0)),
    })
  return txs


def diagnostics(loss_fn, full: bool):
  import anisonoise
  import jax.numpy as jnp

  fns = {
      "hessian_spectrum": lambda p, b: anisonoise.hessian_spectrum(
          loss_fn, p, b, num_eigs=3, key=1).eigenvalues,
      "escape_indicator": lambda p, b: anisonoise.escape_indicator(
          loss_fn, p, b, batch_size=4),
  }
  if full:
    fns.update({
        "escape_indicator_stochastic": lambda p, b: anisonoise.escape_indicator(
            loss_fn, p, b, batch_size=4, method="stochastic", key=1,
            num_samples=4).mean,
        "isotropic_escape_indicator":
            lambda p, b: anisonoise.isotropic_escape_indicator(
                loss_fn, p, b, batch_size=4),
        "covariance_trace": lambda p, b: anisonoise.covariance_trace(
            loss_fn, p, b),
        "hessian_trace": lambda p, b: anisonoise.hessian_trace(
            loss_fn, p, b),
        "gradient_noise_norms": lambda p, b: anisonoise.gradient_noise_norms(
            loss_fn, p, b, batch_size=4),
        "projection_coefficient":
            lambda p, b: anisonoise.projection_coefficient(
                loss_fn, p, b, key=1, num_iters=16),
        "spectral_density": lambda p, b: anisonoise.spectral_density(
            loss_fn, p, b, key=1, num_probes=2, num_iters=12).weights,
        # E[L(theta + nu)], compared at L's scale (see multidevice_worker).
        "expected_sharpness": lambda p, b: anisonoise.expected_sharpness(
            loss_fn, p, b, key=1, num_samples=8).mean
                                           + jnp.mean(loss_fn(p, b)),
    })
  return fns


def cases(args) -> dict:
  import jax

  import anisonoise

  sys.path.insert(0, HERE)
  from multidevice_worker import problem, rel_diff

  loss_fn, params, batch = problem()
  one = jax.local_devices()[0]
  ref_params, ref_batch = jax.device_put((params, batch), one)
  mesh, own_rows, replicated = _layout()
  g_params, g_batch = replicated(params), own_rows(batch)
  results = {"devices": jax.device_count(),
             "processes": jax.process_count()}

  def record(name, got, want, start, noise=None):
    row = {"rel_diff": rel_diff(local(got), local(want)),
           "seconds": time.perf_counter() - start}
    if noise is not None:
      row["noise_rel_diff"] = max(rel_diff(local(a), local(b))
                                  for a, b in zip(*noise))
    results[name] = row

  def compared(run):
    """What a run of steps is checked on: the final parameters, and the
    cached eigenvalues where there are some (their eigenvectors are
    checked through the noise they shape: a rotation inside a cluster of
    equal eigenvalues leaves the noise as it is)."""
    _, params, state, _ = run
    values = [getattr(s, "eigenvalues", None) for s in
              jax.tree.leaves(state, is_leaf=lambda x: hasattr(
                  x, "eigenvalues"))]
    return params, [v for v in values if v is not None]

  # One device of this process alone, outside the mesh.
  txs, fns = transforms(args.all), diagnostics(loss_fn, args.all)
  want, seconds = {}, {}
  for name, tx in txs.items():
    start = time.perf_counter()
    want[name] = _steps(tx, loss_fn, ref_params, ref_batch)
    seconds[name] = time.perf_counter() - start
  for name, fn in fns.items():
    want[name] = jax.jit(fn)(ref_params, ref_batch)
  with jax.set_mesh(mesh):
    for name, tx in txs.items():
      start = time.perf_counter() - seconds[name]
      got = _steps(tx, loss_fn, g_params, g_batch)
      record(name, compared(got), compared(want[name]), start,
             noise=(got[0], want[name][0]))
      if name == "hessian_noise":
        results["checkpoint"] = _checkpoint(
            tx, loss_fn, g_params, g_batch, got[3], args.out, rel_diff)
    for name, fn in fns.items():
      start = time.perf_counter()
      record(name + "/jit", jax.jit(fn)(g_params, g_batch), want[name], start)
      start = time.perf_counter()
      record(name + "/eager", fn(g_params, g_batch), want[name], start)
    # A stream of two batches of 32 examples, each built from this
    # process's 16 rows of it: an eager solve, its products summed over
    # the stream.
    start = time.perf_counter()
    halves = [jax.tree.map(lambda x, i=i: x[32 * i:32 * (i + 1)], batch)
              for i in range(2)]
    stream = anisonoise.Batches([own_rows(h) for h in halves])
    record("hessian_spectrum/batches",
           fns["hessian_spectrum"](g_params, stream),
           want["hessian_spectrum"], start)
  return results


def _checkpoint(tx, loss_fn, params, batch, step, out, rel_diff):
  """One step, an orbax checkpoint of (params, state) written by every
  process, restored onto the same shardings; the next step (a refresh,
  warm-started from the restored cache) against the uninterrupted one."""
  import jax
  import orbax.checkpoint as ocp

  start = time.perf_counter()
  state = tx.init(params)
  params, state, _ = step(params, state, batch)
  path = os.path.join(os.path.abspath(out), "ckpt")
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"params": params, "state": state})
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": params, "state": state}, force=True)
    ckpt.wait_until_finished()
    back = ckpt.restore(path, target)
  resumed = step(back["params"], back["state"], batch)
  uninterrupted = step(params, state, batch)
  return {"rel_diff": rel_diff(local(resumed), local(uninterrupted)),
          "seconds": time.perf_counter() - start}


def all_reduce_bytes(hlo: str) -> int:
  """Bytes of the results of the all-reduce ops in a compiled program's
  text (each op once, wherever it sits: inside a loop it runs once per
  iteration)."""
  import re
  sizes = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
           "pred": 1}
  total = 0
  for line in hlo.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    # "%all-reduce.3 = (f32[32]{0}, f32[5,32]{1,0}) all-reduce(...)"
    result = line.split("=", 1)[-1].split(" all-reduce")[0]
    shapes = re.findall(r"(f64|f32|bf16|f16|s32|u32|pred)\[([\d,]*)\]",
                        result)
    for dtype, dims in shapes:
      total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",")
                                           if d] or [1]))
  return total


def timings(args) -> dict:
  """On this layout, the paper's LeNet (``benchmarks/_common.py``, 1,024
  images): median seconds of a jitted GD + ``hessian_noise(20,
  batch_size=20)`` step over 20 consecutive steps (two refreshes, the
  cold first one included) and of a jitted top-5 ``hessian_spectrum``;
  the bytes all-reduced by one gradient and by one Hessian product, read
  from their compiled programs. For ``benchmarks/multi_process.py``."""
  import jax
  import jax.numpy as jnp

  import anisonoise

  sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
  import _common

  loss_fn, params, batch = _common.lenet_problem(n=1024)
  mesh, own_rows, replicated = _layout()
  g_params, g_batch = replicated(params), own_rows(batch)
  tx = anisonoise.hessian_noise(20, batch_size=20, key=0)
  out = {"devices": jax.device_count(), "processes": jax.process_count()}
  with jax.set_mesh(mesh):
    _, p, s, step = _steps(tx, loss_fn, g_params, g_batch, steps=1)
    for _ in range(10):  # compile both branches of the refresh
      p, s, _ = step(p, s, g_batch)
    runs = []
    for _ in range(3):
      p, s = g_params, tx.init(g_params)
      start = time.perf_counter()
      for _ in range(20):
        p, s, _ = step(p, s, g_batch)
      jax.block_until_ready(p)
      runs.append((time.perf_counter() - start) / 20)
    out["hessian_noise_step_s"] = float(np.median(runs))
    gd = jax.jit(lambda p, b: jax.tree.map(
        lambda a, g: a - 0.1 * g, p,
        jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)))
    out["gd_step_s"] = _common.timeit(gd, g_params, g_batch, repeats=10)
    spectrum = jax.jit(lambda p, b: anisonoise.hessian_spectrum(
        loss_fn, p, b, num_eigs=5, key=1).eigenvalues)
    out["hessian_spectrum_s"] = _common.timeit(spectrum, g_params, g_batch,
                                               repeats=3)
    hvp = jax.jit(lambda p, b, v: anisonoise.hvp(loss_fn, p, b, v))
    out["all_reduce_bytes_gradient"] = all_reduce_bytes(
        gd.lower(g_params, g_batch).compile().as_text())
    out["all_reduce_bytes_hvp"] = all_reduce_bytes(
        hvp.lower(g_params, g_batch, g_params).compile().as_text())
    out["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
