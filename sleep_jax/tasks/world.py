"""Knowledge incorporation and continual learning on the synthetic world of fictional people (the
README's main job), and the same protocol on the user's own documents (``data.source="jsonl"``).

A chunk is a group of new people (or documents); every method reads it, sleeps, and is scored
closed-book on held-out question wordings of every chunk (the accuracy matrix R). Retention
probes on the world base: its pretraining QA population closed-book and in-context reading of
held-out people.
"""

from __future__ import annotations

import os

import numpy as np

from sleep_jax.data import documents
from sleep_jax.data import world as world_lib
from sleep_jax.eval import report
from sleep_jax.tasks import models
from sleep_jax.tasks.base import Setup, Task


def setup(config, model: models.Model) -> Setup:
  c = config
  world = model.corpus or world_lib.World(models.base_recipe(c).world)
  if c.world_chunks > world.cfg.n_chunks:
    raise ValueError(f"world_chunks={c.world_chunks} > the world's n_chunks={world.cfg.n_chunks}")
  chunks = [documents.world_documents(world, world.chunk(k)[:c.data.chunk_size or None],
                                      int(c.data.passages_per_person))
            for k in range(c.world_chunks)]
  extra, anchors = {}, []
  if c.model_source == "world":
    n = int(c.eval.retention_people)
    extra = {"retention_qa": (documents.world_documents(world, world.population("qa")[:n]), False),
             "in_context_heldout": (documents.world_documents(
                 world, world.population("heldout")[:n]), True)}
    anchors = _anchor_prompts(world, model.fmt, n, int(c.consolidation.anchor_prompts))
  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, extra, model.base_metrics,
               anchor_prompts=anchors)


def _anchor_prompts(world, fmt, skip: int, k: int):
  """k prompts, alternately a closed-book question about a QA-population person after the
  first ``skip`` (the retention probe's) and an in-context question about a reading-population
  person (never a probe): what the base already does and the sleep must keep."""
  n = -(-k // 2)  # people of each kind
  qa = documents.world_documents(world, world.population("qa")[skip:skip + n])
  reading = documents.world_documents(world, world.population("reading")[:n])
  rng = np.random.default_rng(0)
  out = []
  for a, b in zip(qa, reading):
    qa_q, rd_q = (d.train_questions[rng.integers(len(d.train_questions))] for d in (a, b))
    out += [fmt.closed_book(qa_q.q), fmt.with_context(b.passage, rd_q.q)]
  return out[:k]


def jsonl_setup(config, model: models.Model) -> Setup:
  docs = documents.load_jsonl(config.data.documents)
  size = int(config.data.chunk_size) or len(docs)
  chunks = [docs[i:i + size] for i in range(0, len(docs), size)]
  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, {}, model.base_metrics)


TABLE = (("closed_book_final", "closed-book (final)"), ("acquisition", "closed-book (just slept)"),
         ("wake_in_context", "in-context (wake)"), ("BWT", "BWT"), ("forgetting", "forgetting"),
         ("retention_qa", "old facts (QA pop.)"), ("in_context_heldout", "reading skill"))


def write_report(results, workdir) -> str:
  md = ["# Knowledge incorporation and continual learning on the synthetic world", "",
        report.markdown_table(results, TABLE, "Closed-book exact match on new people "
                              "(held-out question templates), retention and continual metrics"),
        "", "Plots: `plots/accuracy_matrices.png`, `plots/accuracy_over_chunks.png`."]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  report.plot_results(results, os.path.join(workdir, "plots"))
  return text


TASK = Task("world", setup, write_report)
JSONL_TASK = Task("jsonl", jsonl_setup, write_report)
