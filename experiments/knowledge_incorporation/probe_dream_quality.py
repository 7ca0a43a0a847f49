"""What does a real model write when asked for study material about a passage? Samples dreams
from SmolLM2-135M-Instruct (or ``--gguf F``) with the documents variant's template and with a
template that asks for the ``Q:`` / ``A:`` layout, at two temperatures, on passages the
20-document run does not use (21-40 of ``documents_fictional.jsonl``), and scores them the way
the sleep records dream quality (``dream_qa.quality``): well-formed (at least one question /
answer pair parsed), about the passage (a question names one of its entities) and supported
(an answer occurs in the passage).

    python experiments/knowledge_incorporation/probe_dream_quality.py [--samples 2]

``--reader``: what the question dreams of ``knowledge.py:smollm2_docs_written`` carry. The
Q:/A: layout at T 0.7, 80 tokens, written from each passage (4 dreams) or from the passage
with one of its sentences read again (``dreaming.focus = "sentences"``, 2 dreams per
sentence); the questions that name the passage's entity are answered by the model reading the
passage (the dream's own answer is never used), and the table gives the share of the
passages' facts those answers contain (measurement only: the facts are the task's questions'
answers, which no method is given).

``--items``: what the passage's own consolidation items carry (``consolidation.prompt_templates``:
"Tell me about <title>." and ``knowledge_smollm2.REWRITES``): the greedy answer of the model
reading the passage to each template, 64 and 128 tokens, and the share of the passages' facts
in it.
"""

import argparse
import time

import jax
import numpy as np

from sleep_jax.configs import knowledge, knowledge_smollm2
from sleep_jax.data import documents
from sleep_jax.eval import qa as qa_eval
from sleep_jax.losses.rewards import normalize_answer
from sleep_jax.model import sampler
from sleep_jax.sleep import dream_batches, dream_qa
from sleep_jax.tasks import models

QA_LAYOUT = knowledge_smollm2.QA_LAYOUT  # asks for the "Q: ... / A: ..." layout about {title}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--gguf", default="", help="model file (default: the fetched SmolLM2)")
  ap.add_argument("--first", type=int, default=20, help="first passage (0-based)")
  ap.add_argument("--n", type=int, default=20, help="passages")
  ap.add_argument("--samples", type=int, default=2, help="dreams per passage and setting")
  ap.add_argument("--workdir", default="/tmp/probe_dream_quality")
  ap.add_argument("--reader", action="store_true", help="the question dreams' reader answers")
  ap.add_argument("--items", action="store_true", help="the passage items' teacher answers")
  args = ap.parse_args()
  c = knowledge.get_config("smollm2_docs")
  c.gguf = args.gguf
  m = models.load(c, args.workdir, log=lambda *a: None)
  docs = documents.load_jsonl(c.data.documents)[args.first:args.first + args.n]
  if args.reader:
    return reader_coverage(m, docs)
  if args.items:
    return item_coverage(m, docs)
  variant = list(c.dreaming.templates.values())[0]
  settings = {"variant's template, T 1.0, 48 tokens (the run's)": (variant, 1.0, 48),
              "variant's template, T 1.0, 96 tokens": (variant, 1.0, 96),
              "variant's template, T 0.7, 96 tokens": (variant, 0.7, 96),
              "Q:/A: layout, T 1.0, 96 tokens": (QA_LAYOUT, 1.0, 96),
              "Q:/A: layout, T 0.7, 96 tokens": (QA_LAYOUT, 0.7, 96)}
  print(f"{len(docs)} passages x {args.samples} dreams per setting")
  print("| setting | well-formed | about the passage | supported | pairs | s |")
  print("|---|---|---|---|---|---|")
  for name, (tpl, temperature, new_tokens) in settings.items():
    prompts = [m.fmt.dream_prompt(d.passage, tpl, d.title) for d in docs] * args.samples
    t0 = time.perf_counter()
    texts = _sample(m, prompts, temperature, new_tokens)
    q = dream_qa.quality(texts, [d.passage for d in docs] * args.samples)
    pairs = sum(len(dream_qa.parse_qa_pairs(t)) for t in texts)
    print(f"| {name} | {q['dream_wellformed']:.2f} | {q['dream_about_passage']:.2f} | "
          f"{q['dream_supported']:.2f} | {pairs} | {time.perf_counter() - t0:.0f} |", flush=True)


def _sample(m, prompts, temperature: float, new_tokens: int):
  toks, valid, _ = dream_batches.prompt_batch(prompts, len(prompts), m.tok.pad_id)
  out = sampler.sample(m.params, toks, valid, jax.random.key(1), cfg=m.cfg,
                       max_new_tokens=new_tokens, temperature=temperature,
                       stop_tokens=m.fmt.stop_ids, pad_id=m.tok.pad_id)
  return [m.tok.decode([int(t) for t, on in zip(row, mask) if on])
          for row, mask in zip(np.asarray(out.tokens), np.asarray(out.completion_mask))]


def reader_coverage(m, docs) -> None:
  """The ``--reader`` table (module docstring)."""
  print("| written from | dreams | well-formed | about the passage | questions naming the "
        "entity | facts in the reader's answers | eval answers in them | s |")
  print("|---|---|---|---|---|---|---|---|")
  title = {d.passage: d.title for d in docs}
  for focus, reps in (("passage", 4), ("sentences", 2)):
    t0 = time.perf_counter()
    ddocs, originals = dream_qa.focused_documents(docs, focus)
    texts = _sample(m, [m.fmt.dream_prompt(d.passage, QA_LAYOUT, d.title) for d in ddocs] * reps,
                    0.7, 80)
    passages = originals * reps
    q = dream_qa.quality(texts, passages)
    named = list(dict.fromkeys((p, x) for t, p in zip(texts, passages)
                               for x, _ in dream_qa.entity_pairs(t, title[p], named=True)))
    said = {}
    if named:
      comps = qa_eval.greedy_completions(
          m.params, m.cfg, [m.fmt.with_context(p, x) for p, x in named], max_new_tokens=24,
          stop_tokens=m.fmt.stop_ids, pad_id=m.tok.pad_id)
      for (p, _), a in zip(named, comps):
        said.setdefault(p, []).append(f" {normalize_answer(m.tok.decode(a))} ")

    print(f"| {focus} | {len(texts)} | {q['dream_wellformed']:.2f} | "
          f"{q['dream_about_passage']:.2f} | {len(named)} | "
          f"{_held(docs, said, lambda d: d.train_questions + d.eval_questions):.2f} | "
          f"{_held(docs, said, lambda d: d.eval_questions):.2f} | {time.perf_counter() - t0:.0f} |",
          flush=True)


def _held(docs, said, questions) -> float:
  """Share of the documents' facts (distinct answers of ``questions(d)``) found in ``said``
  (passage -> texts, normalised with spaces around)."""
  facts = {(d.passage, normalize_answer(x.answer)) for d in docs for x in questions(d)}
  return sum(any(f" {f} " in a for a in said.get(p, [])) for p, f in facts) / len(facts)


def item_coverage(m, docs) -> None:
  """The ``--items`` table (module docstring)."""
  print("| item template | new tokens | facts in the teacher's answer | eval answers in it | s |")
  print("|---|---|---|---|---|")
  templates = {"Tell me about <title>.": ("{context}\n\nTell me about {title}.",)}
  templates.update({t.split("\n\n")[1].replace("{title}", "<title>"): (t,)
                    for t in knowledge_smollm2.REWRITES})
  templates["both rewrites (smollm2_docs_written)"] = knowledge_smollm2.REWRITES
  for new_tokens in (64, 128):
    for name, tpls in templates.items():
      t0 = time.perf_counter()
      said = {}
      for tpl in tpls:
        comps = qa_eval.greedy_completions(
            m.params, m.cfg, [m.fmt.dream_prompt(d.passage, tpl, d.title) for d in docs],
            max_new_tokens=new_tokens, stop_tokens=m.fmt.stop_ids, pad_id=m.tok.pad_id,
            batch_size=10)
        for d, a in zip(docs, comps):
          said.setdefault(d.passage, []).append(f" {normalize_answer(m.tok.decode(a))} ")
      print(f"| {name} | {new_tokens} | "
            f"{_held(docs, said, lambda d: d.train_questions + d.eval_questions):.2f} | "
            f"{_held(docs, said, lambda d: d.eval_questions):.2f} | "
            f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
  main()
