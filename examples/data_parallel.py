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
does), and on a GPU or TPU host. It prints the loss, the noise trace in use
and the top Hessian eigenvalues every few steps, and writes
``data_parallel.json`` to ``--out``.

Usage: python examples/data_parallel.py [--steps 30] [--n 1024]
       [--chunk-size 64] [--data-dir DIR] [--out results/data_parallel]
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


def make_batch(n: int, data_dir: str | None) -> dict:
  """The first ``n`` Fashion-MNIST training images (as LeNet patches)."""
  images, labels = data.load_fashion_mnist("train", data_dir=data_dir)
  if n > len(labels):
    raise ValueError(f"--n {n} asks for more than the {len(labels)}"
                     " training images.")
  x = lenet_patches(jnp.asarray(data.scale_images(images[:n])))
  return {"x": x, "y": jnp.asarray(labels[:n], jnp.int32)}


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
  batch = jax.device_put(make_batch(n, data_dir),
                         jax.NamedSharding(mesh, jax.P("data")))

  model = LeNet(nnx.Rngs(seed))
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
      if t % max(1, steps // 10) == 0 or t == steps - 1:
        top = " ".join(f"{x:.3f}" for x in row["eigenvalues"][:3])
        print(f"step {t:4d}  loss {loss:.4f}  Tr(Sigma) {row['trace']:.3e}"
              f"  top eigenvalues {top}", flush=True)
    seconds = time.perf_counter() - t0
  record = {"devices": devices, "device_kind": jax.devices()[0].device_kind,
            "n": n, "chunk_size": chunk_size, "k": k,
            "refresh_every": refresh_every, "steps": steps,
            "seconds": seconds, "history": history}
  if out:
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
  args = parser.parse_args()
  print(f"{jax.device_count()} {jax.default_backend()} devices", flush=True)
  try:
    run(steps=args.steps, n=args.n, k=args.k,
        refresh_every=args.refresh_every, chunk_size=args.chunk_size,
        lr=args.lr, data_dir=args.data_dir, out=args.out)
  except (data.DataError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
