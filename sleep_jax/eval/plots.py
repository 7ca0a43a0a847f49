"""Figures of a finished experiment (PNG + SVG in ``WORKDIR/plots``), from ``results.json``.

* ``accuracy_matrices``: R[i, j] (closed-book accuracy on chunk j after chunk i) per method, each
  panel on its own colour scale (labelled colour bar) so that small differences show;
* ``accuracy_over_chunks``: mean closed-book accuracy on the chunks seen so far, with the
  in-context ceiling and the base as labelled dashed lines;
* ``tradeoff_<probe>``: acquisition (closed-book just slept) against what a method kept of a
  retention probe (reading skill, old facts, known facts; or its KL to the base, 0 = unchanged),
  one point per method and seed, the base and the in-context ceiling as reference lines: does a
  method learn more and forget less?
* ``accuracy_vs_compute`` (reasoning): held-out accuracy against the learning wall seconds
  spent so far, per method (does one method need more compute to match another?);
* ``learning_curves``: per method (its first seed), the loss of each sleep's learning phase
  (consolidation, or the SFT baselines' fine-tuning) and the teacher/student agreement (how often
  the student's most likely next token is the teacher's) over that sleep's steps, one line per
  chunk; read from the runs' ``train_log.jsonl`` (``read_curves``).

``figures(results, curves)`` builds them (tests read their labels); ``plot_results`` writes and
closes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from sleep_jax.eval.report import NOT_PERCENT  # metrics shown as they are, not as percent

PROBES = (("in_context_heldout", "reading skill after the stream (%)"),
          ("retention_qa", "old facts kept closed-book (%)"),
          ("known_facts", "known facts kept (%)"),
          ("kl_to_base", "KL(base || model) on generic prompts (nats per token)"))


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _matrices(results: Dict):
  return [(n, np.mean([np.asarray(s["R"], np.float64) for s in e["seeds"].values()], axis=0))
          for n, e in results["methods"].items()
          if e["seeds"] and all("R" in s for s in e["seeds"].values())]


def _mean(results, method, key):
  e = results["methods"].get(method)
  v = [s["metrics"].get(key) for s in e["seeds"].values()] if e else []
  v = [x for x in v if x is not None and not np.isnan(x)]
  return float(np.mean(v)) if v else None


def fig_matrices(results: Dict):
  plt = _plt()
  mats = _matrices(results)
  cols = min(4, len(mats))
  rows = -(-len(mats) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False,
                           layout="constrained")
  for ax in axes.ravel():
    ax.axis("off")
  for k, (ax, (name, R)) in enumerate(zip(axes.ravel(), mats)):
    ax.axis("on")
    top = max(float(np.nanmax(R)) if np.isfinite(R).any() else 0.0, 0.05)  # own scale
    im = ax.imshow(100 * R, vmin=0, vmax=100 * top, cmap="viridis")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("evaluated chunk j")
    ax.set_ylabel("after chunk i")
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(R.shape[0]))
    for (i, j), v in np.ndenumerate(R):
      if np.isfinite(v):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.5 * top else "black")
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("closed-book accuracy (%)", fontsize=8)
  return fig


def fig_over_chunks(results: Dict):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4))
  T = 1
  for name, R in _matrices(results):
    T = R.shape[0]
    seen = [100 * float(np.nanmean(R[i, : i + 1])) for i in range(T)]
    ax.plot(range(1, T + 1), seen, marker="o", label=name)
  for ref, what, color in (("in_context", "in-context ceiling", "0.3"),
                           ("base", "base (closed-book)", "0.6")):
    v = _mean(results, ref, "acquisition")
    if v is not None:  # in the legend: a text on the line hides the curves near the base
      ax.axhline(100 * v, ls="--" if ref == "in_context" else ":", color=color, lw=1, label=what)
  ax.set_xticks(range(1, T + 1))
  ax.set_xlabel("chunks learned")
  ax.set_ylabel("closed-book accuracy on the chunks seen so far (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def fig_tradeoff(results: Dict, key: str, ylabel: str):
  plt = _plt()
  f = 1.0 if key in NOT_PERCENT else 100.0
  fig, ax = plt.subplots(figsize=(7.0, 4.5))
  markers = "osD^v<>pX*h"
  for k, (name, e) in enumerate(results["methods"].items()):
    pts = [(s["metrics"].get("acquisition"), s["metrics"].get(key)) for s in e["seeds"].values()]
    pts = [(100 * a, f * b) for a, b in pts if a is not None and b is not None]
    if pts:
      x, y = zip(*pts)
      ax.scatter(x, y, marker=markers[k % len(markers)], label=name, s=36)
  ceil, base_acq, base_keep = (_mean(results, "in_context", "acquisition"),
                               _mean(results, "base", "acquisition"), _mean(results, "base", key))
  if ceil is not None:
    ax.axvline(100 * ceil, ls="--", color="0.3", lw=1, label="in-context ceiling")
  if base_acq is not None:
    ax.axvline(100 * base_acq, ls=":", color="0.5", lw=1, label="base (closed-book)")
  if base_keep is not None:
    ax.axhline(f * base_keep, ls="-.", color="0.5", lw=1, label="base's own level")
  ax.set_xlabel("acquisition: closed-book just after sleeping (%)")
  ax.set_ylabel(ylabel)
  ax.set_xlim(0, 100)
  if f == 100.0:
    ax.set_ylim(0, 105)
  else:
    ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.set_title(f"learning (right) vs forgetting ({'down' if f == 100.0 else 'up'})", fontsize=9)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


LEARNING_PHASES = ("consolidation", "sft")
COMPUTE_PHASES = ("consolidation", "dreaming", "deep")  # what a method spends on learning


def fig_accuracy_vs_compute(results: Dict):
  """Mean closed-book accuracy over every scored chunk (mean of R's row) after each chunk,
  against the learning wall seconds spent so far (``seconds_<phase>`` of the learning phases),
  one line per method (seeds averaged), from the base's accuracy at 0 s."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  base = _mean(results, "base", "closed_book_final")
  for name, e in results["methods"].items():
    if name in ("base", "in_context") or not e["seeds"]:
      continue
    xs, ys = [], []
    for s in e["seeds"].values():
      sec = np.cumsum([sum(i.get(f"seconds_{p}", 0.0) for p in COMPUTE_PHASES)
                       for i in s["info"]])
      xs.append(sec)
      ys.append([100 * float(np.nanmean(r)) for r in np.asarray(s["R"], np.float64)])
    x, y = np.mean(xs, axis=0), np.mean(ys, axis=0)
    if base is not None:
      x, y = np.concatenate([[0.0], x]), np.concatenate([[100 * base], y])
    ax.plot(x, y, marker="o", label=name)
  ax.set_xlabel("learning wall seconds so far (consolidation, dreaming, deep sleep)")
  ax.set_ylabel("held-out accuracy, mean over scored chunks (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def read_curves(runs_dir: str) -> Dict[str, List[dict]]:
  """method -> the step lines of its first seed's ``train_log.jsonl`` (``RunLog``)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(runs_dir, "*", "seed_*", "train_log.jsonl"))):
    method = os.path.basename(os.path.dirname(os.path.dirname(path)))
    if method not in out:
      with open(path) as f:
        out[method] = [r for r in map(json.loads, f) if "step" in r]
  return out


def _phase_curves(records: List[dict]):
  """(phase, {chunk: (losses, agreements)}) of the run's learning phase, or None."""
  for phase in LEARNING_PHASES:
    rows = [r for r in records if r.get("phase") == phase]
    if rows:
      by_chunk: Dict[int, Tuple[list, list]] = {}
      for r in rows:
        loss, agree = by_chunk.setdefault(r["chunk"], ([], []))
        loss.append(r.get(f"{phase}/loss"))
        a = [v for k, v in r.items() if k.startswith(f"{phase}/agreement_") and v is not None]
        agree.append(100 * float(np.mean(a)) if a else None)
      return phase, by_chunk
  return None


def _smooth(y: np.ndarray, k: int = 9) -> np.ndarray:
  """Centred moving average over k steps (shorter at the ends), ignoring NaN."""
  ok = np.isfinite(y)
  kernel = np.ones(min(k, len(y)))
  num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
  den = np.convolve(ok.astype(float), kernel, mode="same")
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def fig_learning_curves(curves: Dict[str, List[dict]]):
  plt = _plt()
  runs = [(m, c) for m, c in ((m, _phase_curves(r)) for m, r in curves.items()) if c]
  fig, axes = plt.subplots(len(runs), 2, figsize=(9, 2.4 * len(runs)), squeeze=False,
                           layout="constrained")
  for (ax_l, ax_a), (method, (phase, by_chunk)) in zip(axes, runs):
    for t, (loss, agree) in sorted(by_chunk.items()):
      for ax, ys in ((ax_l, loss), (ax_a, agree)):
        if all(v is None for v in ys):
          continue
        ys = np.asarray([np.nan if v is None else v for v in ys], float)
        x = np.arange(1, len(ys) + 1)
        # Each step is one small batch: the raw points faint, a moving average on top.
        raw = ax.plot(x, ys, lw=0.6, alpha=0.3)[0]
        ax.plot(x, _smooth(ys), lw=1.5, color=raw.get_color(), label=f"chunk {t}")
    ax_l.set_title(f"{method}: {phase} loss", fontsize=9)
    ax_l.set_xlabel("step of the sleep")
    ax_l.set_ylabel("loss")
    ax_l.legend(fontsize=7)
    ax_a.set_title(f"{method}: teacher/student agreement", fontsize=9)
    ax_a.set_xlabel("step of the sleep")
    ax_a.set_ylabel("top-1 agreement (%)")
    if not ax_a.lines:  # fine-tuning has no teacher
      ax_a.text(0.5, 0.5, "no teacher", ha="center", va="center", transform=ax_a.transAxes)
      ax_a.set_xticks([])
      ax_a.set_yticks([])
    for ax in (ax_l, ax_a):
      ax.grid(alpha=0.3)
  return fig


def figures(results: Dict, curves: Optional[Dict[str, List[dict]]] = None
            ) -> List[Tuple[str, object]]:
  """(file stem, figure) of every plot the results (and the runs' curves) support."""
  out = []
  if curves and any(_phase_curves(r) for r in curves.values()):
    out.append(("learning_curves", fig_learning_curves(curves)))
  if _matrices(results):
    out += [("accuracy_matrices", fig_matrices(results)),
            ("accuracy_over_chunks", fig_over_chunks(results))]
    learners = set(results["methods"]) - {"base", "in_context"}
    if results.get("config", {}).get("data", {}).get("source") == "arith" and learners:
      out.append(("accuracy_vs_compute", fig_accuracy_vs_compute(results)))
  runs = [s["metrics"] for e in results["methods"].values() for s in e["seeds"].values()]
  for key, label in PROBES:
    if any(m.get(key) is not None for m in runs) and any("acquisition" in m for m in runs):
      out.append((f"tradeoff_{key}", fig_tradeoff(results, key, label)))
  return out


def plot_results(results: Dict, out_dir: str, runs_dir: str = "") -> List[str]:
  """Writes every figure as PNG and SVG into ``out_dir`` (with the learning curves of the runs
  in ``runs_dir``, if given); returns the paths."""
  plt = _plt()
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  curves = {m: c for m, c in read_curves(runs_dir).items()
            if m in results["methods"]} if runs_dir else None
  for stem, fig in figures(results, curves):
    for ext in ("png", "svg"):
      p = os.path.join(out_dir, f"{stem}.{ext}")
      fig.savefig(p, dpi=110)
      paths.append(p)
    plt.close(fig)
  return paths
