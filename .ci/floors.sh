#!/usr/bin/env bash
# The declared floors, kept true: a fresh venv with exactly the lowest
# releases pyproject.toml allows (as one installable set: flax 0.12.4 pins
# optax 0.2.6), the package without its dependencies, then a subset that
# touches every module: every docstring example (anisonoise/), the models
# and the staged product's tests, the two-process jax.distributed test, and
# the README's loop. Usage: bash .ci/floors.sh (from the repository root).
set -euo pipefail
venv=/tmp/anisonoise-floors-venv
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "jax==0.10.1" "jaxlib==0.10.1" "flax==0.12.4" \
  "optax==0.2.6" "chex==0.1.87" "numpy==2.0.0" matplotlib tqdm \
  pytest pytest-xdist scipy orbax-checkpoint
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import jax, flax, optax, chex, numpy; print('floors:', jax.__version__, flax.__version__, optax.__version__, chex.__version__, numpy.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
  anisonoise tests/test_models.py tests/test_staging.py \
  tests/test_multiprocess.py
"$venv/bin/python" - > /tmp/anisonoise-floors-readme.py <<'PY'
import re
print(re.search(r"```python\n(.*?)```", open("README.md").read(), re.S)[1])
PY
"$venv/bin/python" /tmp/anisonoise-floors-readme.py
