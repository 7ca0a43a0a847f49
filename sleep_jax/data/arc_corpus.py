"""A pretraining corpus of generated ARC-like tasks, for a tiny base model that reads tasks in context.

The few-shot experiment (experiments/few_shot) needs a word-level model whose vocabulary covers
``arc.GRID_VOCAB`` plus ``Q``/``A`` and that can already infer a grid program from a few
demonstrations in its context (the in-context score is the ICL baseline). ``ArcCorpus`` is the
corpus that ``tasks.pretrain`` trains it on (``PretrainConfig.corpus = corpus_name(...)``; the
same loop as the world's base model), with the interface ``pretrain.corpus_for`` expects:
``tokenizer``, ``sample_train_example(rng, mixture, **kw)``, ``probe_sets(n)``, ``eval_sets()``.

Its tasks are a third generated split, disjoint from the dream-generator and evaluation tasks:
``arc.generate_task(seed, index, gen)`` with ``index >= offset`` (``generated_split`` uses indices
``0 .. n_train + n_eval - 1``; ``check_disjoint`` verifies a split against the corpus).

Mixture components (``Example`` of ``data/world.py``; the prompt is context, loss on the target):

* ``incontext``: 3 of the task's 4 pairs as demonstrations (``arc.WORDS`` text), the fourth's
  input as the question, ``<demos> Q: I: <x> O: A:`` -> ``<y>`` -- exactly the driver's
  ``WorldFormat.with_context`` prompt for an ARC document;
* ``generate``: ``<demos>`` -> ``Q: I: <x> O: A: <y>``, a new pair of the same program (what the
  cycle's dreams, sampled from ``bos + demos``, should look like).
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sleep_jax.data import arc
from sleep_jax.data import world as world_lib
from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.data.world import Example

PREFIX = "arc:"
DEFAULT_MIXTURE = (("incontext", 0.8), ("generate", 0.2))
N_PROBE = 1000  # indices offset .. offset + N_PROBE - 1 are the corpus's own held-out probe tasks


def corpus_name(seed: int, offset: int, gen: arc.GenConfig) -> str:
  """The ``PretrainConfig.corpus`` string of an ARC corpus (part of the base model's cache key)."""
  spec = {"seed": int(seed), "offset": int(offset), "gen": dict(vars(gen))}
  spec["gen"]["families"] = list(gen.families)
  return PREFIX + json.dumps(spec, sort_keys=True)


def is_arc_corpus(name: str) -> bool:
  return name.startswith(PREFIX)


def tokenizer() -> WordTokenizer:
  """Grid words plus the driver's ``Q: ... A:`` markers (sorted: deterministic)."""
  return WordTokenizer.from_corpus([], extra=arc.GRID_VOCAB + ("Q", "A"))


def pair_question(x, fmt: arc.GridText = arc.WORDS) -> str:
  """The question of a query pair, as ``arc.arc_documents`` writes it."""
  return arc.input_to_text(x, fmt)


class ArcCorpus:
  """Generated tasks ``generate_task(seed, offset + i, gen)``; see the module docstring."""

  def __init__(self, seed: int, offset: int, gen: arc.GenConfig):
    self.seed, self.offset, self.gen = int(seed), int(offset), gen
    self.fmt = arc.WORDS
    self.tokenizer = tokenizer()

  @classmethod
  def from_name(cls, name: str) -> "ArcCorpus":
    if not is_arc_corpus(name):
      raise ValueError(f"not an ARC corpus name: {name!r}")
    spec = json.loads(name[len(PREFIX):])
    g = dict(spec["gen"])
    g["families"] = tuple(g["families"])
    return cls(spec["seed"], spec["offset"], arc.GenConfig(**g))

  def task(self, i: int) -> arc.Task:
    return arc.generate_task(self.seed, self.offset + int(i), self.gen)

  def check_disjoint(self, seed: int, n_tasks: int) -> None:
    """Raises if split tasks ``generate_task(seed, 0 .. n_tasks - 1)`` could be corpus tasks."""
    if int(seed) == self.seed and n_tasks > self.offset:
      raise ValueError(f"ARC corpus (seed {self.seed}, indices >= {self.offset}) overlaps the "
                       f"split's {n_tasks} tasks of seed {seed}")

  # --- examples --------------------------------------------------------------------------------
  def _family(self, t: arc.Task) -> str:
    return json.loads(t.program)[0][0]

  def incontext(self, t: arc.Task, j: int) -> Example:
    """Pair ``j`` of the task's train + test pairs asked, the others as demonstrations."""
    pairs = list(t.train + t.test)
    x, y = pairs.pop(j)
    demos = arc.pairs_to_text(pairs, self.fmt)
    return Example(f"{demos} Q: {pair_question(x, self.fmt)} A:", arc.grid_to_text(y, self.fmt),
                   "incontext", -1, self._family(t), j, -1)

  def generate(self, t: arc.Task) -> Example:
    (x, y), = t.test[:1]
    target = f"Q: {pair_question(x, self.fmt)} A: {arc.grid_to_text(y, self.fmt)}"
    return Example(arc.pairs_to_text(t.train, self.fmt), target, "generate", -1, self._family(t),
                   -1, -1)

  def sample_train_example(self, rng: np.random.Generator, mixture: Dict[str, float],
                           **unused) -> Example:
    """A random component of ``mixture`` on a random training task (index >= N_PROBE)."""
    comp = world_lib.sample_component(rng, mixture)
    t = self.task(N_PROBE + int(rng.integers(2 ** 31 - N_PROBE)))
    if comp == "incontext":
      return self.incontext(t, int(rng.integers(len(t.train) + len(t.test))))
    if comp == "generate":
      return self.generate(t)
    raise ValueError(f"unknown ARC mixture component {comp!r}; known: incontext, generate")

  def probe_sets(self, n: int) -> Tuple[List[Example], List[Example], Sequence[str]]:
    """The stopping rule's set: the test pair of ``n`` probe tasks asked in context; its twin
    asks a demonstration (leave-one-out); accuracy is reported per program family."""
    tasks = [self.task(i) for i in range(min(n, N_PROBE))]
    probe = [self.incontext(t, len(t.train)) for t in tasks]
    loo = [self.incontext(t, 0) for t in tasks][::3]
    return probe, loo, tuple(self.gen.families)

  def eval_sets(self) -> Dict[str, List[Example]]:
    probe, loo, _ = self.probe_sets(200)
    return {"incontext_probe": probe, "incontext_probe_loo": loo}
