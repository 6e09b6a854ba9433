"""Smoke tests of the benchmark scripts at tiny size (they are not timed
here: the numbers are meaningless at this size, the code paths are not)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "benchmarks"))

import peers  # noqa: E402
import scaling  # noqa: E402
import step_cost  # noqa: E402


def _run(module, monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
  module.main()


def test_step_cost_smoke(tmp_path, monkeypatch):
  _run(step_cost, monkeypatch, "--model", "mlp", "--n", "24", "--repeats",
       "1", "--refresh", "2", "--dynamics", "GLD Hessian k=20",
       "--out", str(tmp_path))
  res = json.load(open(tmp_path / "step_cost_mlp.json"))
  (row,) = res["rows"]
  assert row["step_s"] > 0 and row["ratio_to_floor"] > 0
  assert "| GLD Hessian k=20 | 2 |" in open(tmp_path /
                                            "step_cost_mlp.md").read()
  assert res["env"]["jax"]


def test_scaling_smoke(tmp_path, monkeypatch):
  _run(scaling, monkeypatch, "--widths", "2", "4", "--batches", "16", "32",
       "--fixed-n", "16", "--fixed-width", "2", "--repeats", "1",
       "--refresh", "2", "--dynamics", "GD", "GLD diag", "--out",
       str(tmp_path))
  res = json.load(open(tmp_path / "scaling.json"))
  assert [r["D"] for r in res["by_D"]] == [1600, 1600, 3190, 3190]
  assert set(res["slopes_D"]) == {"GD", "GLD diag"}
  assert all(np.isfinite(v) for v in res["slopes_n"].values())
  import matplotlib.image
  img = matplotlib.image.imread(tmp_path / "scaling.png")
  assert img.std() > 0.01


def test_peers_smoke(tmp_path, monkeypatch):
  _run(peers, monkeypatch, "--n", "12", "--gd-steps", "2", "--iters", "60",
       "--ref-iters", "40", "--repeats", "1", "--pyhessian-repeats", "1",
       "--dense-repeats", "1", "--mlp-hidden", "2", "--eig-size", "60",
       "--pyhessian-max-iter", "3",
       "--out", str(tmp_path))
  res = json.load(open(tmp_path / "peers.json"))
  assert res["D"] == 11_330
  ref = np.asarray(res["reference"]["eigenvalues"])
  assert ref.shape == (20,) and np.all(np.diff(ref) <= 0)
  (ours,) = res["anisonoise"]
  assert ours["hvps"] == 60 and np.isfinite(ours["max_rel_error"])
  small = res["dense"]["small_model"]
  assert small["D"] == 784 * 2 + 2 + 2 * 10 + 10
  # Lanczos on the small MLP agrees with its dense Hessian's eigsh.
  assert small["anisonoise_max_rel_error_vs_dense"] < 1e-2
  py = res["pyhessian"]
  if "skipped" in py:
    assert "bench" in py["skipped"]
  else:
    assert 20 <= py["hvps"] <= 60 and len(py["eigenvalues"]) == 20
  assert "anisonoise" in open(tmp_path / "peers.md").read()


def test_rel_error():
  assert peers.rel_error([3.0, 1.0] + [1.0] * 18, [3.0] + [1.0] * 19) == 0.0
  assert peers.rel_error([1.1] + [1.0] * 19, [1.0] * 20) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="need 20"):
    peers.rel_error([1.0], [1.0] * 20)
