"""Top-20 Hessian eigenpairs of the paper's LeNet: anisonoise against
PyHessian and against the dense method of the paper's authors.

All three work on the same LeNet (11,330 parameters), the same weights and
the same 1,200 images (the paper's corrupted Fashion-MNIST set when the data
is installed, random images of that shape otherwise), at a point reached by
``--gd-steps`` full-batch GD steps (lr 0.1) from the authors' initialisation.

* anisonoise: ``top_eigenpairs(hessian_operator(...), k=20)`` (thick-restart
  Lanczos with full reorthogonalisation, one linearisation), jitted end to
  end, for a few Krylov sizes and tolerances (``--configs``); the
  eigenvalues are compared with a converged reference (``--ref-iters``
  Lanczos steps). ``--plain-conv`` runs it all on LeNet written with
  ``lax.conv`` and ``max_pool``, as a user writes it. Beside them,
  ``hessian_spectrum(num_eigs=20)`` exactly as a user calls it, eagerly
  and under ``jax.jit`` (:func:`public_rows`), on LeNet and the MLP.
* PyHessian (optional ``bench`` extra, PyTorch on the CPU):
  ``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues(top_n=20)``
  on a PyTorch copy of the same network and weights (checked to give the same
  loss). Skipped with a message when torch or pyhessian is missing.
* the dense method (the authors' scripts: a dense Hessian, then ARPACK
  ``eigsh``): timed in full on an MLP small enough to finish (with anisonoise
  on the same MLP); for LeNet *extrapolated* as ``D`` timed HVPs plus a timed
  ``eigsh`` and a timed LAPACK ``eigh`` (top 20) of a dense symmetric matrix
  of LeNet's size.

Writes ``peers.json`` and ``peers.md`` (``peers_plain_conv.*`` with
``--plain-conv``) to ``--out``.

Usage: python benchmarks/peers.py [--repeats 5] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import anisonoise
from _common import (environment, gd, lenet_problem, mlp_problem, timeit,
                     write_results)

K = 20


def solver(loss_fn, num_iters, tol=None, max_matvecs=None):
  @jax.jit
  def run(p, b, key):
    op = anisonoise.hessian_operator(loss_fn, p, b)
    return anisonoise.top_eigenpairs(op, p, K, key=key, num_iters=num_iters,
                                     tol=tol, max_matvecs=max_matvecs)
  return run


def _config(text: str):
  """``M`` (one cycle of a basis of M) or ``M:TOL`` (restarted to TOL)."""
  m, _, tol = text.partition(":")
  return int(m), (float(tol) if tol else None)


def rel_error(vals, ref) -> float:
  """Largest relative error of the top ``K`` of ``vals`` (sorted) against
  the reference's."""
  if len(vals) < K or len(ref) < K:
    raise ValueError(f"need {K} eigenvalues, got {len(vals)} and"
                     f" {len(ref)}.")
  vals = np.sort(np.asarray(vals, np.float64))[::-1][:K]
  ref = np.asarray(ref, np.float64)[:K]
  return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def timed_once(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, out


def median_time(fn, repeats):
  """Median wall time of ``fn()`` (host code: numpy, scipy, PyTorch)."""
  times = []
  out = None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def anisonoise_rows(loss_fn, params, batch, ref, configs, repeats):
  rows = []
  key = jax.random.key(1)
  for m, tol in configs:
    run = solver(loss_fn, m, tol)
    t = timeit(run, params, batch, key, repeats=repeats)
    res = run(params, batch, key)
    rows.append({"num_iters": m, "tol": tol, "hvps": int(res.num_matvecs),
                 "converged": bool(res.converged), "seconds": t,
                 "max_rel_error": rel_error(res.eigenvalues, ref),
                 "max_abs_error_over_lambda1": float(np.max(np.abs(
                     np.asarray(res.eigenvalues, np.float64) - ref[:K]))
                     / abs(ref[0]))})
    print(f"anisonoise, basis {m}, tol {tol}: {t:.2f} s,"
          f" {rows[-1]['hvps']} HVPs, max rel. error"
          f" {rows[-1]['max_rel_error']:.2e}", flush=True)
  return rows


def public_rows(loss_fn, params, batch, ref, repeats, name):
  """``anisonoise.hessian_spectrum(loss_fn, params, batch, num_eigs=20,
  key=0)`` exactly as a user calls it, with its defaults: eagerly and
  under ``jax.jit``, each its first call (with compilation) and then the
  median of ``repeats`` (an eager call compiles its steps once per
  ``loss_fn``, as a diagnostic called along a run does)."""
  def eager():
    return anisonoise.hessian_spectrum(loss_fn, params, batch, num_eigs=K,
                                       key=0)

  jitted = jax.jit(lambda p, b: anisonoise.hessian_spectrum(
      loss_fn, p, b, num_eigs=K, key=0))
  t_eager_first, _ = timed_once(eager)
  t_eager, res = median_time(lambda: jax.block_until_ready(eager()),
                             repeats)
  t_first, res_jit = timed_once(jitted, params, batch)
  t_jit = timeit(jitted, params, batch, repeats=repeats, warmup=False)
  rows = []
  for how, t, r, extra in (("eager", t_eager, res,
                            {"first_call_s": t_eager_first}),
                           ("jit", t_jit, res_jit,
                            {"first_call_s": t_first})):
    hvps = int(r.num_matvecs)
    rows.append({"model": name, "call": how, "seconds": t, "hvps": hvps,
                 "seconds_per_hvp": t / hvps,
                 "converged": bool(r.converged),
                 "max_rel_error": rel_error(r.eigenvalues, ref), **extra})
    print(f"hessian_spectrum on the {name}, {how}: {t:.2f} s, {hvps}"
          f" HVPs ({t / hvps:.3f} s each), max rel. error"
          f" {rows[-1]['max_rel_error']:.1e}", flush=True)
  rows[1]["max_diff_to_eager"] = float(np.max(np.abs(
      np.asarray(res.eigenvalues) - np.asarray(res_jit.eigenvalues))))
  return rows


# --------------------------------------------------------------------------
# PyHessian
# --------------------------------------------------------------------------


def torch_lenet(params):
  """A PyTorch LeNet with the weights of :class:`anisonoise.models.LeNet`."""
  import torch
  from torch import nn

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 10, 5)
      self.conv2 = nn.Conv2d(10, 10, 5)
      self.fc1 = nn.Linear(160, 50)
      self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
      f = nn.functional
      x = f.relu(f.max_pool2d(self.conv1(x), 2))
      x = f.relu(f.max_pool2d(self.conv2(x), 2))
      x = f.relu(self.fc1(x.flatten(1)))
      return self.fc2(x)

  net = Net()
  p = jax.tree.map(np.asarray, params.to_pure_dict())
  with torch.no_grad():
    for name in ("conv1", "conv2"):
      getattr(net, name).weight.copy_(torch.from_numpy(
          p[name]["kernel"].transpose(3, 2, 0, 1).copy()))
      getattr(net, name).bias.copy_(torch.from_numpy(p[name]["bias"].copy()))
    # JAX flattens (h, w, c), PyTorch (c, h, w).
    w1 = p["fc1"]["kernel"].reshape(4, 4, 10, 50).transpose(2, 0, 1, 3)
    net.fc1.weight.copy_(torch.from_numpy(w1.reshape(160, 50).T.copy()))
    net.fc1.bias.copy_(torch.from_numpy(p["fc1"]["bias"].copy()))
    net.fc2.weight.copy_(torch.from_numpy(p["fc2"]["kernel"].T.copy()))
    net.fc2.bias.copy_(torch.from_numpy(p["fc2"]["bias"].copy()))
  return net


def pyhessian_rows(params, images, labels, jax_loss, ref, repeats,
                   max_iter=100):
  try:
    import importlib

    import torch
    from pyhessian import hessian as pyh
    # the module, not the class that pyhessian/__init__ binds to that name
    pyh_module = importlib.import_module("pyhessian.hessian")
  except ImportError as e:
    msg = (f"PyHessian skipped ({e}); install the bench extra: pip install"
           " -e '.[bench]'")
    print(msg, flush=True)
    return {"skipped": msg}
  torch.set_num_threads(os.cpu_count())
  net = torch_lenet(params)
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.asarray(labels).astype(np.int64))
  criterion = torch.nn.CrossEntropyLoss()
  with torch.no_grad():
    torch_loss = float(criterion(net(x), y))
  if abs(torch_loss - jax_loss) > 1e-4 * max(1.0, abs(jax_loss)):
    raise AssertionError(f"PyTorch copy gives loss {torch_loss}, JAX"
                         f" {jax_loss}: the weights were not copied right.")

  def loss_grad():
    net.zero_grad()
    loss = criterion(net(x), y)
    loss.backward()
    return loss

  t_grad, _ = median_time(loss_grad, repeats)
  # PyHessian takes its gradient from ``p.grad`` after its own
  # ``backward(create_graph=True)``, which adds to what is there: clear it
  # before each construction, or its products are of a multiple of H.
  net.zero_grad()
  h = pyh(net, criterion, data=(x, y), cuda=False)
  v = [torch.randn_like(p) for p in h.params]
  t_hvp, _ = median_time(
      lambda: pyh_module.hessian_vector_product(h.gradsH, h.params, v),
      repeats)
  count = {"hvps": 0}
  original = pyh_module.hessian_vector_product

  def counting(*a, **kw):
    count["hvps"] += 1
    return original(*a, **kw)

  pyh_module.hessian_vector_product = counting
  try:
    def top20():
      count["hvps"] = 0
      torch.manual_seed(0)
      net.zero_grad()
      hh = pyh(net, criterion, data=(x, y), cuda=False)
      vals, _ = hh.eigenvalues(top_n=K, maxIter=max_iter)
      return vals, count["hvps"]
    t_top, (vals, hvps) = median_time(top20, repeats)
  finally:
    pyh_module.hessian_vector_product = original
  negative = int(np.sum(np.asarray(vals) < 0))
  row = {"torch": torch.__version__, "loss_grad_s": t_grad, "hvp_s": t_hvp,
         "top20_s": t_top, "hvps": hvps,
         "max_rel_error": rel_error(vals, ref),
         "negative_eigenvalues_returned": negative,
         "eigenvalues": [float(v) for v in vals]}
  print(f"PyHessian: loss+grad {t_grad:.3f} s, HVP {t_hvp:.3f} s, top-20"
        f" {t_top:.1f} s ({hvps} HVPs), max rel. error"
        f" {row['max_rel_error']:.2e}", flush=True)
  return row


# --------------------------------------------------------------------------
# The dense method
# --------------------------------------------------------------------------


def dense_top20(matrix):
  from scipy.sparse.linalg import eigsh
  vals, _ = eigsh(matrix, k=K, which="LA")
  return np.sort(vals)[::-1]


def dense_rows(loss_fn, params, batch, images, labels, iters_list, repeats,
               dense_repeats, mlp_hidden, eig_size=None):
  # (a) In full on a small MLP, with anisonoise on the same problem (the
  # fewest Lanczos steps of ``iters_list`` within 1e-3 of the dense result).
  m_loss, m_params, m_batch = mlp_problem(images, labels, mlp_hidden,
                                         activation=jnp.tanh)
  m_params = gd(m_loss, m_params, m_batch, 200)
  flat, unravel = ravel_pytree(m_params)

  @jax.jit
  def dense_hessian(flat, b):
    return jax.hessian(lambda f: jnp.mean(m_loss(unravel(f), b)))(flat)

  def dense_method():
    hmat = np.asarray(jax.block_until_ready(dense_hessian(flat, m_batch)))
    return dense_top20(hmat)

  dense_method()  # compile
  t_dense, dense_vals = median_time(dense_method, dense_repeats)
  for iters in iters_list:
    run = solver(m_loss, iters)
    t_ours = timeit(run, m_params, m_batch, jax.random.key(1),
                    repeats=repeats)
    err = rel_error(run(m_params, m_batch, jax.random.key(1)).eigenvalues,
                    dense_vals)
    if err <= 1e-3:
      break
  name = f"MLP 784-{mlp_hidden}-10 (tanh)"
  small = {"model": name, "D": int(flat.size),
           "dense_s": t_dense, "anisonoise_s": t_ours, "num_iters": iters,
           "speedup": t_dense / t_ours,
           "anisonoise_max_rel_error_vs_dense": err,
           "public_call": public_rows(m_loss, m_params, m_batch, dense_vals,
                                      repeats, name)}
  print(f"dense method on the {small['model']} (D={small['D']}):"
        f" {t_dense:.2f} s; anisonoise {t_ours:.3f} s"
        f" ({small['speedup']:.0f}x), rel. error {err:.1e}", flush=True)

  # (b) LeNet, extrapolated: D HVPs plus a dense top-20 of a D x D matrix.
  # The HVPs are charged at the cost of products from one linearisation
  # (the cheapest way to apply H column by column), generous to the method.
  lflat, lunravel = ravel_pytree(params)
  d = int(lflat.size)
  per_call = 20

  @jax.jit
  def full_hvp(p, b, v):
    return anisonoise.hvp(loss_fn, p, b, v)

  @jax.jit
  def linearised_hvps(p, b, v):
    op = anisonoise.hessian_operator(loss_fn, p, b)
    for _ in range(per_call):
      v = op(v)
    return v

  v = lunravel(jax.random.normal(jax.random.key(2), lflat.shape, lflat.dtype))
  t_full = timeit(full_hvp, params, batch, v, repeats=repeats)
  t_hvp = timeit(linearised_hvps, params, batch, v,
                 repeats=repeats) / per_call
  size = d if eig_size is None else eig_size
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size)).astype(np.float32)
  a = (a + a.T) / 2
  t_eigsh, _ = median_time(lambda: dense_top20(a), dense_repeats)

  def lapack_top20():
    import scipy.linalg
    return scipy.linalg.eigh(a, subset_by_index=[size - K, size - 1],
                             eigvals_only=True)

  t_eigh, _ = median_time(lapack_top20, dense_repeats)
  lenet = {"D": d, "full_hvp_s": t_full, "hvp_s": t_hvp,
           "dense_hessian_s_extrapolated": d * t_hvp,
           "eig_matrix_size": size, "eigsh_s": t_eigsh,
           "eigh_top20_s": t_eigh,
           "total_s_extrapolated": d * t_hvp + min(t_eigsh, t_eigh),
           "note": "extrapolated: D linearised HVPs (timed) + the faster of"
                   " a timed ARPACK eigsh and LAPACK eigh (top 20) on a"
                   " dense D x D matrix"}
  print(f"dense method on LeNet (extrapolated): {d} x {t_hvp:.3f} s HVPs"
        f" (a full HVP: {t_full:.3f} s) + eigsh {t_eigsh:.1f} s / eigh"
        f" {t_eigh:.1f} s = {lenet['total_s_extrapolated']:.0f} s",
        flush=True)
  return {"small_model": small, "lenet": lenet}


def markdown(res) -> str:
  env = res["env"]
  ours = res["anisonoise"]
  # The fastest anisonoise row within 1e-3 (else the most accurate).
  good = [r for r in ours if r["max_rel_error"] <= 1e-3]
  best = (min(good, key=lambda r: r["seconds"]) if good
          else min(ours, key=lambda r: r["max_rel_error"]))
  lines = [
      f"{res.get('model', 'LeNet')} (D = {res['D']}), {res['n']} images"
      f" ({res['data']}), top-{K}"
      f" eigenpairs, after {res['gd_steps']} GD steps; {env['device']},"
      f" {env['cpu_count']} cores, jax {env['jax']}.", "",
      "| method | seconds | HVPs | max rel. error | anisonoise speed-up |",
      "|---|---|---|---|---|",
  ]
  for r in ours:
    how = (f"basis {r['num_iters']}, one cycle" if r.get("tol") is None
           else f"basis {r['num_iters']}, tol {r['tol']:g}")
    lines.append(f"| anisonoise, {how} |"
                 f" {r['seconds']:.2f} | {r['hvps']} |"
                 f" {r['max_rel_error']:.1e} | |")
  py = res["pyhessian"]
  if "skipped" in py:
    lines.append(f"| PyHessian | skipped: {py['skipped']} | | | |")
  else:
    lines.append(f"| PyHessian `eigenvalues(top_n=20)` (torch {py['torch']})"
                 f" | {py['top20_s']:.1f} | {py['hvps']} |"
                 f" {py['max_rel_error']:.1e} |"
                 f" {py['top20_s'] / best['seconds']:.1f}x |")
  for r in res.get("public_call", []):
    how = ("eager" if r["call"] == "eager" else "under `jax.jit`")
    if "first_call_s" in r:
      how += f" (first call {r['first_call_s']:.1f} s)"
    speed = ("" if "skipped" in py else
             f" {py['top20_s'] / r['seconds']:.1f}x")
    lines.append(f"| `hessian_spectrum(num_eigs=20)`, {how} |"
                 f" {r['seconds']:.2f} | {r['hvps']} |"
                 f" {r['max_rel_error']:.1e} |{speed} |")
  dl = res["dense"]["lenet"]
  lines.append(f"| dense Hessian + eigsh (extrapolated) |"
               f" {dl['total_s_extrapolated']:.0f} | {dl['D']} | exact |"
               f" {dl['total_s_extrapolated'] / best['seconds']:.0f}x |")
  ds = res["dense"]["small_model"]
  lines += ["", f"Dense method timed in full on the {ds['model']}"
            f" (D = {ds['D']}): {ds['dense_s']:.2f} s against"
            f" {ds['anisonoise_s']:.3f} s for anisonoise ({ds['num_iters']}"
            f" Lanczos steps, {ds['speedup']:.0f}x; max rel. error"
            f" {ds['anisonoise_max_rel_error_vs_dense']:.1e}).",
            *[f"`hessian_spectrum(num_eigs=20)` on that MLP, {r['call']}:"
              f" {r['hvps']} HVPs, {r['seconds']:.3f} s"
              f" ({r['seconds_per_hvp'] * 1e3:.2f} ms a product), max rel."
              f" error {r['max_rel_error']:.1e}."
              for r in ds.get("public_call", [])],
            *[f"`hessian_spectrum` on LeNet, {r['call']}:"
              f" {r['seconds_per_hvp']:.3f} s a product."
              for r in res.get("public_call", [])],
            f"Per operation: JAX HVP {dl['full_hvp_s']:.3f} s (from a"
            f" linearisation: {dl['hvp_s']:.3f} s)"
            + ("" if "skipped" in py else
               f"; PyHessian HVP {py['hvp_s']:.3f} s, PyTorch loss+grad"
               f" {py['loss_grad_s']:.3f} s") + "."]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1200)
  parser.add_argument("--gd-steps", type=int, default=500)
  parser.add_argument("--configs", type=_config, nargs="+",
                      default=[(40, None), (40, 1e-3), (60, 1e-3)],
                      help="anisonoise rows: M (one cycle of a Krylov basis"
                      " of M) or M:TOL (restarted until TOL)")
  parser.add_argument("--iters", type=int, nargs="+", default=[40, 60, 80],
                      help="one-cycle Krylov sizes tried on the small MLP")
  parser.add_argument("--ref-iters", type=int, default=300)
  parser.add_argument("--plain-conv", action="store_true",
                      help="LeNet with lax.conv and max_pool, as a user"
                      " writes it (default: the conv-free formulation)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pyhessian-repeats", type=int, default=5)
  parser.add_argument("--dense-repeats", type=int, default=3)
  parser.add_argument("--mlp-hidden", type=int, default=3)
  parser.add_argument("--eig-size", type=int, default=None,
                      help="size of the dense matrix whose eigsh/eigh is"
                      " timed for the LeNet extrapolation (default D)")
  parser.add_argument("--skip-pyhessian", action="store_true")
  parser.add_argument("--pyhessian-max-iter", type=int, default=100,
                      help="PyHessian's power iterations per eigenvalue"
                      " (its default: 100)")
  parser.add_argument("--out", default="results/benchmarks")
  args = parser.parse_args()
  env = environment()
  print(json.dumps(env), flush=True)
  loss_fn, params, batch, info = lenet_problem(args.n, with_info=True,
                                               plain_conv=args.plain_conv)
  params = gd(loss_fn, params, batch, args.gd_steps)
  jax_loss = float(jnp.mean(loss_fn(params, batch)))
  print(f"{info['data']}: loss {jax_loss:.4f} after {args.gd_steps} GD"
        " steps", flush=True)
  # The reference eagerly: the same recursion, each product outside an XLA
  # loop (faster on XLA:CPU for convolutions).
  t_ref, ref = timed_once(
      lambda p, b, key: anisonoise.top_eigenpairs(
          anisonoise.hessian_operator(loss_fn, p, b), p, K, key=key,
          num_iters=args.ref_iters, tol=None), params, batch,
      jax.random.key(7))
  ref_vals = np.asarray(ref.eigenvalues, np.float64)
  print(f"reference ({args.ref_iters} Lanczos steps, {t_ref:.0f} s): top"
        f" eigenvalues {ref_vals[:3].round(4).tolist()} ... "
        f"{ref_vals[-1]:.4f}", flush=True)
  ours = anisonoise_rows(loss_fn, params, batch, ref_vals, args.configs,
                         args.repeats)
  public = public_rows(loss_fn, params, batch, ref_vals, args.repeats,
                       "LeNet")
  py = ({"skipped": "--skip-pyhessian"} if args.skip_pyhessian else
        pyhessian_rows(params, info["images"], info["labels"], jax_loss,
                       ref_vals, args.pyhessian_repeats,
                       args.pyhessian_max_iter))
  dense = dense_rows(loss_fn, params, batch, info["images"], info["labels"],
                     args.iters, args.repeats, args.dense_repeats,
                     args.mlp_hidden, args.eig_size)
  res = {"env": env, "D": int(ravel_pytree(params)[0].size), "n": args.n,
         "model": "LeNet, plain lax.conv" if args.plain_conv else
                  "LeNet, conv-free formulation",
         "data": info["data"], "gd_steps": args.gd_steps,
         "reference": {"num_iters": args.ref_iters,
                       "eigenvalues": ref_vals.tolist(),
                       "residual_norms": np.asarray(
                           ref.residual_norms).tolist()},
         "anisonoise": ours, "public_call": public, "pyhessian": py,
         "dense": dense}
  write_results(args.out, "peers_plain_conv" if args.plain_conv else "peers",
                res, markdown(res))


if __name__ == "__main__":
  main()
