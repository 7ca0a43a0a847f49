"""The reasoning task family: an exact checker, disjoint splits, privileged prompts, environments."""

import numpy as np
import pytest

from sleep_jax.data import arith


@pytest.mark.parametrize("level", arith.LEVELS)
def test_every_generated_answer_verifies_and_a_perturbed_one_fails(level):
  for p in arith.problems(0, level, 60, "train") + arith.problems(0, level, 20, "test"):
    assert arith.evaluate(p.program) == p.answer
    assert arith.check(p.program, arith.target(p))  # the reference solution passes
    assert p.solution.count("=") == level  # one worked line per operation
    for wrong in (p.answer + 1, p.answer - 1, p.answer * 2 + 3):
      assert not arith.check(p.program, f"... Answer: {wrong}")
    assert not arith.check(p.program, "I do not know.")


def test_each_worked_step_is_arithmetic_that_holds():
  for p in arith.problems(1, 5, 40, "train"):
    for step in p.solution.split(". Answer:")[0].split(". "):
      lhs, rhs = step.split(" = ")
      assert arith.evaluate(lhs) == int(rhs), step


def test_splits_are_disjoint_and_deterministic():
  for level in (1, 3):
    train = arith.problems(0, level, 200, "train")
    test = arith.problems(0, level, 50, "test")
    assert not {p.uid for p in train} & {p.uid for p in test}
    assert len({p.uid for p in train}) == 200
    # Another seed draws other problems but never moves one across the split.
    other = arith.problems(7, level, 50, "test")
    assert not {p.uid for p in train} & {p.uid for p in other}
    assert arith.problems(0, level, 50, "test") == test


def test_checker_reads_the_last_tagged_answer_and_refuses_bad_programs():
  assert arith.extract_answer("3 + 4 = 7. Answer: 7") == 7
  assert arith.extract_answer("Answer: 5. Oops, Answer: 6") == 6
  assert arith.extract_answer("it is 12") == 12
  assert arith.extract_answer("none") is None
  assert arith.evaluate("((7 + 3 * 4) - 5)") == 14
  assert arith.evaluate("12 // 4") == 3
  for bad in ("13 // 4", "2 ** 8", "__import__('os')", "1 +", "x + 1", "1.5 + 1", "5 // 0"):
    with pytest.raises(ValueError):
      arith.evaluate(bad)


def test_privileged_prompt_shows_the_solution_only_to_the_teacher():
  p = arith.problems(0, 3, 1, "train")[0]
  student, teacher = arith.prompt(p), arith.prompt(p, with_solution=True)
  assert p.question in student and p.question in teacher
  assert p.solution not in student and "Reference solution" not in student
  assert p.solution in teacher and teacher.endswith(student)


def test_environments_the_checker_rejects_are_none():
  p = arith.problems(0, 2, 1, "train")[0]
  env = arith.parse_environment(arith.environment_text(p))
  assert env is not None and env.answer == p.answer and env.program == p.program
  for bad in ("Problem: How many? Program: 13 // 4",  # inexact
              "Problem: How many? Program: 3 - 10",  # negative
              "Problem: How many? Program: os.system('x')",
              "Problem: How many apples?",  # no program
              "Program: 1 + 2",  # no problem
              "Problem: Ann has 3 apples. Program: 3",  # not a question
              f"Problem: How many? Program: {arith.MAX_VALUE} + 1"):
    assert arith.parse_environment(bad) is None, bad


def test_levels_spread_difficulty():
  rng = np.random.default_rng(0)
  sizes = [np.mean([arith.generate(rng, lv).answer for _ in range(200)]) for lv in (1, 5)]
  assert sizes[1] > sizes[0]  # more operations, larger counts on average
  with pytest.raises(ValueError, match="level"):
    arith.generate(rng, 0)


def test_builder_writes_array_record_and_grain_reads_it_back(tmp_path):
  import grain

  from sleep_jax.data import arith_builder
  cfg = arith_builder.ArithConfig(levels=(1, 3), n_train=12, n_test=4)
  builder = arith_builder.prepare(str(tmp_path), cfg)
  test = arith_builder.load_problems(builder, "test")
  assert test == arith_builder.split_problems(cfg, "test") and len(test) == 8
  assert [p.level for p in test] == [1] * 4 + [3] * 4
  ds = grain.MapDataset.source(builder.as_data_source("train")).map(arith_builder.to_problem)
  train = [ds[i] for i in range(len(ds))]
  assert len(train) == 24 and all(arith.check(p.program, p.solution) for p in train)
  assert not {p.uid for p in train} & {p.uid for p in test}
