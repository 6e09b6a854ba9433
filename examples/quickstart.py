"""Quickstart: train a small MLP with Hessian-aligned noise and watch it.

A two-layer tanh network on a synthetic two-class problem, trained by
full-batch gradient descent plus ``anisonoise.hessian_noise`` (GLD Hessian,
top-k Hessian eigenpairs, trace matched to SGD with minibatch size 20),
chained in front of ``optax.sgd``. Every few steps it prints the loss, the
trace of the noise in use, the top Hessian eigenvalues and the realised noise
norm, next to plain GD from the same start.

Usage: python examples/quickstart.py [--steps 200] [--k 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import anisonoise


def make_problem(n=256, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 2))
  y = (np.sin(2 * x[:, 0]) + 0.3 * rng.normal(size=n) > x[:, 1]).astype(int)
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y)}
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "w1": jax.random.normal(k1, (2, 32)) * 0.5, "b1": jnp.zeros(32),
      "w2": jax.random.normal(k2, (32, 2)) * 0.5, "b2": jnp.zeros(2),
  }
  return batch, params


def loss_fn(params, batch):
  """Per-example cross-entropy losses, shape (n,)."""
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--k", type=int, default=5)
  parser.add_argument("--lr", type=float, default=0.5)
  args = parser.parse_args()

  batch, params0 = make_problem()
  noisy = optax.chain(anisonoise.hessian_noise(args.k, batch_size=20),
                      optax.sgd(args.lr))
  plain = optax.sgd(args.lr)

  def make_step(tx):
    @jax.jit
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(
          lambda p: jnp.mean(loss_fn(p, batch)))(params)
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                                 batch=batch)
      noise = jax.tree.map(lambda u, g: -u / args.lr - g, updates, grads)
      noise_norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(noise)))
      return optax.apply_updates(params, updates), state, loss, noise_norm
    return step

  step_noisy, step_plain = make_step(noisy), make_step(plain)
  p_n, s_n = params0, noisy.init(params0)
  p_g, s_g = params0, plain.init(params0)
  print(f"{'step':>5} {'GD loss':>9} {'GLD-H loss':>10} {'Tr(Sigma)':>10}"
        f" {'|eps|':>8}  top Hessian eigenvalues")
  for t in range(args.steps):
    p_n, s_n, loss_n, eps_norm = step_noisy(p_n, s_n, batch)
    p_g, s_g, loss_g, _ = step_plain(p_g, s_g, batch)
    if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
      st = s_n[0]
      eig = " ".join(f"{x:.3f}" for x in np.asarray(st.eigenvalues))
      print(f"{t:5d} {float(loss_g):9.4f} {float(loss_n):10.4f}"
            f" {float(st.trace):10.3e} {float(eps_norm):8.4f}  {eig}")
  print("The noise is drawn in the span of the top-k Hessian eigenvectors,"
        " with E|eps|^2 = Tr(C)/20, the trace of SGD's noise at m = 20.")


if __name__ == "__main__":
  main()
