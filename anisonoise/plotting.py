"""Matplotlib helpers for the spectral and per-block diagnostics."""

from __future__ import annotations

import numpy as np


def _axes(ax):
  import matplotlib.pyplot as plt

  if ax is None:
    _, ax = plt.subplots(figsize=(5, 3.5))
  return ax


def _finish(ax, xlabel, ylabel, label, logy):
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if label:
    ax.legend()
  return ax


def plot_hessian_spectrum(eigenvalues, ax=None, *, label=None, logy=True):
  """Plots eigenvalues against their index (the layout of Fig. 5 left).

  Args:
    eigenvalues: 1-D array in descending order (e.g.
      ``anisonoise.hessian_spectrum(...).eigenvalues``).
    ax: a matplotlib ``Axes``; a new figure's axes when ``None``.
    label: legend label.
    logy: logarithmic y axis (non-positive values are not drawn there).

  Returns:
    The ``Axes``.
  """
  ax = _axes(ax)
  vals = np.asarray(eigenvalues)
  ax.plot(np.arange(1, vals.size + 1), vals, ".-", ms=3, label=label)
  return _finish(ax, "index", "Hessian eigenvalue", label, logy)


def plot_spectral_density(density, ax=None, *, label=None, logy=True):
  """Plots a :class:`anisonoise.SpectralDensity` (grid against density).

  Args:
    density: the result of ``anisonoise.spectral_density``.
    ax: a matplotlib ``Axes``; a new figure's axes when ``None``.
    label: legend label.
    logy: logarithmic y axis (the bulk near zero dominates otherwise).

  Returns:
    The ``Axes``.
  """
  ax = _axes(ax)
  grid = np.asarray(density.grid)
  dens = np.asarray(density.density)
  ax.plot(grid, np.maximum(dens, 1e-12) if logy else dens, label=label)
  return _finish(ax, "eigenvalue", "density", label, logy)


def plot_blocks(values, ax=None, *, label=None, logy=False, ylabel="value",
                width=0.8, offset=0.0):
  """Bars of one quantity per block of the parameters (per layer).

  Args:
    values: ``{block name: value}``, in the order to draw (e.g. each
      block's top Hessian eigenvalue or ``Tr(H Sigma)`` from
      :func:`anisonoise.param_block` and :func:`anisonoise.param_blocks`).
    ax: a matplotlib ``Axes``; a new figure's axes when ``None``.
    label: legend label.
    logy: logarithmic y axis.
    ylabel: the quantity's name.
    width: bar width; with ``offset``, several quantities or times side by
      side (e.g. ``width=0.4, offset=+-0.2``).
    offset: shift of the bars from the block positions.

  Returns:
    The ``Axes``.

  Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from anisonoise.plotting import plot_blocks
    >>> ax = plot_blocks({"embed": 0.5, "blocks/0": 2.0, "head": 1.0},
    ...                  ylabel="top Hessian eigenvalue")
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['embed', 'blocks/0', 'head']
  """
  ax = _axes(ax)
  names = list(values)
  vals = np.asarray([float(values[n]) for n in names])
  pos = np.arange(len(names))
  ax.bar(pos + offset, vals, width=width, label=label)
  ax.set_xticks(pos, names, rotation=30, ha="right")
  return _finish(ax, "block", ylabel, label, logy)
