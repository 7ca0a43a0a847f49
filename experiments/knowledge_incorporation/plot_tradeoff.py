"""Learning vs forgetting at matched acquisition: one curve per method from the JSON lines
``probe_consolidation.py --out=FILE`` appends (one point per step budget).

    python experiments/knowledge_incorporation/plot_tradeoff.py FILE.jsonl OUT.png

x: closed-book exact match on the chunk's held-out question wordings after learning
(acquisition); y: the two forgetting measures, old facts (closed-book on the base's QA
population) and reading skill (in-context on never-seen people). Also prints the points as a
markdown table.
"""

import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEASURES = (("retention_qa", "old facts: closed-book on the QA population"),
            ("in_context_heldout", "reading skill: in-context on new people"))


def main(src: str, out: str) -> None:
  runs = [json.loads(line) for line in open(src) if line.strip()]
  curves = collections.defaultdict(list)
  for r in runs:
    label = r["method"] + "".join(f" {o}" for o in r["overrides"] if "steps" not in o)
    curves[label].append(r)
  fig, axes = plt.subplots(1, len(MEASURES), figsize=(6 * len(MEASURES), 4.5))
  print("| method | steps | held-out wordings | trained wordings | old facts | reading | s |")
  print("|---|---|---|---|---|---|---|")
  for label, pts in sorted(curves.items()):
    pts.sort(key=lambda r: r["steps"])
    x = [100 * p["after"]["student_heldout_wordings"] for p in pts]
    for ax, (key, title) in zip(axes, MEASURES):
      y = [100 * p["after"][key] for p in pts]
      ax.plot(x, y, "o-", label=label)
      for xi, yi, p in zip(x, y, pts):
        ax.annotate(str(p["steps"]), (xi, yi), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
      ax.axhline(100 * pts[0]["before"][key], color="gray", lw=0.5, ls="--")
      ax.set(xlabel="acquisition: closed-book on held-out wordings (%)", ylabel="%", title=title)
    for p in pts:
      a = p["after"]
      print(f"| {label} | {p['steps']} | {100 * a['student_heldout_wordings']:.1f} | "
            f"{100 * a['student_train_wordings']:.1f} | {100 * a['retention_qa']:.1f} | "
            f"{100 * a['in_context_heldout']:.1f} | {p['seconds']:.0f} |")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(*sys.argv[1:])
