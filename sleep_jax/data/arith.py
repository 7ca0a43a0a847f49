"""Verifiable multi-step arithmetic word problems: the reasoning task family (no network).

A problem is a short story about one person's count of one item, changed by ``level``
operations (buys k more, gives away k, buys n packs of k, doubles, shares equally among n and
keeps one share). Each problem carries

* its *program*: an integer expression over the story's numbers (``((7 + 3 * 4) - 5)``), which
  ``evaluate`` computes exactly (a tiny AST interpreter: integers, + - * and exact //, nothing
  else), so the checker never trusts a stored answer;
* its *worked solution*, one line per step (``7 + 3 * 4 = 19. 19 - 5 = 14. Answer: 14``): the
  privileged context of OPSD and of Sleep's consolidation, and the SFT target;
* a canonical key (``uid``). The split of a problem is a hash of its key, so the train and test
  splits are disjoint by construction whatever the seeds and sizes.

``check(answer, text)`` reads the last ``Answer: N`` of a model's text (else its last integer) and
compares it with the program's value. ``parse_environment`` reads a model-written environment
(dream simulation): ``Problem: ... Program: ...``; it returns ``None`` (rejected) for anything the
interpreter cannot run or whose value is not a small non-negative integer.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
from typing import List, Optional

import numpy as np

NAMES = ("Ada", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Rui", "Sara", "Tomas", "Uma", "Vera", "Wes", "Yara", "Zoe")
ITEMS = ("apples", "pencils", "stamps", "marbles", "coins", "books", "shells", "cards", "eggs",
         "stickers", "buttons", "cookies")
LEVELS = (1, 2, 3, 4, 5)  # operations per problem
MAX_VALUE = 10_000  # environments whose value leaves [0, MAX_VALUE] are rejected
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  program: str
  solution: str  # worked reference solution, ending in "Answer: N"
  answer: int
  level: int

  @property
  def uid(self) -> str:
    """Canonical key: the program and the story's wording (name, item) — equal problems collide."""
    return self.question


STREAM_FRACTION = 0.1  # of all problems: the train problems a wake stream reads (``pool_of``)


def _hash01(problem: Problem) -> float:
  return int(hashlib.sha1(problem.uid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(problem: Problem) -> str:
  """'test' for a fixed ~TEST_FRACTION of all possible problems (hash of the key), else 'train'."""
  return "test" if _hash01(problem) < TEST_FRACTION else "train"


def pool_of(problem: Problem) -> str:
  """The train split in two disjoint pools: 'stream' (what the reasoning experiment's wake
  stream reads, ~STREAM_FRACTION of all problems) and 'corpus' (what a tiny base model is
  pretrained on), so a sleep never studies a problem the base already saw; 'test' as above."""
  h = _hash01(problem)
  if h < TEST_FRACTION:
    return "test"
  return "stream" if h < TEST_FRACTION + STREAM_FRACTION else "corpus"


# ----------------------------------------------------------------------------------------------
# The checker: an exact interpreter of the programs.
# ----------------------------------------------------------------------------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate(program: str) -> int:
  """The integer value of ``program`` (ints, + - *, exact //, parentheses); ValueError otherwise."""
  try:
    tree = ast.parse(program.strip(), mode="eval")
  except SyntaxError as e:
    raise ValueError(f"not an expression: {program!r}") from e

  def ev(node) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
      a, b = ev(node.left), ev(node.right)
      if b == 0 or a % b:
        raise ValueError(f"inexact division {a} // {b}")
      return a // b
    raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")

  return ev(tree.body)


def extract_answer(text: str) -> Optional[int]:
  """The last ``Answer: N`` in ``text``, else its last integer, else None."""
  tagged = re.findall(r"Answer:\s*(-?\d+)", text)
  if tagged:
    return int(tagged[-1])
  nums = re.findall(r"-?\d+", text)
  return int(nums[-1]) if nums else None


def check(program: str, text: str) -> bool:
  """Whether ``text`` ends in the value of ``program`` (the reward of the family: 1 or 0)."""
  got = extract_answer(text)
  return got is not None and got == evaluate(program)


# ----------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------
def _step(rng: np.random.Generator, value: int, expr: str, item: str):
  """One operation on the running count: (sentence, new expression, step text, new value)."""
  kinds = ["buy", "give", "packs", "times"]
  if value > 1:
    kinds.append("share")
  kind = kinds[rng.integers(len(kinds))]
  if kind == "give" and value < 2:
    kind = "buy"
  if kind == "buy":
    k = int(rng.integers(2, 20))
    return f"Then they get {k} more.", f"({expr} + {k})", f"{value} + {k} = {value + k}", value + k
  if kind == "give":
    k = int(rng.integers(1, value))
    return (f"Then they give away {k}.", f"({expr} - {k})", f"{value} - {k} = {value - k}",
            value - k)
  if kind == "packs":
    n, k = int(rng.integers(2, 6)), int(rng.integers(2, 10))
    return (f"Then they buy {n} packs of {k} {item}.", f"({expr} + {n} * {k})",
            f"{value} + {n} * {k} = {value + n * k}", value + n * k)
  if kind == "times":
    m = int(rng.integers(2, 4))
    word = {2: "double", 3: "triple"}[m]
    return (f"Then they {word} what they have.", f"({expr} * {m})", f"{value} * {m} = {value * m}",
            value * m)
  divisors = [n for n in range(2, 6) if value % n == 0]
  if not divisors:  # no exact share: buy instead (keeps every answer an integer)
    k = int(rng.integers(2, 20))
    return f"Then they get {k} more.", f"({expr} + {k})", f"{value} + {k} = {value + k}", value + k
  n = divisors[rng.integers(len(divisors))]
  return (f"Then they share them equally among {n} friends, themselves included, and keep one "
          f"share.", f"({expr} // {n})", f"{value} // {n} = {value // n}", value // n)


def generate(rng: np.random.Generator, level: int) -> Problem:
  """One problem with ``level`` operations after the starting count."""
  if level < 1:
    raise ValueError(f"level must be >= 1, got {level}")
  name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
  value = int(rng.integers(2, 30))
  sentences, expr, steps = [f"{name} has {value} {item}."], str(value), []
  for _ in range(level):
    sentence, expr, step, value = _step(rng, value, expr, item)
    sentences.append(sentence)
    steps.append(step)
  question = " ".join(sentences) + f" How many {item} does {name} have now?"
  solution = ". ".join(steps) + f". Answer: {value}"
  return Problem(question, expr, solution, value, level)


def problems(seed: int, level: int, n: int, split: str) -> List[Problem]:
  """``n`` distinct problems of ``level`` in ``split``, deterministic in seed: 'train' | 'test'
  (``split_of``), or one of the train split's pools 'stream' | 'corpus' (``pool_of``)."""
  if split not in ("train", "test", "stream", "corpus"):
    raise ValueError(f"split must be 'train', 'test', 'stream' or 'corpus', got {split!r}")
  where = split_of if split in ("train", "test") else pool_of
  rng = np.random.default_rng([seed, level])
  out, seen = [], set()
  for _ in range(200 * n + 1000):
    p = generate(rng, level)
    if where(p) == split and p.uid not in seen:
      seen.add(p.uid)
      out.append(p)
      if len(out) == n:
        return out
  raise ValueError(f"only {len(out)} distinct {split} problems of level {level} found; ask for "
                   "fewer")


# ----------------------------------------------------------------------------------------------
# Prompts (the student never sees the reference solution; the OPSD / consolidation teacher does).
# ----------------------------------------------------------------------------------------------
def prompt(problem: Problem, *, with_solution: bool = False) -> str:
  """The problem as a prompt; ``with_solution``: the worked reference solution comes first."""
  ref = f"Reference solution: {problem.solution}\n" if with_solution else ""
  return f"{ref}Problem: {problem.question}\nSolution:"


def target(problem: Problem) -> str:
  """What a solver writes after ``Solution:``."""
  return " " + problem.solution


# ----------------------------------------------------------------------------------------------
# Dream simulation: model-written environments.
# ----------------------------------------------------------------------------------------------
def environment_text(problem: Problem) -> str:
  """An environment in the format the model is asked to write (and the format it imitates)."""
  return f"Problem: {problem.question}\nProgram: {problem.program}"


def parse_environment(text: str) -> Optional[Problem]:
  """A model-written ``Problem: ... Program: ...`` as a checkable Problem, or None (rejected):
  missing parts, a program the interpreter refuses, or a value outside [0, MAX_VALUE]."""
  m = re.search(r"Problem:\s*(.+?)\s*Program:\s*([^\n]+)", text, re.S)
  if not m:
    return None
  question, program = m.group(1).strip(), m.group(2).strip()
  if not question.endswith("?"):
    return None
  try:
    value = evaluate(program)
  except (ValueError, RecursionError):
    return None
  if not 0 <= value <= MAX_VALUE:
    return None
  return Problem(question, program, f"Answer: {value}", value, level=0)
