"""The training and test sets of each study, as arrays in memory.

Fashion-MNIST: the paper's corrupted set (the first ``num_clean +
num_corrupt`` training images, the last ``num_corrupt`` relabelled at
random) and the test set, as LeNet patches; or Wu et al.'s (2020) split
(``fmnist_split="wu2020"``), optionally with raw 0-255 pixels. SVHN and
CIFAR-10: images in [-1, 1], no augmentation (App. D.4). SVHN's split
follows the authors' scripts by default (``svhn_split="paper"``): the first
25,000 images of ``test_32x32.mat`` are the training set and the first
``num_test`` of ``train_32x32.mat`` the test set; ``"standard"`` uses the
files as named. Fortunes (Debian's ``fortunes`` package): sequences of
``seq_len`` characters at random offsets, the training ones from the
corpus's first 90%, the test ones from its last 10%; the targets of the
last ``num_corrupt`` training sequences are redrawn at random (the
corrupted labels of Fashion-MNIST, one per token).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from anisonoise import data
from anisonoise.models import lenet_patches

from configs import Config


class Data(NamedTuple):
  train: dict          # {"x", "y"} on the device
  test: dict
  corrupted: np.ndarray  # (n,) bool: examples whose label was redrawn
  y_true: np.ndarray     # (n,) the original labels


def _take(images, labels, n: int, what: str):
  if n and n > len(labels):
    raise data.DataError(f"asked for {n} {what} images, the data hold"
                         f" {len(labels)}.")
  n = n or len(labels)
  return images[:n], labels[:n]


def _synthetic(n: int, seed: int):
  """Random 32 x 32 images whose mean colour depends on the class (so that
  a network can fit them): for the smoke tests only."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  colours = np.random.default_rng(99).integers(0, 256, (10, 3))
  noise = rng.integers(-40, 41, (n, 32, 32, 3))
  images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255)
  return images.astype(np.uint8), labels


def _wu2020(cfg: Config, data_dir: str | None) -> Data:
  """Wu et al.'s (2020) FashionMNIST split (uuujf/MultiNoise, mnist2np.py):
  the first ``num_clean`` images of the test file to train on, the first
  ``num_test`` of the training file to test on; no label is corrupted."""
  tr = _take(*data.load_fashion_mnist("test", data_dir=data_dir),
             cfg.num_clean, "training")
  te = _take(*data.load_fashion_mnist("train", data_dir=data_dir),
             cfg.num_test, "test")

  def patches(images):
    x = (images.astype(np.float32)[..., None] if cfg.pixels == "raw"
         else data.scale_images(images))
    return lenet_patches(jnp.asarray(x))

  n = len(tr[1])
  return Data({"x": patches(tr[0]), "y": jnp.asarray(tr[1], jnp.int32)},
              {"x": patches(te[0]), "y": jnp.asarray(te[1], jnp.int32)},
              np.zeros(n, bool), np.asarray(tr[1], np.int32))


def _synthetic_text(seed: int) -> str:
  """Text of a few repeated words, for the smoke tests only (no test needs
  the corpus)."""
  words = ["the", "noise", "of", "gradient", "descent", "escapes",
           "sharp", "minima", "\n"]
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(words, 2000))


def _fortunes(cfg: Config, data_dir: str | None, seed: int) -> Data:
  text = (_synthetic_text(seed) if cfg.synthetic
          else data.load_fortunes(data_dir))
  tokens = data.encode_text(text)
  cut = int(0.9 * len(tokens))
  n = cfg.num_clean + cfg.num_corrupt
  train = data.text_windows(tokens[:cut], n, cfg.seq_len, seed)
  test = data.text_windows(tokens[cut:], cfg.num_test, cfg.seq_len,
                           seed + 1)
  y_true = train[:, 1:].copy()
  y = y_true.copy()
  corrupted = np.arange(n) >= cfg.num_clean
  rng = np.random.default_rng(seed + 2)
  y[corrupted] = rng.integers(0, len(data.ALPHABET),
                              (cfg.num_corrupt, cfg.seq_len))
  return Data({"x": jnp.asarray(train[:, :-1]), "y": jnp.asarray(y)},
              {"x": jnp.asarray(test[:, :-1]), "y": jnp.asarray(test[:, 1:])},
              corrupted, y_true)


def load(cfg: Config, data_dir: str | None, seed: int) -> Data:
  """The study's data (raises ``anisonoise.data.DataError`` when missing)."""
  if cfg.dataset == "fortunes":
    return _fortunes(cfg, data_dir, seed)
  if cfg.dataset == "fashion_mnist" and cfg.fmnist_split == "wu2020":
    return _wu2020(cfg, data_dir)
  if cfg.dataset == "fashion_mnist":
    images, labels = data.load_fashion_mnist("train", data_dir=data_dir)
    train = data.corrupted_training_set(
        images, labels, num_clean=cfg.num_clean,
        num_corrupt=cfg.num_corrupt, num_clean_after=cfg.num_clean_after,
        seed=seed)
    test_images, test_labels = data.load_fashion_mnist("test",
                                                       data_dir=data_dir)
    test_x = data.scale_images(test_images[:cfg.num_test])
    return Data(
        {"x": lenet_patches(jnp.asarray(train.x)), "y": jnp.asarray(train.y)},
        {"x": lenet_patches(jnp.asarray(test_x)),
         "y": jnp.asarray(test_labels[:cfg.num_test], jnp.int32)},
        train.corrupted, train.y_true)

  if cfg.synthetic:
    tr = _synthetic(cfg.num_train, seed)
    te = _synthetic(cfg.num_test, seed + 1)
  elif cfg.dataset == "cifar10":
    tr = _take(*data.load_cifar10("train", data_dir=data_dir),
               cfg.num_train, "training")
    te = _take(*data.load_cifar10("test", data_dir=data_dir), cfg.num_test,
               "test")
  else:
    train_split, test_split = (("test", "train") if cfg.svhn_split == "paper"
                               else ("train", "test"))
    tr = _take(*data.load_svhn(train_split, data_dir=data_dir),
               cfg.num_train, "training")
    te = _take(*data.load_svhn(test_split, data_dir=data_dir), cfg.num_test,
               "test")
  n = len(tr[1])
  return Data(
      {"x": jnp.asarray(data.scale_colour_images(tr[0])),
       "y": jnp.asarray(tr[1], jnp.int32)},
      {"x": jnp.asarray(data.scale_colour_images(te[0])),
       "y": jnp.asarray(te[1], jnp.int32)},
      np.zeros(n, bool), np.asarray(tr[1], np.int32))
