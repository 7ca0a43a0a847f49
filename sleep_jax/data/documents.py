"""Documents to learn from, and how a model is prompted about them.

A ``Document`` is what one wake step reads: a passage, the questions asked about it while awake
(``train_questions``: the prompts sleep distils on) and the questions that score it afterwards
(``eval_questions``, never used for learning). Sources:

* ``world_documents``: the built-in synthetic world (one document per person; train and eval
  questions use disjoint templates);
* ``load_jsonl``: the user's own documents, one JSON object per line::

    {"id": "...", "passage": "...",
     "questions": [{"q": "...", "answer": "...", "aliases": ["..."]}],
     "train_questions": [{"q": "...", "answer": "..."}],      # optional
     "title": "..."}                                           # optional: who/what it is about

  Without ``train_questions`` sleep uses one recall prompt per document (``RECALL_PROMPT``).
  ``title`` fills ``{title}`` in dream templates (world documents: the person's name).

A ``Format`` turns documents into token ids for one model family: ``WorldFormat`` (the tiny
world's ``<passage> Q: ... A:`` layout, word tokenizer) and ``ChatFormat`` (a chat model's own
template, e.g. SmolLM2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Sequence, Tuple

from sleep_jax.errors import UserError

RECALL_PROMPT = "What do you know about the document \"{id}\"?"


@dataclasses.dataclass(frozen=True)
class Question:
  q: str
  answer: str
  aliases: tuple = ()

  @property
  def golds(self) -> List[str]:
    return [self.answer, *self.aliases]


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  passage: str
  train_questions: tuple  # of Question: the wake prompts sleep distils on
  eval_questions: tuple  # of Question: scored closed-book after sleep
  title: str = ""  # the entity the passage is about (dream templates may ask for ``{title}``)


class DocumentError(UserError):
  """A malformed documents file; the message names the file and line."""


def _question(obj, where: str, field: str) -> Question:
  if not isinstance(obj, dict) or not isinstance(obj.get("q"), str) or not isinstance(
      obj.get("answer"), str):
    raise DocumentError(f"{where}: every entry of {field!r} needs string fields 'q' and 'answer'; "
                        f"got {obj!r}")
  aliases = obj.get("aliases", [])
  if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
    raise DocumentError(f"{where}: 'aliases' must be a list of strings; got {aliases!r}")
  return Question(obj["q"], obj["answer"], tuple(aliases))


def load_jsonl(path: str) -> List[Document]:
  """Reads and validates a documents file; errors name the line."""
  if not path:
    raise DocumentError("data.source='jsonl' needs a documents file: pass "
                        "--config.data.documents=FILE (one JSON object per line)")
  try:
    with open(path, "rb") as f:
      raw = f.read().split(b"\n")
  except OSError as e:
    raise DocumentError(f"cannot read documents file {path!r}: {e.strerror}") from None
  docs, seen = [], set()
  for n, data in enumerate(raw, 1):
    try:
      line = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DocumentError(f"{path}:{n}: not UTF-8 text (byte {data[e.start]:#04x} at column "
                          f"{e.start + 1}); save the file as UTF-8") from None
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DocumentError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DocumentError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "passage", "questions", "train_questions", "title"}
    if unknown:
      raise DocumentError(f"{where}: unknown fields {sorted(unknown)}; expected id, passage, "
                          "questions, train_questions, title")
    if not isinstance(obj.get("title", ""), str):
      raise DocumentError(f"{where}: 'title' (what the passage is about) must be a string")
    if "id" not in obj or not isinstance(obj.get("passage"), str) or not obj["passage"].strip():
      raise DocumentError(f"{where}: needs an 'id' and a non-empty string 'passage'")
    doc_id = str(obj["id"])
    if doc_id in seen:
      raise DocumentError(f"{where}: duplicate id {doc_id!r}")
    seen.add(doc_id)
    qs = obj.get("questions")
    if not isinstance(qs, list) or not qs:
      raise DocumentError(f"{where}: 'questions' must be a non-empty list")
    evals = tuple(_question(q, where, "questions") for q in qs)
    trains = tuple(_question(q, where, "train_questions")
                   for q in obj.get("train_questions", []))
    if not trains:
      trains = (Question(RECALL_PROMPT.format(id=doc_id), obj["passage"]),)
    docs.append(Document(doc_id, obj["passage"], trains, evals, obj.get("title", "")))
  if not docs:
    raise DocumentError(f"{path}: no documents")
  return docs


KNOWN_FACTS_SMOLLM2 = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "probes",
                                   "known_facts_smollm2.jsonl")


def known_facts(path: str) -> Document:
  """A known-facts probe (``experiments/knowledge_incorporation/make_known_facts.py``): general
  questions the base model answers correctly, as one closed-book document."""
  with open(path, encoding="utf-8") as f:
    qs = [json.loads(line) for line in f if line.strip()]
  return Document(os.path.basename(path), "", (),
                  tuple(Question(q["q"], q["answer"], tuple(q.get("aliases", ()))) for q in qs))


def world_documents(world, people, passages_per_person: int = 1) -> List[Document]:
  """Documents of the synthetic world's ``people``: train-template questions for sleep and the
  held-out templates for evaluation.

  ``passages_per_person = 1``: the single-passage regime (passage variant 0). ``n > 1``: the
  many-passage ("continued pretraining") regime: each person arrives as ``n`` paraphrased
  passages (variants 0..n-1, separate documents ``<pid>``, ``<pid>/v1``, ...); all carry the
  train questions (so every paraphrase is read, distilled and trained on) and only the first the
  eval questions (so a person is scored once)."""
  from sleep_jax.data import world as world_lib
  n = int(passages_per_person)
  if not 1 <= n <= world.cfg.n_passage_variants:
    raise ValueError(f"passages_per_person={n}; the world has {world.cfg.n_passage_variants} "
                     "passage variants per person")
  docs = []
  for p in people:
    tq, eq = [], []
    for a in world_lib.ATTRIBUTES:
      for t in range(len(world_lib.QUESTIONS[a])):
        q = Question(world.question(p, a, t), p.attrs[a])
        (tq if t < world_lib.N_TRAIN_TEMPLATES else eq).append(q)
    for v in range(n):
      docs.append(Document(str(p.pid) if v == 0 else f"{p.pid}/v{v}", world.passage(p, v),
                           tuple(tq), tuple(eq) if v == 0 else (), f"{p.first} {p.last}"))
  return docs


# ----------------------------------------------------------------------------------------------
# Formats.
# ----------------------------------------------------------------------------------------------
class WorldFormat:
  """The tiny world's layout: ``bos <passage> Q: <q> A:`` -> ``<answer> eos``."""

  max_answer_tokens = 2

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.stop_ids = (tokenizer.eos_id,)

  def with_context(self, passage: str, q: str) -> List[int]:
    return self.tok.encode(f"{passage} Q: {q} A:", add_bos=True)

  def closed_book(self, q: str) -> List[int]:
    return self.tok.encode(f"Q: {q} A:", add_bos=True)

  def answer(self, a: str) -> List[int]:
    return self.tok.encode(a) + [self.tok.eos_id]

  def document(self, passage: str) -> List[int]:
    return self.tok.encode(passage, add_bos=True, add_eos=True)

  def dream_prompt(self, passage: str, template: str = "{context}", title: str = "") -> List[int]:
    return self.tok.encode(template.format(context=passage, title=title), add_bos=True)

  def prompt(self, text: str) -> List[int]:
    """Plain text to continue (the KL probe's generic prompts)."""
    return self.tok.encode(text, add_bos=True)

  def bos(self) -> List[int]:
    return [self.tok.bos_id]


class ChatFormat:
  """A chat model's own template (``HFTokenizer.encode_chat``): the passage and the question are
  the user turn; the answer is the assistant turn up to its end-of-turn token."""

  max_answer_tokens = 24

  def __init__(self, tokenizer, instruction: str = "Answer with a short phrase.",
               shots: Sequence[Tuple[str, str]] = ()):
    """``shots``: (question, answer) pairs shown as earlier turns of the chat before every
    question, with or without its passage: worked examples of the answer's format."""
    self.tok = tokenizer
    self.instruction = instruction
    self.stop_ids = tuple(tokenizer.stop_ids) or (tokenizer.eos_id,)
    self.demos = [turn for q, a in shots for turn in (
        {"role": "user", "content": f"{q} {instruction}"}, {"role": "assistant", "content": a})]

  def _chat(self, text: str, demos: bool = False) -> List[int]:
    turns = self.demos if demos else []
    return list(self.tok.encode_chat(turns + [{"role": "user", "content": text}]))

  def with_context(self, passage: str, q: str) -> List[int]:
    return self._chat(f"{passage}\n\n{q} {self.instruction}", demos=True)

  def closed_book(self, q: str) -> List[int]:
    return self._chat(f"{q} {self.instruction}", demos=True)

  def answer(self, a: str) -> List[int]:
    return self.tok.encode(a) + [self.stop_ids[0]]

  def document(self, passage: str) -> List[int]:
    return self.tok.encode(passage) + [self.tok.eos_id]

  def dream_prompt(self, passage: str, template: str = "{context}", title: str = "") -> List[int]:
    # Without the passage ("{context}\n\nTell me about {title}." for the student) the turn
    # starts at the instruction, not at blank lines.
    return self._chat(template.format(context=passage, title=title).strip())

  def prompt(self, text: str) -> List[int]:
    """A user turn as it is, without the short-answer instruction (the KL probe's prompts)."""
    return self._chat(text)

  def bos(self) -> List[int]:
    return [self.tok.bos_id] if self.tok.add_bos_token and self.tok.bos_id is not None else []
