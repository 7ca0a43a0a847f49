"""TFDS builders for task data, written as ``array_record`` so that no TensorFlow is needed.

TFDS works without TensorFlow only with ``file_format="array_record"``: examples are serialised
with TFDS's pure-Python example serializer and read back through ``as_data_source`` (random
access, what ``tfds.data_source`` returns), which feeds a grain pipeline (``pipeline.py``).

The pattern for a task:

    class BiographyWorld(TextRecordsBuilder):
      VERSION = tfds.core.Version("1.0.0")
      TEXT_FIELDS = ("text", "question", "answer")
      INT_FIELDS = ("person_id",)
      SPLITS = ("train", "test")

      def generate(self, split):             # a Python generator of dicts
        for person in make_people(split):
          yield {"text": ..., "question": ..., "answer": ..., "person_id": ...}

    builder = prepare(BiographyWorld, data_dir)      # writes once, then reuses the files
    source = builder.as_data_source("train")         # random-access source for grain

``text_builder(...)`` makes such a class from plain generator functions without subclassing.
Builders here are created with ``skip_registration=True``: they are addressed by class (or
``tfds.builder_from_directory``), never by a global name, so tests and notebooks can define
them freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Type

import numpy as np
import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"


class TextRecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder of records with text fields (and optional int fields).

  Subclasses set ``TEXT_FIELDS`` / ``INT_FIELDS`` / ``SPLITS`` / ``VERSION`` and implement
  ``generate(split) -> Iterable[dict]``. Record keys are the running index within a split, so
  generation must be deterministic (seed any randomness from the split name).
  """

  VERSION = tfds.core.Version("1.0.0")
  TEXT_FIELDS: Sequence[str] = ("text",)
  INT_FIELDS: Sequence[str] = ()
  SPLITS: Sequence[str] = ("train",)
  DESCRIPTION = ""
  DISABLE_SHUFFLING = False  # True keeps records in generation order (TFDS hash-shuffles them)
  # No checksums/metadata files live next to the code. (TFDS would otherwise locate this module
  # with ``importlib_resources``, which is not a dependency.)
  code_path = None

  def __init__(self, *, data_dir: Optional[str] = None, **kwargs):
    kwargs["file_format"] = FILE_FORMAT  # the only TensorFlow-free format
    super().__init__(data_dir=data_dir, **kwargs)

  def generate(self, split: str) -> Iterable[Dict]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    feats = {k: tfds.features.Text() for k in self.TEXT_FIELDS}
    feats.update({k: np.int64 for k in self.INT_FIELDS})
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=tfds.features.FeaturesDict(feats),
                                 disable_shuffling=self.DISABLE_SHUFFLING)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split) -> Iterator:
    fields = set(self.TEXT_FIELDS) | set(self.INT_FIELDS)
    for i, ex in enumerate(self.generate(split)):
      missing = fields - set(ex)
      if missing:
        raise ValueError(f"{type(self).__name__}.generate({split!r}) record {i} lacks fields "
                         f"{sorted(missing)}")
      yield i, {k: ex[k] for k in fields}


def text_builder(name: str, generators: Mapping[str, Callable[[], Iterable[Dict]]], *,
                 text_fields: Sequence[str] = ("text",), int_fields: Sequence[str] = (),
                 version: str = "1.0.0", description: str = "") -> Type[TextRecordsBuilder]:
  """A builder class named ``name`` whose split ``s`` holds the records of ``generators[s]()``."""
  gens = dict(generators)

  def generate(self, split):
    return gens[split]()

  return type(name, (TextRecordsBuilder,), {
      "name": name, "VERSION": tfds.core.Version(version), "TEXT_FIELDS": tuple(text_fields),
      "INT_FIELDS": tuple(int_fields), "SPLITS": tuple(gens), "DESCRIPTION": description,
      "generate": generate, "__module__": __name__})


def config_hash(cfg) -> str:
  """A short stable hash of a dataclass config: the suffix of a builder config's name, so
  datasets built from different configs live side by side under one ``data_dir``."""
  blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
  return hashlib.sha1(blob).hexdigest()[:10]


def config_kwargs(cfg, name: str, kwargs: dict) -> dict:
  """A ``tfds.core.BuilderConfig``'s keyword arguments for a dataclass config: ``name`` and a
  JSON ``description`` of every field, unless the caller gave its own."""
  kwargs.setdefault("name", name)
  kwargs.setdefault("description", json.dumps(dataclasses.asdict(cfg), sort_keys=True))
  return kwargs


def prepare(builder_cls: Type[TextRecordsBuilder], data_dir: str, **kwargs) -> TextRecordsBuilder:
  """Instantiates the builder and writes its files unless they already exist."""
  builder = builder_cls(data_dir=data_dir, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder


def load_from_directory(dataset_dir: str):
  """A prepared dataset read back without its builder class (``.../name/version``)."""
  return tfds.builder_from_directory(dataset_dir)


# ----------------------------------------------------------------------------------------------
# Built-in tiny corpus (the offline default for ``sleep_jax.main``'s LM job).
# ----------------------------------------------------------------------------------------------
_NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu")
_THINGS = ("apples", "books", "cats", "drums", "eggs", "figs", "games", "hats", "ink", "jam")
_PLACES = ("Paris", "Oslo", "Rome", "Lima", "Kyiv", "Cairo", "Tokyo", "Quito")
_VERBS = ("likes", "sells", "paints", "counts", "keeps")


def tiny_corpus_texts(n: int, seed: int) -> Iterator[str]:
  """Short template sentences with learnable regularities (who lives where, counting)."""
  rng = random.Random(seed)
  home = {name: _PLACES[i % len(_PLACES)] for i, name in enumerate(_NAMES)}
  for _ in range(n):
    name = rng.choice(_NAMES)
    kind = rng.randrange(3)
    if kind == 0:
      yield f"{name} lives in {home[name]}. {name} {rng.choice(_VERBS)} {rng.choice(_THINGS)}."
    elif kind == 1:
      a = rng.randrange(10)
      yield f"{name} counts: {a} {a + 1} {a + 2} {a + 3}."
    else:
      yield f"In {home[name]} lives {name}, who {rng.choice(_VERBS)} {rng.choice(_THINGS)}."


class TinyCorpus(TextRecordsBuilder):
  """A few thousand template sentences; enough for a tiny model to show it learns."""

  name = "sleep_jax_tiny_corpus"
  VERSION = tfds.core.Version("1.0.0")
  SPLITS = ("train", "test")
  DESCRIPTION = "Template sentences about people, places and counting (sleep_jax built-in)."
  SIZES = {"train": 4000, "test": 200}

  def generate(self, split):
    seed = {"train": 0, "test": 1}[split]
    for text in tiny_corpus_texts(self.SIZES[split], seed):
      yield {"text": text}


BUILDERS: Dict[str, Type[TextRecordsBuilder]] = {"tiny_corpus": TinyCorpus}
