"""The parts of ``results.md`` that answer "does Sleep help?": a verdict computed from the
numbers, a legend of every column, the dreams each method wrote and kept, and where the time went.

All functions read the ``results.json`` structure (``eval/report.py``) and return markdown.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

# What each column of the knowledge table means (the README and results.md share these words).
LEGEND = {
    "closed_book_final": "closed-book accuracy on every chunk's held-out questions after the "
                         "last sleep (the model's weights only, no passage in the prompt)",
    "acquisition": "closed-book accuracy on a chunk right after sleeping on it (R's diagonal): "
                   "what was stored",
    "wake_in_context": "accuracy with the passage in the prompt while awake: the ceiling a "
                       "sleep distils from",
    "BWT": "backward transfer: mean change on earlier chunks between just after learning them "
           "and the end (negative = forgotten)",
    "forgetting": "mean drop from each earlier chunk's best accuracy to its final one",
    "retention_qa": "closed-book accuracy on facts the base model knew (its pretraining QA "
                    "population) after the stream",
    "in_context_heldout": "in-context accuracy on new people (never learnt) after the stream",
    "known_facts": "general questions the base model answered correctly, after the stream",
    "kl_to_base": "KL(base || model) per token on generic prompts with the base's own answers "
                  "(nats; 0 = unchanged behaviour)",
}
RETENTION = (("in_context_heldout", "reading skill"), ("retention_qa", "old facts"),
             ("known_facts", "known facts"))
CEILING, FLOOR = "in_context", "base"


def _mean(results: Dict, method: str, key: str) -> Optional[float]:
  entry = results["methods"].get(method)
  if entry is None:
    return None
  v = [s["metrics"].get(key) for s in entry["seeds"].values()]
  v = [x for x in v if x is not None and not np.isnan(x)]
  return float(np.mean(v)) if v else None


def stored_share(results: Dict, method: str) -> Optional[float]:
  """(acquisition - base) / (in-context ceiling - base): the share of what reading the passage
  gives that a method kept in its weights (None without both reference rows)."""
  a, lo, hi = (_mean(results, method, "acquisition"), _mean(results, FLOOR, "acquisition"),
               _mean(results, CEILING, "acquisition"))
  if None in (a, lo, hi) or hi - lo <= 1e-9:
    return None
  return (a - lo) / (hi - lo)


def verdict(results: Dict) -> str:
  """One paragraph computed from the table: what each learning method stored, as a share of the
  in-context ceiling's gain over the base, and what it kept of the base's skills."""
  learners = [m for m in results["methods"] if m not in (FLOOR, CEILING)]
  if not learners:
    return "Only reference rows (base, in-context) were run: nothing learnt to compare."
  base_acq, ceil = _mean(results, FLOOR, "acquisition"), _mean(results, CEILING, "acquisition")
  parts = []
  for m in learners:
    share, acq = stored_share(results, m), _mean(results, m, "acquisition")
    if acq is None:
      continue
    txt = f"{m} {100 * acq:.1f}%"
    if share is not None:
      txt += f" ({round(100 * share) + 0:.0f}% of the gap)"  # + 0: no "-0%"
    parts.append(txt)
  out = ["**Verdict.** Closed-book right after sleeping on a chunk: " + "; ".join(parts) + "."]
  if base_acq is not None and ceil is not None:
    out.append(f"The base answers {100 * base_acq:.1f}% closed-book and {100 * ceil:.1f}% with "
               "the passage in the prompt; the gap is what a sleep should close.")
  ranked = sorted((_mean(results, m, "acquisition") or 0.0, m) for m in learners)
  if len(ranked) > 1 and ranked[-1][0] > ranked[-2][0]:
    out.append(f"Most stored: {ranked[-1][1]} (+{100 * (ranked[-1][0] - ranked[-2][0]):.1f} "
               f"points over {ranked[-2][1]}).")
  for key, name in RETENTION:
    ref = _mean(results, FLOOR, key)
    if ref is None or ref <= 0:
      continue
    kept = [f"{m} {100 * v / ref:.0f}%" for m in learners
            if (v := _mean(results, m, key)) is not None]
    if kept:
      out.append(f"Kept of the base's {name} ({100 * ref:.1f}%): " + ", ".join(kept) + ".")
  seeds = sorted({len(e["seeds"]) for e in results["methods"].values()})
  if seeds == [1]:
    out.append("One seed: differences of a few points are within seed noise.")
  return " ".join(out)


def legend(results: Dict, columns: Sequence[tuple]) -> str:
  """Definitions of the ``(key, header)`` columns some run of ``results`` has."""
  runs = [s["metrics"] for e in results["methods"].values() for s in e["seeds"].values()]
  rows = [f"* **{header}**: {LEGEND[k]}" for k, header in columns
          if k in LEGEND and any(m.get(k) is not None for m in runs)]
  return "\n".join(["Columns:", *rows]) if rows else ""


def dream_table(results: Dict) -> str:
  """Dreams written, tried in isolated trials and accepted, per chunk (mean over seeds), and the
  acceptance rate of the tried ones, for the methods that dream."""
  lines: List[str] = []
  for m, e in results["methods"].items():
    infos = [s.get("info", []) for s in e["seeds"].values()]
    if not any(i.get("dreams_accepted") is not None for row in infos for i in row):
      continue

    def per_chunk(key):
      v = np.nanmean([[np.nan if i.get(key) is None else i[key] for i in row] for row in infos],
                     axis=0)
      return "-" if np.all(np.isnan(v)) else " / ".join(f"{a:.1f}" for a in v)

    rate = np.nanmean([i.get("dream_acceptance", np.nan) for row in infos for i in row])
    lines.append(f"| {m} | {per_chunk('dreams_written')} | {per_chunk('dreams_tried')} | "
                 f"{per_chunk('dreams_accepted')} | {100 * rate:.0f}% |")
  if not lines:
    return ""
  return "\n".join(["### Dreams (per chunk)", "",
                    "| method | written | tried | accepted | acceptance rate (of tried) |",
                    "|---|---|---|---|---|", *lines])


def time_table(results: Dict, phases=("wake", "consolidation", "dreaming", "deep", "eval")) -> str:
  """Wall seconds per phase (summed over chunks, mean over seeds) and the total, per method,
  each with the process CPU seconds in brackets where recorded."""
  lines = []

  def total(e, key):
    return np.mean([sum(i.get(key, 0.0) for i in s.get("info", [])) for s in e["seeds"].values()])

  for m, e in results["methods"].items():
    wall = {p: total(e, f"seconds_{p}") for p in phases}
    cpu = {p: total(e, f"cpu_seconds_{p}") for p in phases}
    if not any(wall.values()):
      continue
    cell = lambda w, c: f"{w:.0f}" + (f" ({c:.0f})" if c else "")
    lines.append(f"| {m} | " + " | ".join(cell(wall[p], cpu[p]) for p in phases)
                 + f" | {cell(sum(wall.values()), sum(cpu.values()))} |")
  if not lines:
    return ""
  return "\n".join(["### Time (wall seconds, CPU seconds in brackets; summed over chunks)", "",
                    "| method | " + " | ".join(phases) + " | total |",
                    "|---" * (len(phases) + 2) + "|", *lines])
