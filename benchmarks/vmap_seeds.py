"""Seeds under ``jax.vmap``: cost of S seeds' steps against one seed's.

``hessian_noise(10, refresh_every=5)`` on a tanh MLP 32-48-10 (D = 2,074,
n = 256): the fastest of ``--repeats`` alternated runs of a jitted step,
alone and ``jax.vmap``-ed over the states of S seeds, at a step without
refresh (count 1) and at a warm-started refresh (count 5). ``--select``
reproduces the former behaviour, where the batched refresh predicate
turned the ``lax.cond`` into a ``select`` that runs both branches (for
the "before" numbers).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import anisonoise
from anisonoise._src import batching
from _common import environment, timeit


def problem(n=256, sizes=(32, 48, 10)):
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(n, sizes[0])), jnp.float32),
           "y": jnp.asarray(rng.integers(0, sizes[-1], n))}
  params = [{"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a),
                              jnp.float32),
             "b": jnp.zeros(b, jnp.float32)}
            for a, b in zip(sizes[:-1], sizes[1:])]

  def loss_fn(p, b):
    h = b["x"]
    for layer in p[:-1]:
      h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ p[-1]["w"] + p[-1]["b"]
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, b["y"][:, None], -1)[:, 0]

  return loss_fn, params, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seeds", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--select", action="store_true")
  parser.add_argument("--out", default="results")
  args = parser.parse_args()
  if args.select:
    batching.any_over_batch = lambda pred: pred
  env = environment()
  print(env)
  loss_fn, params, batch = problem()
  tx = anisonoise.hessian_noise(10, batch_size=32, refresh_every=5, key=0)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def update(state):
    return tx.update(zeros, state, params, loss_fn=loss_fn, batch=batch)

  one = jax.jit(update)
  state = tx.init(params)
  states = {}
  for count in range(6):
    states[count] = state
    state = one(state)[1]
  many = jax.jit(jax.vmap(update))
  rows = []
  for label, count in (("no refresh", 1), ("refresh", 5)):
    row = {"step": label}
    for s in args.seeds:
      stacked = jax.tree.map(lambda x, s=s: jnp.stack([x] * s),
                             states[count])
      # Alternated, fastest of each: on a shared machine the minimum is
      # the least disturbed run.
      pairs = [(timeit(one, states[count], repeats=1),
                timeit(many, stacked, repeats=1))
               for _ in range(args.repeats)]
      base, t = min(p[0] for p in pairs), min(p[1] for p in pairs)
      row["one_seed_ms"] = 1e3 * base
      row[f"S={s}_ms"] = 1e3 * t
      row[f"S={s}_ratio"] = t / base
    rows.append(row)
    print(row)
  name = "vmap_seeds_select" if args.select else "vmap_seeds"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
