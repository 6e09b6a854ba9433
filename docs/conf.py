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

# The notebooks' kernels inherit this environment. The tutorials are small
# programs whose time is mostly XLA compilation: at LLVM's optimisation
# level 0 a GLD Hessian step on the tutorials' MLP compiled 2.4x faster
# (25 s against 61 s on the loaded 2-core CPU) and the numbers are the same
# operations. XLA:CPU's fusion emitters are off too (the tests' conftest.py
# gives the measurement: 1.7x faster compilation, the same run time).
# Compiled programs are also kept on disk between builds.
for _flag in ("--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "_build", ".jax_cache"))

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "anisonoise"
copyright = "2026, the anisonoise authors"
author = "the anisonoise authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
exclude_patterns = ["_build", "_generated", "jupyter_execute", "Thumbs.db",
                    ".DS_Store", "**.ipynb_checkpoints"]

# MyST notebooks (text files in the repository), executed at every build.
# Executed through jupyter-cache: a notebook whose code is unchanged since
# the last build is not run again (the cache is docs/_build/.jupyter_cache;
# a clean checkout, as in CI, runs every notebook).
nb_execution_mode = "cache"
nb_execution_raise_on_error = True
# Per cell. Every tutorial runs in under a minute alone on a 2-core CPU;
# the limit leaves a 30x margin for a machine shared with other work (a
# 600 s limit failed a correct build on a loaded machine).
nb_execution_timeout = 1800
nb_merge_streams = True
# What a cell writes to stderr (XLA's "slow_operation_alarm" and other C++
# logs, progress bars) is not part of the page; a cell that raises still
# fails the build.
nb_output_stderr = "remove"
myst_enable_extensions = ["dollarmath", "amsmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# No ``autodoc_default_options``: under Sphinx 9 a default of
# ``{"members": False}`` overrides the explicit ``:members:`` lists of
# api.md and renders the submodules empty (tests/test_docs.py reads the
# built inventory to keep it so).
# Signatures read as the source writes them, not as the expanded unions.
autodoc_type_aliases = {
    "chex.Array": "chex.Array",
    "chex.Numeric": "chex.Numeric",
    "chex.PRNGKey": "chex.PRNGKey",
    "jax.Array": "jax.Array",
    "np.ndarray": "numpy.ndarray",
    "Params": "Params",
    "Batch": "Batch",
    "KeyLike": "KeyLike",
    "LossFn": "LossFn",
    "Matvec": "Matvec",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "anisonoise"
html_theme_options = {"show_toc_level": 2}
html_static_path = []
suppress_warnings = ["mystnb.unknown_mime_type"]

# Links into the documentation of the libraries the API speaks of. Each
# project's published inventory is read first; where the build has no
# network (as on the machine this project is built on), Sphinx falls back
# without a warning to a local inventory written from ``_FALLBACK_TARGETS``
# below (only the names this site links to), so ``-W`` builds pass offline
# and the links point at the same pages.
intersphinx_timeout = 5
_INTERSPHINX = {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "jax": "https://docs.jax.dev/en/latest/",
    "optax": "https://optax.readthedocs.io/en/latest/",
    "flax": "https://flax.readthedocs.io/en/latest/",
}
_FALLBACK_TARGETS = {  # (name, role, page; "$" stands for the name)
    "python": [
        ("typing.Any", "py:data", "library/typing.html#$"),
        ("typing.NamedTuple", "py:function", "library/typing.html#$"),
        ("collections.abc.Callable", "py:class",
         "library/collections.abc.html#$"),
        ("collections.abc.Iterator", "py:class",
         "library/collections.abc.html#$"),
        ("ValueError", "py:exception", "library/exceptions.html#$"),
        ("TypeError", "py:exception", "library/exceptions.html#$"),
    ],
    "numpy": [
        ("numpy.ndarray", "py:class", "reference/generated/$.html#$"),
        ("numpy.number", "py:class", "reference/arrays.scalars.html#$"),
        ("numpy.bool", "py:class", "reference/arrays.scalars.html#$"),
    ],
    "jax": [
        ("jax.Array", "py:class", "_autosummary/$.html#$"),
        ("jax.vmap", "py:function", "_autosummary/$.html#$"),
        ("jax.jit", "py:function", "_autosummary/$.html#$"),
        ("jax.make_mesh", "py:function", "_autosummary/$.html#$"),
        ("jax.lax.map", "py:function", "_autosummary/$.html#$"),
    ],
    "optax": [
        ("optax.GradientTransformationExtraArgs", "py:class",
         "api/transformations.html#$"),
        ("optax.GradientTransformation", "py:class",
         "api/transformations.html#$"),
        ("optax.chain", "py:function", "api/combining_optimizers.html#$"),
        ("optax.sgd", "py:function", "api/optimizers.html#$"),
    ],
    "flax": [
        ("flax.nnx.Module", "py:class", "api_reference/flax.nnx/module.html#$"),
        ("flax.nnx.Rngs", "py:class", "api_reference/flax.nnx/rnglib.html#$"),
        ("flax.nnx.Optimizer", "py:class",
         "api_reference/flax.nnx/training/optimizer.html#$"),
    ],
}
_INVENTORY_DIR = os.path.join(os.path.dirname(__file__), "_generated",
                              "inventories")
intersphinx_mapping = {
    name: (url, (None, os.path.join(_INVENTORY_DIR, f"{name}.inv")))
    for name, url in _INTERSPHINX.items()
}
# Names that stay unresolved on purpose, each with its reason.
nitpick_ignore = [
    # chex's type aliases (unions of array types): chex publishes no
    # inventory entry for them; the signatures show the alias by name.
    ("py:class", "chex.Array"),
    ("py:class", "chex.Numeric"),
    ("py:class", "chex.PRNGKey"),
    # The library's own aliases of ``typing.Any`` and callables, named in
    # signatures for readability (documented in the Args sections).
    ("py:class", "Params"),
    ("py:class", "Batch"),
    ("py:class", "KeyLike"),
    ("py:class", "LossFn"),
    ("py:class", "Matvec"),
]
# Objects whose runtime home is a private module: link them to their
# public name.
_PUBLIC_NAMES = {
    "jax.jaxlib._jax.Array": "jax.Array",
    "jaxlib._jax.Array": "jax.Array",
    "optax._src.base.GradientTransformationExtraArgs":
        "optax.GradientTransformationExtraArgs",
    "optax._src.base.GradientTransformation": "optax.GradientTransformation",
    "flax.nnx.module.Module": "flax.nnx.Module",
    "nnx.Rngs": "flax.nnx.Rngs",
}


def _alias_in_union(app, what, name, obj, options, signature, annotation):
  """Show an alias inside a union by its name: Sphinx 9 renders
  ``chex.Numeric | None`` as ``TypeAliasForwardRef('chex.Numeric') | None``.
  """
  import re

  def fix(text):
    return text and re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", text)

  return fix(signature), fix(annotation)


def _module_signature(app, what, name, obj, options, signature, annotation):
  """Flax NNX modules show their ``__init__``'s arguments, not the
  metaclass's ``(*args, **kwargs)``."""
  if what != "class" or not signature or "*args" not in signature:
    return None
  import inspect
  init = inspect.signature(obj.__init__)
  params = list(init.parameters.values())[1:]  # without self
  import re
  text = str(init.replace(parameters=params))
  return re.sub(r": '([^']+)'", r": \1", text), annotation  # unquoted


def _write_fallback_inventories(app, config):
  """Write ``_FALLBACK_TARGETS`` as Sphinx (version 2) inventories."""
  import zlib
  os.makedirs(_INVENTORY_DIR, exist_ok=True)
  for name, targets in _FALLBACK_TARGETS.items():
    lines = "".join(f"{obj} {role} 1 {uri.replace('$', obj)} -\n"
                    for obj, role, uri in targets)
    head = (f"# Sphinx inventory version 2\n# Project: {name}\n"
            "# Version: \n# The remainder of this file is compressed using "
            "zlib.\n")
    with open(os.path.join(_INVENTORY_DIR, f"{name}.inv"), "wb") as f:
      f.write(head.encode() + zlib.compress(lines.encode()))


def _public_name(app, env, node, contnode):
  """Resolve a private runtime path (``_PUBLIC_NAMES``) by its public name."""
  target = node.get("reftarget")
  if target not in _PUBLIC_NAMES:
    return None
  from sphinx.ext import intersphinx
  node["reftarget"] = _PUBLIC_NAMES[target]
  return intersphinx.missing_reference(app, env, node, contnode)


# The benchmark pages' sections: each result file of ``benchmarks/results``
# under the question it answers, with a readable title.
_BENCHMARK_SECTIONS = {
    "trajectory": [
        ("trajectory_lenet", "LeNet, 100 steps from initialisation and from"
         " theta_GD"),
        ("trajectory_lenet_conv", "LeNet as a user writes it (lax.conv),"
         " 100 steps from initialisation"),
        ("trajectory_mlp", "MLP 784-64-10, 100 steps from initialisation"),
        ("trajectory_mlp4k", "Tanh MLP (D = 3,850) with the dense reference,"
         " 100 steps from initialisation"),
        ("trajectory_mlp4k_tol", "The same: cost against captured curvature,"
         " by tol"),
        ("block_products", "A block of 20 Hessian products: one at a time,"
         " lax.map, vmap"),
        ("warm_vs_cold_lenet5", "A warm start against a cold solve along a"
         " run: LeNet-5 with nnx.Conv"),
        ("study_steps_long", "The Fashion-MNIST study's long runs: 100 steps"
         " of GLD leading and GLD Hessian from theta_GD"),
    ],
    "step_cost": [
        ("step_cost_lenet", "LeNet, every dynamics, refresh 1 and 10"),
        ("step_cost_lenet_hessian_default",
         "LeNet, the Hessian noises with their default estimator"),
        ("step_cost_lenet_settled", "LeNet, a cold against a settled refresh"),
        ("step_cost_mlp", "MLP 784-64-10, every dynamics, refresh 1 and 10"),
        ("step_cost_mlp_hessian_default",
         "MLP, the Hessian noises with their default estimator"),
        ("step_cost_mlp_settled", "MLP, a cold against a settled refresh"),
        ("refresh_profile_mlp", "MLP, where a settled refresh spends its time"),
    ],
    "estimators": [
        ("trace_estimators", "The spread and cost of each Tr(C) estimator"),
        ("warm_start_mlp", "MLP: cached eigenvalues along a GD trajectory"),
        ("warm_start_mlp_s0_1e-2", "MLP from initialisation, tol 1e-2"),
        ("warm_start_mlp_s0_none", "MLP from initialisation, no tol"),
        ("warm_start_mlp_s2000_1e-2", "MLP after 2,000 GD steps, tol 1e-2"),
        ("warm_start_mlp_s2000_none", "MLP after 2,000 GD steps, no tol"),
        ("warm_start_lenet", "LeNet: cached eigenvalues along a GD trajectory"),
    ],
    "peers": [
        ("peers", "Top-20 Hessian eigenpairs of the conv-free LeNet"),
        ("peers_plain_conv", "The same on LeNet written with convolutions"),
        ("solver_overhead", "Lanczos time beyond its matrix-vector products"),
    ],
    "memory": [
        ("memory_n4096", "MLP (D = 2,035,210), n = 4,096"),
        ("memory_n512", "MLP (D = 2,035,210), n = 512"),
        ("gpu/memory", "The same on one H100"),
        ("memory_transformer", "CharTransformer (D = 826,208), n = 1,024"
         " sequences of 64 tokens"),
    ],
    "scaling": [
        ("scaling", "Cost against D and n (MLPs, refresh 10)"),
    ],
    "many_hosts": [
        ("multi_process",
         "2 processes x 1 device against 1 process x 2 devices"),
    ],
    "gpu": [
        ("gpu/step_cost_lenet", "LeNet, every dynamics, on one H100"),
        ("gpu/scale", "VGG11, 5,000 images in chunks of 250, on one H100"),
        ("scale_cpu", "VGG11, 32 images, on the 2-core CPU (partial)"),
        ("scale_cpu_n4_chunk2",
         "VGG11, GLD Hessian in chunks of 2, on the 2-core CPU"),
        ("gpu/data_parallel",
         "examples/data_parallel.py, LeNet with GLD Hessian, on one H100"),
    ],
}


def _scalar_table(res: dict) -> str:
  """A result file without a table of its own: its scalar entries."""
  rows = [f"| `{key}` | {value:.4g} |" if isinstance(value, float)
          else f"| `{key}` | {value} |"
          for key, value in res.items()
          if isinstance(value, (int, float, str))]
  return "| entry | value |\n|---|---|\n" + "\n".join(rows)


def _benchmark_table(name: str) -> str:
  """One result file as markdown: by its benchmark's own ``markdown``
  function where it has one (never copied by hand), else the table the
  benchmark wrote next to it, else its scalar entries."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  base = os.path.join(ROOT, "benchmarks", "results", name)
  with open(base + ".json") as f:
    res = json.load(f)
  stem = os.path.basename(name)
  module = next((m for m in ("step_cost", "peers", "memory", "scaling",
                             "scale", "warm_start", "trace_estimators",
                             "trajectory", "block_products",
                             "multi_process", "study_steps",
                             "warm_vs_cold")
                 if stem == m or stem.startswith(m + "_")), None)
  if module is not None:
    return importlib.import_module(module).markdown(res)
  if os.path.exists(base + ".md"):
    with open(base + ".md") as f:
      return f.read()
  return _scalar_table(res)


def _benchmark_pages() -> dict[str, str]:
  """``{section: markdown}``; a result file in no section gets its own."""
  results = os.path.join(ROOT, "benchmarks", "results")
  listed = {name for files in _BENCHMARK_SECTIONS.values()
            for name, _ in files}
  found = {os.path.relpath(p, results)[:-len(".json")]
           for p in glob.glob(os.path.join(results, "**", "*.json"),
                              recursive=True)}
  sections = dict(_BENCHMARK_SECTIONS)
  sections["other"] = [(name, name) for name in sorted(found - listed)]
  pages = {}
  for section, files in sections.items():
    parts = [f"### {title}\n\n`benchmarks/results/{name}.json`\n\n"
             f"{_benchmark_table(name)}\n"
             for name, title in files if name in found]
    pages[section] = "\n".join(parts)
  if pages["other"]:  # listed in no section above: shown, not lost
    pages["other"] = "## Other result files\n\n" + pages["other"]
  return pages


# The toy studies' committed results, rendered by each study's own
# ``markdown_table`` (results page -> (program, result file)).
_STUDY_TABLES = {
    "fig2_table.md": ("fig2_toy", "examples/results/fig2/fig2.json"),
    "fig4_table.md": ("fig4_one_hidden_layer",
                      "examples/results/fig4/fig4.json"),
    "fmnist_quick_summary.md": ("train.escape_summary",
                                "examples/results/fmnist_quick/results.json"),
    "study_steps_long.md": ("study_steps.markdown",
                            "benchmarks/results/study_steps_long.json"),
    # Several runs (seeds) of one study: the function takes their list.
    "fortunes_seeds.md": ("train.seeds_table", [
        f"examples/results/fortunes/seed{s}/results.json" for s in range(3)]),
    "fortunes_tracking.md": ("train.tracking_table",
                             "examples/results/fortunes/seed0/results.json"),
    "fortunes_escape.md": ("train.escape_summaries", [
        f"examples/results/fortunes/seed{s}/results.json" for s in range(3)]),
}


def _study_table(module: str, result: str | list[str]) -> str:
  """A study's committed result rendered by the study's own code:
  ``module``'s ``markdown_table``, or ``module.function``; for a list of
  results (the seeds of one study), the function of their list."""
  results = [result] if isinstance(result, str) else result
  missing = [r for r in results if not os.path.exists(os.path.join(ROOT, r))]
  if missing:
    return (f"*Not committed yet: run the command above to write"
            f" `{missing[0]}`.*\n")
  for folder in ("benchmarks", "examples", "examples/noisy_minima"):
    sys.path.insert(0, os.path.join(ROOT, folder))
  summaries = []
  for r in results:
    with open(os.path.join(ROOT, r)) as f:
      summaries.append(json.load(f))
  summary = summaries[0] if isinstance(result, str) else summaries
  module, _, function = module.partition(".")
  render = getattr(importlib.import_module(module),
                   function or "markdown_table")
  return render(summary) + "\n"


def _write_generated(app):
  out = os.path.join(app.srcdir, "_generated")
  os.makedirs(out, exist_ok=True)
  texts = {f"benchmarks_{section}.md": text
           for section, text in _benchmark_pages().items()}
  for name, (module, result) in _STUDY_TABLES.items():
    texts[name] = _study_table(module, result)
  # The cost table of the home page and the guide (the README's is checked
  # against it by tests/test_docs.py).
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  texts["cost_table.md"] = importlib.import_module(
      "trajectory").cost_table() + "\n"
  for name, text in texts.items():
    path = os.path.join(out, name)
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
  app.connect("config-inited", _write_fallback_inventories)
  app.connect("missing-reference", _public_name)
  app.connect("autodoc-process-signature", _alias_in_union)
  app.connect("autodoc-process-signature", _module_signature, priority=400)
  app.connect("builder-inited", _write_generated)
  app.connect("build-finished", _copy_mathjax)
