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
import trace_estimators  # noqa: E402
import refresh_profile  # noqa: E402
import warm_start  # noqa: E402


def _run(module, monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
  module.main()


def test_step_cost_smoke(tmp_path, monkeypatch):
  _run(step_cost, monkeypatch, "--model", "mlp", "--n", "24", "--repeats",
       "1", "--refresh", "2", "--dynamics", "GLD Hessian k=20",
       "--warm", "0", "1", "--out", str(tmp_path))
  res = json.load(open(tmp_path / "step_cost_mlp.json"))
  rows = res["rows"]
  assert [(r["trace_estimator"], r["warm"]) for r in rows] == [
      ("default", 0), ("default", 1), ("exact", 0), ("exact", 1)]
  assert all(r["step_s"] > 0 and r["ratio_to_floor"] > 0 for r in rows)
  # The cold refresh runs at least k rows and at most the default budget
  # of 5 num_iters; a warm one at least the cached block, one random row
  # and one chunk of 4 (k + 5 = 25).
  assert 20 <= rows[0]["products"] <= 200
  assert 25 <= rows[1]["products"] <= 200
  md = open(tmp_path / "step_cost_mlp.md").read()
  assert "| GLD Hessian k=20 | 2 | default | 0 |" in md
  assert "| GLD Hessian k=20 | 2 | exact | 1 |" in md
  assert res["env"]["jax"]


# Under ``slow`` (the default suite's 10 minutes): a table the trajectory
# benchmark supersedes for what a run pays.
@pytest.mark.slow
def test_refresh_profile_smoke(tmp_path, monkeypatch):
  _run(refresh_profile, monkeypatch, "--n", "24", "--k", "4", "--repeats",
       "1", "--out", str(tmp_path))
  res = json.load(open(tmp_path / "refresh_profile_mlp.json"))
  # A settled subspace solve: the k cached rows, one random row and one
  # chunk of 4 (k = 4).
  assert res["settled_products"] == 9 and res["solve_products"] > 0
  assert len(res["seconds"]) == 9 and min(res["seconds"].values()) > 0
  assert "| Tr(C), 8 probes |" in open(
      tmp_path / "refresh_profile_mlp.md").read()


# Under ``slow`` (the default suite's 10 minutes): a table the trajectory
# benchmark supersedes for what a run pays.
@pytest.mark.slow
def test_warm_start_smoke(tmp_path, monkeypatch):
  _run(warm_start, monkeypatch, "--problem", "mlp", "--n", "32", "--hidden",
       "8", "--refreshes", "2", "--refresh-every", "2", "--skip", "3",
       "--tol", "0.01", "--out", str(tmp_path))
  res = json.load(open(tmp_path / "warm_start_mlp.json"))
  (prob,) = res["problems"]
  assert prob["num_params"] == 426 and prob["matvecs"] == 20
  assert prob["skip"] == 3 and prob["tol"] == 0.01
  assert [r["refresh"] for r in prob["rows"]] == [1, 2]
  for r in prob["rows"]:
    for name in ("GLD Hessian", "GLD leading"):
      assert 0 <= r[name]["warm_error"] < 1 and r[name]["lambda_1"] > 0
      # At least the cached block, one random row and one chunk of 4
      # (k + 5), at most the default budget of 5 num_iters.
      assert 15 <= r[name]["warm_matvecs"] <= 100
  assert "| 2 |" in open(tmp_path / "warm_start_mlp.md").read()


def test_trace_estimators_smoke(tmp_path, monkeypatch):
  _run(trace_estimators, monkeypatch, "--steps", "0", "3", "--k", "2",
       "--clean", "40", "--corrupt", "10", "--repeats", "1", "--out",
       str(tmp_path))
  res = json.load(open(tmp_path / "trace_estimators.json"))
  assert [r["step"] for r in res["rows"]] == [0, 3]
  for r in res["rows"]:
    # Deflation by the top of C removes the largest part of the spread.
    assert 0 <= r["C"]["rel_sd"] <= r["plain"]["rel_sd"]
    assert 0 < r["C"]["in_span"] < 1 and 0 < r["H"]["in_span"] < 1
  assert set(res["cost_in_gd_steps"]) == {
      "exact", "forward probes", "backward probes",
      "deflated by 2 (GLD Hessian's)"}


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


@pytest.mark.slow  # about 2 minutes: PyHessian and LeNet references
def test_peers_smoke(tmp_path, monkeypatch):
  _run(peers, monkeypatch, "--n", "12", "--gd-steps", "2", "--iters", "60",
       "--configs", "60", "30:1e-1", "--plain-conv",
       "--ref-iters", "40", "--repeats", "1", "--pyhessian-repeats", "1",
       "--dense-repeats", "1", "--mlp-hidden", "2", "--eig-size", "60",
       "--pyhessian-max-iter", "3",
       "--out", str(tmp_path))
  res = json.load(open(tmp_path / "peers_plain_conv.json"))
  assert res["D"] == 11_330
  ref = np.asarray(res["reference"]["eigenvalues"])
  assert ref.shape == (20,) and np.all(np.diff(ref) <= 0)
  one_cycle, restarted = res["anisonoise"]
  assert one_cycle["hvps"] == 60 and np.isfinite(one_cycle["max_rel_error"])
  assert restarted["tol"] == 0.1 and restarted["hvps"] >= 30
  assert res["model"] == "LeNet, plain lax.conv"
  small = res["dense"]["small_model"]
  assert small["D"] == 784 * 2 + 2 + 2 * 10 + 10
  # Lanczos on the small MLP agrees with its dense Hessian's eigsh.
  assert small["anisonoise_max_rel_error_vs_dense"] < 1e-2
  py = res["pyhessian"]
  if "skipped" in py:
    assert "bench" in py["skipped"]
  else:
    assert 20 <= py["hvps"] <= 60 and len(py["eigenvalues"]) == 20
  assert "anisonoise" in open(tmp_path / "peers_plain_conv.md").read()


def test_rel_error():
  assert peers.rel_error([3.0, 1.0] + [1.0] * 18, [3.0] + [1.0] * 19) == 0.0
  assert peers.rel_error([1.1] + [1.0] * 19, [1.0] * 20) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="need 20"):
    peers.rel_error([1.0], [1.0] * 20)


def test_memory_smoke(tmp_path, monkeypatch):
  import memory
  _run(memory, monkeypatch, "--n", "16", "--width", "4", "--chunks", "none",
       "8", "--functions", "covariance_trace", "--out", str(tmp_path))
  res = json.load(open(tmp_path / "memory.json"))
  whole, chunked = res["rows"]
  assert whole["chunk_size"] is None and chunked["chunk_size"] == 8
  assert whole["D"] == 784 * 4 + 4 + 4 * 10 + 10
  assert whole["peak_bytes"] > 0 and chunked["peak_bytes"] > 0
  np.testing.assert_allclose(whole["value"], chunked["value"], rtol=1e-5)


@pytest.mark.slow  # about 1 minute: VGG11's compilations
def test_scale_smoke(tmp_path, monkeypatch):
  """VGG11 (the real model) at n = 2: every code path of the GPU run."""
  import scale
  _run(scale, monkeypatch, "--n", "2", "--chunk-size", "1", "--refresh",
       "2", "--dynamics", "GD + SGD noise", "--eigs", "2", "--eig-iters", "3",
       "--memory-chunks", "1", "--out", str(tmp_path))
  res = json.load(open(tmp_path / "scale.json"))
  assert res["D"] == 9_750_922
  assert [r["dynamics"] for r in res["rows"]] == ["GD", "GD + SGD noise"]
  assert all(r["compile_s"] > 0 and r["step_s"] > 0 for r in res["rows"])
  spec = res["spectrum"]
  assert len(spec["eigenvalues"]) == 2 and spec["num_iters"] == 3
  (mem,) = res["memory"]
  assert mem["chunk_size"] == 1 and mem["peak_bytes"] > 0
  assert "| GD + SGD noise |" in open(tmp_path / "scale.md").read()


def test_memory_on_the_transformer():
  """``memory.py --model transformer``'s child: a CharTransformer's
  covariance trace, in chunks, with its peak and size."""
  import memory
  row = memory.child("covariance_trace", 4, 8, 16, model="transformer",
                     seq_len=8)
  assert row["D"] == 16_448  # transformer_num_params(96, 8, 16, 4)
  assert row["peak_bytes"] > 0 and row["value"][0] > 0
  res = {"env": {"device": "cpu", "cpu_count": 2, "jax": "0"}, "n": 8,
         "width": 16, "model": "transformer", "seq_len": 8, "rows": [
             dict(row, chunk_size=4)]}
  assert "CharTransformer (width 16, 4 blocks)" in memory.markdown(res)


def test_gpu_check_script_runs_the_benchmarks_it_names():
  import subprocess
  here = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
  script = os.path.join(here, "gpu_check.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  text = open(script).read()
  for name in ("step_cost.py", "scale.py", "memory.py"):
    assert f"python {name}" in text and os.path.exists(os.path.join(here,
                                                                    name))
  assert "--preset msgd_paper" in text  # the M-SGD study at full length
  assert "--dataset fortunes --preset gpu" in text
  # Its steps' limits fit the 11 min 45 s it is given.
  import re
  limits = [int(x) for x in re.findall(r"^\s*step (\d+) ", text, re.M)]
  assert len(limits) == 7 and sum(limits) <= 705, limits
  usage = subprocess.run(["bash", script], capture_output=True, text=True,
                         check=False)
  assert usage.returncode != 0 and "usage" in usage.stderr


def test_study_steps_runs_the_study_as_its_long_preset_does(tmp_path,
                                                            monkeypatch):
  """``study_steps.py`` on the tiny preset (fake IDX files, theta_GD a
  tiny run would start from): one row per dynamics, products counted."""
  import study_steps
  from conftest import write_fake_split

  import train
  import models
  import configs

  data = tmp_path / "data"
  data.mkdir()
  write_fake_split(data, "train", 60, seed=1)
  write_fake_split(data, "test", 120, seed=2)
  monkeypatch.setenv("ANISONOISE_FASHION_MNIST_DIR", str(data))
  cfg = configs.PRESETS["fashion_mnist"]["tiny"]
  assert study_steps.scan_length(cfg) == 2
  theta = str(tmp_path / "theta_gd.msgpack")
  train.save_checkpoint(theta, models.create(cfg, 0)[0], {})
  _run(study_steps, monkeypatch, theta, "--preset", "tiny", "--steps", "4",
       "--out", str(tmp_path))
  res = json.load(open(tmp_path / "study_steps_tiny.json"))
  assert list(res["dynamics"]) == ["GD", "GLD leading", "GLD Hessian"]
  assert res["dynamics"]["GLD Hessian"]["num_matvecs"] > 0
  assert "min per 1,000 steps" in study_steps.markdown(res)


def test_multi_process_table():
  """``multi_process.py``'s table from a record of the worker's fields."""
  import multi_process
  row = {"devices": 2, "processes": 1, "hessian_noise_step_s": 0.5,
         "gd_step_s": 0.1, "hessian_spectrum_s": 2.0, "num_params": 11330,
         "all_reduce_bytes_gradient": 45320, "all_reduce_bytes_hvp": 45320}
  res = {"environment": {"backend": "cpu", "cpu_count": 2, "jax": "0"},
         "layouts": {"1 process x 2 devices": row,
                     "2 processes x 1 device": dict(row, gd_step_s=0.2)}}
  table = multi_process.markdown(res)
  assert "| ratio | 2.00 | 1.00 |" in table and "45,320 bytes" in table
