"""Every transform and diagnostic on 8 (forced CPU) devices equals one device.

The worker runs in a subprocess because the device count is fixed when JAX
starts. Cases: the seven transforms (and the Hutchinson trace) inside a
jitted step, the top-5 Hessian spectrum, both escape indicators, Tr(C) and
the expected sharpness; each with the whole batch in one pass, and one of
each kind of pass in chunks of 16; on a mesh with Explicit axes and (one
pass) with Auto axes.
"""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import forced_devices_env

WORKER = pathlib.Path(__file__).with_name("multidevice_worker.py")


@pytest.fixture(scope="module")
def results():
  env = forced_devices_env(8)
  proc = subprocess.run([sys.executable, str(WORKER), "--loop-krylov"], env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


def test_all_cases_ran(results):
  names = {k.split("/", 1)[1] for k in results}
  assert len(names) == 19, sorted(names)
  assert sum(k.startswith("auto/") for k in results) == 13


def test_mesh_matches_one_device_in_float32(results):
  worst = {k: v["rel_diff"] for k, v in results.items()
           if v["rel_diff"] > 1e-5}
  assert not worst, worst


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
