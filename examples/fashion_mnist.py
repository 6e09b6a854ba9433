"""Figs. 3, 5, 7 and 8 of Zhu et al. (ICML 2019): Fashion-MNIST with
corrupted labels; the ``fashion_mnist`` study of ``examples/noisy_minima``.

Usage:
  python examples/fashion_mnist.py --preset quick --out results/fmnist
  python examples/fashion_mnist.py --preset paper --out results/fmnist-paper

Takes every option of ``examples/noisy_minima/main.py`` (``--preset``,
``--out``, ``--seed``, ``--data-dir``, ``--steps``, ``--lr``,
``--dynamics``, ``--restart``, ``--time-limit``), with ``--dataset
fashion_mnist``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "noisy_minima"))

import main  # noqa: E402

if __name__ == "__main__":
  main.main(dataset_default="fashion_mnist")
