"""Results that can be looked at: a markdown table (mean ± spread over seeds) and plots.

Input is the ``results.json`` structure the cycle driver writes::

  {"methods": {name: {"seeds": {seed: {"metrics": {metric: value}, "R": [[...]], ...}}}}}
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Sequence

import numpy as np


def _mean_spread(values: Sequence[float], percent: bool = True) -> str:
  v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64)
  if v.size == 0:
    return "–"
  scale, fmt = (100.0, ".1f") if percent else (1.0, ".3f")
  if v.size == 1:
    return f"{scale * v[0]:{fmt}}"
  return f"{scale * v.mean():{fmt}} ± {scale * v.std(ddof=1):{fmt}}"


NOT_PERCENT = ("kl_to_base", "kl_to_base_change", "learning_seconds")


def _units_note(results: Dict) -> str:
  many = any(len(e["seeds"]) > 1 for e in results["methods"].values())
  return "Percent (KL: nats per token); " + (
      "mean ± sample standard deviation over seeds where there are 2 or more (seeds column)."
      if many else "one seed per method: no spread.")


def markdown_table(results: Dict, columns: Sequence[tuple], title: str = "") -> str:
  """Rows = methods; ``columns`` = [(metric key, header)]. Values shown in percent, except the
  keys in ``NOT_PERCENT`` (e.g. a KL in nats)."""
  runs = [s["metrics"] for e in results["methods"].values() for s in e["seeds"].values()]
  columns = [(k, h) for k, h in columns if any(m.get(k) is not None for m in runs)]  # no probe
  lines = [f"### {title}", ""] if title else []
  lines.append("| method | " + " | ".join(h for _, h in columns) + " | seeds |")
  lines.append("|---" * (len(columns) + 2) + "|")
  for name, entry in results["methods"].items():
    seeds = entry["seeds"]
    cells = [_mean_spread([s["metrics"].get(k) for s in seeds.values()], k not in NOT_PERCENT)
             for k, _ in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(seeds)} |")
  lines.append("")
  lines.append(_units_note(results))
  return "\n".join(lines)


def accuracy_by(answers: Sequence[Dict], query_info: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
  """Mean ``em`` of per-question answer records (``{"q", "em", ...}``) grouped by each map of
  ``query_info`` (e.g. ``{"distance": {q: 3}, "kind": {q: "needle"}}``); questions a map does
  not name are left out. Returns ``{key: {str(group): accuracy}}``, groups in sorted order."""
  out = {}
  for key, m in query_info.items():
    groups: Dict = {}
    for r in answers:
      if r["q"] in m:
        groups.setdefault(m[r["q"]], []).append(float(r["em"]))
    out[key] = {str(g): float(np.mean(groups[g])) for g in sorted(groups)}
  return out


def _group_values(results: Dict, key: str) -> List[str]:
  """Every group of ``by_query[key]`` over methods and seeds (numeric groups numerically)."""
  gs = {g for e in results["methods"].values() for s in e["seeds"].values()
        for g in s.get("by_query", {}).get(key, {})}
  return sorted(gs, key=lambda g: (0, int(g), "") if g.lstrip("-").isdigit() else (1, 0, g))


def grouped_table(results: Dict, key: str, title: str = "") -> str:
  """Rows = methods, columns = the groups of ``by_query[key]`` (``accuracy_by``), percent,
  mean ± spread over the seeds that have the group."""
  gs = _group_values(results, key)
  lines = [f"### {title}", ""] if title else []
  lines.append(f"| method \\ {key} | " + " | ".join(gs) + " | seeds |")
  lines.append("|---" * (len(gs) + 2) + "|")
  for name, entry in results["methods"].items():
    seeds = entry["seeds"].values()
    cells = [_mean_spread([s.get("by_query", {}).get(key, {}).get(g) for s in seeds]) for g in gs]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(seeds)} |")
  lines.append("")
  lines.append(_units_note(results))
  return "\n".join(lines)


def plot_accuracy_by_distance(results: Dict, path: str) -> str:
  """Final accuracy against distance (chunks back), one line per method, mean over seeds with
  the min-max range over seeds as a band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  gs = _group_values(results, "distance")
  x = np.asarray([int(g) for g in gs])
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, entry in results["methods"].items():
    acc = np.asarray([[s.get("by_query", {}).get("distance", {}).get(g, np.nan) for g in gs]
                      for s in entry["seeds"].values()], np.float64)
    if acc.size == 0 or np.all(np.isnan(acc)):
      continue
    with warnings.catch_warnings():  # a distance no seed has is nan, not a warning
      warnings.simplefilter("ignore", RuntimeWarning)
      mean, lo, hi = (np.nanmean(acc, axis=0), np.nanmin(acc, axis=0), np.nanmax(acc, axis=0))
    line, = ax.plot(x, mean, marker="o", label=name)
    if acc.shape[0] > 1:
      ax.fill_between(x, lo, hi, alpha=0.12, color=line.get_color())
  ax.set_xlabel("distance: chunks between the answer and the end of the stream")
  ax.set_ylabel("final exact match")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xticks(x)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
