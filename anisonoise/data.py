"""Fashion-MNIST from the standard IDX files, and the paper's corrupted set.

Sources, in the order ``source="auto"`` tries them:

1. the four IDX ``.gz`` files (``train-images-idx3-ubyte.gz`` ...) in
   ``data_dir``, else ``$ANISONOISE_FASHION_MNIST_DIR``, else
   ``/usr/share/datasets/fashion-mnist`` (Debian's package
   ``dataset-fashion-mnist``);
2. TensorFlow Datasets' ``tfds.data_source("fashion_mnist")`` (the ``data``
   extra; it needs no TensorFlow).

The IDX reader is written here (a dozen lines of ``struct``/``numpy``) so
that the default path needs no extra dependency; it validates magic numbers,
shapes and lengths and names the file in every error.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "ANISONOISE_FASHION_MNIST_DIR"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SIZES = {"train": 60_000, "test": 10_000}
_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, 1 or 3 dimensions


class DataError(ValueError):
  """Missing, truncated or corrupt data files."""


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes with ``ndim`` dimensions.

  Args:
    path: the ``.gz`` file.
    ndim: 3 for images, 1 for labels.

  Returns:
    A ``uint8`` array of the shape the header declares.

  Raises:
    DataError: naming ``path``, if the file is not gzip, has the wrong magic
      number, or holds fewer or more bytes than its header declares.
  """
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: not a readable gzip file ({e}).") from e
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated, {len(raw)} bytes is shorter than the"
                    f" {header}-byte IDX header.")
  magic = struct.unpack(">I", raw[:4])[0]
  if magic != _MAGIC[ndim]:
    raise DataError(f"{path}: magic number {magic:#010x}, expected"
                    f" {_MAGIC[ndim]:#010x} (IDX, unsigned bytes, {ndim}-D).")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise DataError(f"{path}: header declares shape {shape} ({expected}"
                    f" bytes) but the file holds {len(raw) - header}; it is"
                    " truncated or corrupt.")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_dir(data_dir: str | None) -> str:
  return data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR


def _missing_message(where: str) -> str:
  return (
      f"Fashion-MNIST not found in {where}. Either install the IDX files"
      " (Debian: apt-get install dataset-fashion-mnist, which puts them in"
      f" {DEFAULT_DIR}; or download the four *-ubyte.gz files and pass"
      f" data_dir=... or set {ENV_VAR}), or install TensorFlow Datasets"
      " (pip install 'anisonoise[data]') to use tfds.data_source."
  )


def _load_idx(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  img_name, lab_name = FILES[split]
  img_path = os.path.join(data_dir, img_name)
  lab_path = os.path.join(data_dir, lab_name)
  for p in (img_path, lab_path):
    if not os.path.exists(p):
      raise DataError(_missing_message(data_dir) + f" (missing: {p})")
  images = read_idx(img_path, 3)
  labels = read_idx(lab_path, 1)
  if images.shape[1:] != (28, 28):
    raise DataError(f"{img_path}: images of shape {images.shape[1:]}, expected"
                    " (28, 28).")
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{img_path} holds {images.shape[0]} images but"
                    f" {lab_path} {labels.shape[0]} labels.")
  if labels.size and labels.max() > 9:
    raise DataError(f"{lab_path}: label {labels.max()} outside 0..9.")
  return images, labels


def _load_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds

  source = tfds.data_source("fashion_mnist", split=split)
  items = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(it["image"]).reshape(28, 28) for it in items])
  labels = np.asarray([it["label"] for it in items], np.uint8)
  return images.astype(np.uint8), labels


def load_fashion_mnist(
    split: str = "train", *, data_dir: str | None = None, source: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST images ``(n, 28, 28)`` and labels ``(n,)``, as ``uint8``.

  Args:
    split: ``"train"`` (60,000) or ``"test"`` (10,000).
    data_dir: directory of the IDX files (overrides the environment variable
      and the default directory).
    source: ``"auto"`` (IDX files if present, else TFDS), ``"idx"`` or
      ``"tfds"``.

  Returns:
    ``(images, labels)``.

  Raises:
    DataError: data missing (the message names both ways to get it),
      truncated or corrupt (the message names the file).
  """
  if split not in FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if source not in ("auto", "idx", "tfds"):
    raise ValueError(f"source must be 'auto', 'idx' or 'tfds', got"
                     f" {source!r}.")
  where = _idx_dir(data_dir)
  if source == "idx" or (source == "auto" and os.path.isdir(where)):
    return _load_idx(split, where)
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError as e:
    raise DataError(_missing_message(where)) from e
  return _load_tfds(split)


def scale_images(images: np.ndarray) -> np.ndarray:
  """``uint8`` images to float32 in [-1, 1] with a channel axis
  ``(n, 28, 28, 1)``, as the authors' scripts did."""
  return (images.astype(np.float32) / 127.5 - 1.0)[..., None]


class CorruptedSet(NamedTuple):
  """The paper's training set (Section 5.3).

  Attributes:
    x: ``(n, 28, 28, 1)`` float32 images in [-1, 1].
    y: ``(n,)`` int32 training labels (corrupted where ``corrupted``).
    y_true: ``(n,)`` int32 original labels.
    corrupted: ``(n,)`` bool, the examples whose label was redrawn.
  """

  x: np.ndarray
  y: np.ndarray
  y_true: np.ndarray
  corrupted: np.ndarray


def corrupted_training_set(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_clean: int = 1000,
    num_corrupt: int = 200,
    seed: int = 0,
) -> CorruptedSet:
  """The first ``num_clean + num_corrupt`` training images, the last
  ``num_corrupt`` of them relabelled uniformly at random (seeded).

  This is the recipe of the paper's authors' scripts: positions 1000-1199
  of the first 1,200 training images get labels drawn uniformly from the 10
  classes (a redrawn label equals the true one with probability 1/10).

  Args:
    images: ``uint8`` ``(N, 28, 28)`` training images.
    labels: ``(N,)`` training labels.
    num_clean: correctly labelled examples.
    num_corrupt: examples with random labels.
    seed: seed of the random labels.

  Returns:
    A :class:`CorruptedSet`.
  """
  n = num_clean + num_corrupt
  if num_clean < 0 or num_corrupt < 0 or n < 1:
    raise ValueError(f"num_clean={num_clean} and num_corrupt={num_corrupt}"
                     " must be >= 0 with a positive sum.")
  if n > len(labels):
    raise ValueError(f"asked for {n} training examples, only {len(labels)}"
                     " available.")
  y_true = np.asarray(labels[:n], np.int32)
  y = y_true.copy()
  rng = np.random.default_rng(seed)
  y[num_clean:] = rng.integers(0, 10, size=num_corrupt)
  corrupted = np.zeros(n, bool)
  corrupted[num_clean:] = True
  return CorruptedSet(scale_images(images[:n]), y, y_true, corrupted)
