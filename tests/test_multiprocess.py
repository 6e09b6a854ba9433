"""Two processes joined by ``jax.distributed`` equal one device.

``multiprocess_worker.py`` runs in 2 local processes of 2 CPU devices each
(a 4-device mesh, CPU collectives through gloo), each process building its
own half of the examples with ``jax.make_array_from_process_local_data``;
each compares its results with one of its devices alone. About a minute
of two cores: the default set is one launch.
"""

import json

import pytest
from multiprocess_worker import launch

# Float32 rounding of sums reduced in another order (a gathered or
# mis-reduced sum is off by O(1)).
ROUNDING = 3e-5
# The bound on the drawn noise across layouts, default settings.
SAME_DRAW = 1e-3


def _launch(tmp_path, *args):
  try:
    results = launch("--out", str(tmp_path), *args, timeout=420)
  except RuntimeError as e:
    pytest.fail(str(e), pytrace=False)
  assert len(results) == 2
  # Both processes computed the same global results.
  for a, b in zip(*[sorted((k, v["rel_diff"]) for k, v in r.items()
                           if isinstance(v, dict)) for r in results]):
    assert a == b, (a, b)
  return results[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _launch(tmp_path_factory.mktemp("multiprocess"))


def _check(results):
  assert results["devices"] == 4 and results["processes"] == 2
  cases = {k: v for k, v in results.items() if isinstance(v, dict)}
  off = {k: v["rel_diff"] for k, v in cases.items()
         if not v["rel_diff"] <= ROUNDING}
  assert not off, json.dumps(off)
  draws = {k: v["noise_rel_diff"] for k, v in cases.items()
           if "noise_rel_diff" in v}
  assert draws and all(v <= SAME_DRAW for v in draws.values()), draws
  return cases


def test_two_processes_equal_one_device(results):
  """GD + sgd_noise and GD + hessian_noise (refresh every 2: a cold and a
  warm refresh in 3 steps, default tol), hessian_spectrum and
  escape_indicator eager and jitted: to float32 rounding; the drawn noise
  to 1e-3."""
  cases = _check(results)
  assert {"sgd_noise", "hessian_noise", "hessian_spectrum/jit",
          "hessian_spectrum/eager", "escape_indicator/jit",
          "escape_indicator/eager"} <= set(cases)


def test_a_stream_each_process_reads_from_its_own_rows(results):
  """hessian_spectrum over a Batches stream of two global batches, each
  built by every process from its own rows of it: the one-device
  eigenvalues of the whole batch, to float32 rounding."""
  assert results["hessian_spectrum/batches"]["rel_diff"] <= ROUNDING


def test_an_orbax_checkpoint_resumes_across_processes(results):
  """Saved by both processes, restored onto the same shardings: the next
  step (a warm-started refresh) equals the uninterrupted one exactly."""
  assert results["checkpoint"]["rel_diff"] == 0.0


@pytest.mark.slow
def test_every_transform_and_diagnostic_on_two_processes(tmp_path):
  cases = _check(_launch(tmp_path, "--all"))
  assert len([k for k in cases if "/" not in k and k != "checkpoint"]) == 9
  assert len([k for k in cases if k.endswith("/jit")]) == 10
