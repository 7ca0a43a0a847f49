"""Dreams that are study material about a passage: question/answer pairs the model wrote.

A knowledge task's dream prompt holds the passage and asks for questions with short answers
(``dreaming.templates``). ``parse_qa_pairs`` reads the pairs out of what the model wrote, in the
layouts models use ("Q: ... A: ...", "Question: ... Answer: ...", "1. ...? ..."); ``quality``
measures a sleep's dreams (well-formed, about the passage, answer supported by the passage;
``continuation_quality`` for dreams that continue the passage); and
``qa_items`` turns the pairs into consolidation items: the teacher reads the passage and the
question (so the in-context model answers, not the dream's own answer), the student the
question closed-book — the query format the facts must be recalled in.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sleep_jax.losses.rewards import normalize_answer

_QA = re.compile(r"(?:^|\n|\s)(?:Q|Question)\s*\d*\s*[:.)]\s*(?P<q>.+?)\s*"
                 r"(?:\n|\s)(?:A|Answer)\s*\d*\s*[:.)]\s*(?P<a>[^\n]+?)(?=\s*(?:\n|$|Q\s*\d*[:.)]|"
                 r"Question\s*\d*[:.)]))", re.IGNORECASE | re.DOTALL)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s*(?P<q>[^?\n]+\?)\s*(?:[-:\u2013]\s*)?(?P<a>[^\n]+)$",
                       re.MULTILINE)


def parse_qa_pairs(text: str) -> List[Tuple[str, str]]:
  """(question, answer) pairs in ``text``; empty answers and questions without a '?' or a
  question word are dropped."""
  pairs = [(m.group("q"), m.group("a")) for m in _QA.finditer(text)]
  if not pairs:
    pairs = [(m.group("q"), m.group("a")) for m in _NUMBERED.finditer(text)]
  out = []
  for q, a in pairs:
    q, a = " ".join(q.split()), " ".join(a.split()).strip(" .")
    if a and len(q.split()) >= 3 and len(a.split()) <= 12:
      out.append((q, a))
  return out


def _names(passage: str) -> set:
  """The passage's capitalised words after the first word of a sentence (its entity names)."""
  words = re.findall(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}\b", passage)
  return set(words)


def quality(texts: Sequence[str], passages: Sequence[str]) -> Dict[str, float]:
  """Fractions of dreams that are well-formed (at least one pair), about their passage (a
  question names one of its entities) and supported (an answer occurs in the passage)."""
  n = len(texts)
  if n == 0:
    return {"dream_wellformed": 0.0, "dream_about_passage": 0.0, "dream_supported": 0.0}
  wf = about = sup = 0
  for text, passage in zip(texts, passages):
    pairs = parse_qa_pairs(text)
    wf += bool(pairs)
    names, norm = _names(passage), f" {normalize_answer(passage)} "
    about += any(any(w in q for w in names) for q, _ in pairs)
    sup += any(normalize_answer(a) and f" {normalize_answer(a)} " in norm for _, a in pairs)
  return {"dream_wellformed": wf / n, "dream_about_passage": about / n,
          "dream_supported": sup / n}


def continuation_quality(texts: Sequence[str], passages: Sequence[str]) -> Dict[str, float]:
  """For dreams that continue or rewrite their passage: the fraction that names one of the
  passage's entities, and the mean fraction of each dream's word 3-grams found in the passage
  (1 = copied, 0 = nothing the passage says)."""
  n = len(texts)
  if n == 0:
    return {"dream_about_passage": 0.0, "dream_trigrams_in_passage": 0.0}
  about, overlap = 0, 0.0
  for text, passage in zip(texts, passages):
    about += any(w in text for w in _names(passage))
    grams = _trigrams(text)
    overlap += len(grams & _trigrams(passage)) / len(grams) if grams else 0.0
  return {"dream_about_passage": about / n, "dream_trigrams_in_passage": overlap / n}


def _trigrams(text: str) -> set:
  w = normalize_answer(text).split()
  return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def focused_documents(docs, focus: str = "passage") -> tuple:
  """(documents dreams are written from, the original passage of each). ``"passage"``: each
  document as it is. ``"sentences"``: one per sentence of each passage, the whole passage
  followed by that sentence again: a model asked about a passage writes about the few facts it
  asks about first, and a question tends to be about what was read last, so the dreams reach
  every fact. The teacher still reads the original passage."""
  if focus not in ("passage", "sentences"):
    raise ValueError(f"dreaming.focus={focus!r}; valid: 'passage', 'sentences'")
  if focus == "passage":
    return list(docs), [d.passage for d in docs]
  out = [(dataclasses.replace(d, passage=f"{d.passage} {s}"), d.passage) for d in docs
         for s in re.split(r"(?<=[.!?])\s+", d.passage.strip()) if s]
  return [d for d, _ in out], [p for _, p in out]


def fact_coverage(triples: Sequence[Tuple[str, str, str]], docs) -> float:
  """Fraction of the documents' facts (the distinct answers of their questions; measurement
  only, never training data) that some dream about the same passage answers: how much of the
  passage the study questions reach."""
  said: Dict[str, set] = {}
  for passage, _, a in triples:
    said.setdefault(passage, set()).add(normalize_answer(a))
  facts = [(d.passage, normalize_answer(q.answer)) for d in docs
           for q in {q.answer: q for q in d.train_questions + d.eval_questions}.values()]
  return sum(a in said.get(p, ()) for p, a in facts) / len(facts) if facts else 0.0


def decoy_questions(triples: Sequence[Tuple[str, str, str]], docs, rng: np.random.Generator,
                    per_question: float) -> List[str]:
  """Questions about no one: ``per_question`` x as many as ``triples`` (passage, question,
  answer), each a dream question with its document's entity renamed to a mix of two of the
  documents' names (its first word and another title's last word, or the reverse). Hard
  negatives for the new slot's gate: it must open on the whole name, not on a part of it."""
  titles = {d.passage: d.title for d in docs}
  names = sorted({d.title for d in docs})
  usable = [(titles[p], q) for p, q, _ in triples if p in titles and titles[p] in q]
  if not usable or len(names) < 2:
    return []
  out = []
  for i in rng.choice(len(usable), int(round(per_question * len(triples)))):
    title, q = usable[int(i)]
    other = names[int(rng.integers(len(names)))]
    mixed = (f"{title.split()[0]} {other.split()[-1]}" if rng.random() < 0.5
             else f"{other.split()[0]} {title.split()[-1]}")
    if mixed not in titles.values():
      out.append(q.replace(title, mixed))
  return out


def entity_pairs(text: str, title: str, named: bool) -> List[Tuple[str, str]]:
  """``parse_qa_pairs(text)``; with ``named`` only the pairs whose question names ``title`` in
  full (a keyed slot opens on the whole name only: a question that does not name it cannot
  reach the slot)."""
  pairs = parse_qa_pairs(text)
  return [(q, a) for q, a in pairs if title and title in q] if named else pairs


def trial_rows(fmt, items: Sequence, answers: Sequence[Sequence[int]]):
  """(prompts, completions) of ``trial_view = "qa"``: a dream's trial row is the item it would
  be consolidated as, its question asked closed-book (``fmt.closed_book``) with the answer of
  the model reading the passage (``answers``, one per item that is not None, stop token
  dropped). A dream with no usable question (item None) gets an empty completion: its SFT
  gradient is zero, so its trial cannot change tau and is never accepted."""
  prompts, completions, it = [], [], iter(answers)
  for item in items:
    if item is None:
      prompts.append(fmt.closed_book(""))
      completions.append([])
    else:
      prompts.append(fmt.closed_book(item[1]))
      completions.append(list(next(it)) + [fmt.stop_ids[0]])
  return prompts, completions


def qa_items(fmt, pairs_with_passages: Sequence[Tuple[str, str, str]]):
  """(teacher prompts, student prompts) for (passage, question, answer) triples: the teacher
  reads the passage, the student is asked closed-book."""
  teacher = [fmt.with_context(p, q) for p, q, _ in pairs_with_passages]
  student = [fmt.closed_book(q) for _, q, _ in pairs_with_passages]
  return teacher, student
