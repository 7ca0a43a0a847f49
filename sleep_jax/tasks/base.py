"""The interface between the sleep engine and an experiment.

A task file builds a ``Setup`` (what the model reads, in which order, and how it is probed) and
says how a finished run is scored and reported. The engine (``sleep/``) sees only these:

* ``Setup``: the model (params, config, tokenizer, prompt format), the wake stream of document
  chunks, the retention probes, dream-generator training documents, task variants, per-question
  grouping for reports;
* ``Task``: a record of the experiment's functions, ``setup``, ``for_seed``, ``finish_run`` and
  ``report``; prompts come from the setup's format (``teacher_prompts`` etc. below), so a task
  that needs other prompts swaps its format.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from sleep_jax.data import documents


@dataclasses.dataclass
class Setup:
  params: Any
  cfg: Any  # ModelConfig
  tok: Any  # tokenizer (encode/decode/pad_id/bos_id/eos_id)
  fmt: Any  # documents.WorldFormat | documents.ChatFormat
  chunks: List[List[documents.Document]]  # the wake stream
  extra_evals: Dict[str, tuple]  # name -> (documents, in_context): retention probes
  base_metrics: Dict[str, Any]
  # Dream-generator training tasks (ARC: disjoint from the stream's held-out tasks); the driver
  # trains the ReST-EM generator on them before the stream. Never scored.
  generator_docs: List[documents.Document] = dataclasses.field(default_factory=list)
  # (document id, rng, n) -> task-variant documents of that document (ARC: its leave-one-out
  # tasks and n random augmentations; each eval question is a demonstration, never the test).
  task_variants: Optional[Callable[[str, np.random.Generator, int], List[documents.Document]]] = None
  # Per eval question text: {"distance": chunks back the answer lies, "kind": ...} maps
  # (long-horizon streams); reports group the final answers by them.
  query_info: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
  # Prompts of behaviour the sleep must leave alone (world: closed-book questions about people
  # the base knows, in-context reading of others; disjoint from every scored probe). With
  # ``consolidation.anchor_prompts = k`` the first k are distilled from the model as it woke up
  # into the student, same prompt on both sides: a KL-to-base term on unrelated inputs.
  anchor_prompts: List[List[int]] = dataclasses.field(default_factory=list)
  # Closed-book questions about people the base knows (never a probe), keyed by their answer:
  # ``consolidation.value_anchors`` picks those whose answer is a value of the new chunk.
  anchors_by_value: Dict[str, List[List[int]]] = dataclasses.field(default_factory=dict)
  # Generic prompts with the base's continuations (``eval.kl_probe.KLProbe``): the retention
  # probes then also report ``kl_to_base``, KL(base || model) there (0 for the base).
  kl_probe: Optional[Any] = None
  # (V,) bool: the tokens that begin an entity's name (world: every first name), for dreams
  # that copy their passage's entity where they name one (``dreaming.copy_title``).
  entity_starts: Optional[np.ndarray] = None
  # Dream simulation (``dream_sim.py``): the task's environment prompt, parser and checker
  # (``tasks/reasoning.Environments``); None: the task has no checkable environments.
  environments: Optional[Any] = None


def _same_setup(config, setup: Setup, seed: int) -> Setup:
  del config, seed
  return setup


def _as_is(config, setup: Setup, result: Dict[str, Any]) -> Dict[str, Any]:
  del config, setup
  return result


@dataclasses.dataclass(frozen=True)
class Task:
  """One experiment's plug-in functions.

  Attributes:
    name: the ``config.data.source`` value that selects it.
    setup: ``(config, model: models.Model) -> Setup``.
    report: ``(results, workdir) -> markdown`` writes results.md and the plots.
    for_seed: ``(config, setup, seed) -> Setup`` (e.g. every seed reads its own stream).
    finish_run: ``(config, setup, result) -> result`` with the task's own entries added to a
      finished run's result (e.g. partial credit, accuracy by distance).
  """
  name: str
  setup: Callable[..., Setup]
  report: Callable[[Dict[str, Any], str], str]
  for_seed: Callable[..., Setup] = _same_setup
  finish_run: Callable[..., Dict[str, Any]] = _as_is


# ----------------------------------------------------------------------------------------------
# Prompts every task gets from its format.
# ----------------------------------------------------------------------------------------------
def teacher_prompts(setup: Setup, docs: Sequence[documents.Document]) -> List[List[int]]:
  """The wake questions with the passage in context (the teacher's view)."""
  return [setup.fmt.with_context(d.passage, q.q) for d in docs for q in d.train_questions]


def student_prompts(setup: Setup, docs: Sequence[documents.Document]) -> List[List[int]]:
  """The same questions closed-book (the student's view)."""
  return [setup.fmt.closed_book(q.q) for d in docs for q in d.train_questions]


def gold_answers(setup: Setup, docs: Sequence[documents.Document]) -> List[List[int]]:
  """The supported answer of each wake question (``answer + stop``), aligned with the prompts."""
  return [setup.fmt.answer(q.answer) for d in docs for q in d.train_questions]


def template_items(setup: Setup, docs: Sequence[documents.Document], templates) -> tuple:
  """(teacher prompts, student prompts), one item per (template, document), for a consolidation
  that sees none of the task's questions: the teacher reads a template with the passage (e.g.
  ``"{context} Q: {title}"``, or ``"{context}\n\nRewrite this text about {title} ..."``) and
  writes its own question and answer, or its own rewrite, about the document's entity; the
  student reads the template without the passage (``"Q: <title>"``). ``templates``: one
  template or several (several rewrites of each passage: diverse material about each fact)."""
  templates = (templates,) if isinstance(templates, str) else tuple(templates)
  return ([setup.fmt.dream_prompt(d.passage, t, d.title) for t in templates for d in docs],
          [setup.fmt.dream_prompt("", t, d.title) for t in templates for d in docs])


def dream_heads(fmt, docs: Sequence[documents.Document], templates,
                copy_title: bool = False) -> List[List[int]]:
  """What a dream is studied after, one per (document, template) like ``dream_prompts``: the
  template without the passage when it opens a question about the entity (``"{context} Q:
  {title}"`` -> ``"Q: <title>"``, or with ``copy_title`` ``"{context} Q:"`` -> ``"Q:"``: the
  query format), else bos (the dream as standalone text)."""
  return [fmt.dream_prompt("", tpl, d.title) if opens_question(tpl, copy_title) else fmt.bos()
          for d in docs for tpl in templates.values()]


def opens_question(template: str, copy_title: bool = False) -> bool:
  """Whether a dream template ends in the opening of a question about the document's entity:
  it ends in its name (``"... Q: {title}"``) or the sampler copies it in
  (``dreaming.copy_title``). A template that names the entity inside an instruction (``"Write
  questions about {title} ..."``) does not: the dream after it is the model's own text."""
  return template.rstrip().endswith("{title}") or copy_title


def entity_copy(setup: Setup, docs: Sequence[documents.Document], templates, on: bool):
  """``dream_batches.sample_dreams``' ``copy`` for one prompt per (document, template): each
  document's title tokens and the setup's entity-start tokens; None when ``on`` is False."""
  if not on:
    return None
  if setup.entity_starts is None:
    raise ValueError("dreaming.copy_title needs a task that marks the tokens names begin with "
                     "(Setup.entity_starts: the world)")
  spans = [setup.tok.encode(d.title) for d in docs for _ in templates]
  out = np.zeros((len(spans), max(map(len, spans))), np.int32)
  for i, sp in enumerate(spans):
    out[i, :len(sp)] = sp
  return out, np.asarray([len(sp) for sp in spans], np.int32), setup.entity_starts


def entity_names(setup: Setup, docs: Sequence[documents.Document]) -> List[List[int]]:
  """The token sequences that name each document's entity (its title), as it may appear inside
  a sentence (a BPE tokenizer spells " Name" with a leading space) and at its start: the keys a
  sleep writes into the slots it unlocks (``slot_keys.py``)."""
  seen = dict.fromkeys(tuple(setup.tok.encode(v)) for d in docs for v in (d.title, " " + d.title))
  return [list(nm) for nm in seen if nm]


def dream_prompts(setup: Setup, docs: Sequence[documents.Document], templates) -> List[List[int]]:
  """One dream prompt per (document, template)."""
  return [setup.fmt.dream_prompt(d.passage, tpl, d.title) for d in docs
          for tpl in templates.values()]


def value_anchors(setup: Setup, docs: Sequence[documents.Document], k: int,
                  rng: np.random.Generator) -> List[List[int]]:
  """k anchor prompts whose answers are values the new documents teach, round-robin over
  those values: known people with the same answer keep it. A sleep tends to shift the answer
  prior of *every* person towards what it just learnt (a recency bias, not noise), and anchors
  about random people rarely ask for those values."""
  values = sorted({q.answer for d in docs for q in d.train_questions} & set(setup.anchors_by_value))
  pools = [[setup.anchors_by_value[v][i] for i in rng.permutation(len(setup.anchors_by_value[v]))]
           for v in values]
  out = []
  while len(out) < k and any(pools):
    for pool in pools:
      if pool and len(out) < k:
        out.append(pool.pop())
  return out


def pad_rows(rows: Sequence[Sequence[int]], loss_from: Sequence[int], seq_len: int, pad_id: int):
  """Right-padded LM rows; the loss covers tokens from ``loss_from[i]`` on."""
  out = {"tokens": np.full((len(rows), seq_len), pad_id, np.int32),
         "valid": np.zeros((len(rows), seq_len), bool),
         "loss_mask": np.zeros((len(rows), seq_len), bool)}
  for i, (r, start) in enumerate(zip(rows, loss_from)):
    r = list(r)[:seq_len]
    out["tokens"][i, :len(r)] = r
    out["valid"][i, :len(r)] = True
    out["loss_mask"][i, max(start, 1):len(r)] = True
  return out


def variant_rows(setup: Setup, docs, rng: np.random.Generator, n: int):
  """Task-variant training rows of ``docs`` (``Setup.task_variants``): ``with_context(variant
  demonstrations, held-out demonstration input) + answer``; returns (rows, prompt lengths)."""
  rows, starts = [], []
  for d in docs:
    for v in setup.task_variants(d.id, rng, n):
      for q in v.eval_questions:
        prompt = setup.fmt.with_context(v.passage, q.q)
        rows.append(prompt + setup.fmt.answer(q.answer))
        starts.append(len(prompt))
  return rows, starts


def question_rows(setup: Setup, docs) -> tuple:
  """Each wake question closed-book with its supported answer (loss on the answer); returns
  (rows, loss starts)."""
  prompts = student_prompts(setup, docs)
  rows = [p + a for p, a in zip(prompts, gold_answers(setup, docs))]
  return rows, [len(p) for p in prompts]


def passage_rows(setup: Setup, docs) -> tuple:
  """Each passage as one LM row (the SFT baseline's data; a document without a passage, e.g. a
  held-out set, gives none); returns (rows, loss starts)."""
  rows = [setup.fmt.document(d.passage) for d in docs if d.passage]
  return rows, [len(setup.fmt.bos())] * len(rows)
