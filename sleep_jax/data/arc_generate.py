"""The generated ARC-like task family: grid programs (flips, rotations, transpose, recolouring,
translation, object copying, optionally composed), random inputs, and tasks whose outputs are the
program applied to the inputs, so every task is solvable by construction
(``apply_program(task.program, x)`` re-derives any output). Difficulty knobs: grid size, number
of colours, number of objects, program depth (``GenConfig``)."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Sequence, Tuple

import numpy as np

from sleep_jax.data.arc_tasks import N_COLOURS, Grid, Task, as_grid


def dihedral_grid(g: Grid, k: int) -> Grid:
  """The ``k``-th element of the dihedral group D4 (0 = identity; 1-3 = rotations by 90k degrees
  counter-clockwise; 4-7 = the same after a left-right flip)."""
  if not 0 <= k < 8:
    raise ValueError(f"dihedral index must be 0..7; got {k}")
  g = np.fliplr(g) if k >= 4 else g
  return np.ascontiguousarray(np.rot90(g, k % 4))


def dihedral_inverse(k: int) -> int:
  return (4 - k) % 4 if k < 4 else k  # flips (k >= 4) are involutions


def _shift(g: Grid, dy: int, dx: int) -> Grid:
  h, w = g.shape
  out = np.zeros_like(g)
  ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
  yd, xd = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
  out[ys, xs] = g[yd, xd]
  return out


def _copy(g: Grid, dy: int, dx: int) -> Grid:
  moved = _shift(g, dy, dx)
  return np.where(moved > 0, moved, g).astype(np.uint8)


def _recolour(g: Grid, mapping: Sequence[Sequence[int]]) -> Grid:
  lut = np.arange(N_COLOURS, dtype=np.uint8)
  for a, b in mapping:
    lut[a] = b
  return lut[g]


PRIMITIVES = {
    "flip_lr": lambda g: np.ascontiguousarray(np.fliplr(g)),
    "flip_ud": lambda g: np.ascontiguousarray(np.flipud(g)),
    "rot90": lambda g: dihedral_grid(g, 1),
    "rot180": lambda g: dihedral_grid(g, 2),
    "rot270": lambda g: dihedral_grid(g, 3),
    "transpose": lambda g: np.ascontiguousarray(g.T),
    "recolour": lambda g, mapping: _recolour(g, mapping),  # [[from, to], ...]
    "translate": lambda g, dy, dx: _shift(g, dy, dx),  # zero-filled shift
    "copy": lambda g, dy, dx: _copy(g, dy, dx),  # the objects plus a copy shifted by (dy, dx)
}
GEOMETRIC = ("flip_lr", "flip_ud", "rot90", "rot180", "rot270", "transpose")
FAMILIES = GEOMETRIC + ("recolour", "translate", "copy")


def apply_program(program, grid) -> Grid:
  """``program``: a list of ``[name, params]`` (or its JSON), applied left to right."""
  steps = json.loads(program) if isinstance(program, str) else program
  g = as_grid(grid)
  for name, params in steps:
    g = PRIMITIVES[name](g, **params)
  return g.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """Difficulty of the generated family."""

  min_size: int = 3  # grid side drawn from [min_size, max_size] (height and width separately)
  max_size: int = 6
  n_colours: int = 3  # object colours drawn from 1..n_colours (0 is the background)
  n_objects: int = 2  # objects (small random sprites) per input grid
  max_object: int = 2  # an object fits in max_object x max_object cells
  depth: int = 1  # primitives composed per program
  families: Tuple[str, ...] = FAMILIES
  n_train: int = 3  # demonstrations per task
  n_test: int = 1

  def __post_init__(self):
    if not 1 <= self.n_colours <= N_COLOURS - 1:
      raise ValueError("n_colours must be in 1..9")
    if not 1 <= self.min_size <= self.max_size:
      raise ValueError("need 1 <= min_size <= max_size")
    unknown = set(self.families) - set(FAMILIES)
    if unknown:
      raise ValueError(f"unknown families {sorted(unknown)}; valid: {FAMILIES}")


def _sample_step(rng: np.random.Generator, cfg: GenConfig, name: str):
  if name in GEOMETRIC:
    return [name, {}]
  if name == "recolour":
    cols = list(range(1, cfg.n_colours + 1))
    if len(cols) == 1:
      return [name, {"mapping": [[1, 2]]}]
    perm = list(rng.permutation(cols))
    while any(a == b for a, b in zip(cols, perm)):  # a derangement: every colour changes
      perm = list(rng.permutation(cols))
    return [name, {"mapping": [[int(a), int(b)] for a, b in zip(cols, perm)]}]
  dy, dx = 0, 0
  while dy == 0 and dx == 0:
    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
  if name == "copy":  # copies land next to the original
    dy, dx = dy * cfg.max_object, dx * cfg.max_object
  return [name, {"dy": dy, "dx": dx}]


def sample_program(rng: np.random.Generator, cfg: GenConfig) -> List:
  names = [cfg.families[int(rng.integers(len(cfg.families)))] for _ in range(cfg.depth)]
  return [_sample_step(rng, cfg, n) for n in names]


def _margin(program) -> Tuple[int, int, int, int]:
  """Rows/cols (top, bottom, left, right) kept empty so shifts never push content off-grid."""
  top = bottom = left = right = 0
  for name, p in program:
    if name in ("translate", "copy"):
      dy, dx = p["dy"], p["dx"]
      top, bottom = top + max(-dy, 0), bottom + max(dy, 0)
      left, right = left + max(-dx, 0), right + max(dx, 0)
  return top, bottom, left, right


def random_input(rng: np.random.Generator, cfg: GenConfig, program) -> Grid:
  top, bottom, left, right = _margin(program)
  lo = max(cfg.min_size, cfg.max_object + max(top + bottom, left + right))
  hi = max(cfg.max_size, lo)
  h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
  g = np.zeros((h, w), np.uint8)
  for _ in range(cfg.n_objects):
    oh, ow = (int(v) for v in rng.integers(1, cfg.max_object + 1, size=2))
    y0 = int(rng.integers(top, max(top, h - bottom - oh) + 1))
    x0 = int(rng.integers(left, max(left, w - right - ow) + 1))
    sprite = rng.random((oh, ow)) < 0.75
    sprite[rng.integers(oh), rng.integers(ow)] = True  # never empty
    colour = int(rng.integers(1, cfg.n_colours + 1))
    region = g[y0:y0 + oh, x0:x0 + ow]
    region[sprite[:region.shape[0], :region.shape[1]]] = colour
  # Keep the margins empty (objects can overlap them only if the grid is too small).
  g[:top] = 0
  if bottom:
    g[h - bottom:] = 0
  g[:, :left] = 0
  if right:
    g[:, w - right:] = 0
  if not g.any():
    g[top, left] = 1
  return g


def generate_task(seed: int, index: int, cfg: GenConfig = GenConfig(),
                  prefix: str = "gen") -> Task:
  """Task ``index`` of the family ``(seed, cfg)``: same arguments, same task."""
  rng = np.random.default_rng([seed, index, 0xA7C])
  for _ in range(100):  # redraw programs that act as the identity on their inputs
    program = sample_program(rng, cfg)
    pairs, seen = [], set()
    for _ in range(20 * (cfg.n_train + cfg.n_test)):
      x = random_input(rng, cfg, program)
      key = (x.shape, x.tobytes())
      if key in seen:
        continue
      y = apply_program(program, x)
      if x.shape == y.shape and np.array_equal(x, y):
        continue
      seen.add(key)
      pairs.append((x, y))
      if len(pairs) == cfg.n_train + cfg.n_test:
        break
    if len(pairs) == cfg.n_train + cfg.n_test:
      return Task(f"{prefix}-{seed}-{index:05d}", tuple(pairs[:cfg.n_train]),
                  tuple(pairs[cfg.n_train:]), "gen", json.dumps(program))
  raise RuntimeError(f"could not generate task {index} for seed {seed} with {cfg}")


def generate_tasks(n: int, seed: int, cfg: GenConfig = GenConfig(),
                   prefix: str = "gen") -> List[Task]:
  return [generate_task(seed, i, cfg, prefix) for i in range(n)]


def check_solvable(task: Task) -> bool:
  """Generated tasks: the program maps every input to its output."""
  if not task.program:
    raise ValueError(f"task {task.id} has no program")
  return all(np.array_equal(apply_program(task.program, x), y) for x, y in task.train + task.test)
