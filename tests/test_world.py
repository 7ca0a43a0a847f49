"""The synthetic world: determinism, disjoint populations, held-out templates, tokenizer, builder."""

import re
import subprocess
import sys

import numpy as np
import pytest

from sleep_jax.data import world as world_lib
from sleep_jax.data import world_encode
from sleep_jax.data.world import ATTRIBUTES, World, WorldConfig

SMALL = WorldConfig(seed=3, n_pretrain=30, n_qa=30, n_reading=30, n_heldout=10, n_chunks=3, chunk_size=6,
                    n_first_names=20, n_last_names=20)


@pytest.fixture(scope="module")
def world():
  return World(SMALL)


def _training_texts(w: World):
  """Every text a model can be trained on (pretraining mixture and the builder's train splits)."""
  texts = [e.prompt + " " + e.target for e in
           w.bios(w.population("pretrain")) + w.bios(w.population("qa"))
           + w.closed_book_set(w.population("qa"), "train")
           + w.in_context_set(w.population("reading"), "train", all_variants=True)
           + w.closed_book_set(w.population("pretrain"), "train")]
  for k in range(w.cfg.n_chunks):
    texts += [e.target for e in w.bios(w.chunk(k))]
  rng = np.random.default_rng(0)
  mix = dict.fromkeys(world_lib._COMPONENT_POPULATION, 1.0)
  texts += [(lambda e: e.prompt + " " + e.target)(w.sample_train_example(rng, mix))
            for _ in range(500)]
  return texts


def test_deterministic_by_seed():
  a, b, c = World(SMALL), World(SMALL), World(WorldConfig(**{**SMALL.__dict__, "seed": 4}))
  assert a.people == b.people
  assert [a.passage(p, 1) for p in a.people] == [b.passage(p, 1) for p in b.people]
  assert a.tokenizer.itos == b.tokenizer.itos
  assert a.people != c.people
  r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
  mix = {"bio": 1, "closed": 1, "incontext": 1}
  assert ([a.sample_train_example(r1, mix) for _ in range(20)]
          == [b.sample_train_example(r2, mix) for _ in range(20)])


def test_populations_disjoint_and_names_unique(world):
  pops = {p: {x.pid for x in world.population(p)} for p in SMALL.populations}
  assert sum(len(v) for v in pops.values()) == len(world.people)
  names = [x.name for x in world.people]
  assert len(set(names)) == len(names)
  for i, a in enumerate(SMALL.populations):
    assert len(pops[a]) == SMALL.population_size(a)
    for b in SMALL.populations[i + 1:]:
      assert not pops[a] & pops[b], (a, b)


def test_values_single_token_and_in_passage(world):
  tok = world.tokenizer
  for a in ATTRIBUTES:
    for v in world.values[a]:
      assert len(tok.encode(v)) == 1, v
  p = world.population("new_0")[0]
  for v in range(SMALL.n_passage_variants):
    text = world.passage(p, v)
    for a in ATTRIBUTES:
      assert p.attrs[a] in text.split() or p.attrs[a] + "." in text or p.attrs[a] + "," in text
  ex = world.in_context(p, "city", 0, 2)
  ids, mask = world_encode.encode(tok, ex)
  assert ids[mask].tolist() == [tok.token_id(p.attrs["city"]), tok.eos_id]
  assert ex.prompt.endswith("A:") and ex.prompt.startswith(world.passage(p, 2))


def test_question_templates_disjoint():
  for a in ATTRIBUTES:
    tr, ev = world_lib.question_templates(a, "train"), world_lib.question_templates(a, "eval")
    assert tr and ev and not set(tr) & set(ev)
  all_q = [q for a in ATTRIBUTES for q in world_lib.QUESTIONS[a]]
  assert len(set(all_q)) == len(all_q)


def test_eval_templates_never_in_training_data(world):
  texts = _training_texts(world)
  regexes = list(world_lib.iter_eval_templates_regex())
  assert len(regexes) == len(ATTRIBUTES) * 2
  for tpl, rx in regexes:
    # The regex does match a rendering of the template...
    p = world.people[0]
    assert rx.search(tpl.format(name=p.name))
    # ...and no training text.
    hits = [t for t in texts if rx.search(t)]
    assert not hits, (tpl, hits[:2])


def test_tokenizer_round_trips_passages(world):
  tok = world.tokenizer
  assert tok.unk_id not in [i for p in world.people for i in tok.encode(world.passage(p, 0))]
  for p in world.people[::7]:
    for v in range(SMALL.n_passage_variants):
      text = world.passage(p, v)
      assert tok.decode(tok.encode(text)) == text
    for a in ATTRIBUTES:
      for t in range(len(world_lib.QUESTIONS[a])):
        q = world.in_context(p, a, t).prompt
        assert tok.decode(tok.encode(q)) == q


def test_examples_fit_default_seq_len():
  assert world_lib.max_example_len(World(WorldConfig())) <= 64


def test_builder_deterministic_and_tf_free(tmp_path):
  code = ("import sys; import sleep_jax.data.world_builder; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)

  from sleep_jax.data import world_builder
  b1 = world_builder.prepare(str(tmp_path / "a"), SMALL)
  b2 = world_builder.prepare(str(tmp_path / "b"), SMALL)
  assert "tensorflow" not in sys.modules
  assert set(b1.info.splits) == set(world_builder.split_names(SMALL))
  w = World(SMALL)
  for split in world_builder.split_names(SMALL):
    e1, e2 = world_builder.load_split(b1, split), world_builder.load_split(b2, split)
    assert e1 == e2
    assert e1 == [world_builder.to_example(r) for r in world_builder.split_examples(w, split)]
  # Training splits hold no eval template.
  train_texts = [e.prompt for s in ("pretrain", "qa_train", "reading") + tuple(
      f"new_{k}" for k in range(SMALL.n_chunks)) for e in world_builder.load_split(b1, s)]
  for _, rx in world_lib.iter_eval_templates_regex():
    assert not any(rx.search(t) for t in train_texts)
  # A different seed is a different config (own directory name) and different people.
  other = WorldConfig(**{**SMALL.__dict__, "seed": 4})
  assert world_builder.config_name(other) != world_builder.config_name(SMALL)


def test_multi_question_and_generate_examples(world):
  tok = world.tokenizer
  p = world.population("reading")[0]
  attrs, tpls = ["city", "field", "birth_year"], [0, 2, 1]
  ex = world.multi_question(p, attrs, tpls, variant=1, question_weight=0.25)
  assert ex.prompt == world.passage(p, 1) and ex.kind == "multi"
  # The first question is exactly the in-context eval format.
  single = world.in_context(p, "city", 0, 1)
  assert (ex.prompt + " " + ex.target).startswith(single.prompt + " " + single.target)
  ids, w = world_encode.encode_weighted(tok, ex)
  ids2, mask = world_encode.encode(tok, ex)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(mask, w > 0)
  assert ids[-1] == tok.eos_id and w[-1] == 1.0
  full = [tok.token_id(p.attrs[a]) for a in attrs] + [tok.eos_id]
  assert ids[w == 1.0].tolist() == full  # answers + eos carry weight 1
  n_prompt = len(tok.encode(ex.prompt, add_bos=True))
  assert not w[:n_prompt].any() and w[n_prompt] == 0.25  # first "Q" after the passage
  # The "Q" opening a later question (right after an answer) is never trained.
  after = [i + 1 for i in range(len(ids) - 1) if w[i] == 1.0 and ids[i] != tok.eos_id][:-1]
  assert all(tok.itos[ids[i]] == "Q" and w[i] == 0.0 for i in after)
  # Answer-only variant: the loss mask covers exactly the answers and eos.
  ex0 = world.multi_question(p, attrs, tpls, variant=1)
  assert world_encode.encode(tok, ex0)[0][world_encode.encode(tok, ex0)[1]].tolist() == full

  g = world.generate_example(p, "employer", 1, 2)
  ids, mask = world_encode.encode(tok, g)
  assert g.prompt == world.passage(p, 2) and mask[len(tok.encode(g.prompt, add_bos=True)):].all()
  assert tok.decode(ids[mask][:-1]) == f"Q: {world.question(p, 'employer', 1)} A: {p.attrs['employer']}"

  rng = np.random.default_rng(0)
  for _ in range(30):
    e = world.sample_train_example(rng, {"incontext_multi": 1.0}, n_questions=(3, 6), max_len=80)
    assert len(world_encode.encode(tok, e)[0]) <= 80 and e.kind == "multi"
    assert 1 <= e.target.count("Q:") <= 6
    assert world.people[e.pid] in world.population("reading")
  b = world_encode.encode_batch(tok, [ex, g, single], 128)
  assert b["loss_weight"].dtype == np.float32
  np.testing.assert_array_equal(b["loss_mask"], b["loss_weight"] > 0)
  bio = world.sample_train_example(rng, {"bio": 1.0}, bio_eos_weight=0.0)
  assert not world_encode.encode(tok, bio)[1][-1]


def test_many_passage_regime_documents(world):
  """``passages_per_person = n``: n paraphrased passages per person, every one with the train
  questions, only the first with the eval questions (a person is scored once)."""
  from sleep_jax.data import documents
  people = world.chunk(0)
  one = documents.world_documents(world, people)
  many = documents.world_documents(world, people, passages_per_person=3)
  assert len(one) == len(people) and len(many) == 3 * len(people)
  assert [d.id for d in many[:3]] == [one[0].id, f"{one[0].id}/v1", f"{one[0].id}/v2"]
  assert len({d.passage for d in many[:3]}) == 3 and many[0] == one[0]
  assert all(d.train_questions == one[0].train_questions for d in many[:3])
  assert sum(len(d.eval_questions) for d in many) == sum(len(d.eval_questions) for d in one)
  with pytest.raises(ValueError, match="passage variants"):
    documents.world_documents(world, people, passages_per_person=SMALL.n_passage_variants + 1)


def test_partial_passages_for_the_reading_curriculum(world):
  """``passage(keep=...)`` keeps exactly the sentences stating ``keep`` (same words, same order
  as the full passage); partial multi-question examples ask only what their passage states."""
  p = world.population("reading")[3]
  full = world.passage(p, 2)
  part = world.passage(p, 2, keep=["employer", "birth_month"])
  sentences = [s for s in re.split(r"(?<=\.) ", full)]
  kept = [s for s in sentences if s in part]
  assert " ".join(kept) == part and len(kept) == 2  # birth sentence + employer sentence
  assert p.attrs["employer"] in part and p.attrs["birth_year"] in part
  assert p.attrs["city"] not in part
  assert world.passage(p, 2, keep=list(ATTRIBUTES)) == full
  with pytest.raises(ValueError, match="not attributes"):
    world.passage(p, 2, keep=["hobby"])
  rng = np.random.default_rng(1)
  lengths = set()
  for _ in range(40):
    e = world.sample_train_example(rng, {"incontext_multi": 1.0}, n_sentences=(1, 2),
                                   max_len=128)
    n = len(re.split(r"(?<=\.) ", e.prompt))
    lengths.add(n)
    person = world.people[e.pid]
    for a in ATTRIBUTES:  # every answer asked for is in the passage
      if f"A: {person.attrs[a]}" in e.target:
        assert person.attrs[a] in e.prompt
  assert lengths == {1, 2}


def test_anchor_prompts_and_question_rows():
  """Anchor prompts (what a sleep must leave alone) never ask about a scored person; SFT's
  question rows are the closed-book prompt + the supported answer, loss on the answer."""
  import types
  from sleep_jax.data import documents
  from sleep_jax.tasks import base as task_base, pretrain_recipe, world as world_task
  w = world_lib.World(pretrain_recipe.runlocal().world)
  fmt = documents.WorldFormat(w.tokenizer)
  anchors = world_task._anchor_prompts(w, fmt, 5, 6)
  assert len(anchors) == 6
  text = [w.tokenizer.decode(a) for a in anchors]
  scored = w.population("qa")[:5] + w.population("heldout") + [
      p for k in range(w.cfg.n_chunks) for p in w.chunk(k)]
  assert not any(f"{p.first} {p.last}" in t for p in scored for t in text)
  # Alternately closed-book (a known person) and in-context (a passage, then its question).
  assert [t.startswith("Q: ") for t in text] == [True, False] * 3
  # consolidation.anchor_closed_book: that fraction closed-book, interleaved while both last.
  mostly = [w.tokenizer.decode(a).startswith("Q: ")
            for a in world_task._anchor_prompts(w, fmt, 5, 6, closed_book=0.8)]
  assert mostly == [True, False, True, True, True, True]
  assert world_task._anchor_prompts(w, fmt, 5, 7)[:6] == anchors
  with pytest.raises(ValueError, match="anchor_closed_book"):
    world_task._anchor_prompts(w, fmt, 5, 6, closed_book=1.5)
  # consolidation.anchor_people="everyone": closed-book anchors about people of every unscored
  # population, still none about a scored person.
  every = [w.tokenizer.decode(a) for a in world_task._anchor_prompts(w, fmt, 5, 40, 1.0,
                                                                     "everyone")]
  assert not any(f"{p.first} {p.last}" in t for p in scored for t in every)
  pops = {k: {f"{p.first} {p.last}" for p in w.population(k)} for k in ("qa", "pretrain", "reading")}
  assert all(any(n in t for n in pops[k] for t in every) for k in pops)
  with pytest.raises(ValueError, match="anchor_people"):
    world_task._anchor_prompts(w, fmt, 5, 6, people="some")
  docs = documents.world_documents(w, w.chunk(0)[:2])
  rows, starts = task_base.question_rows(types.SimpleNamespace(fmt=fmt), docs)
  qs = [q for d in docs for q in d.train_questions]
  assert len(rows) == len(qs)
  for r, s, q in zip(rows, starts, qs):
    assert r[:s] == fmt.closed_book(q.q) and r[s:] == fmt.answer(q.answer)


def test_value_anchors_ask_for_the_chunk_values_about_known_people():
  """Value anchors: closed-book questions about known, unscored people whose answer is one the
  new chunk teaches, round-robin over those values, deterministic in the rng."""
  import types
  from sleep_jax.data import documents
  from sleep_jax.tasks import base as task_base, pretrain_recipe, world as world_task
  w = world_lib.World(pretrain_recipe.runlocal().world)
  fmt = documents.WorldFormat(w.tokenizer)
  by_value = world_task._anchors_by_value(w, fmt, 5)
  setup = types.SimpleNamespace(anchors_by_value=by_value)
  docs = documents.world_documents(w, w.chunk(0)[:3])
  values = {q.answer for d in docs for q in d.train_questions} & set(by_value)
  assert values
  k = 2 * len(values)
  got = task_base.value_anchors(setup, docs, k, np.random.default_rng(0))
  assert len(got) == k
  assert got == task_base.value_anchors(setup, docs, k, np.random.default_rng(0))
  assert got != task_base.value_anchors(setup, docs, k, np.random.default_rng(1))
  answer_of = {tuple(p): v for v, ps in by_value.items() for p in ps}
  # Every value of the chunk is asked for, each twice (round-robin), about unscored people.
  asked = [answer_of[tuple(a)] for a in got]
  assert sorted(set(asked)) == sorted(values) and all(asked.count(v) == 2 for v in values)
  text = [w.tokenizer.decode(a) for a in got]
  scored = w.population("qa")[:5] + w.population("heldout") + [
      p for c in range(w.cfg.n_chunks) for p in w.chunk(c)]
  assert not any(f"{p.first} {p.last}" in t for p in scored for t in text)
  assert all(t.startswith("Q: ") for t in text)
  assert task_base.value_anchors(setup, docs, 0, np.random.default_rng(0)) == []
