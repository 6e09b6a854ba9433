"""Fig. 4 of Zhu et al. (ICML 2019): one hidden layer, fixed output layer.

1,000 points uniform in [-2, 2]^2, labelled 1 where x0 >= x1; a ReLU layer of
``width`` units whose output weights are fixed to +1 (first half) and -1
(second half); the output clamped to [delta, 1 - delta], delta = 1e-3;
squared loss; Adam (lr 1e-3), full batch, 31 epochs of 10 steps with the
learning rate decaying linearly from epoch 21 (the authors' settings). After
each epoch the escape indicator ``Tr(H Sigma)`` of SGD's noise for minibatch
size 10 and its isotropic equivalent ``Tr(H Sigma_bar)`` are computed exactly
with ``anisonoise.escape_indicator`` / ``isotropic_escape_indicator``.
Proposition 1 predicts the ratio to grow with the width.

Usage: python examples/fig4_one_hidden_layer.py [--out results/fig4]
       [--seed 0] [--widths 32 128 512]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import anisonoise

DELTA = 1e-3
N_POINTS = 1000
EPOCHS = 31
STEPS_PER_EPOCH = 10
DECAY_FROM_EPOCH = 21
LR = 1e-3
SGD_BATCH = 10
MAX_DRAWS = 5


def make_data(key: jax.Array, n: int = N_POINTS) -> dict:
  x = jax.random.uniform(key, (n, 2), minval=-2.0, maxval=2.0)
  return {"x": x, "y": (x[:, 0] >= x[:, 1]).astype(x.dtype)}


def init_params(key: jax.Array, width: int) -> dict:
  """Glorot-uniform first layer (the authors' TensorFlow default), zero bias."""
  limit = np.sqrt(6.0 / (2 + width))
  return {"w": jax.random.uniform(key, (2, width), minval=-limit,
                                  maxval=limit),
          "b": jnp.zeros(width)}


def loss_fn(params: dict, batch: dict) -> jax.Array:
  """Per-example squared loss of the clamped output (Eqs. 19-20)."""
  width = params["b"].shape[0]
  a = jnp.concatenate([jnp.ones(width // 2), -jnp.ones(width - width // 2)])
  f = jax.nn.relu(batch["x"] @ params["w"] + params["b"]) @ a
  return (jnp.clip(f, DELTA, 1.0 - DELTA) - batch["y"]) ** 2


def schedule():
  total = EPOCHS * STEPS_PER_EPOCH
  start = DECAY_FROM_EPOCH * STEPS_PER_EPOCH
  return optax.linear_schedule(LR, 0.0, total - start, transition_begin=start)


def _is_dead(params, batch) -> bool:
  """Every output clamped: the loss has zero gradient and training is over."""
  g = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
  return all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


def train_width(width: int, key: jax.Array, progress=None) -> dict:
  """Trains one width; returns per-epoch indicators, loss and accuracy.

  A run can die in its first epoch: Adam drives every output into the clamp,
  where the gradient is exactly zero (seen for width 128, seed 0). Such a
  network has no minimum to escape from, so the initialisation is redrawn
  (at most ``MAX_DRAWS`` times); the number of draws is recorded.
  """
  data_key, init_key = jax.random.split(key)
  batch = make_data(data_key)
  for draw in range(MAX_DRAWS):
    rec = _train(width, batch, jax.random.fold_in(init_key, draw))
    if not rec.pop("dead"):
      break
  else:
    raise RuntimeError(
        f"width {width}: all {MAX_DRAWS} initialisations died in their first"
        " epoch (every output clamped, zero gradient); there is no record"
        " to plot. Use another seed or a smaller learning rate.")
  rec["init_draws"] = draw + 1
  if progress is not None:
    progress.update(EPOCHS)
  return rec


def _train(width: int, batch: dict, init_key: jax.Array) -> dict:
  params = init_params(init_key, width)
  tx = optax.adam(schedule())
  state = tx.init(params)

  @jax.jit
  def epoch(params, state, batch):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(step, (params, state), None,
                                      STEPS_PER_EPOCH)
    return params, state

  @jax.jit
  def measure(params, batch):
    tr_hs = anisonoise.escape_indicator(loss_fn, params, batch,
                                        batch_size=SGD_BATCH, chunk_size=250)
    tr_hsbar = anisonoise.isotropic_escape_indicator(
        loss_fn, params, batch, batch_size=SGD_BATCH, chunk_size=250)
    losses = loss_fn(params, batch)
    width = params["b"].shape[0]
    a = jnp.concatenate([jnp.ones(width // 2), -jnp.ones(width - width // 2)])
    f = jax.nn.relu(batch["x"] @ params["w"] + params["b"]) @ a
    acc = jnp.mean((f >= 0.5) == (batch["y"] > 0.5))
    return tr_hs, tr_hsbar, jnp.mean(losses), acc

  rec = {"tr_h_sigma": [], "tr_h_sigma_bar": [], "loss": [], "accuracy": []}
  for e in range(EPOCHS):
    params, state = epoch(params, state, batch)
    if e == 0 and _is_dead(params, batch):
      return {"dead": True}
    vals = [float(v) for v in measure(params, batch)]
    for k, v in zip(rec, vals):
      rec[k].append(v)
  rec["ratio"] = [a / b if b > 0 else float("nan")
                  for a, b in zip(rec["tr_h_sigma"], rec["tr_h_sigma_bar"])]
  rec["num_params"] = 3 * width
  rec["dead"] = False
  return rec


def run(out: str, seed: int = 0, widths=(32, 128, 512), plot: bool = True):
  from tqdm import tqdm

  os.makedirs(out, exist_ok=True)
  key = jax.random.key(seed)
  results = {}
  with tqdm(total=EPOCHS * len(widths), desc="epochs") as bar:
    for w in widths:
      results[str(w)] = train_width(w, jax.random.fold_in(key, w), bar)
  summary = {"experiment": "fig4_one_hidden_layer", "seed": seed,
             "delta": DELTA, "sgd_batch_size": SGD_BATCH, "epochs": EPOCHS,
             "widths": results}
  with open(os.path.join(out, "fig4.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if plot:
    plot_figure(summary, out)
  return summary


def plot_figure(summary, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, (w, r) in enumerate(summary["widths"].items()):
    ep = np.arange(1, len(r["tr_h_sigma"]) + 1)
    ax.plot(ep, np.maximum(r["tr_h_sigma"], 1e-30), "-", color=f"C{i}",
            label=f"{w} hidden: Tr(H Sigma)")
    ax.plot(ep, np.maximum(r["tr_h_sigma_bar"], 1e-30), ":", color=f"C{i}",
            label=f"{w} hidden: Tr(H Sigma_bar)")
  ax.set(yscale="log", xlabel="epoch", ylabel="escape indicator",
         title="one hidden layer, fixed output layer")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "fig4.png"), dpi=120)
  plt.close(fig)


def markdown_table(summary) -> str:
  rows = ["| width | D | init draws | final loss | final acc |"
          " mean Tr(H Sigma)/Tr(H Sigma_bar) |",
          "|---|---|---|---|---|---|"]
  for w, r in summary["widths"].items():
    ratio = np.nanmean(r["ratio"])
    rows.append(f"| {w} | {r['num_params']} | {r['init_draws']} |"
                f" {r['loss'][-1]:.4f} |"
                f" {r['accuracy'][-1]:.3f} | {ratio:.2f} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/fig4")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512])
  args = parser.parse_args()
  t0 = time.perf_counter()
  summary = run(args.out, args.seed, tuple(args.widths))
  print(markdown_table(summary))
  print(f"\nwrote {args.out}/fig4.json and fig4.png in"
        f" {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
