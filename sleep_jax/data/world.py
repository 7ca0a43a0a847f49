"""A synthetic world of fictional people: the offline stand-in for knowledge incorporation.

In the spirit of synthetic biographies (Allen-Zhu & Li, "Physics of Language Models 3.1"): every
person has a made-up unique name (first + last name drawn from syllable-generated pools) and six
attributes whose values are each ONE word-level token (early probes on this machine: multi-token answers
stayed near 0% in the tiny model). Everything is a pure function of ``WorldConfig`` (its seed and
sizes): two worlds with equal configs are equal.

Populations (pairwise disjoint sets of people):

* ``pretrain``  people whose biographies are *only read* during pretraining (language-model loss
  on the passage); nobody ever asks about them. Their closed-book accuracy measures how much a
  model extracts from a read biography without question answering -- what a fine-tune on a new
  passage can at best hope for.
* ``qa``        people on whom closed-book question answering is trained (their facts are learnt
  from the answers alone; their biographies are never a training target).
* ``reading``   many people seen only through in-context QA (passage in the prompt, never a
  target). Kept apart from ``qa`` so in-context answers cannot come from memory: the model has to
  learn to read.
* ``heldout``   people never trained on; the base model's in-context reading skill is measured
  on them with held-out question templates.
* ``new_0 .. new_{T-1}``  chunks of new people that arrive later, one per wake phase
  (knowledge incorporation, continual learning).

Question templates are disjoint per attribute and split into ``train`` and ``eval`` templates;
eval templates appear only in evaluation examples (``tests/test_world.py`` checks that no training
text matches any eval template).

Example formats (all ``Example(prompt, target)``; a model is trained on ``bos + prompt + target +
eos`` with the loss on ``target + eos`` only, see ``encode``):

* biography:          prompt ``""``,                         target ``passage(person)``
* closed-book QA:     prompt ``"Q: <question> A:"``,          target ``<answer>`` (one token)
* in-context QA:      prompt ``"<passage> Q: <question> A:"``, target ``<answer>`` (one token)
* multi-question reading (``incontext_multi``): prompt ``"<passage>"``, target
  ``"Q: <q1> A: <a1> Q: <q2> A: <a2> ..."`` (several attributes, random order); the loss is on the
  answers and the final eos (weight 1) and optionally, with a small weight, on the question text
  (``Example.segments`` carries per-segment loss weights). Its first question is exactly the
  in-context eval format, and every passage gives several answers of supervision.
* question generation (``incontext_generate``): prompt ``"<passage>"``, target
  ``"Q: <question> A: <answer>"`` with the loss on all of it: the format of a dream (the cycle
  samples ``bos + passage`` -> ``" Q: ... A: ... eos"`` and trains on it closed-book).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from sleep_jax.data.tokenizer import WordTokenizer
# The world's language is part of this module's interface (re-exported).
from sleep_jax.data.world_text import (ATTRIBUTES, BIRTH_SENTENCES, FIELDS, MONTHS,  # noqa: F401
                                       N_SENTENCES, N_TRAIN_TEMPLATES, QUESTIONS,
                                       SENTENCE_KEYS, SENTENCES, iter_eval_templates_regex,
                                       question_templates)

# ----------------------------------------------------------------------------------------------
# Configuration and people.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything the world depends on. Equal configs give equal worlds."""

  seed: int = 0
  n_pretrain: int = 400  # biographies only (read, never asked about)
  n_qa: int = 400  # closed-book + in-context QA
  n_reading: int = 3000  # in-context QA only: their passages are prompts, never targets
  n_heldout: int = 200  # in-context evaluation of the base model
  n_chunks: int = 5  # T wake chunks of new people
  chunk_size: int = 20  # people per chunk
  n_first_names: int = 120
  n_last_names: int = 120
  n_cities: int = 40
  n_universities: int = 24
  n_employers: int = 40
  first_year: int = 1940
  n_years: int = 60
  n_passage_variants: int = 4  # paraphrased biographies per person
  # Sentence order per passage variant. A fixed order (False) did not make reading faster to
  # learn for the 2-layer base model (NOTES_world.md: ~2-4% in-context after 300 steps).
  shuffle_sentences: bool = True

  @property
  def populations(self) -> Tuple[str, ...]:
    return ("pretrain", "qa", "reading", "heldout") + tuple(f"new_{k}" for k in range(self.n_chunks))

  def population_size(self, name: str) -> int:
    if name.startswith("new_"):
      return self.chunk_size
    return {"pretrain": self.n_pretrain, "qa": self.n_qa, "reading": self.n_reading,
            "heldout": self.n_heldout}[name]


class Person(NamedTuple):
  pid: int  # global id (index in World.people)
  first: str
  last: str
  female: bool
  attrs: Dict[str, str]  # attribute -> one-word value

  @property
  def name(self) -> str:
    return f"{self.first} {self.last}"


class Example(NamedTuple):
  """One training/eval example: the loss (and the answer) is on ``target`` only.

  ``segments`` (optional): ``((text, weight), ...)`` whose space-joined texts are ``target``; each
  segment's tokens get its loss weight (0 = context only). ``eos_weight`` weighs the closing eos.
  Without segments every target token has weight 1."""
  prompt: str
  target: str
  kind: str  # "bio" | "closed" | "incontext" | "multi" | "generate"
  pid: int
  attribute: str  # "" for biographies (and multi-question examples)
  template: int  # question-template index in QUESTIONS[attribute] (-1 for biographies)
  variant: int  # passage variant (-1 for closed-book)
  segments: Tuple[Tuple[str, float], ...] = ()
  eos_weight: float = 1.0


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "st", "sh", "th", "ch", "pl", "fl", "sl")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "x", "nd", "rk")


def _syllable_words(rng: np.random.Generator, n: int, n_syll: Tuple[int, int], suffixes,
                    taken: set) -> List[str]:
  """``n`` new capitalised made-up words (not in ``taken``; added to it)."""
  out = []
  while len(out) < n:
    k = int(rng.integers(n_syll[0], n_syll[1] + 1))
    w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))]
                for _ in range(k))
    w += _CODAS[rng.integers(len(_CODAS))] + suffixes[rng.integers(len(suffixes))]
    w = w.capitalize()
    if w not in taken and 4 <= len(w) <= 12:
      taken.add(w)
      out.append(w)
  return out


_COMPONENT_POPULATION = {"bio": "pretrain", "closed": "qa", "incontext": "reading",
                        "bio_qa": "qa", "incontext_qa": "qa", "closed_pretrain": "pretrain",
                        "incontext_pretrain": "pretrain", "incontext_multi": "reading",
                        "incontext_generate": "reading"}


def sample_component(rng: np.random.Generator, mixture: Dict[str, float]) -> str:
  """A mixture component drawn with probability proportional to its weight (any corpus)."""
  names = sorted(mixture)
  w = np.array([mixture[n] for n in names], float)
  return names[rng.choice(len(names), p=w / w.sum())]


class World:
  """The people, their value vocabularies, passages and questions of one ``WorldConfig``."""

  def __init__(self, cfg: WorldConfig = WorldConfig()):
    self.cfg = cfg
    rng = np.random.default_rng([cfg.seed, 0x51EE9])
    taken = set(MONTHS) | {f.capitalize() for f in FIELDS}
    self.first_names = _syllable_words(rng, cfg.n_first_names, (1, 2), ("",), taken)
    self.last_names = _syllable_words(rng, cfg.n_last_names, (2, 2), ("", "son", "man", "ov"),
                                      taken)
    self.values: Dict[str, Tuple[str, ...]] = {
        "birth_year": tuple(str(cfg.first_year + i) for i in range(cfg.n_years)),
        "birth_month": MONTHS,
        "city": tuple(_syllable_words(rng, cfg.n_cities, (1, 2),
                                      ("ton", "burg", "field", "ford", "mar", "ville"), taken)),
        "university": tuple(_syllable_words(rng, cfg.n_universities, (2, 2), ("ia", "ard", "ell"),
                                            taken)),
        "field": FIELDS,
        "employer": tuple(_syllable_words(rng, cfg.n_employers, (1, 2), ("corp", "tek", "ix"),
                                          taken)),
    }
    n_total = sum(cfg.population_size(p) for p in cfg.populations)
    if n_total > len(self.first_names) * len(self.last_names):
      raise ValueError(f"{n_total} people need more than {cfg.n_first_names} x "
                       f"{cfg.n_last_names} distinct names")
    # Unique (first, last) pairs, then split into disjoint populations in config order.
    pairs = rng.choice(len(self.first_names) * len(self.last_names), size=n_total, replace=False)
    self.people: List[Person] = []
    for pid, code in enumerate(pairs):
      f, l = divmod(int(code), len(self.last_names))
      attrs = {a: self.values[a][rng.integers(len(self.values[a]))] for a in ATTRIBUTES}
      self.people.append(Person(pid, self.first_names[f], self.last_names[l],
                                bool(rng.integers(2)), attrs))
    self._pops: Dict[str, Tuple[int, ...]] = {}
    start = 0
    for p in cfg.populations:
      n = cfg.population_size(p)
      self._pops[p] = tuple(range(start, start + n))
      start += n
    self._passage_rng_seed = int(rng.integers(2 ** 31))

  # --- populations -----------------------------------------------------------------------------
  def population(self, name: str) -> List[Person]:
    """The people of population ``name`` (see ``WorldConfig.populations``)."""
    return [self.people[i] for i in self._pops[name]]

  def chunk(self, k: int) -> List[Person]:
    """Wake chunk ``k`` of new people."""
    return self.population(f"new_{k}")

  # --- text ----------------------------------------------------------------------------------
  def passage(self, person: Person, variant: int = 0,
              keep: Optional[Sequence[str]] = None) -> str:
    """Biography of ``person``; ``variant`` picks one of ``n_passage_variants`` paraphrases
    (sentence wording per attribute and sentence order), deterministic per (person, variant).

    ``keep`` (attributes): only the sentences stating them, in the variant's order and wording
    (a *partial* passage; the birth sentence states birth_year and birth_month and carries the
    name). Used for short reading examples: with fewer distractor values in the passage the
    model learns to find each attribute sooner (NOTES_world.md, fourth session)."""
    if not 0 <= variant < self.cfg.n_passage_variants:
      raise ValueError(f"variant={variant}; world has {self.cfg.n_passage_variants} variants")
    rng = np.random.default_rng([self._passage_rng_seed, person.pid, variant])
    fill = dict(person.attrs, name=person.name, P="She" if person.female else "He",
                p="she" if person.female else "he", Poss="Her" if person.female else "His",
                poss="her" if person.female else "his")
    first = BIRTH_SENTENCES[rng.integers(len(BIRTH_SENTENCES))]
    rest = [SENTENCES[a][rng.integers(len(SENTENCES[a]))] for a in SENTENCES]
    order = rng.permutation(len(rest)) if self.cfg.shuffle_sentences else np.arange(len(rest))
    keyed = [("birth", first)] + [(list(SENTENCES)[i], rest[i]) for i in order]
    if keep is not None:
      unknown = set(keep) - set(ATTRIBUTES)
      if unknown:
        raise ValueError(f"keep={sorted(unknown)}: not attributes {ATTRIBUTES}")
      wanted = {"birth" if a.startswith("birth_") else a for a in keep}
      keyed = [(k, s) for k, s in keyed if k in wanted]
    return " ".join(s.format(**fill) for _, s in keyed)

  @staticmethod
  def question(person: Person, attribute: str, template: int) -> str:
    return QUESTIONS[attribute][template].format(name=person.name)

  # --- examples ----------------------------------------------------------------------------------
  def bio_example(self, person: Person, variant: int = 0) -> Example:
    return Example("", self.passage(person, variant), "bio", person.pid, "", -1, variant)

  def closed_book(self, person: Person, attribute: str, template: int) -> Example:
    """``Q: <question> A:`` -> answer."""
    return Example(f"Q: {self.question(person, attribute, template)} A:",
                   person.attrs[attribute], "closed", person.pid, attribute, template, -1)

  def in_context(self, person: Person, attribute: str, template: int, variant: int = 0) -> Example:
    """``<passage> Q: <question> A:`` -> answer."""
    return Example(f"{self.passage(person, variant)} Q: {self.question(person, attribute, template)}"
                   " A:", person.attrs[attribute], "incontext", person.pid, attribute, template,
                   variant)

  def multi_question(self, person: Person, attributes: Sequence[str], templates: Sequence[int],
                     variant: int = 0, question_weight: float = 0.0,
                     first_q_weight: Optional[float] = None,
                     keep: Optional[Sequence[str]] = None) -> Example:
    """``<passage>`` -> ``Q: <q1> A: <a1> Q: <q2> A: <a2> ...`` (one question per attribute).

    Loss weights: answers and the final eos 1; question text ``question_weight``; the ``Q:``
    opening the first question ``first_q_weight`` (default ``question_weight``: it teaches that a
    passage is followed by a question); the ``Q:`` after an answer 0 (an answer is followed by
    eos in every single-question format, so that token is never trained)."""
    fq = question_weight if first_q_weight is None else first_q_weight
    segs = []
    for i, (a, t) in enumerate(zip(attributes, templates)):
      segs += [("Q:", fq if i == 0 else 0.0), (f"{self.question(person, a, t)} A:", question_weight),
               (person.attrs[a], 1.0)]
    return Example(self.passage(person, variant, keep), " ".join(x for x, _ in segs), "multi",
                   person.pid, "", int(templates[0]) if len(templates) else -1, variant,
                   tuple(segs), 1.0)

  def generate_example(self, person: Person, attribute: str, template: int,
                       variant: int = 0) -> Example:
    """``<passage>`` -> ``Q: <question> A: <answer>`` (+ eos), loss on all of it (a dream)."""
    return Example(self.passage(person, variant),
                   f"Q: {self.question(person, attribute, template)} A: {person.attrs[attribute]}",
                   "generate", person.pid, attribute, template, variant)

  def _templates(self, split: str) -> Sequence[int]:
    return range(N_TRAIN_TEMPLATES) if split == "train" else range(
        N_TRAIN_TEMPLATES, len(QUESTIONS[ATTRIBUTES[0]]))

  def bios(self, people: Sequence[Person]) -> List[Example]:
    """Every passage variant of every person."""
    return [self.bio_example(p, v) for p in people for v in range(self.cfg.n_passage_variants)]

  def closed_book_set(self, people: Sequence[Person], split: str = "train") -> List[Example]:
    """Closed-book questions: every attribute x every ``split`` template."""
    return [self.closed_book(p, a, t) for p in people for a in ATTRIBUTES
            for t in self._templates(split)]

  def in_context_set(self, people: Sequence[Person], split: str = "train",
                     all_variants: bool = False) -> List[Example]:
    """In-context questions: every attribute x every ``split`` template, with passage variant
    ``(pid + attribute + template) mod n_variants`` (or every variant with ``all_variants``)."""
    nv = self.cfg.n_passage_variants
    out = []
    for p in people:
      for ai, a in enumerate(ATTRIBUTES):
        for t in self._templates(split):
          vs = range(nv) if all_variants else [(p.pid + ai + t) % nv]
          out.extend(self.in_context(p, a, t, v) for v in vs)
    return out

  def sample_train_example(self, rng: np.random.Generator, mixture: Dict[str, float], *,
                           n_questions: Tuple[int, int] = (6, 6), question_weight: float = 0.0,
                           first_q_weight: Optional[float] = None, max_len: Optional[int] = None,
                           bio_eos_weight: float = 1.0,
                           n_sentences: Tuple[int, int] = (N_SENTENCES, N_SENTENCES)) -> Example:
    """One random pretraining example. ``mixture`` maps component -> weight, components:
    ``bio`` (pretrain population biographies), ``closed`` (qa population, train templates),
    ``incontext`` (reading population, train templates), ``incontext_multi`` (reading
    population: one passage, ``n_questions`` = (min, max) questions on distinct attributes in
    random order, see ``multi_question``; questions are dropped from the end until the example
    fits ``max_len`` tokens; the passage keeps ``n_sentences`` = (min, max) of its
    ``N_SENTENCES`` sentences, chosen at random, and only their attributes are asked),
    ``incontext_generate`` (reading population: passage -> a whole
    ``Q: ... A: ...`` pair, see ``generate_example``), and, off in the default recipe:
    ``bio_qa`` (qa population biographies), ``incontext_qa``,
    ``closed_pretrain`` / ``incontext_pretrain`` (QA on the pretrain population).
    ``bio_eos_weight`` weighs the eos closing a biography."""
    comp = sample_component(rng, mixture)
    if comp not in _COMPONENT_POPULATION:
      raise ValueError(f"unknown mixture component {comp!r}; known: {sorted(_COMPONENT_POPULATION)}")
    pop = self._pops[_COMPONENT_POPULATION[comp]]
    person = self.people[pop[rng.integers(len(pop))]]
    variant = int(rng.integers(self.cfg.n_passage_variants))
    if comp in ("bio", "bio_qa"):
      ex = self.bio_example(person, variant)
      return ex if bio_eos_weight == 1.0 else ex._replace(eos_weight=float(bio_eos_weight))
    if comp == "incontext_multi":
      k = int(rng.integers(n_questions[0], n_questions[1] + 1))
      keep = None
      if tuple(n_sentences) != (N_SENTENCES, N_SENTENCES):  # partial passage
        n = int(rng.integers(n_sentences[0], n_sentences[1] + 1))
        keys = [SENTENCE_KEYS[i] for i in rng.permutation(N_SENTENCES)[:n]]
        keep = [a for a in ATTRIBUTES if ("birth" if a.startswith("birth_") else a) in keys]
      pool = ATTRIBUTES if keep is None else keep
      attrs = [pool[i] for i in rng.permutation(len(pool))[:k]]
      tpls = [int(t) for t in rng.integers(N_TRAIN_TEMPLATES, size=len(attrs))]
      while True:
        ex = self.multi_question(person, attrs, tpls, variant, question_weight, first_q_weight,
                                 keep)
        if max_len is None or len(attrs) == 1 or (
            len(self.tokenizer.encode(ex.prompt)) + len(self.tokenizer.encode(ex.target)) + 2
            <= max_len):
          return ex
        attrs, tpls = attrs[:-1], tpls[:-1]
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    template = int(rng.integers(N_TRAIN_TEMPLATES))
    if comp in ("closed", "closed_pretrain"):
      return self.closed_book(person, attribute, template)
    if comp == "incontext_generate":
      return self.generate_example(person, attribute, template, variant)
    return self.in_context(person, attribute, template, variant)

  # --- vocabulary ------------------------------------------------------------------------------
  def vocabulary_texts(self) -> List[str]:
    """Texts covering every word the world can produce (templates, values, names)."""
    texts = ["Q: A:", "He She he she His Her his her"]
    texts += list(BIRTH_SENTENCES) + [s for v in SENTENCES.values() for s in v]
    texts += [q for v in QUESTIONS.values() for q in v]
    texts = [re.sub(r"\{\w+\}", " ", t) for t in texts]
    texts += [" ".join(v) for v in self.values.values()]
    texts += [" ".join(self.first_names), " ".join(self.last_names)]
    return texts

  @functools.cached_property
  def tokenizer(self) -> WordTokenizer:
    """Word-level tokenizer over the world's full vocabulary (sorted: deterministic)."""
    return WordTokenizer.from_corpus(self.vocabulary_texts())


def max_example_len(world: World) -> int:
  """Longest in-context example (tokens incl. bos/eos) over all people/variants/templates."""
  tok = world.tokenizer
  longest = 0
  for p in world.people:
    plen = max(len(tok.encode(world.passage(p, v))) for v in range(world.cfg.n_passage_variants))
    qlen = max(len(tok.encode(world.question(p, a, t))) for a in ATTRIBUTES
               for t in range(len(QUESTIONS[a])))
    longest = max(longest, plen + qlen + 6)  # bos, Q, :, A, :, answer, eos -> 7 minus 1 slack
  return longest + 1
