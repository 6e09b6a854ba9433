"""Every setting of a study, and the presets of each data set.

A :class:`Config` is stored with the results and the checkpoints: a run
resumed with other settings is refused, not silently mixed.
"""

from __future__ import annotations

import dataclasses

import anisonoise

DATASETS = ("fashion_mnist", "svhn", "cifar10", "fortunes")
# Table 1's dynamics and the follow-ups' (M-SGD, Anti-PGD).
ALL_DYNAMICS = anisonoise.DYNAMICS + anisonoise.FAMILY_DYNAMICS


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a run.

  The defaults are the paper's Fashion-MNIST protocol (Section 5.3,
  App. D.3); :data:`PRESETS` holds the SVHN and CIFAR-10 ones (App. D.4).
  """

  dataset: str = "fashion_mnist"
  model: str = "lenet"         # "lenet", "vgg11" or "transformer"
  vgg_width: float = 1.0       # VGG11 channel multiplier (1: the paper's)
  # Fortunes: sequences of seq_len characters (one sequence, one example;
  # num_clean + num_corrupt training sequences, num_test test ones) and the
  # CharTransformer's width, heads and blocks.
  seq_len: int = 32
  tf_dim: int = 32
  tf_heads: int = 4
  tf_layers: int = 2
  synthetic: bool = False      # random class-coloured images (tests only)
  num_clean: int = 1000        # Fashion-MNIST: correctly labelled examples
  num_corrupt: int = 200       # Fashion-MNIST: examples with random labels
  num_clean_after: int = 0     # Fashion-MNIST: clean examples after them
  # Fashion-MNIST: "zhu2019" trains on the training file (corrupted as
  # above) and tests on the test file; "wu2020" trains on the first
  # ``num_clean`` images of the test file and tests on the first
  # ``num_test`` of the training file, as uuujf/MultiNoise's mnist2np.py.
  fmnist_split: str = "zhu2019"
  pixels: str = "unit"         # "unit": [-1, 1]; "raw": 0-255 (MultiNoise)
  init: str = "truncated"      # LeNet: "truncated" normal weights, zero
  #                              biases; "normal": every parameter N(0,
  #                              0.02^2), as MultiNoise's ConvSmall
  num_train: int = 0           # SVHN / CIFAR-10 training images (0: all)
  num_test: int = 10_000
  svhn_split: str = "paper"    # "paper": train on test_32x32.mat[:25,000]
  chunk_size: int | None = None  # examples per vectorised pass (None: all)
  gd_lr: float = 0.1
  gd_steps: int = 3000
  gd_eval_every: int = 100
  gd_sharpness_every: int = 500
  lr: float = 0.07
  steps: int = 20_000          # the authors' scripts' default ``maxiter``
  # Per-dynamics step counts overriding ``steps``: ((name, steps), ...).
  dynamics_steps: tuple[tuple[str, int], ...] = ()
  batch_size: int = 20
  k: int = 20
  const_std: float = 1e-3
  estimation_size: int | None = None  # the M-SGD "-B" rows' sub-batch b
  refresh_low_rank: int = 10   # GLD leading and GLD Hessian
  refresh_eigvec: int = 1      # GLD 1st eigvec(H)
  refresh_diagonal: int = 1    # GLD dynamic and GLD diag
  early_steps: int = 50        # Fig. 8
  early_eval_every: int = 1
  eval_every: int = 100
  sharpness_every: int = 1000
  sharpness_samples: int = 1000
  sharpness_delta: float = 0.01
  spectrum_eigs: int = 400     # 0: no spectrum at theta_GD
  spectrum_iters: int | None = None  # None: 2 * spectrum_eigs + 20
  diag_every: int = 1000       # SGD-trajectory diagnostics (0: none)
  diag_samples: int = 100
  lanczos_iters: int | None = None  # None: the transforms' default
  diag_lanczos_iters: int = 30      # (lambda_1, u_1) of the projection coef.
  stability_batches: int = 0   # minibatch Hessians' lambda_1 at theta_GD
  stability_iters: int = 40    # Lanczos iterations for each of them
  # Along the GD phase, every track_every steps (0: never): the top
  # track_eigs Hessian eigenvalues, Tr(H Sigma) against Tr(H Sigma_bar)
  # and the noise norms (diag_samples draws), and per block of the
  # parameters its Hessian trace (Hutchinson, diag_samples probes) and top
  # eigenvalue (track_block_iters Lanczos iterations).
  track_every: int = 0
  track_eigs: int = 20
  track_block_iters: int = 20
  dynamics: tuple[str, ...] = anisonoise.DYNAMICS

  def refresh_every(self, name: str) -> int:
    """How often the noise factor of dynamics ``name`` is re-estimated."""
    if name in ("GLD leading", "GLD Hessian"):
      return self.refresh_low_rank
    if name == "GLD 1st eigvec(H)":
      return self.refresh_eigvec
    return self.refresh_diagonal

  def steps_of(self, name: str) -> int:
    """How many steps dynamics ``name`` runs from theta_GD."""
    return dict(self.dynamics_steps).get(name, self.steps)


# App. D.4: VGG11, lr 0.05 for every dynamics, m = 100, GLD const 1e-3,
# GLD dynamic / diag re-estimated every 10 steps, expected sharpness from
# 100 draws at delta 0.01, no augmentation; the paper runs GD, GLD const,
# dynamic, diag and SGD, and the cheap rest is offered here as well.
_VGG_PAPER = dict(
    model="vgg11", gd_lr=0.05, lr=0.05, batch_size=100, const_std=1e-3,
    refresh_diagonal=10, refresh_low_rank=10, refresh_eigvec=10,
    sharpness_samples=100, sharpness_delta=0.01, chunk_size=500,
    steps=10_000, eval_every=200, gd_eval_every=200, gd_sharpness_every=1000,
    sharpness_every=1000, early_steps=0, spectrum_eigs=20, diag_every=0,
    dynamics=("GD", "GLD const", "GLD dynamic", "GLD diag", "SGD"),
)
# A reduced VGG study for a 2-core CPU (about 30 minutes): a quarter-width
# VGG11, 1,000 training and 1,000 test images, GD to a sharp minimum at a
# larger learning rate, then 200 steps of each dynamics.
_VGG_CPU = dict(
    _VGG_PAPER, vgg_width=0.25, num_train=1000, num_test=1000,
    gd_lr=0.05, gd_steps=800, gd_eval_every=100, gd_sharpness_every=400,
    steps=200, eval_every=25, sharpness_every=50, early_steps=20,
    early_eval_every=5, chunk_size=None, spectrum_eigs=10, k=10,
    dynamics=("GD", "GLD const", "GLD dynamic", "GLD diag", "GLD Hessian",
              "SGD", "GD + SGD noise"),
)
# Seconds, synthetic 32 x 32 images (not a reproduction): the VGG11 path of
# every phase, one dynamics of each kind (the Fashion-MNIST tiny preset runs
# every dynamics and diagnostic).
_VGG_TINY = dict(
    _VGG_PAPER, vgg_width=0.0625, synthetic=True, num_train=40, num_test=30,
    gd_steps=6, gd_eval_every=3, gd_sharpness_every=6, steps=4, k=2,
    batch_size=8, chunk_size=16, refresh_low_rank=2, refresh_eigvec=2,
    refresh_diagonal=2, early_steps=2, early_eval_every=2, eval_every=2,
    sharpness_every=2, sharpness_samples=4, spectrum_eigs=2,
    spectrum_iters=6, lanczos_iters=4, diag_every=0,
    dynamics=("GD", "GLD diag", "GLD Hessian", "SGD"),
)

# Fig. 3's generalisation question on a 2-core CPU: SGD for the authors'
# 20,000 steps, the full-batch dynamics for 3,000 (a full-batch step costs
# about 100 SGD steps), the low-rank ones for 1,000; evaluations thinned to
# every 200 steps after the first 50 (each one every step: the collapse
# right after theta_GD), the expected sharpness every 2,000; the lambda_1 of
# 200 minibatch Hessians at theta_GD against SGD's stability limit 2 / lr.
# Extend any dynamics with ``--steps`` (a finished run resumes from its
# checkpoint); on a GPU, ``--steps 20000`` runs every dynamics in full.
_FM_LONG = dict(
    gd_eval_every=250, gd_sharpness_every=1000, sharpness_samples=100,
    steps=20_000, dynamics_steps=(
        ("GD", 3000), ("GLD const", 3000), ("GLD dynamic", 3000),
        ("GLD diag", 3000), ("GD + SGD noise", 3000), ("GLD leading", 1000),
        ("GLD Hessian", 1000), ("GLD 1st eigvec(H)", 1000)),
    early_steps=50, early_eval_every=1, eval_every=200, sharpness_every=2000,
    spectrum_eigs=20, diag_every=2000, diag_samples=20, refresh_eigvec=10,
    refresh_diagonal=10, stability_batches=200,
)

# Wu et al. (ICML 2020), Fig. 1(a): every dynamics trained from
# initialisation (no GD phase) with the settings of their FashionMNIST
# scripts (uuujf/MultiNoise): 1,000 training images (the test file's first),
# their ConvSmall (this LeNet; every parameter N(0, 0.02^2)), raw 0-255
# pixels, lr 0.01, 10,001 iterations ("iters"). Changed: m = 20 for SGD and
# every matched noise (bgd.py's keep-probability 0.02 of 1,000; sgd.py's
# default batch is 50), the magnitudes from ``batch_size`` (their --std is a
# flag without a default value that matches), the "-B" sub-batch b = 100
# (gdStoCov.py's default is b = n), test accuracy on 10,000 images of the
# training file (theirs: all 60,000) every 100 steps and every 10 of the
# first 100 (theirs: each of the first 100).
_MSGD = dict(
    fmnist_split="wu2020", pixels="raw", init="normal", num_clean=1000,
    num_corrupt=0, num_test=10_000, gd_steps=0, gd_eval_every=1,
    gd_sharpness_every=1, lr=0.01, steps=10_001, batch_size=20,
    estimation_size=100, early_steps=100, early_eval_every=10,
    eval_every=100, sharpness_every=1000, sharpness_samples=100,
    spectrum_eigs=0, diag_every=0, stability_batches=0,
    dynamics=("GD", "SGD", "MSGD-Fisher", "MSGD-Cov", "MSGD-Bernoulli",
              "MSGD-Cov-B"),
)

# Beyond the paper: a character transformer on Debian's fortune cookies
# (apt-get install fortunes), the Fashion-MNIST protocol as it is: full-batch
# GD to a sharp point that fits 400 clean sequences and 100 whose targets
# are redrawn at random, then each dynamics from it at half GD's learning
# rate. One sequence of 16 characters is one example. At lr 1.0 GD fits 88%
# of the random targets by step 1,750 (probed: 1,000 sequences fitted 21%
# of theirs by step 1,500, too slow for a CPU). Along the GD phase the
# paper's quantities every 250 steps (track_every).
_FORTUNES = dict(
    dataset="fortunes", model="transformer", seq_len=16, tf_dim=32,
    tf_heads=4, tf_layers=2, num_clean=400, num_corrupt=100, num_test=1000,
    gd_lr=1.0, gd_steps=2000, gd_eval_every=100, gd_sharpness_every=500,
    lr=0.5, batch_size=20, k=20, steps=200, early_steps=20,
    early_eval_every=5, eval_every=25, sharpness_every=50,
    sharpness_samples=50, spectrum_eigs=20, diag_every=50, diag_samples=20,
    refresh_low_rank=10, refresh_diagonal=10, track_every=250,
    stability_batches=0,
    dynamics=("GD", "SGD", "GD + SGD noise", "GLD Hessian", "GLD const"),
)

PRESETS: dict[str, dict[str, Config]] = {
    "fashion_mnist": {
        # The full protocol; meant for a GPU, runnable anywhere (it resumes).
        "paper": Config(),
        # Within 20 minutes on a 2-core CPU: the full data, model and GD
        # phase, 100 steps of each dynamics instead of 20,000 (the escape
        # happens in the first 50, Fig. 8), every factor refreshed every 10
        # steps, fewer Monte Carlo samples and the top 150 eigenvalues.
        "quick": Config(
            gd_eval_every=250, gd_sharpness_every=1000, steps=100,
            early_eval_every=5, eval_every=25, sharpness_every=50,
            sharpness_samples=100, spectrum_eigs=150, diag_every=50,
            diag_samples=20, refresh_eigvec=10, refresh_diagonal=10,
        ),
        # The generalisation runs, on the paper's text's 1,000 + 200 images
        # and on the authors' script's 6,000 (positions 1000-1199 relabelled).
        "long": Config(**_FM_LONG),
        "long_authors": Config(num_clean_after=4800, **_FM_LONG),
        # Wu et al.'s Fig. 1(a) at their length (a GPU's run) and on a
        # 2-core CPU: 1,000 steps, by which GD fits 96% of the 1,000 images
        # (75-77 minutes a seed with three seeds sharing the two cores).
        "msgd_paper": Config(**_MSGD),
        "msgd": Config(**dict(_MSGD, steps=1000)),
        # Seconds: a smoke test of every code path (not a reproduction).
        "tiny": Config(
            num_clean=40, num_corrupt=10, num_test=100, gd_steps=6,
            gd_eval_every=3, gd_sharpness_every=6, steps=4, k=2,
            refresh_low_rank=2, refresh_eigvec=2, refresh_diagonal=2,
            early_steps=2, early_eval_every=2, eval_every=2,
            sharpness_every=2, sharpness_samples=4, spectrum_eigs=4,
            spectrum_iters=8, diag_every=2, diag_samples=2, lanczos_iters=4,
            diag_lanczos_iters=4, stability_batches=3, stability_iters=8,
            dynamics_steps=(("GD", 2),),
        ),
    },
    "svhn": {
        # 25,000 training images, about 70,000 test images, GD 3,000 steps.
        "paper": Config(dataset="svhn", num_train=25_000, num_test=70_000,
                        gd_steps=3000, **_VGG_PAPER),
        "cpu": Config(dataset="svhn", **_VGG_CPU),
        "tiny": Config(dataset="svhn", **_VGG_TINY),
    },
    "fortunes": {
        "cpu": Config(**_FORTUNES),
        # Four times the width and the sequences, twice their length: for a
        # GPU (benchmarks/gpu_check.sh).
        "gpu": Config(**dict(_FORTUNES, seq_len=32, tf_dim=128,
                             num_clean=1600, num_corrupt=400,
                             num_test=2000, gd_steps=3000)),
        # Seconds, on text the run makes itself (synthetic).
        "tiny": Config(**dict(
            _FORTUNES, synthetic=True, seq_len=8, tf_dim=8, tf_heads=2,
            tf_layers=1, num_clean=24, num_corrupt=6, num_test=20,
            gd_steps=6, gd_eval_every=3, gd_sharpness_every=6, steps=4, k=2,
            early_steps=2, early_eval_every=2, eval_every=2,
            sharpness_every=2, sharpness_samples=4, spectrum_eigs=3,
            spectrum_iters=8, diag_every=2, diag_samples=2, lanczos_iters=4,
            diag_lanczos_iters=4, refresh_low_rank=2, refresh_diagonal=2,
            track_every=3, track_eigs=3, track_block_iters=4)),
    },
    "cifar10": {
        # The standard 50,000 / 10,000 split, GD 4,000 steps.
        "paper": Config(dataset="cifar10", num_train=50_000, num_test=10_000,
                        gd_steps=4000, **_VGG_PAPER),
        "cpu": Config(dataset="cifar10", **_VGG_CPU),
        "tiny": Config(dataset="cifar10", **_VGG_TINY),
    },
}


def get_config(dataset: str, preset: str) -> Config:
  """The preset ``preset`` of ``dataset``, with a clear error for either
  name unknown."""
  if dataset not in PRESETS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from"
                     f" {list(PRESETS)}.")
  if preset not in PRESETS[dataset]:
    raise ValueError(f"unknown preset {preset!r} for {dataset}; choose from"
                     f" {list(PRESETS[dataset])}.")
  return PRESETS[dataset][preset]


def check(cfg: Config) -> None:
  """Refuses inconsistent settings before any work is done."""
  if cfg.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose from"
                     f" {list(DATASETS)}.")
  unknown = set(cfg.dynamics) - set(ALL_DYNAMICS)
  if unknown:
    raise ValueError(f"unknown dynamics {sorted(unknown)}; choose from"
                     f" {list(ALL_DYNAMICS)}.")
  if cfg.model not in ("lenet", "vgg11", "transformer"):
    raise ValueError(f"model must be 'lenet', 'vgg11' or 'transformer', got"
                     f" {cfg.model!r}.")
  if (cfg.dataset == "fortunes") != (cfg.model == "transformer"):
    raise ValueError("the fortunes corpus goes with model='transformer' and"
                     f" the transformer with it; got dataset {cfg.dataset!r},"
                     f" model {cfg.model!r}.")
  unknown = set(dict(cfg.dynamics_steps)) - set(ALL_DYNAMICS)
  if unknown:
    raise ValueError(f"dynamics_steps names unknown dynamics"
                     f" {sorted(unknown)}; choose from"
                     f" {list(ALL_DYNAMICS)}.")
  for field, allowed in (("fmnist_split", ("zhu2019", "wu2020")),
                         ("pixels", ("unit", "raw")),
                         ("init", ("truncated", "normal"))):
    if getattr(cfg, field) not in allowed:
      raise ValueError(f"{field} must be one of {list(allowed)}, got"
                       f" {getattr(cfg, field)!r}.")
  if cfg.gd_steps < 0:
    raise ValueError(f"gd_steps must be >= 0 (0: the dynamics start from"
                     f" the initialisation), got {cfg.gd_steps}.")
  if any(s < 1 for _, s in cfg.dynamics_steps) or cfg.steps < 1:
    raise ValueError("every dynamics must run at least one step; got steps"
                     f"={cfg.steps}, dynamics_steps={cfg.dynamics_steps}.")
  if cfg.svhn_split not in ("paper", "standard"):
    raise ValueError("svhn_split must be 'paper' or 'standard', got"
                     f" {cfg.svhn_split!r}.")
