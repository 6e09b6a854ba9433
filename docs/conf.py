"""Sphinx configuration of the anisonoise documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"``). Tutorials are MyST notebooks executed at
build time (a cell that raises fails the build); math is rendered by a
MathJax bundled with the site (no CDN), so the HTML reads offline.
"""

import glob
import importlib
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "anisonoise"
copyright = "2026, the anisonoise authors"
author = "the anisonoise authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
exclude_patterns = ["_build", "_generated", "jupyter_execute", "Thumbs.db",
                    ".DS_Store", "**.ipynb_checkpoints"]

# MyST notebooks (text files in the repository), executed at every build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "anisonoise"
html_theme_options = {"show_toc_level": 2}
html_static_path = []
suppress_warnings = ["mystnb.unknown_mime_type"]


def _benchmark_tables() -> str:
  """The benchmark tables, rendered from ``benchmarks/results/*.json`` by
  each benchmark's own ``markdown`` function (never copied by hand)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  renderers = {"step_cost": "step_cost", "peers": "peers",
               "memory": "memory", "scaling": "scaling", "scale": "scale",
               "warm_start": "warm_start"}
  parts = []
  for where, title in (("", "On the 2-core CPU"),
                       ("gpu", "On one NVIDIA H100")):
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results",
                                          where, "*.json")))
    section = []
    for path in files:
      name = os.path.splitext(os.path.basename(path))[0]
      module = next((m for prefix, m in renderers.items()
                     if name == prefix or name.startswith(prefix + "_")),
                    None)
      if module is None:
        continue
      with open(path) as f:
        res = json.load(f)
      table = importlib.import_module(module).markdown(res)
      rel = os.path.relpath(path, ROOT)
      section.append(f"### `{rel}`\n\n{table}\n")
    if section:
      parts.append(f"## {title}\n\n" + "\n".join(section))
  return "\n".join(parts)


def _write_generated(app):
  out = os.path.join(app.srcdir, "_generated")
  os.makedirs(out, exist_ok=True)
  text = _benchmark_tables()
  path = os.path.join(out, "benchmark_tables.md")
  if not os.path.exists(path) or open(path).read() != text:
    with open(path, "w") as f:
      f.write(text)


# MathJax served from the site itself: the copy shipped by the PyPI package
# sphinx-mathjax-offline (whose module name has hyphens, so it cannot be
# loaded as an extension; its two lines of setup are done here).
mathjax_path = "mathjax/tex-chtml.js"


def _mathjax_dir() -> str:
  from importlib import metadata
  dist = metadata.distribution("sphinx-mathjax-offline")
  return str(dist.locate_file("sphinx-mathjax-offline/static/mathjax"))


def _copy_mathjax(app, exc):
  from sphinx.util.fileutil import copy_asset
  if exc is None:
    copy_asset(_mathjax_dir(), os.path.join(app.outdir, "_static", "mathjax"))


def setup(app):
  app.connect("builder-inited", _write_generated)
  app.connect("build-finished", _copy_mathjax)
