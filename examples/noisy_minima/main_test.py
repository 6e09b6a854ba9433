"""Smoke test of the study package: the VGG11 path at tiny size (synthetic
images), its artefacts and figures, and the command line's errors. The
Fashion-MNIST study's own tests are ``tests/test_fashion_mnist.py``."""

import dataclasses
import glob
import json
import os

import matplotlib.image
import numpy as np
import pytest
from flax import serialization

import anisonoise
import configs
import main
import train

# One xdist worker runs the whole module (``--dist loadfile``): its
# fixtures are computed once.


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("svhn_tiny"))
  main.main(["--dataset", "svhn", "--preset", "tiny", "--out", out])
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


# The VGG11 path of the study at tiny width: 3-6 minutes of compilation on
# the 2-core CPU, so in the slow set. Its fast counterparts: the same
# protocol code (train.py, every phase and artefact) on the LeNet in
# tests/test_fashion_mnist.py (test_tiny_run_writes_every_artefact), the
# VGG11 network in tests/test_models.py, the SVHN/CIFAR-10 loaders in
# tests/test_colour_data.py, and this file's command-line tests.
@pytest.mark.slow
def test_vgg_tiny_run_writes_every_artefact(vgg_run):
  out, summary = vgg_run
  cfg = configs.PRESETS["svhn"]["tiny"]
  assert summary["config"]["model"] == "vgg11"
  assert summary["data"] == {
      "num_train": cfg.num_train, "num_corrupted": 0, "corrupted_indices": [],
      "corrupted_label_changed": 0, "num_test": cfg.num_test}
  # The reduced-width network: every layer scaled, parameters counted.
  assert 0 < summary["num_params"] < 9_750_922
  assert list(summary["dynamics"]) == list(cfg.dynamics)
  for name, hist in summary["dynamics"].items():
    assert [r["step"] for r in hist] == [0, 2, 4], name
    assert "train_acc_corrupted" not in hist[-1]
    assert 0 <= hist[-1]["test_acc"] <= 1
    assert np.isfinite(hist[-1]["sharpness"])
    assert hist[0]["train_loss"] == summary["gd"][-1]["train_loss"]
  final = {n: h[-1]["train_loss"] for n, h in summary["dynamics"].items()}
  assert len(set(final.values())) == len(final)  # noise changed each run
  assert len(summary["spectrum"]["eigenvalues"]) == cfg.spectrum_eigs
  table = open(os.path.join(out, "table.md")).read()
  assert "corrupted" not in table
  for name in cfg.dynamics:
    assert f"| {name} |" in table
  for fig in ("fig1", "fig6", "fig8"):
    img = matplotlib.image.imread(os.path.join(out, f"{fig}.png"))
    assert img.shape[0] > 300 and img.std() > 0.01, fig


@pytest.mark.slow  # on the VGG run above
def test_figure1_joins_runs(vgg_run, tmp_path):
  out, _ = vgg_run
  path = str(tmp_path / "fig1.png")
  main.main(["--figure1", out, out, "--out", path])
  img = matplotlib.image.imread(path)
  assert img.shape[1] > 1.8 * img.shape[0]  # two panels side by side
  with pytest.raises(SystemExit):
    main.main(["--figure1", str(tmp_path), "--out", path])


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--dataset", "svhn", "--preset", "quick"],
     "unknown preset 'quick' for svhn; choose from ['paper', 'cpu', 'tiny']"),
    (["--dataset", "cifar10", "--preset", "tiny", "--dynamics", "Adam"],
     "unknown dynamics ['Adam']"),
    ([], "--dataset is required"),
])
def test_command_line_errors(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exc:
    main.main(argv + ["--out", str(tmp_path)])
  assert exc.value.code == 2
  assert message in capsys.readouterr().err


def test_missing_cifar10_names_every_way(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv(anisonoise.data.CIFAR10_ENV_VAR, raising=False)
  with pytest.raises(SystemExit):
    main.main(["--dataset", "cifar10", "--preset", "cpu", "--data-dir",
               str(tmp_path), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert str(tmp_path) in err and "ANISONOISE_CIFAR10_DIR" in err


def test_paper_presets_follow_the_appendix():
  for name, gd_steps, n in (("svhn", 3000, 25_000), ("cifar10", 4000,
                                                     50_000)):
    cfg = configs.PRESETS[name]["paper"]
    assert (cfg.model, cfg.vgg_width, cfg.lr, cfg.gd_lr, cfg.batch_size,
            cfg.const_std, cfg.refresh_diagonal, cfg.sharpness_samples,
            cfg.sharpness_delta) == ("vgg11", 1.0, 0.05, 0.05, 100, 1e-3, 10,
                                     100, 0.01)
    assert (cfg.gd_steps, cfg.num_train) == (gd_steps, n)
    assert cfg.dynamics == ("GD", "GLD const", "GLD dynamic", "GLD diag",
                            "SGD")
  assert configs.PRESETS["svhn"]["paper"].svhn_split == "paper"


def test_tx_comes_from_the_library_table():
  cfg = configs.PRESETS["fashion_mnist"]["paper"]
  for name in anisonoise.DYNAMICS:
    tx = train.make_tx(name, cfg, seed=0)
    assert hasattr(tx, "update"), name


def test_command_line_overrides_reach_the_config():
  """``--lr``, ``--steps`` and ``--dynamics`` override the preset; the GD
  phase to theta_GD keeps the preset's own learning rate."""
  _, args = main.parse_args(["--preset", "long", "--lr", "0.01", "--steps",
                             "500", "--dynamics", "SGD", "GD"],
                            dataset_default="fashion_mnist")
  cfg = main.config_from_args(args)
  preset = configs.PRESETS["fashion_mnist"]["long"]
  assert (cfg.lr, cfg.gd_lr, cfg.steps) == (0.01, preset.gd_lr, 500)
  assert cfg.dynamics == ("SGD", "GD") and cfg.dynamics_steps == ()
  assert cfg.steps_of("SGD") == 500


# The committed studies and the preset each was run with.
_STUDIES = {"fmnist_long": ("fashion_mnist", "long"),
            "fmnist_long_authors": ("fashion_mnist", "long_authors"),
            "fmnist_msgd": ("fashion_mnist", "msgd"),
            "fortunes": ("fortunes", "cpu")}


def test_committed_gd_checkpoints_resume_with_their_presets():
  """Every committed theta_GD checkpoint is accepted by its preset today,
  although most were written before some settings existed (those take
  their defaults); a changed setting is still refused."""
  results = os.path.join(os.path.dirname(__file__), "..", "results")
  paths = sorted(glob.glob(os.path.join(results, "**", "checkpoints",
                                        "gd.msgpack"), recursive=True))
  assert len(paths) >= 13
  for path in paths:
    study = os.path.relpath(path, results).split(os.sep)[0]
    with open(path, "rb") as f:
      record = json.loads(serialization.msgpack_restore(f.read())["record"])
    cfg = configs.get_config(*_STUDIES[study])
    want = {"phase": "gd", **train.gd_settings(
        dict(dataclasses.asdict(cfg), seed=record["config"]["seed"]))}
    assert train.same_settings(record["config"], want), path
    assert not train.same_settings(record["config"],
                                   dict(want, gd_lr=want["gd_lr"] / 2)), path
