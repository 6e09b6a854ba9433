"""Which dynamics leave GD's sharp minimum, and where they end (Zhu et al.,
ICML 2019): Figs. 3, 5, 7, 8 (Fashion-MNIST, LeNet, corrupted labels) and
Figs. 1, 6 (SVHN and CIFAR-10, VGG11), one protocol for all three.

Presets (``configs.PRESETS``): ``paper`` is each study's full protocol
(meant for a GPU; resumable anywhere); Fashion-MNIST's ``quick`` and the
VGG studies' ``cpu`` are reduced runs for a 2-core CPU (docs/reproducing.md
says what they reduce); ``tiny`` exercises every code path in seconds.
Fashion-MNIST's ``msgd`` and ``msgd_paper`` run Wu et al.'s (ICML 2020)
Fig. 1(a) instead: GD, SGD and the multiplicative noises from the
initialisation, on their 1,000 images. Beyond the paper, ``--dataset
fortunes`` runs the same protocol with a character transformer on
Debian's fortune cookies, with the paper's quantities along the GD phase.

Usage:
  python examples/noisy_minima/main.py --dataset fashion_mnist --preset quick
  python examples/noisy_minima/main.py --dataset svhn --preset cpu \\
      --data-dir ~/data/svhn --out results/svhn
  python examples/noisy_minima/main.py --figure1 results/svhn \\
      results/cifar10 --out results/fig1.png

Outputs in ``--out``: ``results.json``, ``table.md``, the figures,
``theta_gd.msgpack`` and ``checkpoints/`` (a killed run started again with
the same arguments resumes from its last checkpoint; ``--time-limit``
stops one cleanly, for machines lent for a few minutes at a time, and
``long_runs.sh`` drives the Fashion-MNIST long runs that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import anisonoise
from anisonoise import data

import configs
import plots
import train

DATA_HELP = {
    "fashion_mnist": f"the four IDX .gz files (default ${data.ENV_VAR}, else"
                     f" {data.DEFAULT_DIR}, else TFDS)",
    "svhn": f"train_32x32.mat / test_32x32.mat (default ${data.SVHN_ENV_VAR},"
            " else TFDS svhn_cropped)",
    "cifar10": "the cifar-10-batches-py directory or its parent (default"
               f" ${data.CIFAR10_ENV_VAR}, else TFDS cifar10)",
    "fortunes": "the fortune cookie files (default"
                f" ${data.FORTUNES_ENV_VAR}, else {data.FORTUNES_DIR},"
                " Debian's fortunes package)",
}


# The exit status of a run stopped by --time-limit (resumable).
TIME_LIMIT_STATUS = 3


def parse_args(argv=None, dataset_default: str | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default=dataset_default,
                      help=f"one of {list(configs.DATASETS)}")
  parser.add_argument("--preset", default=None,
                      help="fashion_mnist: paper, quick (default), long,"
                      " long_authors, msgd, msgd_paper, tiny;"
                      " svhn / cifar10: paper, cpu (default), tiny;"
                      " fortunes: cpu (default), gpu, tiny")
  parser.add_argument("--out", default=None,
                      help="output directory (default results/<dataset>)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir", default=None, help="; ".join(
      f"{k}: {v}" for k, v in DATA_HELP.items()))
  parser.add_argument("--steps", type=int, default=None,
                      help="override the preset's steps per dynamics")
  parser.add_argument("--lr", type=float, default=None,
                      help="override the dynamics' learning rate (the GD"
                      " phase to theta_GD keeps the preset's gd_lr)")
  parser.add_argument("--dynamics", nargs="+", default=None,
                      help=f"a subset of {list(anisonoise.DYNAMICS)};"
                      " results.json keeps those an earlier call in --out"
                      " ran from the same theta_GD")
  parser.add_argument("--chunk-size", type=int, default=None,
                      help="override the preset's examples per pass")
  parser.add_argument("--svhn-split", choices=("paper", "standard"),
                      default=None, help="SVHN: the authors' split (train on"
                      " test_32x32.mat[:25000]; default) or the standard one")
  parser.add_argument("--restart", action="store_true",
                      help="discard checkpoints in --out")
  parser.add_argument("--time-limit", type=float, default=None,
                      metavar="SECONDS", help="start no new segment of steps"
                      " after SECONDS; exit with status 3, everything done in"
                      " the checkpoints (the same command again resumes)")
  parser.add_argument("--combine", nargs="+", metavar="RUN_DIR",
                      help="join finished runs of one study with different"
                      " seeds: seeds.md (mean ± standard error) and"
                      " fig3_seeds.png into --out (a directory)")
  parser.add_argument("--collapse", type=int, default=None, metavar="STEPS",
                      help="re-run the first STEPS steps of each dynamics"
                      " from the theta_GD in --out, with the Hessian's top"
                      " eigenvalue at each iterate (collapse.json/.png)")
  parser.add_argument("--figure1", nargs="+", metavar="RUN_DIR",
                      help="draw Fig. 1 from finished runs' results.json"
                      " (one panel each) into --out (a .png path)")
  return parser, parser.parse_args(argv)


def config_from_args(args) -> configs.Config:
  preset = args.preset or ("quick" if args.dataset == "fashion_mnist"
                           else "cpu")
  cfg = configs.get_config(args.dataset, preset)
  if args.steps is not None:  # every dynamics, the preset's own included
    cfg = dataclasses.replace(cfg, dynamics_steps=())
  overrides = {"steps": args.steps, "lr": args.lr,
               "chunk_size": args.chunk_size,
               "svhn_split": args.svhn_split,
               "dynamics": tuple(args.dynamics) if args.dynamics else None}
  return dataclasses.replace(
      cfg, **{k: v for k, v in overrides.items() if v is not None})


def _summaries(parser, run_dirs: list[str]) -> list[dict]:
  summaries = []
  for d in run_dirs:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      parser.exit(2, f"error: {path} does not exist; run the study first.\n")
    with open(path) as f:
      summaries.append(json.load(f))
  return summaries


def main(argv=None, dataset_default: str | None = None) -> None:
  parser, args = parse_args(argv, dataset_default)
  if args.combine:
    summaries = _summaries(parser, args.combine)
    out = args.out or "seeds"
    try:
      table = train.seeds_table(summaries)
    except ValueError as e:
      parser.exit(2, f"error: {e}\n")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "seeds.md"), "w") as f:
      f.write(table + "\n")
    plots.plot_seeds(summaries, train.common_dynamics(summaries),
                     os.path.join(out, "fig3_seeds.png"))
    print(table)
    print(f"wrote {out}/seeds.md and fig3_seeds.png")
    return
  if args.figure1:
    summaries = _summaries(parser, args.figure1)
    out = args.out or "fig1.png"
    plots.figure1(summaries, out)
    print(f"wrote {out}")
    return
  if args.dataset is None:
    parser.exit(2, f"error: --dataset is required; one of"
                f" {list(configs.DATASETS)}.\n")
  out = args.out or os.path.join("results", args.dataset)
  t0 = time.perf_counter()
  if args.collapse is not None:
    try:
      train.collapse(out, config_from_args(args), args.seed, args.data_dir,
                     steps=args.collapse)
    except (data.DataError, train.ConfigMismatch, ValueError,
            FileNotFoundError) as e:
      parser.exit(2, f"error: {e}\n")
    print(f"wrote {out}/collapse.json and collapse.png in"
          f" {time.perf_counter() - t0:.1f} s")
    return
  try:
    cfg = config_from_args(args)
    summary = train.run(out, cfg, args.seed, args.data_dir, args.restart,
                        time_limit=args.time_limit)
  except (data.DataError, train.ConfigMismatch, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  except train.TimeLimit as e:
    parser.exit(TIME_LIMIT_STATUS, f"{e} Run the same command again to go"
                " on.\n")
  print(train.markdown_table(summary))
  print("\nseconds:", {k: round(v, 1) for k, v in summary["timings"].items()})
  print(f"wrote {out}/results.json, table.md and figures in"
        f" {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  sys.exit(main())
