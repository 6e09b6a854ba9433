"""Data-parallel training with Hessian-aligned noise on every local device.

A Flax NNX training loop: the paper's LeNet on Fashion-MNIST, full-batch
gradient descent plus ``anisonoise.hessian_noise`` (GLD Hessian: top-k
Hessian eigenpairs, refreshed every ``--refresh-every`` steps, trace matched
to SGD with minibatch size 20), through ``nnx.Optimizer``. The training set
is placed on a mesh of all local devices, split along the examples
(``jax.P("data")``), the parameters replicated; nothing in the step names
a device. Every pass over the data (the gradient, the Hessian products of
the eigen-solve, ``Tr(C)``) runs on each device's own examples,
``--chunk-size`` of them at a time, and only the per-chunk sums cross
devices.

The same file runs unchanged on one CPU, on 8 forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as the test suite
does), on a GPU or TPU host, and on several processes or hosts joined by
``jax.distributed``: each process then reads only its own share of the
examples (``jax.make_array_from_process_local_data``), the mesh spans the
devices of every process, and only the per-chunk sums cross hosts. It
prints the loss, the noise trace in use and the top Hessian eigenvalues
every few steps, and writes ``data_parallel.json`` to ``--out`` (process 0).

Usage: python examples/data_parallel.py [--steps 30] [--n 1024]
       [--chunk-size 64] [--data-dir DIR] [--out results/data_parallel]
       [--coordinator HOST:PORT --num-processes N --process-id I |
        --distributed]

Two processes on one machine (CPU collectives through gloo), one command
each::

  python examples/data_parallel.py --coordinator 127.0.0.1:12345 \
      --num-processes 2 --process-id 0 &
  python examples/data_parallel.py --coordinator 127.0.0.1:12345 \
      --num-processes 2 --process-id 1

On a cluster, ``--distributed`` lets ``jax.distributed.initialize()``
read the coordinator, the process count and each process's id from the
scheduler (SLURM, Open MPI, Cloud TPU), e.g. ``srun --ntasks 4 python
examples/data_parallel.py --distributed``.
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
from anisonoise import data
from anisonoise.models import LeNet, lenet_patches


def make_batch(n: int, data_dir: str | None, mesh: jax.sharding.Mesh) -> dict:
  """The first ``n`` Fashion-MNIST training images (as LeNet patches),
  split along the examples over ``mesh``: each process reads and places
  only its own contiguous share of them."""
  images, labels = data.load_fashion_mnist("train", data_dir=data_dir)
  if n > len(labels):
    raise ValueError(f"--n {n} asks for more than the {len(labels)}"
                     " training images.")
  per = n // jax.process_count()
  rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  local = {"x": np.asarray(lenet_patches(
               jnp.asarray(data.scale_images(images[:n][rows])))),
           "y": np.asarray(labels[:n][rows], np.int32)}
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def run(*, steps: int = 30, n: int = 1024, k: int = 10,
        refresh_every: int = 10, chunk_size: int | None = 64,
        lr: float = 0.1, data_dir: str | None = None,
        out: str | None = None, seed: int = 0) -> dict:
  """Trains and returns the record written to ``data_parallel.json``."""
  devices = jax.device_count()
  if n % devices:
    raise ValueError(f"--n {n} examples cannot be split evenly over"
                     f" {devices} devices; use a multiple of {devices}.")
  mesh = jax.make_mesh((devices,), ("data",))
  batch = make_batch(n, data_dir, mesh)

  # Every process builds the same model from the same seed; its state is
  # then placed whole on every device of every process.
  model = LeNet(nnx.Rngs(seed))
  replicated = jax.NamedSharding(mesh, jax.P())
  nnx.update(model, jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(replicated,
                                                       np.asarray(x)),
      nnx.state(model)))
  graphdef, _ = nnx.split(model, nnx.Param)

  def loss_fn(params, b):
    """Per-example losses, shape (n,): what the transform differentiates."""
    logits = nnx.merge(graphdef, params)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  tx = optax.chain(
      anisonoise.hessian_noise(k, batch_size=20, refresh_every=refresh_every,
                               chunk_size=chunk_size, key=seed),
      optax.sgd(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    params = nnx.state(model, nnx.Param)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(loss_fn(p, batch)))(params)
    optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)
    return loss

  history = []
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    for t in range(steps):
      loss = float(train_step(model, optimizer, batch))
      noise_state = optimizer.opt_state[0]
      row = {"step": t, "loss": loss, "trace": float(noise_state.trace),
             "eigenvalues": np.asarray(noise_state.eigenvalues).tolist()}
      history.append(row)
      if jax.process_index() == 0 and (
          t % max(1, steps // 10) == 0 or t == steps - 1):
        top = " ".join(f"{x:.3f}" for x in row["eigenvalues"][:3])
        print(f"step {t:4d}  loss {loss:.4f}  Tr(Sigma) {row['trace']:.3e}"
              f"  top eigenvalues {top}", flush=True)
    seconds = time.perf_counter() - t0
  record = {"devices": devices, "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind,
            "n": n, "chunk_size": chunk_size, "k": k,
            "refresh_every": refresh_every, "steps": steps,
            "seconds": seconds, "history": history}
  if out and jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "data_parallel.json"), "w") as f:
      json.dump(record, f, indent=1)
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--refresh-every", type=int, default=10)
  parser.add_argument("--chunk-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default="results/data_parallel")
  parser.add_argument("--coordinator", default=None,
                      help="HOST:PORT of process 0, to join several"
                      " processes by jax.distributed")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with the"
                      " cluster's own settings (SLURM, Open MPI, TPU)")
  args = parser.parse_args()
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      sys.exit("error: --coordinator needs --num-processes and"
               " --process-id.")
    # CPU processes reduce through gloo (a GPU's or TPU's own
    # collectives are used there); set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
  print(f"process {jax.process_index()} of {jax.process_count()}:"
        f" {jax.device_count()} {jax.default_backend()} devices in all",
        flush=True)
  try:
    run(steps=args.steps, n=args.n, k=args.k,
        refresh_every=args.refresh_every, chunk_size=args.chunk_size,
        lr=args.lr, data_dir=args.data_dir, out=args.out)
  except (data.DataError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
