"""The paper's figures, drawn from a study's ``results.json`` summary.

Fashion-MNIST: Fig. 3 (training accuracy, test accuracy and expected
sharpness against the iteration), Fig. 5 (the spectrum at theta_GD; along
SGD the projection coefficient and Tr(H Sigma) against Tr(H Sigma_bar)),
Fig. 7 (gradient and noise norms along SGD) and Fig. 8 (the first
iterations after theta_GD). SVHN and CIFAR-10: Fig. 6 (Fig. 3's layout)
and Fig. 1 (the final test accuracy of each dynamics, one panel per data
set; :func:`figure1` joins several studies).
"""

from __future__ import annotations

import os

import numpy as np

import anisonoise.plotting

TITLES = {
    "fashion_mnist": "FashionMNIST, {num_train} images, {num_corrupt} with"
                     " random labels",
    "svhn": "SVHN, VGG11 (width {vgg_width}), {num_train} training images",
    "cifar10": "CIFAR-10, VGG11 (width {vgg_width}), {num_train} training"
               " images",
    "fortunes": "Fortunes, CharTransformer (width {tf_dim}, {tf_layers}"
                " blocks), {num_train} sequences of {seq_len} characters,"
                " {num_corrupt} with random targets",
}


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _series(hist, key, offset=0):
  rows = [r for r in hist if key in r]
  return (np.array([r["step"] + offset for r in rows]),
          np.array([r[key] for r in rows]))


def start_point(summary: dict) -> str:
  """Where the dynamics start: theta_GD, or the initialisation (no GD
  phase, as Wu et al.'s Fig. 1(a)); the figures' and tables' word."""
  return "theta_GD" if summary["config"].get("gd_steps") else "initialisation"


def _title(summary: dict) -> str:
  cfg = dict(summary["config"])
  cfg["num_train"] = summary["data"]["num_train"]
  if cfg.get("fmnist_split") == "wu2020":
    return (f"FashionMNIST (Wu et al.'s split), {cfg['num_train']} images,"
            f" lr {cfg['lr']}, from initialisation")
  title = TITLES[cfg["dataset"]].format(**cfg)
  return (title + f" (synthetic {examples(summary)})" if cfg.get("synthetic")
          else title)


def examples(summary: dict) -> str:
  """What a study's examples are: images, or sequences (the fortunes)."""
  return ("sequences" if summary["config"]["dataset"] == "fortunes"
          else "images")


def plot_curves(summary: dict, path: str) -> None:
  """Fig. 3 / Fig. 6: training accuracy, test accuracy and expected
  sharpness against the iteration, theta_GD marked by a dashed line and the
  final test accuracy of each dynamics in the legend."""
  plt = _plt()
  gd = summary["gd"]
  t_gd = summary["config"]["gd_steps"]
  dyn = summary["dynamics"]
  steps = max(h[-1]["step"] for h in dyn.values())
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, key, label in zip(axes, ("train_acc", "test_acc", "sharpness"),
                            ("training accuracy", "test accuracy",
                             "expected sharpness")):
    if t_gd:
      x, y = _series(gd, key)
      ax.plot(x, y, "k.-", lw=0.8, ms=3, label="GD to theta_GD")
    for i, (name, hist) in enumerate(dyn.items()):
      x, y = _series(hist, key, t_gd)
      lab = f"{name} ({y[-1]:.3f})" if key == "test_acc" else name
      ax.plot(x, y, color=f"C{i}", lw=1.2, label=lab)
    if t_gd:
      ax.axvline(t_gd, color="k", ls="--", lw=0.8)
    ax.set(xlabel="iteration", ylabel=label)
    if steps < t_gd / 4:  # a short run: zoom on theta_GD and after
      ax.set_xlim(t_gd - 2 * steps, t_gd + 1.05 * steps)
    if key == "sharpness":
      vals = [r[key] for h in (gd, *dyn.values()) for r in h if key in r]
      if vals and min(vals) > 0:
        ax.set_yscale("log")
      else:
        ax.set_yscale("symlog", linthresh=1e-4)
  axes[1].legend(fontsize=7)
  fig.suptitle(_title(summary) + (" (dashed: theta_GD)" if t_gd else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_early(summary: dict, path: str) -> None:
  """Fig. 8: accuracies over the first iterations after theta_GD, with the
  training loss and the distance from theta_GD (where recorded)."""
  plt = _plt()
  early = summary["config"]["early_steps"]
  panels = [("train_acc", "training accuracy"), ("test_acc", "test accuracy"),
            ("train_loss", "training loss"),
            ("distance", "||theta - theta_GD||")]
  panels = [(k, lab) for k, lab in panels if any(
      k in r for h in summary["dynamics"].values() for r in h[1:])]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
  for ax, (key, label) in zip(axes, panels):
    for i, (name, hist) in enumerate(summary["dynamics"].items()):
      x, y = _series([r for r in hist if r["step"] <= early], key)
      ax.plot(x, y, ".-", color=f"C{i}", ms=3, lw=1.2, label=name)
    ax.set(xlabel=f"iteration after {start_point(summary)}", ylabel=label)
    if key in ("train_loss", "distance"):
      ax.set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_escape(summary: dict, path: str) -> None:
  """Fig. 5: the spectrum at theta_GD; along SGD, the projection
  coefficient and ``Tr(H Sigma)`` against ``Tr(H Sigma_bar)``."""
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ev = np.asarray(summary["spectrum"]["eigenvalues"])
  anisonoise.plotting.plot_hessian_spectrum(np.maximum(ev, 1e-12), axes[0])
  axes[0].set_title("top Hessian eigenvalues at theta_GD")
  sgd = summary["dynamics"].get("SGD", [])
  x, a = _series(sgd, "projection_coefficient")
  axes[1].plot(x, a, "o-", ms=3)
  axes[1].set(xlabel="SGD iteration after theta_GD",
              ylabel="projection coefficient a", yscale="log")
  x, hs = _series(sgd, "tr_h_sigma")
  _, hsb = _series(sgd, "tr_h_sigma_bar")
  axes[2].plot(x, np.maximum(hs, 1e-30), "o-", ms=3, label="Tr(H Sigma)")
  axes[2].plot(x, np.maximum(hsb, 1e-30), "s--", ms=3,
               label="Tr(H Sigma_bar)")
  axes[2].set(xlabel="SGD iteration after theta_GD", ylabel="indicator",
              yscale="log")
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_norms(summary: dict, path: str) -> None:
  """Fig. 7: mean-gradient norm against expected noise norm along SGD."""
  plt = _plt()
  sgd = summary["dynamics"].get("SGD", [])
  fig, ax = plt.subplots(figsize=(6, 4.2))
  x, g = _series(sgd, "grad_norm")
  _, s = _series(sgd, "noise_norm")
  ax.plot(x, g, ".-", label="||grad L|| (mean gradient)")
  ax.plot(x, s, ".-", label="sqrt(Tr Sigma) (expected noise norm)")
  ax.set(xlabel="SGD iteration after theta_GD", ylabel="L2 norm",
         yscale="log")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def figure1(summaries: list[dict], path: str) -> None:
  """Fig. 1: the final test accuracy of each dynamics, one panel per study
  (SVHN left, CIFAR-10 right in the paper), theta_GD's as a dashed line."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(summaries),
                           figsize=(6 * len(summaries), 4.2), squeeze=False)
  for ax, summary in zip(axes[0], summaries):
    names = list(summary["table"])
    acc = [summary["table"][n]["test_acc"] for n in names]
    ax.bar(range(len(names)), acc, color=[f"C{i}" for i in range(len(names))])
    for i, a in enumerate(acc):
      ax.text(i, a, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(summary["gd"][-1]["test_acc"], color="k", ls="--", lw=0.8,
               label="theta_GD")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right",
                  fontsize=8)
    lo = min(acc + [summary["gd"][-1]["test_acc"]])
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(acc) + 0.03))
    ax.set(ylabel="test accuracy", title=_title(summary))
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_stability(summary: dict, path: str) -> None:
  """The top eigenvalue of random minibatch Hessians at theta_GD against the
  number of corrupted examples in the minibatch, with SGD's stability limit
  ``2 / lr`` and the full-batch ``lambda_1``."""
  plt = _plt()
  st = summary["stability"]
  lam = np.asarray(st["lambda_1"])
  cnt = np.asarray(st["num_corrupted"])
  rng = np.random.default_rng(0)  # horizontal jitter only
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ax.scatter(cnt + rng.uniform(-0.2, 0.2, cnt.shape), lam, s=10, alpha=0.6)
  ax.axhline(st["limit"], color="r", ls="--", lw=1,
             label=f"2 / lr = {st['limit']:.3g}"
             f" ({100 * st['fraction_unstable']:.0f}% of minibatches above)")
  if summary.get("spectrum"):
    lam_full = summary["spectrum"]["eigenvalues"][0]
    ax.axhline(lam_full, color="k", ls=":", lw=1,
               label=f"full batch: {lam_full:.3g}")
  ax.set(xlabel="corrupted examples in the minibatch",
         ylabel="lambda_1 of the minibatch Hessian", yscale="log",
         title="SGD's linear stability at theta_GD")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_collapse(result: dict, path: str) -> None:
  """The first steps after theta_GD: the full-batch training loss and the
  top eigenvalue of the full-batch Hessian at each iterate against the
  stability limit ``2 / lr`` (SGD: also the minibatch it draws)."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for i, (name, rows) in enumerate(result["dynamics"].items()):
    x = [r["step"] for r in rows]
    axes[0].plot(x, [r["train_loss"] for r in rows], ".-", color=f"C{i}",
                 label=name)
    axes[1].plot(x, [r["lambda_1"] for r in rows], ".-", color=f"C{i}",
                 label=name)
    mb = [(r["step"], r["minibatch_lambda_1"]) for r in rows
          if "minibatch_lambda_1" in r]
    if mb:
      axes[1].plot(*zip(*mb), "x", color=f"C{i}", ms=6,
                   label=f"{name}: its minibatch")
  axes[1].axhline(result["limit"], color="r", ls="--", lw=1,
                  label=f"2 / lr = {result['limit']:.3g}")
  axes[0].set(xlabel="iteration after theta_GD", ylabel="training loss",
              yscale="log")
  axes[1].set(xlabel="iteration after theta_GD",
              ylabel="lambda_1 of the Hessian", yscale="log")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_seeds(summaries: list[dict], names: list[str], path: str) -> None:
  """Fig. 3 over seeds: the mean test accuracy of each dynamics in
  ``names`` against the iteration after theta_GD, shaded one standard
  error, and the final test accuracies as bars with their standard
  errors."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
  finals = []
  for i, name in enumerate(names):
    hists = [s["dynamics"][name] for s in summaries]
    steps = sorted(set.intersection(*(
        {r["step"] for r in h if "test_acc" in r} for h in hists)))
    acc = np.array([[{r["step"]: r["test_acc"] for r in h}[t]
                     for t in steps] for h in hists])
    mean = acc.mean(0)
    sem = acc.std(0, ddof=1) / np.sqrt(len(hists)) if len(hists) > 1 else 0
    x = np.maximum(np.asarray(steps), 0.5)
    axes[0].plot(x, mean, color=f"C{i}", lw=1.2, label=name)
    axes[0].fill_between(x, mean - sem, mean + sem, color=f"C{i}", alpha=0.2)
    finals.append((mean[-1], sem if np.isscalar(sem) else sem[-1], steps[-1]))
  gd = np.array([s["gd"][-1]["test_acc"] for s in summaries])
  start = start_point(summaries[0])
  # From the initialisation its accuracy is chance: no line on the bars.
  for ax in axes if start == "theta_GD" else axes[:1]:
    ax.axhline(gd.mean(), color="k", ls="--", lw=0.8, label=start)
  axes[0].set(xscale="log", xlabel=f"iteration after {start}",
              ylabel="test accuracy")
  axes[0].legend(fontsize=7)
  m = [f[0] for f in finals]
  axes[1].bar(range(len(names)), m, yerr=[f[1] for f in finals],
              color=[f"C{i}" for i in range(len(names))], capsize=3)
  for i, (a, _, t) in enumerate(finals):
    axes[1].text(i, a, f"{a:.3f}\n({t})", ha="center", va="bottom",
                 fontsize=7)
  axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right",
                     fontsize=8)
  ref = [gd.mean()] if start == "theta_GD" else []
  lo = min(m + ref)
  axes[1].set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + ref) + 0.04))
  axes[1].set(ylabel="final test accuracy (steps run)")
  fig.suptitle(f"{_title(summaries[0])}: mean of {len(summaries)} seeds,"
               " ± one standard error")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_tracking(summary: dict, path: str) -> None:
  """The paper's quantities along the GD phase (``track_every``): the top
  Hessian eigenvalues at each tracked step, ``Tr(H Sigma) / Tr(H
  Sigma_bar)`` (Proposition 1's ratio), the mean-gradient and noise norms
  (Fig. 7's), and each block's share of ``Tr H`` at the first, a middle
  and the last tracked step (:func:`anisonoise.plotting.plot_blocks`)."""
  plt = _plt()
  rows = [r for r in summary["gd"] if "track_eigenvalues" in r]
  fig, axes = plt.subplots(1, 4, figsize=(21, 4.4))
  cmap = plt.get_cmap("viridis")
  for i, r in enumerate(rows):
    anisonoise.plotting.plot_hessian_spectrum(
        np.maximum(r["track_eigenvalues"], 1e-12), axes[0],
        label=f"step {r['step']}")
    axes[0].lines[-1].set_color(cmap(i / max(len(rows) - 1, 1)))
  axes[0].legend(fontsize=7)
  axes[0].set_title("top Hessian eigenvalues along GD")
  steps = np.array([r["step"] for r in rows])
  ratio = np.array([r["tr_h_sigma"] / r["tr_h_sigma_bar"] for r in rows])
  axes[1].plot(steps, ratio, "o-", ms=4)
  axes[1].axhline(1, color="k", lw=0.6, ls=":")
  axes[1].set(xlabel="GD iteration", yscale="log",
              ylabel="Tr(H Sigma) / Tr(H Sigma_bar)")
  axes[2].plot(steps, [r["grad_norm"] for r in rows], "o-", ms=4,
               label="||grad L||")
  axes[2].plot(steps, [r["noise_norm"] for r in rows], "s--", ms=4,
               label="sqrt(Tr Sigma)")
  axes[2].set(xlabel="GD iteration", ylabel="L2 norm", yscale="log")
  axes[2].legend(fontsize=8)
  picks = sorted({0, len(rows) // 2, len(rows) - 1})
  width = 0.8 / len(picks)
  for j, i in enumerate(picks):
    per = rows[i]["blocks"]
    total = sum(b["trace"] for b in per.values())
    anisonoise.plotting.plot_blocks(
        {k: b["trace"] / total for k, b in per.items()}, axes[3],
        label=f"step {rows[i]['step']}", width=width,
        offset=(j - (len(picks) - 1) / 2) * width,
        ylabel="share of Tr H (Hutchinson)")
  fig.suptitle(_title(summary))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_study(summary: dict, out: str) -> list[str]:
  """Every figure of one study into ``out``; returns the file names."""
  if summary["config"]["dataset"] in ("fashion_mnist", "fortunes"):
    figs = {"fig3.png": plot_curves, "fig8.png": plot_early}
    if summary.get("spectrum"):
      figs["fig5.png"] = plot_escape
    if summary["config"].get("diag_every"):
      figs["fig7.png"] = plot_norms
    if summary.get("stability"):
      figs["stability.png"] = plot_stability
    if any("track_eigenvalues" in r for r in summary["gd"]):
      figs["tracking.png"] = plot_tracking
  else:
    figs = {"fig6.png": plot_curves,
            "fig1.png": lambda s, p: figure1([s], p)}
    if summary["config"]["early_steps"]:
      figs["fig8.png"] = plot_early
  for name, fn in figs.items():
    fn(summary, os.path.join(out, name))
  return list(figs)
