"""A pretraining corpus of arithmetic word problems, for a tiny base model that solves some of them.

The reasoning experiment (experiments/reasoning) needs a word-level model that can already solve
easy problems of ``data/arith.py`` step by step, fails on harder ones (partial competence: the
room a learning method has), reads a worked reference solution in its context (the teacher of
OPSD and of Sleep's consolidation) and writes new problems with their programs (the environments
of dream simulation). ``ArithCorpus`` is the corpus ``tasks.pretrain`` trains it on
(``PretrainConfig.corpus = corpus_name(...)``; the same loop as the world's base model), with the
interface ``pretrain.corpus_for`` expects: ``tokenizer``, ``sample_train_example(rng, mixture,
**kw)``, ``probe_sets(n)``, ``eval_sets()``.

Its problems come from the ``corpus`` pool of the train split (``arith.pool_of``): never a test
problem, never one the wake stream reads. Numbers are spelt digit by digit (the tokenizer's
``split_digits``). Mixture components (``Example`` of ``data/world.py``, loss on the target), in
the driver's ``WorldFormat`` layout:

* ``solve``: ``Q: <question> A:`` -> ``<worked solution>`` (closed-book: the skill scored);
* ``read``: ``<worked solution> Q: <question> A:`` -> ``<worked solution>`` (the solution in the
  context, as the teacher sees a reference solution);
* ``env``: ``Problem:`` -> ``<question> Program: <program>`` (an environment, the format dream
  simulation asks the model to write; ``arith.parse_environment`` reads it).
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sleep_jax.data import arith
from sleep_jax.data import world as world_lib
from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.data.world import Example

PREFIX = "arith:"
DEFAULT_MIXTURE = (("solve", 0.45), ("read", 0.35), ("env", 0.2))
ENV_PROMPT = "Problem:"  # what an environment is written after (dream simulation's prompt)


def corpus_name(seed: int, levels: Sequence[int], solve_levels: Sequence[int]) -> str:
  """The ``PretrainConfig.corpus`` string (part of the base model's cache key). ``solve`` is
  trained on ``solve_levels`` only; ``read`` and ``env`` on every level of ``levels``."""
  return PREFIX + json.dumps({"seed": int(seed), "levels": [int(x) for x in levels],
                              "solve_levels": [int(x) for x in solve_levels]}, sort_keys=True)


def is_arith_corpus(name: str) -> bool:
  return name.startswith(PREFIX)


def tokenizer() -> WordTokenizer:
  """Every word the generator and the formats can write, digits one by one (deterministic)."""
  rng = np.random.default_rng(0)
  texts = [t for level in arith.LEVELS for _ in range(400)
           for p in [arith.generate(rng, level)]
           for t in (p.question, p.solution, arith.environment_text(p))]
  return WordTokenizer.from_corpus(texts, extra=tuple("0123456789") + ("Q", "A"),
                                   split_digits=True)


def solve(p: arith.Problem) -> Example:
  return Example(f"Q: {p.question} A:", p.solution, "solve", -1, f"level{p.level}", -1, -1)


def read(p: arith.Problem) -> Example:
  return Example(f"{p.solution} Q: {p.question} A:", p.solution, "read", -1, f"level{p.level}",
                 -1, -1)


def env(p: arith.Problem) -> Example:
  return Example(ENV_PROMPT, arith.environment_text(p)[len(ENV_PROMPT):].strip(), "env", -1,
                 f"level{p.level}", -1, -1)


class ArithCorpus:
  """Problems of the ``corpus`` pool, drawn fresh every example; see the module docstring."""

  def __init__(self, seed: int, levels: Sequence[int], solve_levels: Sequence[int]):
    self.seed = int(seed)
    self.levels = tuple(int(x) for x in levels)
    self.solve_levels = tuple(int(x) for x in solve_levels)
    self.tokenizer = tokenizer()

  @classmethod
  def from_name(cls, name: str) -> "ArithCorpus":
    if not is_arith_corpus(name):
      raise ValueError(f"not an arithmetic corpus name: {name!r}")
    spec = json.loads(name[len(PREFIX):])
    return cls(spec["seed"], spec["levels"], spec["solve_levels"])

  def _problem(self, rng: np.random.Generator, levels: Sequence[int]) -> arith.Problem:
    while True:
      p = arith.generate(rng, int(levels[rng.integers(len(levels))]))
      if arith.pool_of(p) == "corpus":
        return p

  def sample_train_example(self, rng: np.random.Generator, mixture: Dict[str, float],
                           **unused) -> Example:
    comp = world_lib.sample_component(rng, mixture)
    if comp == "solve":
      return solve(self._problem(rng, self.solve_levels))
    if comp == "read":
      return read(self._problem(rng, self.levels))
    if comp == "env":
      return env(self._problem(rng, self.levels))
    raise ValueError(f"unknown arithmetic mixture component {comp!r}; known: solve, read, env")

  def probe_sets(self, n: int) -> Tuple[List[Example], List[Example], Sequence[str]]:
    """The stopping rule's set: ``n`` test problems per level solved closed-book; its twin reads
    the reference solution; accuracy is reported per level."""
    per = max(1, n // len(self.levels))
    tests = [p for level in self.levels for p in arith.problems(self.seed + 1, level, per, "test")]
    return ([solve(p) for p in tests], [read(p) for p in tests][::3],
            tuple(f"level{x}" for x in self.levels))

  def eval_sets(self) -> Dict[str, List[Example]]:
    out = {}
    for level in self.levels:
      tests = arith.problems(self.seed + 1, level, 100, "test")
      out[f"solve_level{level}"] = [solve(p) for p in tests]
      out[f"read_level{level}"] = [read(p) for p in tests[:50]]
    return out


def recipe_fields(levels=(1, 2, 3), solve_levels=(1, 2, 3)) -> dict:
  """``config.base`` fields of the tiny arithmetic base that reads this corpus."""
  return dict(corpus=corpus_name(0, levels, solve_levels), mixture=tuple(DEFAULT_MIXTURE))
