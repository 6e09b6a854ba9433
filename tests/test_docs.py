"""The documentation covers the public API (as optax checks its API docs)."""

import os
import re

import anisonoise

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


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
