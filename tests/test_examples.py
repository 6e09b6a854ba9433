"""Smoke tests of the paper reproductions at reduced size."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import fig2_toy  # noqa: E402


def test_fig2_loss_has_the_two_minima():
  batch = {"x": jnp.zeros((1, 2))}
  assert float(fig2_toy.loss_fn(jnp.ones(2), batch)[0]) == 0.0
  assert float(fig2_toy.loss_fn(-jnp.ones(2), batch)[0]) == 0.0
  # The sharp basin is sharper: compare the Hessians' top eigenvalues.
  h = lambda w: jax.hessian(lambda v: fig2_toy.loss_fn(v, batch)[0])(w)  # noqa
  assert np.linalg.eigvalsh(h(jnp.ones(2)))[-1] > 50 * np.linalg.eigvalsh(
      h(-jnp.ones(2)))[-1]


def test_fig2_small_run(tmp_path):
  summary = fig2_toy.run(str(tmp_path), seed=1, num_runs=6)
  with open(tmp_path / "fig2.json") as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  dyn = on_disk["dynamics"]
  assert set(dyn) == set(fig2_toy.dynamics())
  for name, r in dyn.items():
    assert 0.0 <= r["success_rate"] <= 1.0
    lo, hi = r["ci95"]
    assert 0.0 <= lo <= r["success_rate"] <= hi <= 1.0
    curve = np.asarray(r["mean_tr_h_sigma"])
    assert curve.shape == (fig2_toy.STEPS,)
    if name != "GD":
      assert np.all(curve >= 0) and curve.mean() > 1.0
  # GD is deterministic at a minimum: it never escapes and adds no noise.
  assert dyn["GD"]["success_rate"] == 0.0
  assert np.max(np.abs(dyn["GD"]["mean_tr_h_sigma"])) < 1e-6
  import matplotlib.image
  img = matplotlib.image.imread(tmp_path / "fig2.png")
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
  assert img.std() > 0.01  # not a blank canvas


def test_fig2_deterministic_for_a_seed(tmp_path, monkeypatch):
  """Two runs of a seed give the same summary (40 steps and 2 runs each:
  any randomness not drawn from the seed shows at the first step)."""
  monkeypatch.setattr(fig2_toy, "STEPS", 40)
  a = fig2_toy.run(str(tmp_path / "a"), seed=3, num_runs=2, plot=False)
  b = fig2_toy.run(str(tmp_path / "b"), seed=3, num_runs=2, plot=False)
  assert a == b


def test_fig4_small_run(tmp_path, monkeypatch):
  import fig4_one_hidden_layer as fig4
  monkeypatch.setattr(fig4, "EPOCHS", 3)
  monkeypatch.setattr(fig4, "DECAY_FROM_EPOCH", 2)
  summary = fig4.run(str(tmp_path), seed=0, widths=(8, 16))
  with open(tmp_path / "fig4.json") as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  for w, r in on_disk["widths"].items():
    assert r["num_params"] == 3 * int(w)
    assert len(r["tr_h_sigma"]) == len(r["tr_h_sigma_bar"]) == 3
    assert all(x >= 0 for x in r["tr_h_sigma"] + r["tr_h_sigma_bar"])
    assert all(np.isfinite(r["ratio"]))
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
  import matplotlib.image
  img = matplotlib.image.imread(tmp_path / "fig4.png")
  assert img.ndim == 3 and img.std() > 0.01


def test_fig4_refuses_when_every_initialisation_dies(monkeypatch):
  import fig4_one_hidden_layer as fig4
  monkeypatch.setattr(fig4, "_train", lambda *a: {"dead": True})
  with pytest.raises(RuntimeError, match="initialisations died"):
    fig4.train_width(8, jax.random.key(0))
