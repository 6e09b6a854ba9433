"""Matplotlib helpers for the spectral diagnostics."""

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
