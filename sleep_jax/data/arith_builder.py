"""TFDS builder (array_record, no TensorFlow) for the arithmetic reasoning family of ``arith.py``.

One record per problem: ``question``, ``program``, ``solution`` text fields and ``answer``,
``level`` ints. Splits ``train`` and ``test`` (disjoint by construction: ``arith.split_of``).
The builder config carries the ``ArithConfig``; its name is derived from it, so several families
live side by side under one ``data_dir``:

    builder = arith_builder.prepare(data_dir, arith_builder.ArithConfig(levels=(2, 3)))
    source = builder.as_data_source("test")        # == tfds.data_source; grain.MapDataset.source
    problems = arith_builder.load_problems(builder, "test")
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple

import tensorflow_datasets as tfds

from sleep_jax.data import arith
from sleep_jax.data import builders

TEXT_FIELDS = ("question", "program", "solution")
INT_FIELDS = ("answer", "level")


@dataclasses.dataclass(frozen=True)
class ArithConfig:
  """What the builder writes: per level, ``n_train`` train and ``n_test`` test problems."""

  seed: int = 0
  levels: Tuple[int, ...] = (1, 2, 3)
  n_train: int = 512
  n_test: int = 64


def config_name(cfg: ArithConfig) -> str:
  return f"seed{cfg.seed}_{builders.config_hash(cfg)}"


class ArithBuilderConfig(tfds.core.BuilderConfig):
  def __init__(self, arith_cfg: ArithConfig = ArithConfig(), **kwargs):
    super().__init__(**builders.config_kwargs(arith_cfg, config_name(arith_cfg), kwargs))
    self.arith = arith_cfg


def split_problems(cfg: ArithConfig, split: str) -> List[arith.Problem]:
  """The problems of ``split`` (the builder writes exactly these, in this order)."""
  n = {"train": cfg.n_train, "test": cfg.n_test}.get(split)
  if n is None:
    raise ValueError(f"unknown split {split!r}; valid: 'train', 'test'")
  return [p for level in cfg.levels for p in arith.problems(cfg.seed, level, n, split)]


class ArithProblems(builders.TextRecordsBuilder, skip_registration=True):
  """Verifiable arithmetic word problems; one builder config per ``ArithConfig``."""

  name = "sleep_arith"
  VERSION = tfds.core.Version("1.0.0")
  TEXT_FIELDS = TEXT_FIELDS
  INT_FIELDS = INT_FIELDS
  SPLITS = ("train", "test")
  DESCRIPTION = "Multi-step arithmetic word problems with programs an exact checker runs."
  DISABLE_SHUFFLING = True  # records in generation order: level by level
  BUILDER_CONFIGS = [ArithBuilderConfig()]

  def generate(self, split: str) -> Iterable[Dict]:
    for p in split_problems(self.builder_config.arith, split):
      yield {"question": p.question, "program": p.program, "solution": p.solution,
             "answer": p.answer, "level": p.level}


def prepare(data_dir: str, cfg: ArithConfig = ArithConfig()) -> ArithProblems:
  """Writes the problems under ``data_dir`` (once) and returns the builder."""
  return builders.prepare(ArithProblems, data_dir, config=ArithBuilderConfig(cfg))


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def to_problem(record: Dict) -> arith.Problem:
  return arith.Problem(_text(record["question"]), _text(record["program"]),
                       _text(record["solution"]), int(record["answer"]), int(record["level"]))


def load_problems(builder: ArithProblems, split: str) -> List[arith.Problem]:
  source = builder.as_data_source(split)
  return [to_problem(source[i]) for i in range(len(source))]
