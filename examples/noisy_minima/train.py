"""The study protocol: GD to a sharp minimum, then every dynamics from it.

1. Full-batch GD (``gd_lr``) from the network's initialisation for
   ``gd_steps`` iterations reaches a sharp minimum ``theta_GD``; it is saved.
2. Fig. 5 (left): the top Hessian eigenvalues at ``theta_GD``.
3. From ``theta_GD``, each dynamics of Table 1 (``anisonoise.DYNAMICS``)
   runs at the common learning rate ``lr``, the noise magnitudes matched to
   SGD's with minibatch size ``batch_size`` (``Tr Sigma = Tr C / m``, Eq.
   14); GLD const uses its own ``const_std``.
4. Recorded along the way: training accuracy on all, clean and corrupted
   examples (against the training labels), test accuracy, losses, the
   expected sharpness ``E L(theta + nu) - L(theta)`` with ``nu ~ N(0,
   delta^2 I)`` (the same draws at every evaluation: common random
   numbers), and along SGD the Fig. 5 / Fig. 7 diagnostics.

Every full-batch pass (gradient, noise estimate, evaluation) runs in chunks
of ``chunk_size`` examples, so the VGG11 studies' 25,000-50,000 images fit;
under a device mesh (``jax.set_mesh``) with the batch sharded along its
examples, every pass is data-parallel. A killed run started again with the
same settings resumes from its last checkpoint and ends with the same
numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import anisonoise

import configs
import input_pipeline
import models
import plots

SCAN_CHUNK = 25  # most steps run per jitted call (progress updates between)
EVAL_CHUNK = 2000  # examples per evaluation pass when chunk_size is None

# What each phase's checkpoint must agree on (so that adding a dynamics
# later reuses theta_GD).
_GD_KEYS = ("dataset", "model", "vgg_width", "seq_len", "tf_dim", "tf_heads",
            "tf_layers", "track_every", "track_eigs", "track_block_iters",
            "diag_samples", "synthetic", "num_clean",
            "num_corrupt", "num_clean_after", "num_train", "num_test",
            "svhn_split", "fmnist_split", "pixels", "init", "gd_lr",
            "gd_steps", "gd_eval_every", "gd_sharpness_every",
            "sharpness_samples", "sharpness_delta", "seed")


# GD-phase settings that only its tracking reads (track_every > 0).
_TRACK_KEYS = ("track_eigs", "track_block_iters", "diag_samples")


class ConfigMismatch(ValueError):
  """A checkpoint written with different settings than the current run."""


def gd_settings(config: dict) -> dict:
  """The settings theta_GD depends on: :data:`_GD_KEYS`, less the tracking's
  when the GD phase is not tracked."""
  return {k: config[k] for k in _GD_KEYS
          if config["track_every"] or k not in _TRACK_KEYS}


def same_settings(stored: dict, config: dict) -> bool:
  """Whether a checkpoint's stored settings are ``config``'s. A setting
  added to :class:`configs.Config` after the checkpoint was written takes
  its default (what every run did before it existed), so checkpoints
  outlive new options; stored settings ``config`` does not name are not
  compared."""
  stored = json.loads(json.dumps({**dataclasses.asdict(configs.Config()),
                                  **stored}))
  return all(k in stored and stored[k] == v
             for k, v in json.loads(json.dumps(config)).items())


# --------------------------------------------------------------------------
# The dynamics
# --------------------------------------------------------------------------


def make_tx(name: str, cfg: configs.Config, seed: int):
  """The optax transform of one dynamics: its noise (from the library's
  one table, :func:`anisonoise.dynamics_noise`) then ``sgd(lr)``."""
  solver = {} if cfg.lanczos_iters is None else {
      "num_iters": (min(cfg.lanczos_iters, 11) if name == "GLD 1st eigvec(H)"
                    else cfg.lanczos_iters)}
  # The paper's magnitude: the exact Tr(C) and diag(C) from per-example
  # gradients at every refresh, as the authors' scripts compute them (the
  # library's default estimates them from random probes).
  noise = anisonoise.dynamics_noise(
      name, std=cfg.const_std, k=cfg.k, batch_size=cfg.batch_size,
      refresh_every=cfg.refresh_every(name),
      key=seed * 1000 + configs.ALL_DYNAMICS.index(name),
      chunk_size=cfg.chunk_size, trace_estimator="exact",
      estimation_size=cfg.estimation_size, **solver)
  sgd = optax.sgd(cfg.lr)
  # GD and SGD add nothing: plain sgd, with the state layout of sgd alone.
  return sgd if name in ("GD", "SGD") else optax.chain(noise, sgd)


def _mean_grad(loss_fn, chunk_size):
  """The full-batch gradient: ``anisonoise.mean_gradient`` in chunks; in
  one pass, ``jax.grad`` of the mean loss, the form the Fashion-MNIST
  results were measured with (``mean_gradient`` sums then scales, which
  rounds differently in float32 over thousands of steps)."""
  if chunk_size is None:
    return jax.grad(lambda p, b: jnp.mean(loss_fn(p, b)))
  return lambda p, b: anisonoise.mean_gradient(loss_fn, p, b,
                                               chunk_size=chunk_size)


def _advance_fn(step):
  """``advance(carry, t0, batch, length)``: ``length`` steps under one jitted
  ``lax.scan`` (about 25% faster per GD step than a Python loop over a jitted
  step on a CPU: 0.118 s against 0.162 s for the LeNet step); one compile
  per distinct ``length``."""

  @functools.partial(jax.jit, static_argnames="length")
  def advance(carry, t0, batch, length):
    def body(c, t):
      return step(c, t, batch), None
    return jax.lax.scan(body, carry, t0 + jnp.arange(length))[0]

  return advance


def gd_step(loss_fn, lr, chunk_size=None):
  grad = _mean_grad(loss_fn, chunk_size)

  def step(params, t, batch):
    del t
    return jax.tree.map(lambda p, d: p - lr * d, params, grad(params, batch))
  return step


def noise_step(loss_fn, tx, chunk_size=None):
  grad = _mean_grad(loss_fn, chunk_size)

  def step(carry, t, batch):
    del t
    params, state = carry
    updates, state = tx.update(grad(params, batch), state, params,
                               loss_fn=loss_fn, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def draw_minibatch(base, i, n: int, m: int, batch):
  """``(idx, minibatch)``: ``m`` distinct examples of the ``n`` in
  ``batch``, drawn from ``base`` folded with ``i`` (a step or a draw
  number), so that the same ``i`` always draws the same."""
  idx = jax.random.choice(jax.random.fold_in(base, i), n, (m,),
                          replace=False)
  return idx, jax.tree.map(lambda x: x[idx], batch)


def sgd_key(seed: int) -> jax.Array:
  """The base key of SGD's minibatch draws."""
  return jax.random.key(seed + 23)


def sgd_step(loss_fn, tx, m, n, seed):
  """SGD with ``m`` distinct examples per step, drawn afresh each step from
  a key folded with the step number (so a resumed run draws the same)."""
  base = sgd_key(seed)

  def step(carry, t, batch):
    params, state = carry
    _, mini = draw_minibatch(base, t, n, m, batch)
    g = jax.grad(lambda p: jnp.mean(loss_fn(p, mini)))(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state
  return step


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


# What drew the low-rank noises of a checkpoint's run, stored in its
# record. Checkpoints without it were written before the refreshes solved
# for the top-k subspace and drew in the full space: those whose states
# still have today's shapes load, and the run goes on with the same noise
# distribution but not the draws a fresh run makes (a note says so);
# those of older states are refused, with what wrote them and what to do.
NOISE_REVISION = "subspace solve, full-space draw"
# What wrote a checkpoint whose record has no revision.
EARLIER_NOISE = "Lanczos refreshes, draws in the eigenbasis"


def _check_revision(path: str, record: dict) -> None:
  """Says so when a checkpoint's run drew its noise another way."""
  wrote = record.get("noise", EARLIER_NOISE)
  if wrote != NOISE_REVISION:
    print(f"note: {path} was written by an earlier anisonoise ({wrote});"
          f" this run goes on with the current one ({NOISE_REVISION}): the"
          " same noise distribution, not the draws of an uninterrupted run"
          " of either. Pass --restart for a run of one version.",
          file=sys.stderr)


def _to_storable(tree) -> list[np.ndarray]:
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out.append(np.asarray(leaf))
  return out


def _from_storable(template, leaves: list[np.ndarray]):
  t_leaves, treedef = jax.tree.flatten(template)
  if len(t_leaves) != len(leaves):
    raise ConfigMismatch(f"checkpoint holds {len(leaves)} arrays, the run"
                         f" expects {len(t_leaves)}.")
  restored = []
  for t, x in zip(t_leaves, leaves):
    if jnp.issubdtype(t.dtype, jax.dtypes.prng_key):
      restored.append(jax.random.wrap_key_data(jnp.asarray(x)))
    else:
      if tuple(x.shape) != tuple(t.shape):
        raise ConfigMismatch(f"checkpoint array of shape {x.shape}, the run"
                             f" expects {t.shape}.")
      restored.append(jnp.asarray(x, t.dtype))
  return jax.tree.unflatten(treedef, restored)


def save_checkpoint(path: str, tree, record: dict) -> None:
  """Writes ``tree`` (any pytree of arrays, PRNG keys included) and a JSON
  record atomically (write to a temporary file, then rename)."""
  blob = serialization.msgpack_serialize(
      {"leaves": _to_storable(tree), "record": json.dumps(record)})
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
  _on_checkpoint(path)


def load_checkpoint(path: str, template):
  """``(tree, record)`` from :func:`save_checkpoint`, or ``None``."""
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    raw = serialization.msgpack_restore(f.read())
  leaves = raw["leaves"]
  if isinstance(leaves, dict):  # msgpack may return lists as indexed dicts
    leaves = [leaves[str(i)] for i in range(len(leaves))]
  record = json.loads(raw["record"])
  try:
    return _from_storable(template, leaves), record
  except ConfigMismatch as e:
    if "t" not in record or "noise" in record:
      raise
    raise ConfigMismatch(
        f"{path} was written by an earlier anisonoise ({EARLIER_NOISE}),"
        f" whose noise state this version cannot"
        f" read ({e}). Pass --restart to run afresh (results.json keeps"
        " the earlier run's numbers until then), or resume it with the"
        f" commit that wrote it (git log -1 -- {path}).") from None


def _on_checkpoint(path: str) -> None:
  """Hook called after every checkpoint (tests use it to kill a run)."""


class TimeLimit(Exception):
  """The run reached its deadline; its checkpoints hold everything done so
  far, and the same call again resumes from them."""


def _check_time(deadline: float | None, where: str) -> None:
  if deadline is not None and time.monotonic() >= deadline:
    raise TimeLimit(f"time limit reached; {where}.")


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def _floats(d: dict) -> dict:
  return {k: float(v) for k, v in d.items()}


def make_measures(loss_fn, logits_fn, cfg: configs.Config,
                  corrupted: np.ndarray, seed: int):
  """Evaluation functions (jitted; data always passed as arguments)."""
  sharp_key = jax.random.key(seed + 17)
  chunk = cfg.chunk_size

  def per_example(x):  # a sequence's mean over its tokens
    return x.mean(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x

  @jax.jit
  def sums(params, x, y, corrupt):
    logits = logits_fn(params, x)
    loss = per_example(
        optax.softmax_cross_entropy_with_integer_labels(logits, y))
    acc = per_example((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return (jnp.sum(loss), jnp.sum(acc), jnp.sum(jnp.where(corrupt, acc, 0.0)))

  def totals(params, batch, corrupt):
    n = batch["y"].shape[0]
    step = chunk or EVAL_CHUNK
    parts = [sums(params, batch["x"][i:i + step], batch["y"][i:i + step],
                  corrupt[i:i + step]) for i in range(0, n, step)]
    return [sum(float(p[j]) for p in parts) for j in range(3)]

  corrupt_train = jnp.asarray(corrupted)
  n_c = int(corrupted.sum())
  n_k = len(corrupted) - n_c

  def metrics(params, train, test):
    n = train["y"].shape[0]
    loss, acc, acc_c = totals(params, train, corrupt_train)
    row = {"train_loss": loss / n, "train_acc": acc / n}
    if n_c:
      row["train_acc_clean"] = (acc - acc_c) / max(n_k, 1)
      row["train_acc_corrupted"] = acc_c / n_c
    m = test["y"].shape[0]
    loss, acc, _ = totals(params, test, jnp.zeros(m, bool))
    row["test_loss"], row["test_acc"] = loss / m, acc / m
    return row

  @jax.jit
  def sharpness(params, train):
    est = anisonoise.expected_sharpness(
        loss_fn, params, train, key=sharp_key, delta=cfg.sharpness_delta,
        num_samples=cfg.sharpness_samples, chunk_size=chunk)
    return {"sharpness": est.mean, "sharpness_sem": est.stderr}

  @jax.jit
  def norms(params, train):
    r = anisonoise.gradient_noise_norms(loss_fn, params, train,
                                        batch_size=cfg.batch_size,
                                        chunk_size=chunk)
    return {"grad_norm": r.gradient_norm, "noise_norm": r.noise_norm}

  @jax.jit
  def escape(params, train, key):
    k1, k2, k3 = jax.random.split(key, 3)
    s = cfg.diag_samples
    tr_hs = anisonoise.escape_indicator(
        loss_fn, params, train, batch_size=cfg.batch_size,
        method="stochastic", key=k1, num_samples=s, chunk_size=chunk)
    tr_hs_bar = anisonoise.isotropic_escape_indicator(
        loss_fn, params, train, batch_size=cfg.batch_size,
        hessian_trace_method="hutchinson", key=k2, num_probes=s,
        chunk_size=chunk)
    a = anisonoise.projection_coefficient(
        loss_fn, params, train, key=k3, num_iters=cfg.diag_lanczos_iters,
        hessian_trace_method="hutchinson", num_probes=s, chunk_size=chunk)
    return {"tr_h_sigma": tr_hs.mean, "tr_h_sigma_sem": tr_hs.stderr,
            "tr_h_sigma_bar": tr_hs_bar, "projection_coefficient": a}

  return metrics, sharpness, norms, escape


def make_tracker(loss_fn, cfg: configs.Config, params0, norms, escape,
                 seed: int):
  """The paper's quantities at a point of the GD phase (``track_every``):
  the top ``track_eigs`` Hessian eigenvalues, Tr(H Sigma) and Tr(H
  Sigma_bar), the gradient-noise norms, and per block of the parameters
  (:func:`models.blocks`) its Hessian trace (Hutchinson) and top
  eigenvalue, through :func:`anisonoise.param_block`."""
  chunk = cfg.chunk_size
  masks = models.blocks(cfg, params0)

  @functools.partial(jax.jit, static_argnums=0)
  def block(name, params, train, key):
    f, p = anisonoise.param_block(loss_fn, params, masks[name])
    k1, k2 = jax.random.split(key)
    trace = anisonoise.hessian_trace(f, p, train, method="hutchinson",
                                     key=k1, num_probes=cfg.diag_samples,
                                     chunk_size=chunk)
    top = anisonoise.hessian_spectrum(f, p, train, num_eigs=1, key=k2,
                                      num_iters=cfg.track_block_iters,
                                      chunk_size=chunk)
    size = sum(x.size for x in jax.tree.leaves(p))
    return {"trace": trace.mean if hasattr(trace, "mean") else trace,
            "top": top.eigenvalues[0], "size": size}

  def track(params, train, t):
    key = jax.random.fold_in(jax.random.key(seed + 29), t)
    k1, k2, k3 = jax.random.split(key, 3)
    spec = anisonoise.hessian_spectrum(
        loss_fn, params, train, num_eigs=cfg.track_eigs, key=k1,
        chunk_size=chunk)
    row = {"track_eigenvalues": [float(x) for x in spec.eigenvalues],
           "track_converged": bool(spec.converged)}
    row.update(_floats(norms(params, train)))
    row.update(_floats(escape(params, train, k2)))
    per = {}
    for i, name in enumerate(masks):
      r = block(name, params, train, jax.random.fold_in(k3, i))
      per[name] = {k: float(v) for k, v in r.items()}
    row["blocks"] = per
    return row

  return track


# --------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------


def schedule(total: int, every: int, early: int = 0,
             early_every: int = 1) -> list[int]:
  """Sorted evaluation steps in ``1..total`` (always including ``total``)."""
  pts = set(range(every, total + 1, every)) | {total}
  if early:
    pts |= set(range(early_every, min(early, total) + 1, early_every))
  return sorted(p for p in pts if p >= 1)


def scan_length(points: list[int]) -> int:
  """Steps per jitted call of a phase evaluated at ``points``: one scan
  length for the whole phase (one compilation), the largest divisor of
  every segment that is at most :data:`SCAN_CHUNK`."""
  chunk = functools.reduce(math.gcd, np.diff([0, *points]).tolist(), 0) or 1
  return max(d for d in range(1, min(chunk, SCAN_CHUNK) + 1)
             if chunk % d == 0)


def _run_phase(
    name: str, path: str, config: dict, carry, advance: Callable,
    total: int, points: list[int], evaluate: Callable, bar,
    deadline: float | None = None,
):
  """Steps ``carry`` to ``total``, evaluating at ``points`` and saving a
  checkpoint after each evaluation; resumes from ``path`` if present.
  Raises :class:`TimeLimit` instead of starting a segment past
  ``deadline`` (a ``time.monotonic()`` value)."""
  history: list[dict] = []
  t = 0
  restored = load_checkpoint(path, carry)
  if restored is not None:
    carry, record = restored
    if not same_settings(record["config"], config):
      raise ConfigMismatch(
          f"{path} was written by a run with different settings; use another"
          " --out or pass --restart to discard it.")
    t, history = record["t"], record["history"]
    _check_revision(path, record)
    bar.update(t)
  if t == 0 and not history:
    history.append(evaluate(carry, 0))
    save_checkpoint(path, carry, {"config": config, "t": 0,
                                  "history": history,
                                  "noise": NOISE_REVISION})
  chunk = scan_length(points)
  for p in points:
    if p <= t:
      continue
    _check_time(deadline, f"{name}: stopped at step {t} of {total} (its"
                f" checkpoint: {path})")
    bar.set_description(name)
    while t < p:
      length = min(p - t, chunk)
      carry = advance(carry, t, length)
      t += length
      bar.update(length)
    history.append(evaluate(carry, t))
    bar.set_postfix({k: f"{history[-1][k]:.3g}" for k in
                     ("train_acc", "test_acc") if k in history[-1]})
    save_checkpoint(path, carry, {"config": config, "t": t,
                                  "history": history,
                                  "noise": NOISE_REVISION})
  return carry, history


def slug(name: str) -> str:
  """A file-name form of a dynamics' name."""
  s = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
  return s.replace("+", "plus").replace(".", "")


def run(out: str, cfg: configs.Config, seed: int = 0,
        data_dir: str | None = None, restart: bool = False,
        plot: bool = True, time_limit: float | None = None) -> dict:
  """Runs (or resumes) a study; returns the summary written to
  ``results.json`` (plus ``timings``, seconds per phase).

  With ``time_limit`` (seconds), no new segment of steps starts after it:
  :class:`TimeLimit` is raised at the first evaluation past it, everything
  run so far is in the checkpoints, and the same call again goes on (for
  machines lent for a few minutes at a time).

  A study grows one dynamics at a time: dynamics already in ``out``'s
  ``results.json`` from the same settings and theta_GD that ``cfg`` does
  not name are kept in the new one; with another theta_GD or other
  settings, or with ``restart``, they are dropped with a message."""
  from tqdm import tqdm

  configs.check(cfg)
  config = dict(dataclasses.asdict(cfg), seed=seed)
  config["dynamics"] = list(cfg.dynamics)
  config["dynamics_steps"] = [list(p) for p in cfg.dynamics_steps]
  gd_config = gd_settings(config)
  # A dynamics' checkpoint does not depend on how far it is asked to run: a
  # finished run asked for more steps goes on from where it stopped.
  dyn_config = {k: v for k, v in config.items()
                if k not in ("dynamics", "spectrum_eigs", "spectrum_iters",
                             "steps", "dynamics_steps", "stability_batches",
                             "stability_iters")}
  ckpt = os.path.join(out, "checkpoints")
  if restart and os.path.isdir(ckpt):
    for f in os.listdir(ckpt):
      os.remove(os.path.join(ckpt, f))
  os.makedirs(ckpt, exist_ok=True)
  timings: dict[str, float] = {}
  deadline = None if time_limit is None else time.monotonic() + time_limit

  data = input_pipeline.load(cfg, data_dir, seed)
  train_batch, test_batch = data.train, data.test
  params0, loss_fn, logits_fn = models.create(cfg, seed)
  metrics, sharpness, norms, escape = make_measures(
      loss_fn, logits_fn, cfg, data.corrupted, seed)
  track = (make_tracker(loss_fn, cfg, params0, norms, escape, seed)
           if cfg.track_every else None)
  last_steps: set[int] = set()

  def evaluate(params, t, *, sharp_every, with_norms=False,
               diag_every=None, track_every=None):
    row = {"step": t, **metrics(params, train_batch, test_batch)}
    if track_every and (t % track_every == 0 or t in last_steps):
      row.update(track(params, train_batch, t))
    if t % sharp_every == 0 or t in last_steps:
      row.update(_floats(sharpness(params, train_batch)))
    if with_norms:
      row.update(_floats(norms(params, train_batch)))
    if diag_every and (t % diag_every == 0 or t in last_steps):
      row.update(_floats(escape(params, train_batch,
                                jax.random.fold_in(jax.random.key(seed), t))))
    return row

  # ---- GD to the sharp minimum -------------------------------------------
  last_steps = {cfg.gd_steps}
  gd_advance = _advance_fn(gd_step(loss_fn, cfg.gd_lr, cfg.chunk_size))
  t0 = time.perf_counter()
  with tqdm(total=cfg.gd_steps, desc="GD to theta_GD") as bar:
    theta_gd, gd_history = _run_phase(
        "GD to theta_GD", os.path.join(ckpt, "gd.msgpack"),
        {"phase": "gd", **gd_config}, params0,
        lambda p, t, length: gd_advance(p, t, train_batch, length=length),
        cfg.gd_steps, sorted(set(schedule(cfg.gd_steps, cfg.gd_eval_every))
                             | set(schedule(cfg.gd_steps, cfg.track_every
                                            or max(cfg.gd_steps, 1)))),
        lambda p, t: evaluate(p, t, sharp_every=cfg.gd_sharpness_every,
                              track_every=cfg.track_every), bar, deadline)
  timings["gd"] = time.perf_counter() - t0
  save_checkpoint(os.path.join(out, "theta_gd.msgpack"), theta_gd,
                  {"config": config, "t": cfg.gd_steps})

  # ---- Fig. 5 left: the Hessian spectrum at theta_GD ---------------------
  _check_time(deadline, "theta_GD is saved, the spectrum not computed")
  t0 = time.perf_counter()
  spectrum = _spectrum(cfg, seed, loss_fn, theta_gd, train_batch,
                       os.path.join(ckpt, "spectrum.json"), gd_config)
  timings["spectrum"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  stability = _stability(cfg, seed, loss_fn, theta_gd, train_batch,
                         data.corrupted, os.path.join(ckpt, "stability.json"),
                         gd_config)
  timings["stability"] = time.perf_counter() - t0

  # ---- the dynamics from theta_GD ------------------------------------------
  results = {}
  n = train_batch["y"].shape[0]
  with_diagnostics = cfg.diag_every > 0
  for name in cfg.dynamics:
    t0 = time.perf_counter()
    total = cfg.steps_of(name)
    points = schedule(total, cfg.eval_every, cfg.early_steps,
                      cfg.early_eval_every)
    last_steps = {total}
    tx = make_tx(name, cfg, seed)
    is_sgd = name == "SGD"
    advance = _advance_fn(
        sgd_step(loss_fn, tx, cfg.batch_size, n, seed) if is_sgd else
        noise_step(loss_fn, tx, cfg.chunk_size))
    carry = (theta_gd, tx.init(theta_gd))
    diag = is_sgd and with_diagnostics

    def ev(c, t, diag=diag):
      if t == 0:
        row = dict(gd_history[-1], step=0)
        if diag:
          row.update(_floats(norms(c[0], train_batch)))
          row.update(_floats(escape(c[0], train_batch,
                                    jax.random.fold_in(jax.random.key(seed),
                                                       0))))
        return row
      row = evaluate(c[0], t, sharp_every=cfg.sharpness_every,
                     with_norms=diag,
                     diag_every=cfg.diag_every if diag else None)
      row["distance"] = float(_distance(c[0], theta_gd))
      return row

    with tqdm(total=total, desc=name) as bar:
      _, history = _run_phase(
          name, os.path.join(ckpt, f"dyn_{slug(name)}.msgpack"),
          {"phase": name, **dyn_config}, carry,
          lambda c, t, length, advance=advance: advance(
              c, t, train_batch, length=length),
          total, points, ev, bar, deadline)
    # A checkpoint run further than asked: report up to ``total``.
    results[name] = [r for r in history if r["step"] <= total]
    timings[name] = time.perf_counter() - t0

  # Dynamics of an earlier call from the same theta_GD that this one does
  # not name stay in results.json (their checkpoints may be gone).
  kept, kept_steps = _earlier_dynamics(
      os.path.join(out, "results.json"), dyn_config, gd_history, results,
      restart)
  results = {**kept, **results}
  config["dynamics"] = list(results)
  config["dynamics_steps"] += [p for p in kept_steps
                               if p[0] not in dict(cfg.dynamics_steps)]

  summary = {
      "experiment": f"{cfg.dataset}_{cfg.model}",
      "config": config,
      "data": {"num_train": int(n),
               "num_corrupted": int(data.corrupted.sum()),
               "corrupted_indices": np.flatnonzero(data.corrupted).tolist(),
               "corrupted_label_changed": int(
                   (np.asarray(train_batch["y"]) != data.y_true)[
                       data.corrupted].sum()),
               "num_test": int(test_batch["y"].shape[0])},
      "num_params": int(sum(x.size for x in jax.tree.leaves(params0))),
      "gd": gd_history,
      "spectrum": spectrum,
      "stability": stability,
      "dynamics": results,
      "table": final_table(results),
  }
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(markdown_table(summary) + "\n")
  if plot:
    plots.plot_study(summary, out)
  summary["timings"] = timings  # not in results.json: differs on resume
  with open(os.path.join(out, "timings.json"), "w") as f:
    json.dump(timings, f, indent=1)
  return summary


def _earlier_dynamics(path: str, dyn_config: dict, gd_history: list,
                      named: dict, restart: bool) -> tuple[dict, list]:
  """The dynamics in an earlier ``results.json`` at ``path`` that are not in
  ``named``, with their ``dynamics_steps`` entries, if that file comes from
  the same settings and the same GD history (so the same theta_GD);
  otherwise none, and a message names what the new file drops."""
  if not os.path.exists(path):
    return {}, []
  try:
    with open(path) as f:
      stored = json.load(f)
  except json.JSONDecodeError as e:  # e.g. a run killed while writing it
    print(f"{path} cannot be read ({e}); it is replaced by this call's"
          " dynamics only.", file=sys.stderr)
    return {}, []
  others = [n for n in stored.get("dynamics", {}) if n not in named]
  if not others:
    return {}, []
  why = ("--restart was given" if restart else
         "it was written with different settings"
         if not same_settings(stored.get("config", {}), dyn_config) else
         "its GD history differs (another theta_GD)"
         if stored.get("gd") != json.loads(json.dumps(gd_history)) else None)
  if why:
    print(f"{path}: dropping {others} from the earlier results, because {why};"
          " run them again to have them back.", file=sys.stderr)
    return {}, []
  steps = [p for p in stored["config"].get("dynamics_steps", [])
           if p[0] in others]
  return {n: stored["dynamics"][n] for n in others}, steps


@jax.jit
def _distance(params, theta):
  """``||params - theta||`` over every leaf."""
  return optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, params, theta))


def _cached(path: str, config: dict, compute: Callable[[], dict]) -> dict:
  """``compute()``'s JSON-able result, stored in ``path`` with ``config``
  and read back while ``config`` is unchanged."""
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if same_settings(stored.pop("config"), config):
      return stored
  result = compute()
  with open(path, "w") as f:
    json.dump(dict(result, config=config), f)
  return result


def _spectrum(cfg, seed, loss_fn, theta_gd, train_batch, path, gd_config):
  """The top ``spectrum_eigs`` Hessian eigenvalues at theta_GD (cached)."""
  if not cfg.spectrum_eigs:
    return None
  spec_config = dict(gd_config, spectrum_eigs=cfg.spectrum_eigs,
                     spectrum_iters=cfg.spectrum_iters)
  return _cached(path, spec_config, lambda: _compute_spectrum(
      cfg, seed, loss_fn, theta_gd, train_batch))


def _compute_spectrum(cfg, seed, loss_fn, theta_gd, train_batch) -> dict:
  print(f"top {cfg.spectrum_eigs} Hessian eigenvalues at theta_GD ...",
        flush=True)
  spec = jax.jit(lambda p, b: anisonoise.hessian_spectrum(
      loss_fn, p, b, num_eigs=cfg.spectrum_eigs,
      num_iters=cfg.spectrum_iters, chunk_size=cfg.chunk_size,
      key=jax.random.key(seed + 5)))(theta_gd, train_batch)
  return {"eigenvalues": np.asarray(spec.eigenvalues).tolist(),
          "residual_norms": np.asarray(spec.residual_norms).tolist(),
          "num_matvecs": int(spec.num_matvecs),
          "converged": bool(spec.converged)}


def collapse(out: str, cfg: configs.Config, seed: int = 0,
             data_dir: str | None = None, steps: int = 20,
             names: tuple[str, ...] | None = None) -> dict:
  """The first ``steps`` steps of each dynamics from the ``theta_GD`` of a
  finished (or started) run in ``out``, with the curvature each step meets:
  the top eigenvalue of the full-batch Hessian at every iterate (against
  the stability limit ``2 / lr`` of a gradient step) and, for SGD, that of
  the minibatch the step draws. The same draws as the study's run (the
  same keys), so these are its first iterations; written to
  ``collapse.json`` and ``collapse.png``."""
  configs.check(cfg)
  path = os.path.join(out, "theta_gd.msgpack")
  data = input_pipeline.load(cfg, data_dir, seed)
  batch = data.train
  params0, loss_fn, _ = models.create(cfg, seed)
  restored = load_checkpoint(path, params0)
  if restored is None:
    raise FileNotFoundError(f"{path} does not exist; run the study (at"
                            " least its GD phase) first.")
  theta_gd, record = restored
  config = dict(dataclasses.asdict(cfg), seed=seed)
  if not same_settings(record["config"], gd_settings(config)):
    raise ConfigMismatch(f"{path} was written with other settings than"
                         f" --preset/--seed give.")
  n = batch["y"].shape[0]
  m = cfg.batch_size
  lanczos_key = jax.random.key(seed + 31)

  @jax.jit
  def top1(params, b):
    spec = anisonoise.hessian_spectrum(loss_fn, params, b, num_eigs=1,
                                       key=lanczos_key, num_iters=30,
                                       tol=1e-2, unroll=False)
    return spec.eigenvalues[0]

  @jax.jit
  def mean_loss(params, b):
    return jnp.mean(loss_fn(params, b))

  base = sgd_key(seed)
  result = {"config": config, "steps": steps, "limit": 2.0 / cfg.lr,
            "dynamics": {}}
  for name in names or cfg.dynamics:
    tx = make_tx(name, cfg, seed)
    is_sgd = name == "SGD"
    advance = _advance_fn(sgd_step(loss_fn, tx, m, n, seed) if is_sgd else
                          noise_step(loss_fn, tx, cfg.chunk_size))
    carry = (theta_gd, tx.init(theta_gd))
    rows = []
    for t in range(steps + 1):
      p = carry[0]
      row = {"step": t, "train_loss": float(mean_loss(p, batch)),
             "distance": float(_distance(p, theta_gd)),
             "lambda_1": float(top1(p, batch))}
      if is_sgd and t < steps:
        idx, mini = draw_minibatch(base, t, n, m, batch)
        row["minibatch_lambda_1"] = float(top1(p, mini))
        row["minibatch_corrupted"] = int(
            data.corrupted[np.asarray(idx)].sum())
      rows.append(row)
      if t < steps:
        carry = advance(carry, t, batch, length=1)
    result["dynamics"][name] = rows
    print(name, " ".join(f"{r['train_loss']:.3g}/{r['lambda_1']:.3g}"
                         for r in rows), flush=True)
  with open(os.path.join(out, "collapse.json"), "w") as f:
    json.dump(result, f, indent=1)
  plots.plot_collapse(result, os.path.join(out, "collapse.png"))
  return result


def _stability(cfg, seed, loss_fn, theta_gd, train_batch, corrupted, path,
               gd_config):
  """Whether theta_GD is linearly stable for SGD: the top eigenvalue of the
  Hessian of ``stability_batches`` random minibatches of ``batch_size``
  (drawn as SGD draws them), each with its number of corrupted examples,
  against the limit ``2 / lr`` above which a step on that minibatch
  amplifies the deviation along its top eigenvector (cached)."""
  if not cfg.stability_batches:
    return None
  st_config = dict(gd_config, stability_batches=cfg.stability_batches,
                   stability_iters=cfg.stability_iters,
                   batch_size=cfg.batch_size, lr=cfg.lr)
  return _cached(path, st_config, lambda: _compute_stability(
      cfg, seed, loss_fn, theta_gd, train_batch, corrupted))


def _compute_stability(cfg, seed, loss_fn, theta_gd, train_batch,
                       corrupted) -> dict:
  n = train_batch["y"].shape[0]
  base = jax.random.key(seed + 29)

  @jax.jit
  def top(params, batch, i):
    key = jax.random.fold_in(base, i)
    idx, mini = draw_minibatch(base, i, n, cfg.batch_size, batch)
    spec = anisonoise.hessian_spectrum(
        loss_fn, params, mini, num_eigs=1, key=jax.random.fold_in(key, 1),
        num_iters=min(cfg.stability_iters,
                      sum(x.size for x in jax.tree.leaves(params))))
    return idx, spec.eigenvalues[0], spec.converged

  lams, counts, ok = [], [], True
  for i in range(cfg.stability_batches):
    idx, lam, conv = top(theta_gd, train_batch, i)
    lams.append(float(lam))
    counts.append(int(corrupted[np.asarray(idx)].sum()))
    ok = ok and bool(conv)
  return {
      "lambda_1": lams, "num_corrupted": counts, "converged": ok,
      "limit": 2.0 / cfg.lr,
      "fraction_unstable": float(np.mean(np.asarray(lams) > 2.0 / cfg.lr)),
  }


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def final_table(results: dict) -> dict:
  """Final values per dynamics (the markdown table's rows)."""
  table = {}
  nan = float("nan")
  for name, hist in results.items():
    last = hist[-1]
    sharp = [r for r in hist if "sharpness" in r]
    table[name] = {
        "steps": last["step"],
        "test_acc": last["test_acc"],
        "train_acc": last["train_acc"],
        "train_acc_corrupted": last.get("train_acc_corrupted", nan),
        "sharpness": sharp[-1]["sharpness"] if sharp else nan,
        "sharpness_sem": sharp[-1]["sharpness_sem"] if sharp else nan,
        "start_sharpness": sharp[0]["sharpness"] if sharp else nan,
        "min_train_acc": min(r["train_acc"] for r in hist),
    }
  return table


def markdown_table(summary: dict) -> str:
  """The final table of a study, in markdown."""
  cfg = summary["config"]
  corrupted = summary["data"]["num_corrupted"] > 0
  start = plots.start_point(summary)
  rows = [f"{cfg['dataset']}, {summary['data']['num_train']} training"
          f" {plots.examples(summary)}: from {start} (lr {cfg['lr']},"
          f" m = {cfg['batch_size']},"
          f" seed {cfg['seed']}); {start}: test accuracy"
          f" {summary['gd'][-1]['test_acc']:.4f}, sharpness"
          f" {summary['gd'][-1].get('sharpness', float('nan')):.4g}.", ""]
  head = ["dynamics", "steps", "test acc"]
  if corrupted:
    head.append("train acc (corrupted subset)")
  head += ["train acc (all)", "lowest train acc", "expected sharpness"]
  rows += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in summary["table"].items():
    cells = [name, str(r.get("steps", cfg["steps"])), f"{r['test_acc']:.4f}"]
    if corrupted:
      cells.append(f"{r['train_acc_corrupted']:.3f}")
    cells += [f"{r['train_acc']:.3f}", f"{r['min_train_acc']:.3f}",
              f"{r['sharpness']:.4g} ± {r['sharpness_sem']:.2g}"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def escape_summary(summary: dict) -> str:
  """What a results page says of a study's escape from the starting point,
  in markdown, from its ``results.json`` alone: each dynamics' first
  evaluation with less than half of what the start fitted of the corrupted
  subset (Fashion-MNIST's start fits all of it: below half; the fortunes'
  transformer fits part of its random targets: below half of that part)
  and its sharpness against the start's; the spectrum at the start; the
  SGD-trajectory diagnostics (Figs. 5 and 7)."""
  start = plots.start_point(summary)
  first = summary["gd"][-1]
  fitted = first.get("train_acc_corrupted", 1.0)
  lines = [f"- {start}: training loss {first['train_loss']:.2g}, train"
           f" accuracy {first['train_acc']:.3f}, test accuracy"
           f" {first['test_acc']:.4f}, expected sharpness"
           f" {first['sharpness']:.3g} ± {first['sharpness_sem']:.1g}."]
  for name, rows in summary["dynamics"].items():
    left = [r["step"] for r in rows
            if r.get("train_acc_corrupted", 1) < 0.5 * fitted]
    end = summary["table"][name]
    fall = first["sharpness"] / end["sharpness"]
    half = ("half of the corrupted subset" if fitted == 1.0 else
            f"half of the corrupted targets {start} fitted ({fitted:.3f})")
    lines.append(
        f"- {name}: " + (f"below {half} from step {left[0]}" if left
                         else "keeps the corrupted subset fitted"
                         if fitted == 1.0 else f"stays above {half}")
        + f"; sharpness {end['sharpness']:.3g} ± {end['sharpness_sem']:.1g}"
        f" after {end.get('steps', summary['config']['steps'])} steps,"
        f" {start}'s over it {fall:.2f}.")
  spec = summary.get("spectrum") or {}
  if spec.get("eigenvalues"):
    ev = np.asarray(spec["eigenvalues"])
    below = np.flatnonzero(ev < 0.01 * ev[0])
    lines.append(
        f"- Spectrum at {start}: top {len(ev)} Hessian eigenvalues"
        f" ({spec['num_matvecs']} products, "
        + ("converged" if spec["converged"] else "not converged")
        + f"); lambda_1 = {ev[0]:.3g}; the first below 1%"
        " of it: " + (f"the {below[0] + 1}th." if below.size else "none."))
  diag = [r for r in summary["dynamics"].get("SGD", [])
          if "tr_h_sigma" in r]
  if diag:
    lines.append("- Along SGD, step: Tr(H Sigma) / Tr(H Sigma_bar);"
                 " projection coefficient; expected noise norm over the"
                 " mean-gradient norm: " + "; ".join(
                     f"{r['step']}:"
                     f" {r['tr_h_sigma'] / r['tr_h_sigma_bar']:.3g},"
                     f" {r['projection_coefficient']:.2g},"
                     f" {r['noise_norm'] / r['grad_norm']:.2g}"
                     for r in diag) + ".")
  return "\n".join(lines)


def tracking_table(summary: dict) -> str:
  """The paper's quantities along the GD phase (``track_every``), in
  markdown: accuracies, the top and 20th Hessian eigenvalues, Proposition
  1's ratio ``Tr(H Sigma) / Tr(H Sigma_bar)``, the noise norm over the
  mean-gradient norm (Fig. 7's), and each block's share of ``Tr H``
  (Hutchinson, ``diag_samples`` probes per block: a share near zero can
  come out negative) with its top eigenvalue."""
  rows = [r for r in summary["gd"] if "track_eigenvalues" in r]
  if not rows:
    return "*No tracked steps (track_every = 0).*"
  names = list(rows[0]["blocks"])
  head = (["step", "train acc", "corrupted", "lambda_1", "lambda_20",
           "Tr(H Sigma) / Tr(H Sigma_bar)", "noise / gradient"]
          + [f"{n}: share of Tr H, lambda_1" for n in names])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    ev = r["track_eigenvalues"]
    total = sum(b["trace"] for b in r["blocks"].values())
    cells = [str(r["step"]), f"{r['train_acc']:.3f}",
             f"{r.get('train_acc_corrupted', float('nan')):.3f}",
             f"{ev[0]:.3g}", f"{ev[-1]:.3g}",
             f"{r['tr_h_sigma'] / r['tr_h_sigma_bar']:.3g}",
             f"{r['noise_norm'] / r['grad_norm']:.2g}"]
    cells += [f"{r['blocks'][n]['trace'] / total:.2f}, "
              f"{r['blocks'][n]['top']:.3g}" for n in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def escape_summaries(summaries: list[dict]) -> str:
  """:func:`escape_summary` of each seed of one study, under its seed."""
  return "\n\n".join(f"Seed {s['config']['seed']}:\n\n" + escape_summary(s)
                     for s in summaries)


def _mean_sem(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  sem = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
  return float(v.mean()), float(sem)


def common_dynamics(summaries: list[dict]) -> list[str]:
  """The dynamics every run has finished, in the first run's order (seeds
  may be at different stages of a long study)."""
  return [name for name in summaries[0]["table"]
          if all(name in s["table"] for s in summaries)]


def seeds_table(summaries: list[dict]) -> str:
  """The final values of several seeds of one study, as mean ± standard
  error of the mean, in markdown, for the dynamics every seed has run (the
  others are named below the table); refuses runs of different settings."""
  # A setting added after a run was stored takes its default for that run.
  defaults = dataclasses.asdict(configs.Config())

  def settings(summary):
    return {k: v for k, v in {**defaults, **summary["config"]}.items()
            if k not in ("seed", "dynamics")}

  keys = settings(summaries[0])
  for s in summaries[1:]:
    other = settings(s)
    if other != keys:
      diff = sorted(k for k in set(keys) | set(other)
                    if keys.get(k) != other.get(k))
      raise ValueError(f"runs differ in {diff}; combine seeds of one study.")
  seeds = [s["config"]["seed"] for s in summaries]
  gd = _mean_sem([s["gd"][-1]["test_acc"] for s in summaries])
  gd_sharp = _mean_sem([s["gd"][-1].get("sharpness", np.nan)
                        for s in summaries])
  start = plots.start_point(summaries[0])
  corrupted = summaries[0]["data"]["num_corrupted"] > 0
  rows = [f"{keys['dataset']}, {summaries[0]['data']['num_train']} training"
          f" {plots.examples(summaries[0])}, seeds {seeds}: mean ± standard"
          " error over seeds."
          f" {start}: test accuracy {gd[0]:.4f} ± {gd[1]:.4f}, expected"
          f" sharpness {gd_sharp[0]:.4g} ± {gd_sharp[1]:.2g}.", "",
          f"| dynamics | steps | test acc | test acc - {start}'s |"
          + (" train acc (corrupted subset) |" if corrupted else "")
          + " expected sharpness |",
          "|---|---|---|---|" + ("---|" if corrupted else "") + "---|"]
  common = common_dynamics(summaries)
  for name in common:
    t = [s["table"][name] for s in summaries]
    steps = sorted({r["steps"] for r in t})
    acc = _mean_sem([r["test_acc"] for r in t])
    gain = _mean_sem([r["test_acc"] - s["gd"][-1]["test_acc"]
                      for r, s in zip(t, summaries)])
    corr = _mean_sem([r["train_acc_corrupted"] for r in t])
    sharp = _mean_sem([r["sharpness"] for r in t])
    rows.append(
        f"| {name} | {'/'.join(map(str, steps))} | {acc[0]:.4f} ±"
        f" {acc[1]:.4f} | {gain[0]:+.4f} ± {gain[1]:.4f} |"
        + (f" {corr[0]:.3f} ± {corr[1]:.3f} |" if corrupted else "")
        + f" {sharp[0]:.3g} ± {sharp[1]:.2g} |")
  partial = {name: [s["config"]["seed"] for s in summaries
                    if name in s["table"]]
             for name in dict.fromkeys(n for s in summaries
                                       for n in s["table"])
             if name not in common}
  if partial:
    rows += ["", "Not run by every seed (left out above): " + "; ".join(
        f"{name} (seeds {ran})" for name, ran in partial.items()) + "."]
  return "\n".join(rows)
