"""The paper's data sets from their standard files, validated.

Fashion-MNIST (:func:`load_fashion_mnist`, and the paper's corrupted set),
CIFAR-10 (:func:`load_cifar10`) and SVHN (:func:`load_svhn`); beyond the
paper, a character corpus (:func:`load_fortunes`, Debian's ``fortunes``
package) cut into sequences (:func:`encode_text`,
:func:`text_windows`). Every file is
checked (shapes, dtypes, label range, counts) and an error names the file and
what is wrong; when no source has the data, the error names every way to get
it.

Fashion-MNIST sources, in the order ``source="auto"`` tries them:

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
import pickle
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


def _tfds_arrays(name: str, split: str, shape: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Every ``(image, label)`` of ``tfds.data_source(name, split)`` as
  ``uint8`` images of ``shape`` and ``int64`` labels."""
  import tensorflow_datasets as tfds

  source = tfds.data_source(name, split=split)
  items = [source[i] for i in range(len(source))]
  images = np.zeros((len(items), *shape), np.uint8)
  for i, it in enumerate(items):
    images[i] = np.asarray(it["image"]).reshape(shape)
  labels = np.asarray([it["label"] for it in items], np.int64)
  return images, labels


def _load_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _tfds_arrays("fashion_mnist", split, (28, 28))
  return images, labels.astype(np.uint8)


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
    num_clean_after: int = 0,
    seed: int = 0,
) -> CorruptedSet:
  """The first ``num_clean + num_corrupt + num_clean_after`` training
  images, positions ``num_clean .. num_clean + num_corrupt - 1`` relabelled
  uniformly at random (seeded).

  The paper's text (Section 5.3) uses 1,000 correct and 200 random labels
  (the defaults). The authors' published script keeps the first 6,000
  training images with positions 1000-1199 relabelled: ``num_clean=1000,
  num_corrupt=200, num_clean_after=4800``. A redrawn label equals the true
  one with probability 1/10.

  Args:
    images: ``uint8`` ``(N, 28, 28)`` training images.
    labels: ``(N,)`` training labels.
    num_clean: correctly labelled examples before the corrupted block.
    num_corrupt: examples with random labels.
    num_clean_after: correctly labelled examples after the corrupted block.
    seed: seed of the random labels.

  Returns:
    A :class:`CorruptedSet`.

  Example:
    >>> import numpy as np
    >>> from anisonoise import data
    >>> images = np.zeros((10, 28, 28), np.uint8)
    >>> s = data.corrupted_training_set(images, np.arange(10) % 10,
    ...                                 num_clean=4, num_corrupt=2,
    ...                                 num_clean_after=3)
    >>> s.corrupted.astype(int).tolist()
    [0, 0, 0, 0, 1, 1, 0, 0, 0]
  """
  n = num_clean + num_corrupt + num_clean_after
  if min(num_clean, num_corrupt, num_clean_after) < 0 or n < 1:
    raise ValueError(f"num_clean={num_clean}, num_corrupt={num_corrupt} and"
                     f" num_clean_after={num_clean_after} must be >= 0 with"
                     " a positive sum.")
  if n > len(labels):
    raise ValueError(f"asked for {n} training examples, only {len(labels)}"
                     " available.")
  y_true = np.asarray(labels[:n], np.int32)
  y = y_true.copy()
  rng = np.random.default_rng(seed)
  block = slice(num_clean, num_clean + num_corrupt)
  y[block] = rng.integers(0, 10, size=num_corrupt)
  corrupted = np.zeros(n, bool)
  corrupted[block] = True
  return CorruptedSet(scale_images(images[:n]), y, y_true, corrupted)


# --------------------------------------------------------------------------
# CIFAR-10 and SVHN (32 x 32 colour images; the VGG11 studies)
# --------------------------------------------------------------------------

CIFAR10_ENV_VAR = "ANISONOISE_CIFAR10_DIR"
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_PER_FILE = 10_000
SVHN_ENV_VAR = "ANISONOISE_SVHN_DIR"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
SVHN_SIZES = {"train": 73_257, "test": 26_032}
_TFDS_NAMES = {"cifar10": "cifar10", "svhn": "svhn_cropped"}


def _colour_missing_message(name: str, tried: list[str]) -> str:
  files = {
      "cifar10": ("the 'CIFAR-10 python version' directory"
                  " (cifar-10-batches-py/ with data_batch_1 ... data_batch_5"
                  " and test_batch, from"
                  " https://www.cs.toronto.edu/~kriz/cifar.html)"),
      "svhn": ("the cropped-digits files train_32x32.mat and test_32x32.mat"
               " (from http://ufldl.stanford.edu/housenumbers/)"),
  }[name]
  env = {"cifar10": CIFAR10_ENV_VAR, "svhn": SVHN_ENV_VAR}[name]
  return (
      f"{name} not found (looked in: {', '.join(tried) or 'nothing'}). Get"
      f" {files} and pass data_dir=... (--data-dir) or set ${env}; or install"
      " TensorFlow Datasets (pip install 'anisonoise[data]') and prepare"
      f" tfds '{_TFDS_NAMES[name]}' (tfds build {_TFDS_NAMES[name]})."
  )


def _check_images(path: str, images: np.ndarray, labels: np.ndarray,
                  count: int | None) -> None:
  if images.dtype != np.uint8:
    raise DataError(f"{path}: images of dtype {images.dtype}, expected"
                    " uint8.")
  if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
    raise DataError(f"{path}: images of shape {images.shape[1:]}, expected"
                    " (32, 32, 3).")
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{path}: {images.shape[0]} images but"
                    f" {labels.shape[0]} labels.")
  if count is not None and images.shape[0] != count:
    raise DataError(f"{path}: {images.shape[0]} images, the standard file"
                    f" holds {count}; it is truncated or not the standard"
                    " file.")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataError(f"{path}: labels in {labels.min()}..{labels.max()},"
                    " expected 0..9.")


def read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One pickled batch of the CIFAR-10 python version.

  Args:
    path: a ``data_batch_i`` or ``test_batch`` file (a pickled dict with
      ``data``, ``uint8`` ``(10000, 3072)`` in channel-major order, and
      ``labels``, 10,000 integers in 0..9).

  Returns:
    ``(images, labels)``: ``uint8`` ``(10000, 32, 32, 3)`` and ``(10000,)``.

  Raises:
    DataError: naming ``path``, if the file is not such a pickle or its
      arrays have the wrong shape, dtype, count or label range.
  """
  try:
    with open(path, "rb") as f:
      raw = pickle.load(f, encoding="bytes")
  except (OSError, EOFError, pickle.UnpicklingError, ValueError,
          TypeError) as e:
    raise DataError(f"{path}: not a readable CIFAR-10 pickle ({e}).") from e
  if not isinstance(raw, dict):
    raise DataError(f"{path}: holds a {type(raw).__name__}, expected the"
                    " CIFAR-10 dict with 'data' and 'labels'.")
  raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
  if "data" not in raw or "labels" not in raw:
    raise DataError(f"{path}: keys {sorted(raw)}, expected 'data' and"
                    " 'labels'.")
  data = np.asarray(raw["data"])
  if data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(f"{path}: 'data' of shape {data.shape}, expected"
                    " (N, 3072).")
  labels = np.asarray(raw["labels"])
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  _check_images(path, images, labels, CIFAR10_PER_FILE)
  return np.ascontiguousarray(images), labels.astype(np.uint8)


def read_svhn_mat(path: str, count: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """One SVHN cropped-digits ``.mat`` file (``train_32x32.mat`` ...).

  Args:
    path: the file (MATLAB v5: ``X`` ``uint8`` ``(32, 32, 3, N)``, ``y``
      ``(N, 1)`` in 1..10, where 10 means the digit 0).
    count: the number of images the file must hold (``None``: any).

  Returns:
    ``(images, labels)``: ``uint8`` ``(N, 32, 32, 3)`` and labels ``(N,)``
    in 0..9 (10 mapped to 0).

  Raises:
    DataError: naming ``path``, if the file is unreadable or its arrays
      have the wrong shape, dtype, count or label range.
  """
  try:
    import scipy.io
  except ImportError as e:
    raise DataError("reading SVHN's .mat files needs scipy (pip install"
                    " 'anisonoise[data]').") from e
  try:
    raw = scipy.io.loadmat(path)
  except (OSError, ValueError, TypeError) as e:
    raise DataError(f"{path}: not a readable SVHN .mat file ({e}).") from e
  if "X" not in raw or "y" not in raw:
    raise DataError(f"{path}: holds {sorted(k for k in raw if k[0] != '_')},"
                    " expected 'X' and 'y'.")
  x, y = np.asarray(raw["X"]), np.asarray(raw["y"]).reshape(-1)
  if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
    raise DataError(f"{path}: 'X' of shape {x.shape}, expected"
                    " (32, 32, 3, N).")
  if y.size and (y.min() < 1 or y.max() > 10):
    raise DataError(f"{path}: 'y' in {y.min()}..{y.max()}, expected 1..10"
                    " (10 meaning the digit 0).")
  labels = np.where(y == 10, 0, y).astype(np.uint8)
  images = np.ascontiguousarray(np.moveaxis(x, 3, 0))
  _check_images(path, images, labels, count)
  return images, labels


def _load_tfds_colour(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _tfds_arrays(_TFDS_NAMES[name], split, (32, 32, 3))
  _check_images(f"tfds {_TFDS_NAMES[name]}[{split}]", images, labels, None)
  return images, labels.astype(np.uint8)


def _check_split_and_source(split: str, source: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if source not in ("auto", "files", "tfds"):
    raise ValueError(f"source must be 'auto', 'files' or 'tfds', got"
                     f" {source!r}.")


def _colour_dirs(data_dir: str | None, env: str) -> list[str]:
  return [d for d in (data_dir, os.environ.get(env)) if d]


def load_cifar10(
    split: str = "train", *, data_dir: str | None = None,
    source: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 images ``(n, 32, 32, 3)`` and labels ``(n,)``, as ``uint8``.

  Looks, in this order, in ``data_dir``, in ``$ANISONOISE_CIFAR10_DIR``
  (each either the ``cifar-10-batches-py`` directory or its parent), then in
  TensorFlow Datasets (``cifar10``).

  Args:
    split: ``"train"`` (50,000, ``data_batch_1`` ... ``_5``) or ``"test"``
      (10,000, ``test_batch``).
    data_dir: directory of the python-version batches.
    source: ``"auto"`` (files if found, else TFDS), ``"files"`` or ``"tfds"``.

  Returns:
    ``(images, labels)``.

  Raises:
    DataError: data missing (the message names every way to get it),
      truncated or corrupt (the message names the file).

  Example:
    >>> from anisonoise import data
    >>> images, labels = data.load_cifar10('test')  # doctest: +SKIP
    >>> images.shape, labels.max()  # doctest: +SKIP
    ((10000, 32, 32, 3), 9)
  """
  _check_split_and_source(split, source)
  tried = []
  if source != "tfds":
    for d in _colour_dirs(data_dir, CIFAR10_ENV_VAR):
      for cand in (os.path.join(d, "cifar-10-batches-py"), d):
        if os.path.exists(os.path.join(cand, CIFAR10_FILES[split][0])):
          parts = []
          for name in CIFAR10_FILES[split]:
            path = os.path.join(cand, name)
            if not os.path.exists(path):
              raise DataError(f"{cand} holds {CIFAR10_FILES[split][0]} but"
                              f" not {name}: the set is incomplete.")
            parts.append(read_cifar10_batch(path))
          return (np.concatenate([p[0] for p in parts]),
                  np.concatenate([p[1] for p in parts]))
      tried.append(d)
    if source == "files":
      raise DataError(_colour_missing_message("cifar10", tried))
  return _tfds_or_error("cifar10", split, tried)


def _tfds_or_error(name: str, split: str, tried: list[str]):
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError as e:
    raise DataError(_colour_missing_message(name, tried)) from e
  try:
    return _load_tfds_colour(name, split)
  except DataError:
    raise
  except Exception as e:  # tfds raises several types for a missing set
    raise DataError(_colour_missing_message(name, tried + ["tfds"])
                    + f" (tfds: {e})") from e


def load_svhn(
    split: str = "train", *, data_dir: str | None = None,
    source: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
  """SVHN cropped digits ``(n, 32, 32, 3)`` and labels ``(n,)`` in 0..9.

  Looks, in this order, in ``data_dir``, in ``$ANISONOISE_SVHN_DIR``, then
  in TensorFlow Datasets (``svhn_cropped``). The label 10 of the ``.mat``
  files (the digit 0) becomes 0, as in TFDS.

  Args:
    split: ``"train"`` (``train_32x32.mat``, 73,257 images) or ``"test"``
      (``test_32x32.mat``, 26,032 images). The paper's study trains on the
      first 25,000 of the *test* file and tests on the *train* file; that
      choice belongs to the study, not to this loader.
    data_dir: directory of the ``.mat`` files.
    source: ``"auto"`` (files if found, else TFDS), ``"files"`` or ``"tfds"``.

  Returns:
    ``(images, labels)``; errors as :func:`load_cifar10`'s.

  Example:
    >>> from anisonoise import data
    >>> images, labels = data.load_svhn('test')  # doctest: +SKIP
    >>> images.shape  # doctest: +SKIP
    (26032, 32, 32, 3)
  """
  _check_split_and_source(split, source)
  tried = []
  if source != "tfds":
    for d in _colour_dirs(data_dir, SVHN_ENV_VAR):
      path = os.path.join(d, SVHN_FILES[split])
      if os.path.exists(path):
        return read_svhn_mat(path, SVHN_SIZES[split])
      tried.append(d)
    if source == "files":
      raise DataError(_colour_missing_message("svhn", tried))
  return _tfds_or_error("svhn", split, tried)


def scale_colour_images(images: np.ndarray) -> np.ndarray:
  """``uint8`` ``(n, 32, 32, 3)`` images to float32 in [-1, 1] (per-channel
  mean 0.5 and std 0.5 of ``[0, 1]`` pixels, torchvision's
  ``Normalize((0.5,) * 3, (0.5,) * 3)``); no augmentation (App. D.4)."""
  return images.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------
# A character corpus
# ---------------------------------------------------------------------------

FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_ENV_VAR = "ANISONOISE_FORTUNES_DIR"
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
"""The 96 characters :func:`encode_text` maps to tokens ``0..95``: the
newline, then printable ASCII in code order."""


def load_fortunes(data_dir: str | None = None) -> str:
  """The English fortune cookies of Debian's ``fortunes`` package, as text.

  ``apt-get install fortunes`` (with ``fortunes-min``) puts 2.6 MB of
  plain-text cookie files (``art``, ``computers``, ``literature``,
  ``science``, ...; each cookie ended by a line ``%``) in
  ``/usr/share/games/fortunes``. They are read in sorted file order, the
  ``%`` lines and the index files (``.dat``, and the ``.u8`` links)
  dropped, and joined by newlines. Nothing is downloaded.

  Args:
    data_dir: the directory of the cookie files (default
      ``$ANISONOISE_FORTUNES_DIR``, else ``/usr/share/games/fortunes``).

  Returns:
    The corpus, one string.

  Raises:
    DataError: when the directory holds no cookie file, saying how to
      install them.
  """
  where = data_dir or os.environ.get(FORTUNES_ENV_VAR) or FORTUNES_DIR
  names = sorted(
      n for n in (os.listdir(where) if os.path.isdir(where) else [])
      if "." not in n and not os.path.islink(os.path.join(where, n))
      and os.path.isfile(os.path.join(where, n)))
  if not names:
    raise DataError(
        f"no fortune cookie files in {where}; install Debian's package"
        " (apt-get install fortunes) or pass data_dir (or set"
        f" ${FORTUNES_ENV_VAR}) to a directory of plain-text files whose"
        " entries end with a line '%'.")
  parts = []
  for n in names:
    with open(os.path.join(where, n), encoding="latin-1") as f:
      parts.append("\n".join(line for line in f.read().splitlines()
                             if line.strip() != "%"))
  return "\n".join(parts)


def encode_text(text: str) -> np.ndarray:
  """Characters as tokens of :data:`ALPHABET` (96: printable ASCII and the
  newline; tabs read as spaces, any other character as ``?``).

  Args:
    text: a string.

  Returns:
    ``(len(text),)`` ``int32`` tokens in ``[0, 96)``.
  """
  table = np.full(256, ALPHABET.index("?"), np.int32)
  for i, c in enumerate(ALPHABET):
    table[ord(c)] = i
  table[ord("\t")] = ALPHABET.index(" ")
  codes = np.frombuffer(text.encode("latin-1", errors="replace"), np.uint8)
  return table[codes]


def text_windows(tokens: np.ndarray, num: int, length: int,
                 seed: int) -> np.ndarray:
  """``num`` windows of ``length + 1`` consecutive tokens, at distinct
  random offsets (a window's first ``length`` tokens are a sequence, its
  last ``length`` the next-token targets).

  Args:
    tokens: ``(N,)`` tokens.
    num: how many windows.
    length: sequence length ``T``.
    seed: the offsets' seed.

  Returns:
    ``(num, length + 1)`` tokens.
  """
  span = len(tokens) - length
  if num > span:
    raise DataError(f"asked for {num} windows of {length + 1} tokens from"
                    f" {len(tokens)} tokens.")
  starts = np.random.default_rng(seed).choice(span, num, replace=False)
  return tokens[starts[:, None] + np.arange(length + 1)]
