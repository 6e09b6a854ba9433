"""The Fashion-MNIST loader and the paper's corrupted training set."""

import gzip
import os

import numpy as np
import pytest

from anisonoise import data
from conftest import write_fake_split, write_idx


def _fake_dir(tmp_path, n=12, split="train"):
  return write_fake_split(tmp_path, split, n)


def test_roundtrip(tmp_path):
  images, labels = _fake_dir(tmp_path)
  got_x, got_y = data.load_fashion_mnist("train", data_dir=str(tmp_path))
  np.testing.assert_array_equal(got_x, images)
  np.testing.assert_array_equal(got_y, labels)


def test_environment_variable_overrides_default(tmp_path, monkeypatch):
  images, _ = _fake_dir(tmp_path, split="test")
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
  got_x, _ = data.load_fashion_mnist("test")
  np.testing.assert_array_equal(got_x, images)


def test_wrong_magic_names_the_file(tmp_path):
  _fake_dir(tmp_path)
  path = tmp_path / data.FILES["train"][1]
  write_idx(path, np.zeros(12), magic=0x00000803)
  with pytest.raises(data.DataError, match=f"{path}: magic number"):
    data.load_fashion_mnist("train", data_dir=str(tmp_path))


def test_truncated_file_names_the_file(tmp_path):
  _fake_dir(tmp_path)
  path = tmp_path / data.FILES["train"][0]
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-100])
  with pytest.raises(data.DataError, match=f"{path}: header declares"):
    data.load_fashion_mnist("train", data_dir=str(tmp_path))


def test_not_gzip_names_the_file(tmp_path):
  _fake_dir(tmp_path)
  path = tmp_path / data.FILES["train"][0]
  path.write_bytes(b"this is not gzip")
  with pytest.raises(data.DataError, match=f"{path}: not a readable gzip"):
    data.load_fashion_mnist("train", data_dir=str(tmp_path))


def test_label_count_mismatch(tmp_path):
  _fake_dir(tmp_path)
  write_idx(tmp_path / data.FILES["train"][1], np.zeros(11))
  with pytest.raises(data.DataError, match="12 images but .* 11 labels"):
    data.load_fashion_mnist("train", data_dir=str(tmp_path))


def test_missing_data_names_both_ways(tmp_path):
  missing = tmp_path / "nowhere"
  os.makedirs(missing)
  with pytest.raises(data.DataError,
                     match="apt-get install dataset-fashion-mnist.*tfds"):
    data.load_fashion_mnist("train", data_dir=str(missing), source="idx")


def test_corruption_recipe():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(1500, 28, 28)).astype(np.uint8)
  labels = rng.integers(0, 10, size=1500).astype(np.uint8)
  a = data.corrupted_training_set(images, labels, seed=3)
  b = data.corrupted_training_set(images, labels, seed=3)
  c = data.corrupted_training_set(images, labels, seed=4)
  assert a.x.shape == (1200, 28, 28, 1) and a.x.dtype == np.float32
  assert a.x.min() >= -1.0 and a.x.max() <= 1.0
  np.testing.assert_allclose(a.x[..., 0], images[:1200] / 127.5 - 1,
                             atol=1e-6)  # float32 rounding
  assert a.corrupted.sum() == 200 and not a.corrupted[:1000].any()
  np.testing.assert_array_equal(a.y[:1000], labels[:1000])
  np.testing.assert_array_equal(a.y_true, labels[:1200])
  np.testing.assert_array_equal(a.y, b.y)
  assert np.any(a.y[1000:] != c.y[1000:])
  # Uniform redraws: about 1/10 coincide with the true label (binomial sd
  # sqrt(200 * 0.09) ~ 4.2; 5 sd bounds) and every class appears.
  same = int(np.sum(a.y[1000:] == a.y_true[1000:]))
  assert 20 - 22 <= same <= 20 + 22
  assert len(np.unique(a.y[1000:])) == 10


def test_corruption_recipe_of_the_authors_script():
  """The published script's variant: the first 1,500 here (6,000 there)
  images, positions 1000-1199 relabelled with the same draws as the 1,200
  variant, the rest clean."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(1500, 28, 28)).astype(np.uint8)
  labels = rng.integers(0, 10, size=1500).astype(np.uint8)
  text = data.corrupted_training_set(images, labels, seed=3)
  script = data.corrupted_training_set(images, labels, num_clean_after=300,
                                       seed=3)
  assert script.x.shape == (1500, 28, 28, 1)
  np.testing.assert_array_equal(np.flatnonzero(script.corrupted),
                                np.arange(1000, 1200))
  np.testing.assert_array_equal(script.y[:1200], text.y)
  np.testing.assert_array_equal(script.y[1200:], labels[1200:])
  with pytest.raises(ValueError, match="num_clean_after=-1"):
    data.corrupted_training_set(images, labels, num_clean_after=-1)
  with pytest.raises(ValueError, match="asked for 1600"):
    data.corrupted_training_set(images, labels, num_clean_after=400)


@pytest.mark.skipif(not os.path.isdir(data.DEFAULT_DIR),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_real_files():
  x, y = data.load_fashion_mnist("test", data_dir=data.DEFAULT_DIR)
  assert x.shape == (10_000, 28, 28) and y.shape == (10_000,)
  assert np.bincount(y).tolist() == [1000] * 10


def test_tfds_source_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    x, y = data.load_fashion_mnist("test", source="tfds")
  assert x.shape == (5, 28, 28) and x.dtype == np.uint8
  assert y.shape == (5,) and y.dtype == np.uint8 and y.max() <= 9
