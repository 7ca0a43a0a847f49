"""ARC tasks as data: grids (``uint8`` arrays of colours 0-9, 0 the background) and ``Task``, a
handful of demonstration pairs plus test pairs."""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import numpy as np

Grid = np.ndarray  # uint8, shape (h, w), values 0..9
Pair = Tuple[Grid, Grid]
N_COLOURS = 10


def as_grid(x) -> Grid:
  g = np.asarray(x, dtype=np.uint8)
  if g.ndim != 2 or g.size == 0:
    raise ValueError(f"a grid is a non-empty 2-D array; got shape {g.shape}")
  if g.max() >= N_COLOURS:
    raise ValueError(f"grid colours must be 0..9; got {int(g.max())}")
  return g


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One ARC task. ``source``: where it came from ("arc1/train", "arc1/eval", "gen");
  ``program``: the generating program (generated tasks only; JSON of ``[[name, params], ...]``)."""

  id: str
  train: Tuple[Pair, ...]
  test: Tuple[Pair, ...]
  source: str = ""
  program: str = ""

  def __eq__(self, other):
    return (isinstance(other, Task) and self.id == other.id and pairs_equal(self.train, other.train)
            and pairs_equal(self.test, other.test))

  def __hash__(self):
    return hash(self.id)


def pairs_equal(a: Sequence[Pair], b: Sequence[Pair]) -> bool:
  return len(a) == len(b) and all(
      np.array_equal(x0, y0) and np.array_equal(x1, y1) for (x0, x1), (y0, y1) in zip(a, b))


def _task(id_: str, obj: Dict, source: str) -> Task:
  conv = lambda exs: tuple((as_grid(e["input"]), as_grid(e["output"])) for e in exs)
  return Task(id_, conv(obj["train"]), conv(obj["test"]), source)
