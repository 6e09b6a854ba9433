"""Every transform and diagnostic on 8 (forced CPU) devices equals one device.

The worker runs in a subprocess because the device count is fixed when JAX
starts. Cases: the seven transforms (and the Hutchinson trace) inside a
jitted step, the top-5 Hessian spectrum, both escape indicators, Tr(C) and
the expected sharpness; each with the whole batch in one pass, and one of
each kind of pass in chunks of 16; on a mesh with Explicit axes, and the
low-rank draws with Auto axes (every one-pass case under ``slow``).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import forced_devices_env, write_fake_split

# One xdist worker runs the whole module (``--dist loadfile``): its
# fixtures are computed once.

WORKER = pathlib.Path(__file__).with_name("multidevice_worker.py")


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
  """IDX files in the standard format for ``examples/data_parallel.py``."""
  path = tmp_path_factory.mktemp("data_parallel")
  write_fake_split(path, "train", 64)
  return path


@pytest.fixture(scope="module")
def worker(example_dir):
  """One subprocess for every multi-device test: the cases, then the
  data-parallel example."""
  return _run_worker("--loop-krylov", "--data-parallel", str(example_dir),
                     str(example_dir / "out"), "--cli-only")


def _run_worker(*args):
  proc = subprocess.run([sys.executable, str(WORKER), *args],
                        env=forced_devices_env(8), capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def results(worker):
  """The cases' records."""
  return {k: v for k, v in worker.items() if k != "data_parallel"}


# About 3 minutes on the 2-core CPU (the LeNet's chunked Hessian noise
# compiled for 8 devices), so in the slow set. Its fast counterparts: the
# worker's hessian_noise@chunk16 case (the same transform, chunked, on an
# 8-device mesh, against one device) and the command-line test below.
@pytest.mark.slow
def test_data_parallel_example_on_8_devices(example_dir):
  """``examples/data_parallel.py`` runs unchanged on 8 forced CPU devices
  on IDX files in the standard format."""
  worker = _run_worker("--data-parallel", str(example_dir),
                       str(example_dir / "out"), "--cases", "none")
  assert worker["data_parallel"]["devices"] == 8
  rec = json.load(open(example_dir / "out" / "data_parallel.json"))
  assert rec["devices"] == 8 and len(rec["history"]) == 3
  for row in rec["history"]:
    assert np.isfinite(row["loss"]) and row["trace"] > 0
    assert row["eigenvalues"][0] >= row["eigenvalues"][1]
  # Refreshed at steps 0 and 2, cached at step 1.
  h = rec["history"]
  assert h[1]["eigenvalues"] == h[0]["eigenvalues"]
  assert h[2]["eigenvalues"] != h[1]["eigenvalues"]


def test_data_parallel_example_refuses_an_uneven_batch(worker):
  """A batch the devices cannot share evenly: a clear error from the
  example's command line."""
  error = worker["data_parallel"]["error"]
  assert error.startswith("error:") and "multiple of 8" in error


def test_all_cases_ran(results):
  names = {k.split("/", 1)[1] for k in results}
  assert len(names) == 22, sorted(names)
  assert sum(k.startswith("auto/") for k in results) == 3


# About a minute more of the 2-core CPU, so in the slow set: the default
# runs every case with Explicit axes and the draws with Auto axes, and the
# two-process test (tests/test_multiprocess.py) its cases with Auto axes.
@pytest.mark.slow
def test_every_unchunked_case_on_auto_axes():
  """Auto axes (the compiler places the intermediates): every unchunked
  transform and diagnostic equals one device, and gathers nothing but the
  exact indicator."""
  results = _run_worker("--loop-krylov", "--auto-all")
  auto = {k: v for k, v in results.items() if k.startswith("auto/")}
  assert len(auto) == 16, sorted(auto)
  off = {k: v["rel_diff"] for k, v in auto.items()
         if v["rel_diff"] > 3e-5 and "/same_draw/" not in k}
  assert not off, off
  gathered = {k: v["all_gathers"] for k, v in auto.items()
              if v["all_gathers"] and "escape_indicator_exact" not in k}
  assert not gathered, gathered


def test_mesh_matches_one_device_in_float32(results):
  """To float32 rounding of the reordered sums (a step's updates and
  state; a gathered or mis-reduced sum is off by O(1))."""
  worst = {k: v["rel_diff"] for k, v in results.items()
           if v["rel_diff"] > 3e-5 and "/same_draw/" not in k}
  assert not worst, worst


def test_the_same_key_draws_the_same_noise_on_the_mesh(results):
  """The low-rank noises at their defaults (``tol`` 3e-3, a cold and a
  warm refresh): the noise drawn on 8 devices is one device's to 1e-3
  (relative), whatever signs or rotations the two solves gave their
  eigenvectors."""
  draws = {k: v["rel_diff"] for k, v in results.items()
           if "/same_draw/" in k}
  assert len(draws) == 3 and max(draws.values()) <= 1e-3, draws


def test_nothing_is_gathered_but_the_exact_indicator(results):
  """Statistics are reduced (all-reduce), never the batch gathered; the
  exact Tr(H Sigma) all-gathers each chunk's centred gradients, by design
  (see its docstring)."""
  gathered = {k: v["all_gathers"] for k, v in results.items()
              if v["all_gathers"] and "escape_indicator_exact" not in k}
  assert not gathered, gathered
  reduced = [k for k, v in results.items() if "noise" in k
             and "isotropic_noise" != k.split("/")[1] and not v["all_reduces"]]
  assert not reduced, reduced
