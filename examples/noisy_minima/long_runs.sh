#!/bin/bash
# Fig. 3's generalisation runs on Fashion-MNIST, within a time budget,
# resumable: the `long` and `long_authors` presets (1,000 + 200 and
# 5,800 + 200 training images), seeds 0, 1 and 2. A first pass runs each
# dynamics to its preset's own steps (SGD 20,000, the full-batch dynamics
# 3,000, the low-rank ones 1,000); a second pass takes every dynamics to
# STEPS (default 20,000). No new segment of steps starts after SECONDS
# (main.py's --time-limit); a later call with the same OUT_DIR goes on from
# the checkpoints, also on another machine (copy OUT_DIR over). Once every
# seed of a preset has finished a pass, the seeds are combined
# (OUT_DIR/PRESET/seeds.md, fig3_seeds.png).
#
# Usage:
#   bash examples/noisy_minima/long_runs.sh OUT_DIR SECONDS [STEPS [MAIN_OPTIONS...]]
#
# MAIN_OPTIONS go to every main.py call (e.g. --data-dir DIR; by default
# the data come from $ANISONOISE_FASHION_MNIST_DIR, Debian's package or
# TFDS). PRESETS and SEEDS in the environment override the presets and
# seeds, PYTHON the interpreter (default python3). Compilations are cached
# in $JAX_COMPILATION_CACHE_DIR (default OUT_DIR/jax_cache), so that each
# seed does not compile again.
#
# Exit status: 0 when everything ran, 3 when the time ran out first (run
# again to go on), anything else when a run failed.
set -u
if [ $# -lt 2 ]; then
  echo "usage: bash $0 OUT_DIR SECONDS [STEPS [MAIN_OPTIONS...]]" >&2
  exit 2
fi
out=$1
budget=${2%.*}
steps=${3:-20000}
shift $(($# < 3 ? $# : 3))
here=$(cd "$(dirname "$0")" && pwd)
presets=${PRESETS:-long long_authors}
seeds=${SEEDS:-0 1 2}
py=${PYTHON:-python3}
end=$((SECONDS + budget))
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}

for pass in preset full; do
  for preset in $presets; do
    dirs=()
    for seed in $seeds; do
      left=$((end - SECONDS))
      if [ "$left" -le 0 ]; then
        echo "long_runs.sh: time limit reached before $preset seed $seed" \
             "($pass pass); run again to go on."
        exit 3
      fi
      more=()
      if [ "$pass" = full ]; then more=(--steps "$steps"); fi
      echo "=== $(date -u +%FT%TZ) $preset seed $seed, $pass pass" \
           "(${left} s left)"
      "$py" "$here/main.py" --dataset fashion_mnist --preset "$preset" \
          --seed "$seed" --out "$out/$preset/seed$seed" \
          --time-limit "$left" "${more[@]}" "$@"
      rc=$?
      if [ $rc -ne 0 ]; then exit $rc; fi
      dirs+=("$out/$preset/seed$seed")
    done
    "$py" "$here/main.py" --combine "${dirs[@]}" --out "$out/$preset" || exit
  done
done
echo "long_runs.sh: every run finished."
