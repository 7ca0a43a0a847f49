"""Knowledge incorporation and continual learning on the synthetic world of fictional people (the
README's main job), and the same protocol on the user's own documents (``data.source="jsonl"``).

A chunk is a group of new people (or documents); every method reads it, sleeps, and is scored
closed-book on held-out question wordings of every chunk (the accuracy matrix R). Retention
probes on the world base: its pretraining QA population closed-book and in-context reading of
held-out people.
"""

from __future__ import annotations

import math
import os

import numpy as np

from sleep_jax.data import documents
from sleep_jax.data import world as world_lib
from sleep_jax.eval import kl_probe, plots, report, verdict
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
  extra, anchors, by_value, starts = {}, [], {}, None
  if c.model_source == "world":
    starts = np.zeros(model.cfg.vocab_size, bool)  # the tokens a person's name begins with
    starts[[model.tok.encode(f)[0] for f in world.first_names]] = True
    n = int(c.eval.retention_people)
    extra = {"retention_qa": (documents.world_documents(world, world.population("qa")[:n]), False),
             "in_context_heldout": (documents.world_documents(
                 world, world.population("heldout")[:n]), True)}
    anchors = _anchor_prompts(world, model.fmt, n, int(c.consolidation.anchor_prompts),
                              float(c.consolidation.get("anchor_closed_book", 0.5)),
                              str(c.consolidation.get("anchor_people", "qa")))
    if int(c.consolidation.get("value_anchors", 0)):
      by_value = _anchors_by_value(world, model.fmt, n)
    # Generic prompts of the world: the opening words of biographies the base was trained on.
    texts = [" ".join(world.passage(p).split()[:6])
             for p in world.population("pretrain")[:int(c.eval.kl_prompts)]]
  else:
    extra, texts = _real_model_probes(c), kl_probe.read_prompts()[:int(c.eval.kl_prompts)]
  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, extra, model.base_metrics,
               anchor_prompts=anchors, anchors_by_value=by_value,
               kl_probe=_kl_probe(c, model, texts), entity_starts=starts)


def _real_model_probes(config):
  """Known facts of a real model (``eval.known_facts``: a file; "" = the shipped set of the
  fetched SmolLM2, none for another model; "none" = off)."""
  path = config.eval.known_facts
  if path == "" and not config.gguf:
    path = documents.KNOWN_FACTS_SMOLLM2
  if path in ("", "none"):
    return {}
  return {"known_facts": ([documents.known_facts(path)], False)}


def _kl_probe(config, model: models.Model, texts):
  if not texts:
    return None
  return kl_probe.build(model.params, model.cfg, [model.fmt.prompt(t) for t in texts],
                        stop_ids=model.fmt.stop_ids, pad_id=model.tok.pad_id,
                        new_tokens=int(config.eval.kl_new_tokens),
                        batch_size=int(config.eval.batch_size))


def _anchor_prompts(world, fmt, skip: int, k: int, closed_book: float = 0.5,
                    people: str = "qa"):
  """k prompts: closed-book questions about QA-population people after the first ``skip`` (the
  retention probe's), a ``closed_book`` fraction of them, and in-context questions about
  reading-population people (never a probe), interleaved: what the base already does and the
  sleep must keep. One question per person. ``people="everyone"``: the closed-book ones are
  about a shuffled mix of those QA people and people the base never answered about closed-book
  (pretraining and reading populations): names of every kind the new slot must stay shut on."""
  if not 0.0 <= closed_book <= 1.0:
    raise ValueError(f"consolidation.anchor_closed_book={closed_book} must be in [0, 1]")
  if people not in ("qa", "everyone"):
    raise ValueError(f"consolidation.anchor_people={people!r}; valid: 'qa', 'everyone'")
  n_qa = math.ceil(closed_book * k)
  pool = world.population("qa")[skip:]
  if people == "everyone":
    pool = pool + world.population("pretrain") + world.population("reading")[k - n_qa:]
    pool = [pool[i] for i in np.random.default_rng(1).permutation(len(pool))]
  qa = documents.world_documents(world, pool[:n_qa])
  reading = documents.world_documents(world, world.population("reading")[:k - n_qa])
  rng = np.random.default_rng(0)
  out = []
  for i in range(max(len(qa), len(reading))):
    for docs, closed in ((qa, True), (reading, False)):
      if i < len(docs):
        q = docs[i].train_questions[rng.integers(len(docs[i].train_questions))].q
        out.append(fmt.closed_book(q) if closed else fmt.with_context(docs[i].passage, q))
  return out[:k]


def _anchors_by_value(world, fmt, skip: int):
  """Every training wording about every QA-population person after the retention probe's
  first ``skip``, closed-book, keyed by its answer."""
  out = {}
  for d in documents.world_documents(world, world.population("qa")[skip:]):
    for q in d.train_questions:
      out.setdefault(q.answer, []).append(fmt.closed_book(q.q))
  return out


def jsonl_setup(config, model: models.Model) -> Setup:
  c = config
  docs = documents.load_jsonl(c.data.documents)[:int(c.data.max_documents) or None]
  size = int(c.data.chunk_size) or len(docs)
  chunks = [docs[i:i + size] for i in range(0, len(docs), size)]
  extra, texts = {}, []  # the tiny world model reads no general English
  if c.model_source != "world":
    extra, texts = _real_model_probes(c), kl_probe.read_prompts()[:int(c.eval.kl_prompts)]
  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, extra, model.base_metrics,
               kl_probe=_kl_probe(c, model, texts))


TABLE = (("closed_book_final", "closed-book (final)"), ("acquisition", "closed-book (just slept)"),
         ("wake_in_context", "in-context (wake)"), ("BWT", "BWT"), ("forgetting", "forgetting"),
         ("retention_qa", "old facts (QA pop.)"), ("in_context_heldout", "reading skill"),
         ("known_facts", "known facts"), ("kl_to_base", "KL to base"))


def write_report(results, workdir, *, documents_file: str = "") -> str:
  if documents_file:
    title = f"# Knowledge incorporation on the documents of `{os.path.basename(documents_file)}`"
    what = "Closed-book score on the documents' eval questions, retention and continual metrics"
  else:
    title = "# Knowledge incorporation and continual learning on the synthetic world"
    what = ("Closed-book exact match on new people (held-out question templates), retention and "
            "continual metrics")
  md = [title, "", verdict.verdict(results), "", report.markdown_table(results, TABLE, what), "",
        verdict.legend(results, TABLE), "", verdict.dream_table(results), "",
        verdict.time_table(results), "",
        "Plots (PNG and SVG): `plots/accuracy_matrices`, `plots/accuracy_over_chunks`, "
        "`plots/tradeoff_<probe>` (acquisition against each retention probe), "
        "`plots/learning_curves` (each sleep's loss and teacher/student agreement); per-step "
        "curves in TensorBoard: `tensorboard --logdir WORKDIR/runs`."]
  md = [x for i, x in enumerate(md) if x or (i and md[i - 1])]  # no empty sections
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  plots.plot_results(results, os.path.join(workdir, "plots"), os.path.join(workdir, "runs"))
  return text


def jsonl_report(results, workdir) -> str:
  return write_report(results, workdir, documents_file=results["config"]["data"]["documents"])


TASK = Task("world", setup, write_report)
JSONL_TASK = Task("jsonl", jsonl_setup, jsonl_report)
