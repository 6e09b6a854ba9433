"""The documentation covers the public API (as optax checks its API docs)."""

import inspect
import json
import os
import posixpath
import re
import subprocess
import sys

import pytest

import anisonoise
import anisonoise.data
import anisonoise.models
import anisonoise.plotting

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_every_public_name_has_a_reference_entry():
  with open(os.path.join(DOCS, "api.md")) as f:
    text = f.read()
  documented = set(re.findall(
      r"\.\. (?:autofunction|autoclass|autodata|py:data):: anisonoise\.(\w+)",
      text))
  missing = sorted(set(anisonoise.__all__) - documented)
  assert not missing, f"add these public names to docs/api.md: {missing}"
  stale = sorted(documented - set(anisonoise.__all__))
  assert not stale, f"docs/api.md documents names not in __all__: {stale}"


def test_every_tutorial_is_in_the_table_of_contents():
  with open(os.path.join(DOCS, "index.md")) as f:
    index = f.read()
  for name in os.listdir(os.path.join(DOCS, "tutorials")):
    if name.endswith(".md"):
      assert f"tutorials/{name[:-3]}" in index, name


# The names each module makes public: its ``__all__``, or for the
# submodules, the functions and classes defined in them.
def _public_names(module):
  if hasattr(module, "__all__"):
    return set(module.__all__)
  return {name for name, value in vars(module).items()
          if not name.startswith("_")
          and (inspect.isroutine(value) or inspect.isclass(value))
          and getattr(value, "__module__", None) == module.__name__}


def test_built_site_documents_every_public_name(tmp_path):
  """Builds the site (notebooks not executed, nitpicky, warnings are
  errors) and reads its inventory: every public name of the four modules
  is a documented object, and every reference resolves."""
  pytest.importorskip("myst_nb")
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q",
       "-b", "html", "-D", "nb_execution_mode=off", DOCS, str(out)],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  from sphinx.util.inventory import InventoryFile
  with open(out / "objects.inv", "rb") as f:
    inventory = InventoryFile.load(f, "", posixpath.join)
  inventory = getattr(inventory, "data", inventory)  # a dict in Sphinx 9
  documented = {name for role in ("py:function", "py:class", "py:data",
                                  "py:exception")
                for name in inventory.get(role, {})}
  for module in (anisonoise, anisonoise.models, anisonoise.data,
                 anisonoise.plotting):
    missing = sorted(f"{module.__name__}.{name}"
                     for name in _public_names(module)
                     if f"{module.__name__}.{name}" not in documented)
    assert not missing, f"not rendered in the API reference: {missing}"
  # The quick study's page shows the committed results.json's numbers,
  # rendered by the study's own code.
  page = (out / "results" / "fmnist_quick.html").read_text()
  with open(os.path.join(ROOT, "examples", "results", "fmnist_quick",
                         "results.json")) as f:
    summary = json.load(f)
  assert f"test accuracy {summary['gd'][-1]['test_acc']:.4f}" in page
  assert page.count("below half of the corrupted subset from step") == 5
  # The scale page's many-hosts section, with its measured table.
  scale = (out / "scale.html").read_text()
  assert "Many hosts" in scale and "jax.distributed" in scale
  assert "2 processes x 1 device" in scale and "bytes" in scale
  # Page titles in the navigation are text, not TeX source; tables and
  # prose write the plus-minus sign.
  index = (out / "results" / "index.html").read_text()
  titles = set(re.findall(r'href="fig4_one_hidden_layer.html"[^>]*>(.*?)</a>',
                          index, re.S))
  assert "Fig. 4: Tr(HΣ) against Tr(HΣ̄), one hidden layer" in titles
  assert not any("mathrm" in t or "$" in t for t in titles), titles
  for page in (out / "results").glob("*.html"):
    assert " +- " not in page.read_text(), page.name
  # The fortunes study: its tables rendered from the seeds' results.json.
  fortunes = (out / "results" / "fortunes.html").read_text()
  assert "seeds [0, 1, 2]" in fortunes and "Not committed yet" not in fortunes


def test_readme_training_loop_runs(tmp_path):
  """The README's first Python block is a complete program: it runs."""
  with open(os.path.join(DOCS, "..", "README.md")) as f:
    readme = f.read()
  block = re.search(r"```python\n(.*?)```", readme, re.S)
  assert block, "README.md has no ```python block"
  assert readme[:block.end()].count("\n") <= 60, "first example past line 60"
  script = tmp_path / "readme_example.py"
  script.write_text(block.group(1))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "loss after 100 steps" in proc.stdout


def test_readme_cost_table_is_the_committed_measurement():
  """The README's table of the low-rank noises' cost along a run is the
  one ``benchmarks/trajectory.py`` builds from its committed JSON (the
  home page and the guide include it at build time), so the front page
  cannot drift from the measurement."""
  sys.path.insert(0, os.path.join(DOCS, "..", "benchmarks"))
  import trajectory  # pylint: disable=import-outside-toplevel

  table = trajectory.cost_table()
  assert table.count("\n") >= 5 and "| - | - | - | - | - |" not in table
  with open(os.path.join(DOCS, "..", "README.md")) as f:
    readme = f.read()
  assert table in readme, (
      "README.md's cost table differs from benchmarks/trajectory.py's"
      f" cost_table(); paste:\n{table}")
