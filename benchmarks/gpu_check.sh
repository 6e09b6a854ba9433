#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one run (at most 11 minutes and
# 45 s on one H100), for a host that already has jax with CUDA, flax, optax
# and chex:
#
#   pip install --no-deps -e . && bash benchmarks/gpu_check.sh OUT_DIR
#
# Writes into OUT_DIR: env.json (device, versions), step_cost_lenet.json
# (per-step cost of every dynamics on the paper's LeNet, refresh 1 and 10),
# scale.json (VGG11 at n = 5,000: compile time and per-step cost of every
# dynamics at refresh 10, top-20 Hessian eigenpairs with residuals, the same
# step on all local devices through the mesh path, peak device memory
# against chunk_size), memory.json (the diagnostics on an MLP with
# D = 2,035,210 and n = 4,096 against chunk_size), block_products.json
# (a block of 20 Hessian products one at a time, lax.map'd and vmap'd, on
# LeNet, the MLP and VGG11 at n = 500), trajectory_lenet.json (100
# consecutive steps of hessian_noise's defaults and the recommended calls
# from initialisation: cost per step and products per refresh), a .md
# table beside each, fmnist_msgd_paper/ (the M-SGD study's full-length
# preset) and fortunes_gpu/ (the character transformer's study, four times
# the CPU preset's width), each where its data are on the host and resumable
# (a second call goes on). Each step has its own time limit, so that one
# slow step cannot take the others with it; a step that fails leaves a note
# in OUT_DIR/failed.txt.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if ! timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"; then
    echo "$name: failed or timed out after $((SECONDS - t0)) s" \
      >> "$out/failed.txt"
  fi
  echo "== $name: $((SECONDS - t0)) s"
}

python -c "import json, jax, _common; print(json.dumps(_common.environment()))" \
  > "$out/env.json"
cat "$out/env.json"
step 75 step_cost_lenet python step_cost.py --model lenet --repeats 3 \
  --out "$out"
step 270 scale python scale.py --n 5000 --chunk-size 250 --repeats 2 \
  --mesh --memory-chunks 1000 250 --out "$out"
step 75 memory python memory.py --n 4096 --chunks 64 none --out "$out"
step 60 block_products python block_products.py --problems lenet mlp --vgg \
  --repeats 3 --out "$out"
step 90 trajectory_lenet python trajectory.py --problem lenet --start init \
  --out "$out"
# Wu et al.'s Fig. 1(a) at their length (10,001 steps per dynamics), where
# the Fashion-MNIST files are on the host ($ANISONOISE_FASHION_MNIST_DIR or
# Debian's package); resumable, so a second call goes on.
if python -c "from anisonoise import data; data.load_fashion_mnist('test')" \
    >/dev/null 2>&1; then
  step 45 fmnist_msgd_paper python ../examples/noisy_minima/main.py \
    --dataset fashion_mnist --preset msgd_paper --out "$out/fmnist_msgd_paper"
else
  echo "fmnist_msgd_paper: no Fashion-MNIST files on this host" \
    >> "$out/failed.txt"
fi
# The fortunes study's GPU preset, where Debian's fortunes package is (or
# $ANISONOISE_FORTUNES_DIR); --time-limit stops it cleanly, resumable.
if python -c "from anisonoise import data; data.load_fortunes()" \
    >/dev/null 2>&1; then
  step 75 fortunes_gpu python ../examples/noisy_minima/main.py \
    --dataset fortunes --preset gpu --time-limit 55 --out "$out/fortunes_gpu"
else
  echo "fortunes_gpu: no fortune cookie files on this host" \
    >> "$out/failed.txt"
fi
ls -l "$out"
