"""TFDS builder (array_record, no TensorFlow) for the synthetic world of ``world.py``.

Splits (each record: ``prompt``, ``target``, ``kind``, ``attribute``, ``population``,
``template_split`` text fields and ``pid``, ``template``, ``variant`` ints; see ``world.Example``):

* ``pretrain``   every passage variant of every ``pretrain`` person (kind ``bio``);
* ``qa_train``   closed-book QA on the ``qa`` population, train templates;
* ``reading``    in-context QA on the ``reading`` population, train templates;
* ``heldout``    in-context QA on ``heldout`` people, eval templates (base-model reading check);
* ``new_k``      every passage variant of wake chunk ``k`` (what arrives in wake phase ``k``);
* ``new_k_qa``   closed-book and in-context QA on chunk ``k``, every template
                 (``template_split`` says train/eval wording);
* ``eval``       closed-book QA with eval templates on the ``pretrain`` and ``qa`` populations.

The builder config carries the ``WorldConfig`` (seed and sizes); its name is derived from it, so
different worlds live side by side under one ``data_dir``:

    builder = world_builder.prepare(data_dir, world.WorldConfig(seed=3))
    source = builder.as_data_source("new_0")          # random access; text fields are bytes
    ex = world_builder.to_example(source[0])          # -> world.Example
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import tensorflow_datasets as tfds

from sleep_jax.data import builders
from sleep_jax.data import world as world_lib

TEXT_FIELDS = ("prompt", "target", "kind", "attribute", "population", "template_split")
INT_FIELDS = ("pid", "template", "variant")


def config_name(cfg: world_lib.WorldConfig) -> str:
  return f"seed{cfg.seed}_{builders.config_hash(cfg)}"


class WorldBuilderConfig(tfds.core.BuilderConfig):
  """A ``BuilderConfig`` carrying the ``WorldConfig`` (seed and population sizes)."""

  def __init__(self, world: world_lib.WorldConfig = world_lib.WorldConfig(), **kwargs):
    super().__init__(**builders.config_kwargs(world, config_name(world), kwargs))
    self.world = world


def _record(ex: world_lib.Example, population: str) -> Dict:
  tsplit = "" if ex.template < 0 else (
      "train" if ex.template < world_lib.N_TRAIN_TEMPLATES else "eval")
  return {"prompt": ex.prompt, "target": ex.target, "kind": ex.kind, "attribute": ex.attribute,
          "population": population, "template_split": tsplit, "pid": ex.pid,
          "template": ex.template, "variant": ex.variant}


def split_examples(world: world_lib.World, split: str) -> List[Dict]:
  """The records of ``split`` (the builder writes exactly these, in this order)."""
  if split == "pretrain":
    return [_record(e, "pretrain") for e in world.bios(world.population("pretrain"))]
  if split == "qa_train":
    return [_record(e, "qa") for e in world.closed_book_set(world.population("qa"), "train")]
  if split == "reading":
    return [_record(e, "reading") for e in world.in_context_set(world.population("reading"),
                                                                  "train")]
  if split == "heldout":
    return [_record(e, "heldout") for e in world.in_context_set(world.population("heldout"),
                                                                  "eval")]
  if split == "eval":
    return [_record(e, pop) for pop in ("pretrain", "qa")
            for e in world.closed_book_set(world.population(pop), "eval")]
  if split.startswith("new_"):
    k = split.split("_")[1]
    pop = f"new_{k}"
    people = world.population(pop)
    if split.endswith("_qa"):
      exs = [e for s in ("train", "eval") for e in world.closed_book_set(people, s)
             + world.in_context_set(people, s)]
      return [_record(e, pop) for e in exs]
    return [_record(e, pop) for e in world.bios(people)]
  raise ValueError(f"unknown split {split!r}")


def split_names(cfg: world_lib.WorldConfig) -> List[str]:
  chunks = [s for k in range(cfg.n_chunks) for s in (f"new_{k}", f"new_{k}_qa")]
  return ["pretrain", "qa_train", "reading", "heldout", "eval"] + chunks


class SleepWorld(builders.TextRecordsBuilder, skip_registration=True):
  """The synthetic biography world; one builder config per ``WorldConfig``."""

  name = "sleep_world"
  VERSION = tfds.core.Version("1.0.0")
  TEXT_FIELDS = TEXT_FIELDS
  INT_FIELDS = INT_FIELDS
  DESCRIPTION = "Synthetic biographies and questions (sleep_jax.data.world)."
  BUILDER_CONFIGS = [WorldBuilderConfig()]

  @property
  def SPLITS(self):  # noqa: N802 (the base class reads this name)
    return split_names(self.builder_config.world)

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    # Keep records in generation order (split_examples order) instead of TFDS's hash shuffle.
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=info.features, disable_shuffling=True)

  def generate(self, split: str) -> Iterable[Dict]:
    return split_examples(world_lib.World(self.builder_config.world), split)


def prepare(data_dir: str, cfg: world_lib.WorldConfig = world_lib.WorldConfig()) -> SleepWorld:
  """Writes the world's splits under ``data_dir`` (once) and returns the builder."""
  return builders.prepare(SleepWorld, data_dir, config=WorldBuilderConfig(cfg))


def to_example(record: Dict) -> world_lib.Example:
  """A decoded record (text fields bytes) -> ``world.Example``."""
  s = lambda k: record[k].decode() if isinstance(record[k], bytes) else str(record[k])
  return world_lib.Example(s("prompt"), s("target"), s("kind"), int(record["pid"]),
                           s("attribute"), int(record["template"]), int(record["variant"]))


def load_split(builder: SleepWorld, split: str) -> List[world_lib.Example]:
  src = builder.as_data_source(split)
  return [to_example(src[i]) for i in range(len(src))]
