"""The synthetic world's language: the attributes of a person and their values, the passage
sentences (several paraphrases per attribute) and the question templates (training wordings and
held-out evaluation wordings)."""

from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

ATTRIBUTES: Tuple[str, ...] = ("birth_year", "birth_month", "city", "university", "field",
                               "employer")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
FIELDS = ("physics", "chemistry", "biology", "history", "law", "medicine", "economics", "music",
          "philosophy", "mathematics", "linguistics", "geology", "astronomy", "architecture",
          "sociology", "engineering")

# One sentence per attribute in every passage; each attribute has several paraphrases. The birth
# sentence (year + month) opens the passage and carries the full name; the others use pronouns.
# Placeholders: {name}, {P} (He/She), {p} (he/she), {Poss} (His/Her), {poss} (his/her).
BIRTH_SENTENCES = (
    "{name} was born in {birth_month} {birth_year}.",
    "{name} came into the world in {birth_month} {birth_year}.",
    "Born in {birth_month} {birth_year}, {name} is our subject.",
    "{name} has a birthday in {birth_month} and was born in {birth_year}.",
)
# Every attribute shares words with some of its question templates ("grew up", "attended",
# "university is", "works for"): reading is then one generic match-and-copy skill. Without
# shared words (e.g. "Who employs X?" vs "X is employed by"), the 2-layer base model learnt to
# read one attribute at a time, each after its own plateau (NOTES_world.md).
SENTENCES: Dict[str, Tuple[str, ...]] = {
    "city": ("{P} grew up in {city}.", "{P} spent {poss} childhood in {city}.",
             "{P} was raised in {city}.", "{Poss} hometown is {city}."),
    "university": ("{P} studied at {university}.", "{P} graduated from {university}.",
                   "{P} attended {university}.", "{Poss} university is {university}."),
    "field": ("{P} majored in {field}.", "{Poss} field of study was {field}.",
              "{P} focused on {field}.", "{P} trained in {field}."),
    "employer": ("{P} works for {employer}.", "{P} is employed by {employer}.",
                 "{P} has a job at {employer}.", "{Poss} employer is {employer}."),
}

# Question templates per attribute: the first N_TRAIN_TEMPLATES are training templates, the rest
# are evaluation-only. Eval templates reuse words the model knows, in wordings it never saw.
# Training wordings vary the structure (question word first, name first, imperative): with only
# the three question-word-first ones, the base model read 34% of the training wordings but 3% of
# the name-first eval wordings after 400 steps (NOTES_world.md, third session).
QUESTIONS: Dict[str, Tuple[str, ...]] = {
    "birth_year": ("In what year was {name} born?", "What is the birth year of {name}?",
                   "When was {name} born?", "Tell me the year {name} was born.",
                   "Name the birth year of {name}.", "{name} came into the world in what year?",
                   "{name} was born in which year?", "The birth year of {name} is what?"),
    "birth_month": ("In what month was {name} born?", "What is the birth month of {name}?",
                    "Which month was {name} born in?", "Tell me the month {name} was born.",
                    "Name the birth month of {name}.", "{name} had a birthday in what month?",
                    "{name} was born in which month?", "The birth month of {name} is what?"),
    "city": ("Where did {name} grow up?", "What is the hometown of {name}?",
             "In which city was {name} raised?", "Tell me where {name} grew up.",
             "Name the hometown of {name}.", "{name} was raised in what city?",
             "{name} grew up in which city?", "The hometown of {name} is what?"),
    "university": ("Where did {name} study?", "Which university did {name} attend?",
                   "What university did {name} graduate from?", "Tell me where {name} studied.",
                   "Name the university {name} attended.",
                   "{name} graduated from what university?",
                   "{name} studied at which university?", "The university of {name} is what?"),
    "field": ("What did {name} study?", "What was the major of {name}?",
              "What field did {name} focus on?", "Tell me what {name} majored in.",
              "Name the field {name} focused on.", "{name} trained in what field?",
              "{name} majored in which field?", "The field of study of {name} is what?"),
    "employer": ("Who employs {name}?", "Where does {name} work?",
                 "Which company does {name} work for?", "Tell me who employs {name}.",
                 "Name the company {name} works for.", "{name} is employed by what company?",
                 "{name} works for which company?", "The employer of {name} is what?"),
}
N_TRAIN_TEMPLATES = 6
# Sentences of a full passage: the birth sentence (birth_year, birth_month) + one per SENTENCES key.
SENTENCE_KEYS: Tuple[str, ...] = ("birth",) + tuple(SENTENCES)
N_SENTENCES = len(SENTENCE_KEYS)


def question_templates(attribute: str, split: str) -> Tuple[str, ...]:
  """The ``"train"`` or ``"eval"`` question templates of ``attribute``."""
  t = QUESTIONS[attribute]
  if split == "train":
    return t[:N_TRAIN_TEMPLATES]
  if split == "eval":
    return t[N_TRAIN_TEMPLATES:]
  raise ValueError(f"split={split!r}; expected 'train' or 'eval'")


def iter_eval_templates_regex() -> Iterator[Tuple[str, "re.Pattern"]]:
  """(template, regex matching any rendering of it) for every eval question template."""
  for a in ATTRIBUTES:
    for t in question_templates(a, "eval"):
      parts = t.split("{name}")
      yield t, re.compile(r"[A-Z]\w* [A-Z]\w*".join(re.escape(x) for x in parts))
