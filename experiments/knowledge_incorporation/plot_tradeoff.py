"""Learning vs forgetting at matched acquisition: one curve per method over a sweep of its
learning budget (steps or learning rate), one panel per forgetting measure.

    python experiments/knowledge_incorporation/plot_tradeoff.py SRC [SRC ...] OUT.png

Each SRC is either a driver workdir (``python -m sleep_jax.main ... --workdir=DIR``, one per
sweep point; every method and seed in its ``results.json`` counts, and a point is labelled by
the budget keys -- ``*.steps``, ``*.lr``, ``*.lr_existing`` -- that differ between the workdirs)
or the JSON lines ``probe_consolidation.py --out=FILE`` appends (one point per step budget).
Seeds of the same method and budget (e.g. workdirs run with other ``--config.seeds``) make one
point: the mean, with the sample standard deviation as error bars and in the table.

x: acquisition (closed-book accuracy on the new documents' held-out questions just after
learning); y: each forgetting measure the runs report: reading skill (in-context on documents
never learnt), old facts (the world base's QA population), known facts (SmolLM2's shipped
general questions), KL(base || model) on generic prompts. The base's level is a dashed line.
Also prints the points as a markdown table.
"""

import collections
import json
import os
import sys
from typing import Dict, List

import matplotlib
import numpy as np

from sleep_jax.eval.report import NOT_PERCENT
from sleep_jax.sleep import run_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (metric, panel title, in percent): the metrics that are not percentages are report's list
MEASURES = tuple((k, title, k not in NOT_PERCENT) for k, title in (
    ("in_context_heldout", "reading skill: in-context on new documents"),
    ("retention_qa", "old facts: closed-book on the base's QA population"),
    ("known_facts", "known facts: general questions the base answered"),
    ("kl_to_base", "KL(base || model) on generic prompts (nats/token)")))
BUDGET_KEYS = ("steps", "lr", "lr_existing")


def _sortable(v):
  return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, repr(v))


def _from_workdirs(dirs: List[str]):
  """Per-seed points, base levels and the budget keys of driver workdirs (``results.json``)."""
  results = []
  for d in dirs:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      sys.exit(f"plot_tradeoff: {path} does not exist (is {d} a finished driver workdir?)")
    with open(path) as f:
      results.append(json.load(f))
  flats = [run_records.flat_config(r["config"]) for r in results]
  varying = sorted(k for k in set().union(*flats) if k.rsplit(".", 1)[-1] in BUDGET_KEYS
                   and len({repr(f.get(k)) for f in flats}) > 1)
  points, base = [], {}
  for r, flat in zip(results, flats):
    values = tuple(flat.get(k) for k in varying)
    for method, e in r["methods"].items():
      for s in e["seeds"].values():
        m = s["metrics"]
        if method == "base":
          base.update({k: m[k] for k, _, _ in MEASURES if m.get(k) is not None})
        elif method != "in_context" and m.get("acquisition") is not None:
          points.append({**m, "method": method, "order": tuple(map(_sortable, values)),
                         "short": "/".join(map(str, values)),
                         "label": " ".join(f"{k}={v}" for k, v in zip(varying, values))
                         or "(one budget)"})
  return points, base, " / ".join(varying)


def _from_probe_lines(path: str):
  """Points, base levels and the budget key of ``probe_consolidation.py --out`` lines."""
  points, base = [], {}
  for line in open(path):
    if not line.strip():
      continue
    r = json.loads(line)
    method = r["method"] + "".join(f" {o}" for o in r["overrides"] if "steps" not in o)
    points.append({**r["after"], "method": method, "order": (_sortable(r["steps"]),),
                   "short": str(r["steps"]), "label": f"{r['steps']} steps",
                   "acquisition": r["after"]["student_heldout_wordings"]})
    base.update({k: r["before"][k] for k, _, _ in MEASURES if k in r["before"]})
  return points, base, "steps"


def _seed_means(points: List[Dict], keys) -> List[Dict]:
  """One point per (method, budget): mean and sample std over its seeds of every key."""
  groups = collections.defaultdict(list)
  for p in points:
    groups[(p["method"], p["order"])].append(p)
  out = []
  for (method, order), ps in groups.items():
    q = {"method": method, "order": order, "short": ps[0]["short"], "label": ps[0]["label"],
         "seeds": len(ps)}
    for k in keys:
      v = [p[k] for p in ps if p.get(k) is not None]
      if v:
        q[k] = float(np.mean(v))
        q[k + "_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    out.append(q)
  return out


def _cell(p, key, pct):
  if p.get(key) is None:
    return "-"
  f, digits = (100, 1) if pct else (1, 3)
  spread = f" ± {f * p[key + '_std']:.{digits}f}" if p["seeds"] > 1 else ""
  return f"{f * p[key]:.{digits}f}{spread}"


def main(*args: str) -> None:
  if len(args) < 2 or not args[-1].endswith((".png", ".svg")):
    sys.exit(__doc__)
  *srcs, out = args
  points, base, keys = [], {}, []
  dirs = [s for s in srcs if not os.path.isfile(s)]
  for p, b, k in [_from_probe_lines(f) for f in srcs if os.path.isfile(f)] + (
      [_from_workdirs(dirs)] if dirs else []):
    points += p
    base.update(b)
    keys.append(k)
  measures = [m for m in MEASURES if any(p.get(m[0]) is not None for p in points)]
  if not points or not measures:
    sys.exit("plot_tradeoff: no point has an acquisition and a forgetting measure")
  curves = collections.defaultdict(list)
  for p in _seed_means(points, ["acquisition"] + [m[0] for m in measures]):
    curves[p["method"]].append(p)
  fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4.5), squeeze=False)
  print("| method | budget | seeds | acquisition | " + " | ".join(m[0] for m in measures) + " |")
  print("|---|---|---|---|" + "---|" * len(measures))
  for method, pts in sorted(curves.items()):
    pts.sort(key=lambda p: p["order"])  # the curve follows the sweep
    for ax, (key, title, pct) in zip(axes[0], measures):
      f = 100 if pct else 1
      on = [p for p in pts if p.get(key) is not None]
      if not on:
        continue
      x, y = [100 * p["acquisition"] for p in on], [f * p[key] for p in on]
      ax.errorbar(x, y, xerr=[100 * p["acquisition_std"] for p in on],
                  yerr=[f * p[key + "_std"] for p in on], fmt="o-", capsize=2, label=method)
      for xi, yi, p in zip(x, y, on):
        ax.annotate(p["short"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
      ax.set(xlabel="acquisition: closed-book just after learning (%)",
             ylabel="%" if pct else "nats per token", title=title)
    for p in pts:
      print(f"| {method} | {p['label']} | {p['seeds']} | {_cell(p, 'acquisition', True)} | "
            + " | ".join(_cell(p, k, pct) for k, _, pct in measures) + " |")
  for ax, (key, _, pct) in zip(axes[0], measures):
    if key in base:
      ax.axhline((100 if pct else 1) * base[key], color="gray", lw=0.8, ls="--", label="base")
    ax.title.set_fontsize(9)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"learning (right) vs forgetting; points labelled by {'; '.join(keys)}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(*sys.argv[1:])
