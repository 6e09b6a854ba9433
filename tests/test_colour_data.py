"""The CIFAR-10 and SVHN loaders on files written in the exact standard
formats (pickled python-version batches, MATLAB .mat files), and the TFDS
path under ``tfds.testing.mock_data``."""

import os
import pickle

import numpy as np
import pytest

from anisonoise import data

PER_FILE = 6  # images per CIFAR-10 batch in these tests (10,000 for real)
SVHN_COUNTS = {"train": 7, "test": 5}


@pytest.fixture(autouse=True)
def small_counts(monkeypatch):
  monkeypatch.setattr(data, "CIFAR10_PER_FILE", PER_FILE)
  monkeypatch.setattr(data, "SVHN_SIZES", dict(SVHN_COUNTS))
  monkeypatch.delenv(data.CIFAR10_ENV_VAR, raising=False)
  monkeypatch.delenv(data.SVHN_ENV_VAR, raising=False)


def write_cifar(root, seed=0, per_file=PER_FILE):
  """A ``cifar-10-batches-py`` directory in the python-version format:
  each file a pickled dict with byte-string keys, ``data`` uint8 (N, 3072)
  channel-major, ``labels`` a list of ints."""
  d = root / "cifar-10-batches-py"
  d.mkdir()
  rng = np.random.default_rng(seed)
  out = {}
  for split, names in data.CIFAR10_FILES.items():
    imgs, labs = [], []
    for name in names:
      x = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
      y = rng.integers(0, 10, per_file).tolist()
      with open(d / name, "wb") as f:
        pickle.dump({b"batch_label": name.encode(),
                     b"data": x.reshape(per_file, 3072), b"labels": y,
                     b"filenames": [b"x.png"] * per_file}, f)
      imgs.append(x.transpose(0, 2, 3, 1))
      labs.append(np.asarray(y, np.uint8))
    out[split] = (np.concatenate(imgs), np.concatenate(labs))
  return d, out


def write_svhn(root, seed=0, counts=None):
  """``train_32x32.mat`` / ``test_32x32.mat``: ``X`` (32, 32, 3, N) uint8 and
  ``y`` (N, 1) in 1..10 (10 is the digit 0), MATLAB v5 as distributed."""
  import scipy.io

  rng = np.random.default_rng(seed)
  out = {}
  for split, name in data.SVHN_FILES.items():
    n = (counts or SVHN_COUNTS)[split]
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    scipy.io.savemat(root / name, {"X": x, "y": y})
    out[split] = (np.moveaxis(x, 3, 0), np.where(y[:, 0] == 10, 0, y[:, 0]))
  return out


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_roundtrip(tmp_path, split, parent):
  d, expected = write_cifar(tmp_path)
  x, y = data.load_cifar10(split, data_dir=str(tmp_path if parent else d))
  n = PER_FILE * len(data.CIFAR10_FILES[split])
  assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x, expected[split][0])
  np.testing.assert_array_equal(y, expected[split][1])


def test_cifar10_channel_order(tmp_path):
  """The 3072 bytes are 1024 red, then green, then blue, row-major."""
  d, _ = write_cifar(tmp_path)
  with open(d / "test_batch", "rb") as f:
    raw = pickle.load(f, encoding="bytes")
  x, _ = data.load_cifar10("test", data_dir=str(d))
  flat = raw[b"data"][0]
  assert x[0, 0, 1, 0] == flat[1]         # red, row 0, column 1
  assert x[0, 1, 0, 1] == flat[1024 + 32]  # green, row 1, column 0
  assert x[0, 0, 0, 2] == flat[2048]       # blue, row 0, column 0


def test_cifar10_environment_variable(tmp_path, monkeypatch):
  d, expected = write_cifar(tmp_path)
  monkeypatch.setenv(data.CIFAR10_ENV_VAR, str(d))
  x, _ = data.load_cifar10("test")
  np.testing.assert_array_equal(x, expected["test"][0])


def test_cifar10_truncated_file_names_it(tmp_path):
  d, _ = write_cifar(tmp_path)
  path = d / "data_batch_3"
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataError, match="data_batch_3: not a readable"):
    data.load_cifar10("train", data_dir=str(d))


def test_cifar10_wrong_count_and_labels(tmp_path):
  d, _ = write_cifar(tmp_path)
  with open(d / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((PER_FILE - 1, 3072), np.uint8),
                 b"labels": [0] * (PER_FILE - 1)}, f)
  with pytest.raises(data.DataError, match="test_batch: 5 images, the"
                     " standard file holds 6"):
    data.load_cifar10("test", data_dir=str(d))
  with open(d / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((PER_FILE, 3072), np.uint8),
                 b"labels": [11] * PER_FILE}, f)
  with pytest.raises(data.DataError, match="labels in 11..11"):
    data.load_cifar10("test", data_dir=str(d))
  with open(d / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((PER_FILE, 3000), np.uint8),
                 b"labels": [1] * PER_FILE}, f)
  with pytest.raises(data.DataError, match=r"shape \(6, 3000\)"):
    data.load_cifar10("test", data_dir=str(d))


def test_cifar10_incomplete_set(tmp_path):
  d, _ = write_cifar(tmp_path)
  os.remove(d / "data_batch_4")
  with pytest.raises(data.DataError, match="not data_batch_4"):
    data.load_cifar10("train", data_dir=str(d))


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_roundtrip_maps_10_to_0(tmp_path, split):
  expected = write_svhn(tmp_path)
  x, y = data.load_svhn(split, data_dir=str(tmp_path))
  assert x.shape == (SVHN_COUNTS[split], 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x, expected[split][0])
  np.testing.assert_array_equal(y, expected[split][1])
  assert y[0] == 0 and y.max() <= 9


def test_svhn_environment_variable(tmp_path, monkeypatch):
  expected = write_svhn(tmp_path)
  monkeypatch.setenv(data.SVHN_ENV_VAR, str(tmp_path))
  x, _ = data.load_svhn("test")
  np.testing.assert_array_equal(x, expected["test"][0])


def test_svhn_bad_files_name_the_file(tmp_path):
  import scipy.io

  write_svhn(tmp_path)
  path = tmp_path / "test_32x32.mat"
  raw = path.read_bytes()
  path.write_bytes(raw[:200])
  with pytest.raises(data.DataError, match="test_32x32.mat: not a readable"):
    data.load_svhn("test", data_dir=str(tmp_path))
  # A file with fewer images than the standard one.
  scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8),
                          "y": np.ones((4, 1), np.uint8)})
  with pytest.raises(data.DataError, match="4 images, the standard file"
                     " holds 5"):
    data.load_svhn("test", data_dir=str(tmp_path))
  scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 5), np.uint8),
                          "y": np.zeros((5, 1), np.uint8)})
  with pytest.raises(data.DataError, match="expected 1..10"):
    data.load_svhn("test", data_dir=str(tmp_path))
  scipy.io.savemat(path, {"X": np.zeros((28, 28, 3, 5), np.uint8),
                          "y": np.ones((5, 1), np.uint8)})
  with pytest.raises(data.DataError, match=r"'X' of shape \(28, 28, 3, 5\)"):
    data.load_svhn("test", data_dir=str(tmp_path))
  scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 5), np.float64),
                          "y": np.ones((5, 1), np.uint8)})
  with pytest.raises(data.DataError, match="dtype float64, expected uint8"):
    data.load_svhn("test", data_dir=str(tmp_path))


@pytest.mark.parametrize("loader,name", [(data.load_cifar10, "cifar10"),
                                         (data.load_svhn, "svhn")])
def test_missing_data_names_every_way(tmp_path, monkeypatch, loader, name):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataError) as exc:
    loader("train", data_dir=str(empty), source="files")
  msg = str(exc.value)
  env = data.CIFAR10_ENV_VAR if name == "cifar10" else data.SVHN_ENV_VAR
  assert str(empty) in msg and env in msg and "data_dir" in msg
  assert "tfds" in msg and "anisonoise[data]" in msg


def test_bad_arguments():
  with pytest.raises(ValueError, match="split must be"):
    data.load_cifar10("validation")
  with pytest.raises(ValueError, match="source must be"):
    data.load_svhn("train", source="http")


@pytest.mark.parametrize("loader,split,n", [(data.load_cifar10, "train", 9),
                                            (data.load_svhn, "test", 7)])
def test_tfds_source_under_mock_data(loader, split, n):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=n,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    x, y = loader(split, source="tfds")
  assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
  assert y.shape == (n,) and y.max() <= 9
