"""The Fashion-MNIST study (Figs. 3, 5, 7, 8) at tiny size: every
artefact, checkpoints and resume equivalence, and its command line."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_fake_split

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "noisy_minima"))

import anisonoise  # noqa: E402
import configs  # noqa: E402
import main as study  # noqa: E402
import models  # noqa: E402
import train as fm  # noqa: E402

# One xdist worker runs the whole module (``--dist loadfile``): its
# fixtures are computed once.

TINY = configs.PRESETS["fashion_mnist"]["tiny"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fmnist")
  write_fake_split(d, "train", 60, seed=1)
  write_fake_split(d, "test", 120, seed=2)
  return str(d)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("tiny")
  return str(out), fm.run(str(out), TINY, seed=0, data_dir=data_dir)


def test_schedule():
  assert fm.schedule(10, 4) == [4, 8, 10]
  assert fm.schedule(100, 25, early=10, early_every=5) == [5, 10, 25, 50, 75,
                                                            100]


def test_checkpoint_roundtrip_with_prng_keys(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  tx = anisonoise.hessian_noise(2, key=3)
  state = tx.init(params)
  path = str(tmp_path / "c.msgpack")
  fm.save_checkpoint(path, (params, state), {"t": 7})
  back, record = fm.load_checkpoint(path, (params, tx.init(params)))
  assert record == {"t": 7}
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves((params, state))):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)
  assert not os.path.exists(path + ".tmp")
  # A template of another shape is refused with a message.
  with pytest.raises(fm.ConfigMismatch, match="shape"):
    fm.load_checkpoint(path, ({"w": jnp.zeros((3, 3)), "b": jnp.ones(3)},
                              state))


def test_a_checkpoint_of_an_earlier_noise_says_what_wrote_it(capsys):
  """A GLD leading checkpoint of the committed long runs, written by an
  earlier noise state: refused with what wrote it and what to do; one of
  today's shapes without the revision resumes with a note."""
  path = os.path.join(EXAMPLES, "results", "fmnist_long", "low_rank_2000",
                      "seed1", "checkpoints", "dyn_gld_leading.msgpack")
  cfg = configs.PRESETS["fashion_mnist"]["long"]
  params, _, _ = models.create(cfg, 1)
  tx = fm.make_tx("GLD leading", cfg, 1)
  with pytest.raises(fm.ConfigMismatch,
                     match="earlier anisonoise.*--restart.*git log"):
    fm.load_checkpoint(path, (params, tx.init(params)))
  fm._check_revision(path, {"t": 10})
  assert "earlier anisonoise" in capsys.readouterr().err
  fm._check_revision(path, {"t": 10, "noise": fm.NOISE_REVISION})
  assert capsys.readouterr().err == ""


def test_unknown_dynamics_is_refused(tmp_path, data_dir):
  cfg = dataclasses.replace(TINY, dynamics=("GD", "Adam"))
  with pytest.raises(ValueError, match="unknown dynamics"):
    fm.run(str(tmp_path), cfg, data_dir=data_dir)


def test_tiny_run_writes_every_artefact(tiny_run):
  out, summary = tiny_run
  with open(os.path.join(out, "results.json")) as f:
    on_disk = json.load(f)
  summary = dict(summary)
  summary.pop("timings")
  assert on_disk == json.loads(json.dumps(summary))

  # The corrupted set: the last 10 of the first 50 images, recorded.
  assert on_disk["data"]["num_train"] == 50
  assert on_disk["data"]["corrupted_indices"] == list(range(40, 50))
  assert on_disk["num_params"] == 11_330

  # GD phase: evaluations at 0, 3, 6 with accuracies in [0, 1].
  assert [r["step"] for r in on_disk["gd"]] == [0, 3, 6]
  assert set(on_disk["dynamics"]) == set(anisonoise.DYNAMICS)
  for name, hist in on_disk["dynamics"].items():
    # The preset runs GD for 2 steps (dynamics_steps), the rest for 4.
    assert [r["step"] for r in hist] == ([0, 2] if name == "GD" else
                                         [0, 2, 4]), name
    assert on_disk["table"][name]["steps"] == hist[-1]["step"]
    assert all(r["distance"] > 0 for r in hist[1:])
    for r in hist:
      for key in ("train_acc", "train_acc_clean", "train_acc_corrupted",
                  "test_acc"):
        assert 0.0 <= r[key] <= 1.0
      assert np.isfinite(r["train_loss"]) and r["train_loss"] > 0
    assert "sharpness" in hist[-1] and np.isfinite(hist[-1]["sharpness"])
    # Every dynamics starts from theta_GD.
    assert hist[0]["train_loss"] == on_disk["gd"][-1]["train_loss"]

  # Deterministic GD and noisy dynamics leave theta_GD differently.
  final = {n: h[-1]["train_loss"] for n, h in on_disk["dynamics"].items()}
  for name in anisonoise.DYNAMICS:
    if name != "GD":
      assert final[name] != final["GD"], name

  # Fig. 5 left: descending Hessian eigenvalues with small residuals.
  ev = np.asarray(on_disk["spectrum"]["eigenvalues"])
  assert ev.shape == (4,) and np.all(np.diff(ev) <= 1e-6 * abs(ev[0]))
  # The tiny preset's basis of 8 may not reach 1e-3 within its budget of
  # 80 products; the record says which.
  assert isinstance(on_disk["spectrum"]["converged"], bool)
  assert 8 <= on_disk["spectrum"]["num_matvecs"] <= 80
  # Fig. 5 middle/right and Fig. 7 along SGD.
  for r in on_disk["dynamics"]["SGD"]:
    # (Hutchinson with 2 probes may go negative off a minimum: finite only.)
    assert r["noise_norm"] > 0 and r["grad_norm"] > 0
    for key in ("tr_h_sigma", "tr_h_sigma_bar", "projection_coefficient"):
      assert np.isfinite(r[key]), key

  # SGD's stability at theta_GD: one top eigenvalue per random minibatch,
  # with the corrupted examples it holds (recounted from the same draws).
  st = on_disk["stability"]
  assert len(st["lambda_1"]) == TINY.stability_batches
  assert st["limit"] == pytest.approx(2 / TINY.lr)
  assert st["fraction_unstable"] == np.mean(np.array(st["lambda_1"])
                                            > st["limit"])
  corrupted = np.zeros(50, bool)
  corrupted[40:] = True
  for i, c in enumerate(st["num_corrupted"]):
    key = jax.random.fold_in(jax.random.key(0 + 29), i)
    idx = jax.random.choice(key, 50, (TINY.batch_size,), replace=False)
    assert c == corrupted[np.asarray(idx)].sum()

  table = open(os.path.join(out, "table.md")).read()
  for name in anisonoise.DYNAMICS:
    assert f"| {name} |" in table
  import matplotlib.image
  for fig in ("fig3", "fig5", "fig7", "fig8", "stability"):
    img = matplotlib.image.imread(os.path.join(out, f"{fig}.png"))
    assert img.shape[0] > 300 and img.std() > 0.01, fig

  # theta_GD is saved and loads into the model's parameters.
  params, _, _ = models.create(TINY, 0)
  theta, record = fm.load_checkpoint(os.path.join(out, "theta_gd.msgpack"),
                                     params)
  assert record["t"] == TINY.gd_steps
  assert sum(x.size for x in jax.tree.leaves(theta)) == 11_330


class _Killed(Exception):
  pass


def test_killed_run_resumes_to_the_same_numbers(tmp_path, data_dir,
                                                monkeypatch, tiny_run):
  """Killed twice (in the GD phase, then inside a dynamics), started again
  each time: the results equal the uninterrupted run's."""
  _, reference = tiny_run
  cfg = dataclasses.replace(TINY, dynamics=("GLD Hessian", "SGD"))
  out = str(tmp_path / "resumed")
  calls = {"n": 0}

  def kill_at(*points):
    def hook(path):
      calls["n"] += 1
      if calls["n"] in points:
        raise _Killed(path)
    return hook

  # Checkpoints: GD at 0, 3, 6; theta_GD; GLD Hessian at 0, 2, 4; SGD ...
  monkeypatch.setattr(fm, "_on_checkpoint", kill_at(2, 6))
  with pytest.raises(_Killed, match="gd.msgpack"):
    fm.run(out, cfg, data_dir=data_dir, plot=False)
  with pytest.raises(_Killed, match="gld_hessian"):
    fm.run(out, cfg, data_dir=data_dir, plot=False)
  resumed = fm.run(out, cfg, data_dir=data_dir, plot=False)
  assert calls["n"] > 6
  assert resumed["gd"] == reference["gd"]
  assert resumed["spectrum"] == reference["spectrum"]
  for name in cfg.dynamics:
    assert resumed["dynamics"][name] == reference["dynamics"][name], name

  # Resuming with other settings is refused, not silently mixed.
  other = dataclasses.replace(cfg, lr=0.05)
  with pytest.raises(fm.ConfigMismatch, match="different settings"):
    fm.run(out, other, data_dir=data_dir, plot=False)


def test_finished_dynamics_extends_from_its_checkpoint(tmp_path, data_dir,
                                                      tiny_run):
  """A dynamics asked for more steps than it ran goes on from its last
  checkpoint and ends where a run straight to that step ends; asked for
  fewer, it reports up to that step."""
  _, reference = tiny_run
  out = str(tmp_path / "extended")
  short = dataclasses.replace(TINY, dynamics=("GD",))
  longer = dataclasses.replace(short, dynamics_steps=(("GD", 4),))
  first = fm.run(out, short, data_dir=data_dir, plot=False)
  assert first["dynamics"]["GD"] == reference["dynamics"]["GD"]
  extended = fm.run(out, longer, data_dir=data_dir, plot=False)
  assert extended["timings"]["gd"] < first["timings"]["gd"]  # reused
  hist = extended["dynamics"]["GD"]
  assert [r["step"] for r in hist] == [0, 2, 4]
  assert hist[:2] == first["dynamics"]["GD"]
  straight = fm.run(str(tmp_path / "straight"), longer, data_dir=data_dir,
                    plot=False)
  assert straight["dynamics"]["GD"][-1] == hist[-1]
  again = fm.run(out, short, data_dir=data_dir, plot=False)
  assert again["dynamics"]["GD"] == first["dynamics"]["GD"]


def test_study_grows_one_dynamics_at_a_time(tmp_path, data_dir, tiny_run,
                                            capsys):
  """Naming one more dynamics keeps those an earlier call ran from the same
  theta_GD in results.json, even without their checkpoints; from another
  theta_GD or other settings they are dropped, and the message says so."""
  _, reference = tiny_run
  out = str(tmp_path / "grown")
  fm.run(out, dataclasses.replace(TINY, dynamics=("GD",)), data_dir=data_dir,
         plot=False)
  os.remove(os.path.join(out, "checkpoints", "dyn_gd.msgpack"))
  sgd = dataclasses.replace(TINY, dynamics=("SGD",))
  grown = fm.run(out, sgd, data_dir=data_dir, plot=False)
  assert list(grown["dynamics"]) == ["GD", "SGD"]
  for name in ("GD", "SGD"):
    assert grown["dynamics"][name] == reference["dynamics"][name], name
  on_disk = json.load(open(os.path.join(out, "results.json")))
  assert on_disk["config"]["dynamics"] == ["GD", "SGD"]
  assert set(on_disk["table"]) == {"GD", "SGD"}
  table = open(os.path.join(out, "table.md")).read()
  assert "| GD |" in table and "| SGD |" in table
  assert "dropping" not in capsys.readouterr().err

  # Another theta_GD behind the stored GD: dropped, not mixed in.
  on_disk["gd"][-1]["test_acc"] += 0.01
  json.dump(on_disk, open(os.path.join(out, "results.json"), "w"))
  again = fm.run(out, sgd, data_dir=data_dir, plot=False)
  assert list(again["dynamics"]) == ["SGD"]
  err = capsys.readouterr().err
  assert "dropping ['GD']" in err and "GD history differs" in err

  # An unreadable file (a run killed while writing it) is replaced.
  with open(os.path.join(out, "results.json"), "w") as f:
    f.write('{"dynamics": {"GD": [')
  again = fm.run(out, sgd, data_dir=data_dir, plot=False)
  assert list(again["dynamics"]) == ["SGD"]
  assert "cannot be read" in capsys.readouterr().err

  # Other settings (another lr): the earlier dynamics are dropped.
  other = fm.run(out, dataclasses.replace(TINY, lr=TINY.lr / 2,
                                          dynamics=("GLD const",)),
                 data_dir=data_dir, plot=False)
  assert list(other["dynamics"]) == ["GLD const"]
  err = capsys.readouterr().err
  assert "dropping ['SGD']" in err and "different settings" in err


def test_seeds_combine_into_mean_and_standard_error(tmp_path, tiny_run,
                                                    capsys):
  out, summary = tiny_run
  other = json.loads(json.dumps({k: v for k, v in summary.items()
                                 if k != "timings"}))
  other["config"]["seed"] = 1
  for name, row in other["table"].items():
    row["test_acc"] = summary["table"][name]["test_acc"] + 0.1
  d1 = tmp_path / "seed1"
  d1.mkdir()
  (d1 / "results.json").write_text(json.dumps(other))
  combined = str(tmp_path / "combined")
  study.main(["--combine", out, str(d1), "--out", combined])
  table = open(os.path.join(combined, "seeds.md")).read()
  assert "seeds [0, 1]" in table
  acc = summary["table"]["SGD"]["test_acc"]
  # Two seeds a and a + 0.1: mean a + 0.05, standard error 0.05.
  assert f"| SGD | 4 | {acc + 0.05:.4f} ± 0.0500 |" in table
  assert "Not run by every seed" not in table
  import matplotlib.image
  img = matplotlib.image.imread(os.path.join(combined, "fig3_seeds.png"))
  assert img.shape[1] > 2 * img.shape[0] and img.std() > 0.01
  # A seed that has not run every dynamics yet: the others are combined,
  # and the missing one is named.
  del other["table"]["GD"], other["dynamics"]["GD"]
  other["config"]["dynamics"] = [d for d in other["config"]["dynamics"]
                                 if d != "GD"]
  (d1 / "results.json").write_text(json.dumps(other))
  study.main(["--combine", out, str(d1), "--out", combined])
  table = open(os.path.join(combined, "seeds.md")).read()
  assert "| GD |" not in table and f"| SGD | 4 | {acc + 0.05:.4f}" in table
  assert "Not run by every seed (left out above): GD (seeds [0])." in table
  # Runs of different settings are refused.
  other["config"]["lr"] = 0.5
  (d1 / "results.json").write_text(json.dumps(other))
  with pytest.raises(SystemExit):
    study.main(["--combine", out, str(d1), "--out", combined])
  assert "runs differ in ['lr']" in capsys.readouterr().err
  # A run stored before a setting existed has that setting's default: the
  # tiny preset's 8 stability iterations differ from it, the default not.
  other["config"]["lr"] = summary["config"]["lr"]
  del other["config"]["stability_iters"]
  (d1 / "results.json").write_text(json.dumps(other))
  with pytest.raises(SystemExit):
    study.main(["--combine", out, str(d1), "--out", combined])
  assert "runs differ in ['stability_iters']" in capsys.readouterr().err
  d0 = tmp_path / "seed0"
  d0.mkdir()
  mine = json.loads(json.dumps({k: v for k, v in summary.items()
                                if k != "timings"}))
  mine["config"]["stability_iters"] = configs.Config().stability_iters
  (d0 / "results.json").write_text(json.dumps(mine))
  study.main(["--combine", str(d0), str(d1), "--out", combined])
  assert "seeds [0, 1]" in open(os.path.join(combined, "seeds.md")).read()


def test_collapse_replays_the_first_steps_with_their_curvature(
    tiny_run, data_dir, tmp_path, capsys):
  """``--collapse``: the first steps of a dynamics from the run's theta_GD
  are the run's own (the same draws), each with the Hessian's top
  eigenvalue (the full batch's, and for SGD its minibatch's)."""
  out, summary = tiny_run
  res = fm.collapse(out, TINY, 0, data_dir, steps=2, names=("SGD",))
  rows = res["dynamics"]["SGD"]
  assert [r["step"] for r in rows] == [0, 1, 2]
  ran = {r["step"]: r for r in summary["dynamics"]["SGD"]}
  for r in rows:
    if r["step"] in ran:
      assert r["train_loss"] == pytest.approx(ran[r["step"]]["train_loss"],
                                              rel=1e-5)
      assert r["distance"] == pytest.approx(ran[r["step"]].get(
          "distance", 0.0), rel=1e-4, abs=1e-7)
  # lambda_1 at theta_GD agrees with the run's spectrum within the
  # tolerance asked (1e-2 of lambda_1).
  lam = summary["spectrum"]["eigenvalues"][0]
  assert rows[0]["lambda_1"] == pytest.approx(lam, rel=1.5e-2)
  assert all(r["minibatch_lambda_1"] > 0 for r in rows[:-1])
  assert all(0 <= r["minibatch_corrupted"] <= TINY.batch_size
             for r in rows[:-1])
  assert res["limit"] == pytest.approx(2 / TINY.lr)
  assert os.path.exists(os.path.join(out, "collapse.png"))
  with pytest.raises(SystemExit):
    study.main(["--preset", "tiny", "--out", str(tmp_path), "--data-dir",
                data_dir, "--collapse", "2"], dataset_default="fashion_mnist")
  assert "theta_gd.msgpack does not exist" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
  empty = tmp_path / "nothing-here"
  empty.mkdir()
  with pytest.raises(SystemExit) as exc:
    study.main(["--preset", "tiny", "--out", str(tmp_path / "o"),
                "--data-dir", str(empty)], dataset_default="fashion_mnist")
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "error:" in err and str(empty) in err


def test_fashion_mnist_command_keeps_its_options(tmp_path):
  """``examples/fashion_mnist.py`` is the study's command with
  ``--dataset fashion_mnist``: an unknown preset is named in the error."""
  import subprocess
  r = subprocess.run(
      [sys.executable, os.path.join(EXAMPLES, "fashion_mnist.py"),
       "--preset", "cpu", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert "unknown preset 'cpu' for fashion_mnist" in r.stderr
  assert ("['paper', 'quick', 'long', 'long_authors', 'msgd_paper', 'msgd',"
          " 'tiny']") in r.stderr


def test_time_limit_stops_cleanly_and_the_next_call_goes_on(
    tmp_path, data_dir, tiny_run, capsys):
  """``time_limit``: no new segment after it; everything run so far is in
  the checkpoints, and the same call without the limit ends where an
  uninterrupted run ends. On the command line: exit status 3."""
  _, reference = tiny_run
  cfg = dataclasses.replace(TINY, dynamics=("GD",))
  out = str(tmp_path / "limited")
  with pytest.raises(fm.TimeLimit, match="GD to theta_GD: stopped at step 0"):
    fm.run(out, cfg, data_dir=data_dir, plot=False, time_limit=0)
  assert os.listdir(os.path.join(out, "checkpoints")) == ["gd.msgpack"]
  assert not os.path.exists(os.path.join(out, "results.json"))
  done = fm.run(out, cfg, data_dir=data_dir, plot=False, time_limit=600)
  assert done["gd"] == reference["gd"]
  assert done["dynamics"]["GD"] == reference["dynamics"]["GD"]
  with pytest.raises(SystemExit) as exc:
    study.main(["--preset", "tiny", "--out", str(tmp_path / "cli"),
                "--data-dir", data_dir, "--dynamics", "GD", "--time-limit",
                "0"], dataset_default="fashion_mnist")
  assert exc.value.code == study.TIME_LIMIT_STATUS == 3
  assert "Run the same command again to go on." in capsys.readouterr().err


@pytest.mark.slow  # six processes: two minutes on one core
def test_long_runs_script_resumes_across_calls(tmp_path, data_dir):
  """``long_runs.sh``: a call whose time is up exits with status 3 having
  run nothing; the next call runs the preset pass and the full pass
  (``STEPS``) of every seed and combines the seeds."""
  import subprocess
  script = os.path.join(EXAMPLES, "noisy_minima", "long_runs.sh")
  env = dict(os.environ, PRESETS="tiny", SEEDS="0 1")
  out = str(tmp_path / "runs")
  args = ["bash", script, out]
  opts = ["6", "--data-dir", data_dir, "--dynamics", "GD"]
  r = subprocess.run(args + ["0"] + opts, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 3, r.stderr
  assert "time limit reached before tiny seed 0" in r.stdout
  r = subprocess.run(args + ["600"] + opts, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "every run finished" in r.stdout
  for seed in (0, 1):
    with open(os.path.join(out, "tiny", f"seed{seed}", "results.json")) as f:
      res = json.load(f)
    assert res["table"]["GD"]["steps"] == 6 and res["config"]["seed"] == seed
  table = open(os.path.join(out, "tiny", "seeds.md")).read()
  assert "seeds [0, 1]" in table and "| GD | 6 |" in table
  r = subprocess.run(["bash", script], capture_output=True, text=True)
  assert r.returncode == 2
  assert "usage: bash" in r.stderr
  assert "long_runs.sh OUT_DIR SECONDS" in r.stderr


def test_msgd_preset_trains_from_initialisation_on_wu2020s_split(
    tmp_path_factory):
  """Wu et al.'s Fig. 1(a) protocol at tiny size (two of its dynamics;
  the M-SGD transforms are tested in test_family.py, SGD's path in the
  tiny run above): the training images are the test file's first, the
  test images the training file's, raw 0-255 pixels, every parameter
  N(0, 0.02^2), no GD phase (every dynamics starts from the same
  initialisation), M-SGD rows from the library's table."""
  d = tmp_path_factory.mktemp("wu2020")
  train_images, train_labels = write_fake_split(d, "train", 30, seed=3)
  test_images, test_labels = write_fake_split(d, "test", 50, seed=4)
  cfg = dataclasses.replace(
      configs.PRESETS["fashion_mnist"]["msgd"], num_clean=20, num_test=30,
      steps=4, batch_size=5, estimation_size=10, early_steps=2,
      early_eval_every=2, eval_every=2, sharpness_every=4,
      sharpness_samples=4, dynamics=("GD", "MSGD-Cov-B"))
  paper = configs.PRESETS["fashion_mnist"]["msgd_paper"]
  assert (paper.lr, paper.steps, paper.init, paper.pixels, paper.gd_steps,
          paper.num_clean, paper.num_corrupt) == (
              0.01, 10_001, "normal", "raw", 0, 1000, 0)

  data = fm.input_pipeline.load(cfg, str(d), seed=0)
  np.testing.assert_array_equal(data.train["y"], test_labels[:20])
  np.testing.assert_array_equal(data.test["y"], train_labels[:30])
  # Raw pixels: patch 0 of image 0 is its top-left 5x5 block, unscaled.
  np.testing.assert_array_equal(
      np.asarray(data.train["x"][0, 0]), test_images[0, :5, :5].ravel())
  params, _, _ = models.create(cfg, seed=0)
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
  assert flat.size == 11_330 and abs(flat.std() - 0.02) < 0.002
  assert np.all(flat != 0)  # biases drawn too

  out = str(tmp_path_factory.mktemp("msgd"))
  summary = fm.run(out, cfg, seed=0, data_dir=str(d))
  assert len(summary["gd"]) == 1 and summary["gd"][0]["step"] == 0
  assert list(summary["dynamics"]) == list(cfg.dynamics)
  start = summary["gd"][0]["train_loss"]
  finals = set()
  for name, hist in summary["dynamics"].items():
    assert [r["step"] for r in hist] == [0, 2, 4], name
    assert hist[0]["train_loss"] == start  # from the initialisation
    finals.add(hist[-1]["train_loss"])
  assert len(finals) == len(cfg.dynamics)  # each its own noise
  table = open(os.path.join(out, "table.md")).read()
  assert "from initialisation" in table and "| MSGD-Cov-B |" in table
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [
      "fig3.png", "fig8.png"]
  seeds = fm.seeds_table([summary, dict(summary, config=dict(
      summary["config"], seed=1))])
  assert "test acc - initialisation's" in seeds and "corrupted" not in seeds
