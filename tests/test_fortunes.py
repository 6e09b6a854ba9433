"""The fortunes study (the character transformer, beyond the paper) at tiny
size on text it makes itself, and the corpus reader on files written here:
no test needs Debian's ``fortunes`` package."""

import json
import os
import sys

import matplotlib.image
import numpy as np
import pytest

from anisonoise import data

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "noisy_minima"))

import configs  # noqa: E402
import main as study  # noqa: E402
import train  # noqa: E402

TINY = configs.PRESETS["fortunes"]["tiny"]


def test_load_fortunes_reads_the_cookie_files(tmp_path):
  (tmp_path / "wisdom").write_text("Look before you leap.\n%\nTabs\there.\n%\n")
  (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
  (tmp_path / "art").write_text("caf\xe9 au lait\n%\n", encoding="latin-1")
  os.symlink(tmp_path / "wisdom", tmp_path / "wisdom.u8")
  text = data.load_fortunes(str(tmp_path))
  # Sorted file order, the "%" lines and the index files dropped.
  assert text == "caf\xe9 au lait\nLook before you leap.\nTabs\there."
  tokens = data.encode_text(text)
  assert tokens.dtype == np.int32 and len(tokens) == len(text)
  decoded = "".join(data.ALPHABET[t] for t in tokens)
  assert decoded == "caf? au lait\nLook before you leap.\nTabs here."
  assert len(data.ALPHABET) == 96
  windows = data.text_windows(tokens, 5, 4, seed=0)
  assert windows.shape == (5, 5)
  starts = [decoded.find("".join(data.ALPHABET[t] for t in w))
            for w in windows]
  assert all(s >= 0 for s in starts) and len(set(starts)) == 5
  with pytest.raises(data.DataError, match="from 12 tokens"):
    data.text_windows(tokens[:12], 20, 4, seed=0)


def test_load_fortunes_says_how_to_install(tmp_path):
  with pytest.raises(data.DataError, match="apt-get install fortunes"):
    data.load_fortunes(str(tmp_path))


def test_fortunes_config_checks():
  import dataclasses
  with pytest.raises(ValueError, match="goes with model='transformer'"):
    configs.check(dataclasses.replace(TINY, model="lenet"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fortunes_tiny"))
  study.main(["--dataset", "fortunes", "--preset", "tiny", "--out", out])
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


def test_tiny_run_tracks_the_papers_quantities(tiny_run):
  """Along the GD phase every ``track_every`` steps (and at its end): the
  top eigenvalues in descending order, Tr(H Sigma) and Tr(H Sigma_bar),
  the noise norms and each block's Hessian trace and top eigenvalue; the
  corrupted subset is whole sequences with random targets; the figures and
  the tables say sequences."""
  out, summary = tiny_run
  cfg = TINY
  assert summary["config"]["model"] == "transformer"
  assert summary["data"]["num_train"] == cfg.num_clean + cfg.num_corrupt
  assert summary["data"]["corrupted_indices"] == list(
      range(cfg.num_clean, cfg.num_clean + cfg.num_corrupt))
  # Targets redrawn per token: most of the corrupted ones changed.
  assert summary["data"]["corrupted_label_changed"] > (
      0.8 * cfg.num_corrupt * cfg.seq_len)
  tracked = [r for r in summary["gd"] if "track_eigenvalues" in r]
  assert [r["step"] for r in tracked] == [0, 3, 6]
  for r in tracked:
    ev = np.asarray(r["track_eigenvalues"])
    assert len(ev) == cfg.track_eigs and np.all(np.diff(ev) <= 1e-6)
    assert r["tr_h_sigma_bar"] > 0 and np.isfinite(r["tr_h_sigma"])
    assert r["noise_norm"] > 0 and r["grad_norm"] > 0
    assert sorted(r["blocks"]) == ["LayerNorms", "MLP 0", "attention 0",
                                   "embeddings", "read-out"]
    sizes = {k: b["size"] for k, b in r["blocks"].items()}
    assert sum(sizes.values()) == summary["num_params"]
    assert all(np.isfinite(b["trace"]) and np.isfinite(b["top"])
               for b in r["blocks"].values())
  img = matplotlib.image.imread(os.path.join(out, "tracking.png"))
  assert img.shape[0] > 100 and img.std() > 0.01
  table = open(os.path.join(out, "table.md")).read()
  assert "training sequences" in table and "±" in table and "+-" not in table
  tracking = train.tracking_table(summary)
  assert tracking.count("\n") == 1 + len(tracked)
  assert "attention 0: share of Tr H" in tracking
  text = train.escape_summaries([summary, summary])
  assert text.count("Seed 0:") == 2
  assert "corrupted" in text
