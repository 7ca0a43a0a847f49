"""Figures of a finished experiment (PNG + SVG in ``WORKDIR/plots``), from ``results.json``.

* ``accuracy_matrices``: R[i, j] (closed-book accuracy on chunk j after chunk i) per method, each
  panel on its own colour scale (labelled colour bar) so that small differences show;
* ``accuracy_over_chunks``: mean closed-book accuracy on the chunks seen so far, with the
  in-context ceiling and the base as labelled dashed lines;
* ``tradeoff_<probe>``: acquisition (closed-book just slept) against what a method kept of a
  retention probe (reading skill, old facts, known facts), one point per method and seed, the
  base and the in-context ceiling as reference lines: does a method learn more and forget less?

``figures(results)`` builds them (tests read their labels); ``plot_results`` writes and closes.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

PROBES = (("in_context_heldout", "reading skill after the stream (%)"),
          ("retention_qa", "old facts kept closed-book (%)"),
          ("known_facts", "known facts kept (%)"))


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
    if v is not None:
      ax.axhline(100 * v, ls="--", color=color, lw=1)
      ax.annotate(what, (T, 100 * v), xytext=(-2, 3), textcoords="offset points", fontsize=7,
                  color=color, ha="right")
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
  fig, ax = plt.subplots(figsize=(7.0, 4.5))
  markers = "osD^v<>pX*h"
  for k, (name, e) in enumerate(results["methods"].items()):
    pts = [(s["metrics"].get("acquisition"), s["metrics"].get(key)) for s in e["seeds"].values()]
    pts = [(100 * a, 100 * b) for a, b in pts if a is not None and b is not None]
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
    ax.axhline(100 * base_keep, ls="-.", color="0.5", lw=1, label="base's own level")
  ax.set_xlabel("acquisition: closed-book just after sleeping (%)")
  ax.set_ylabel(ylabel)
  ax.set_xlim(0, 100)
  ax.set_ylim(0, 105)
  ax.grid(alpha=0.3)
  ax.set_title("learning (right) vs forgetting (down)", fontsize=9)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  return fig


def figures(results: Dict) -> List[Tuple[str, object]]:
  """(file stem, figure) of every plot the results support."""
  out = []
  if _matrices(results):
    out += [("accuracy_matrices", fig_matrices(results)),
            ("accuracy_over_chunks", fig_over_chunks(results))]
  runs = [s["metrics"] for e in results["methods"].values() for s in e["seeds"].values()]
  for key, label in PROBES:
    if any(m.get(key) is not None for m in runs) and any("acquisition" in m for m in runs):
      out.append((f"tradeoff_{key}", fig_tradeoff(results, key, label)))
  return out


def plot_results(results: Dict, out_dir: str) -> List[str]:
  """Writes every figure as PNG and SVG into ``out_dir``; returns the paths."""
  plt = _plt()
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for stem, fig in figures(results):
    for ext in ("png", "svg"):
      p = os.path.join(out_dir, f"{stem}.{ext}")
      fig.savefig(p, dpi=110)
      paths.append(p)
    plt.close(fig)
  return paths
