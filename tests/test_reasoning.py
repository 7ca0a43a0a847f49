"""The reasoning experiment's pieces: the digit tokenizer, the arithmetic corpus and task, the
checker metric, dream simulation's filter, and the driver end to end (the ``test`` variant)."""

import numpy as np
import pytest

from sleep_jax.configs import reasoning as reasoning_config
from sleep_jax.data import arith, arith_corpus
from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.eval import qa
from sleep_jax.sleep import dream_sim
from sleep_jax.tasks import base as task_lib
from sleep_jax.tasks import reasoning


def test_digit_tokenizer_spells_numbers_digit_by_digit_and_round_trips(tmp_path):
  tok = arith_corpus.tokenizer()
  p = arith.generate(np.random.default_rng(3), 3)
  ids = tok.encode(p.solution)
  assert tok.unk_id not in ids
  assert all(tok.itos[i] in "0123456789" for i in tok.encode("1234"))  # four tokens
  assert len(tok.encode("1234")) == 4
  assert arith.extract_answer(tok.decode(ids)) == p.answer
  tok.save(tmp_path / "t.json")
  back = WordTokenizer.load(tmp_path / "t.json")
  assert back.split_digits and back.encode(p.solution) == ids
  plain = WordTokenizer.from_corpus(["Ada has 17 apples."])  # the world's: unchanged
  assert not plain.split_digits and len(plain.encode("17")) == 1


def test_pools_are_disjoint_and_the_corpus_never_draws_a_test_or_stream_problem():
  for lv in (1, 2, 3):
    stream = arith.problems(0, lv, 30, "stream")
    test = arith.problems(0, lv, 30, "test")
    assert {p.uid for p in stream}.isdisjoint(p.uid for p in test)
    assert all(arith.split_of(p) == "train" for p in stream)
  corpus = arith_corpus.ArithCorpus(0, (1, 2, 3), (1, 2))
  rng = np.random.default_rng(0)
  for _ in range(200):
    ex = corpus.sample_train_example(rng, dict(arith_corpus.DEFAULT_MIXTURE))
    assert ex.kind in ("solve", "read", "env")
    if ex.kind == "solve":
      assert ex.attribute in ("level1", "level2")


def test_checked_metric_reads_the_final_answer():
  gold = [["3 + 4 = 7. Answer: 7"]]
  assert qa.score_answers(["3 + 4 = 7. Answer: 7"], gold)["checked"][0] == 1.0
  assert qa.score_answers(["3 + 4 = 8. Answer: 8"], gold)["checked"][0] == 0.0
  assert qa.score_answers(["Answer: 7. Answer: 9"], gold)["checked"][0] == 0.0  # the last
  assert qa.score_answers(["no idea"], [["Paris"]])["checked"][0] == 0.0


class _Fmt:
  stop_ids = (2,)

  def closed_book(self, q):
    return [1] + [10 + len(q) % 50]

  def with_context(self, passage, q):
    return [1, 99] + self.closed_book(q)[1:]


class _Tok:
  pad_id = 0

  def __init__(self):
    self.texts = {}

  def decode(self, ids):
    return self.texts.get(tuple(int(i) for i in ids if int(i) > 2), "")


def test_simulation_keeps_only_valid_environments_solved_by_a_verified_attempt(monkeypatch):
  """Rejected environments (no program, a program the checker refuses, a repeat) and failed
  attempts never become candidates; a solved environment gives exactly one trajectory."""
  tok = _Tok()
  envs = {(40,): "Ada has 3 apples. How many? Program: (3 + 4)",  # valid, solved
          (41,): "Ben has 2 cards. How many? Program: (2 * 5)",  # valid, never solved
          (42,): "Cleo has 5 eggs. How many? Program: import os",  # refused
          (43,): "no program here",  # malformed
          (44,): "Ada has 3 apples. How many? Program: (3 + 4)"}  # a repeat
  tok.texts.update({k: v for k, v in envs.items()})
  tok.texts.update({(50,): "Answer: 7", (51,): "Answer: 8", (52,): "Answer: 11"})
  calls = []

  class Out:
    def __init__(self, rows):
      width = max(len(r) for r in rows)
      self.tokens = np.array([r + [0] * (width - len(r)) for r in rows])
      self.completion_mask = self.tokens > 2

  def fake_sample(params, cfg, mask, prompts, key, m, *a, **k):
    calls.append((len(prompts), m))
    if len(calls) == 1:  # environments
      return Out([[40], [41], [42], [43], [44]])
    # attempts: row r tries valid environment r mod 2 (Ada's first, Ben's second)
    return Out([[51], [52], [50], [51]])

  monkeypatch.setattr(dream_sim.dream_batches, "sample_dreams", fake_sample)

  class Setup:
    environments = reasoning.Environments([1, 5])
    fmt, cfg = _Fmt(), None

  Setup.tok = tok
  dcfg = type("D", (), dict(simulate_envs=5, simulate=2, simulate_tokens=8, temperature=1.0,
                            random_expert=False))
  sim = dream_sim.simulate(None, Setup, None, dcfg, 8, __import__("jax").random.key(0))
  assert sim.info == {"envs_proposed": 5, "envs_valid": 2, "envs_solved": 1,
                      "trajectories_kept": 1}
  assert calls[1] == (2, 4)  # 2 valid environments x 2 attempts
  comps = np.asarray(sim.candidates.tokens)[np.asarray(sim.candidates.completion_mask)]
  assert comps.tolist() == [50, 2]  # the verified attempt (+ stop), nothing else
  assert list(sim.questions.values()) == ["Ada has 3 apples. How many?"]
  # A chat model writes the whole format itself; the tiny base continues "Problem:".
  assert reasoning.Environments.parse("Sure.\nProblem: Ada has 3 apples. How many?\n"
                                      "Program: (3 + 4)") == ("Ada has 3 apples. How many?",
                                                              "(3 + 4)")


def test_the_teacher_reads_the_reference_solution_and_the_student_does_not():
  c = reasoning_config.get_config("test")
  tok = arith_corpus.tokenizer()
  from sleep_jax.data.documents import WorldFormat
  model = type("M", (), dict(params=None, cfg=None, tok=tok, fmt=WorldFormat(tok),
                             base_metrics={}))
  s = reasoning.setup(c, model)
  docs = s.chunks[0]
  assert docs[-1].id == f"heldout-L{c.data.arith.levels[0]}"
  assert len(docs) == c.data.arith.per_chunk + 1
  teacher, student = task_lib.teacher_prompts(s, docs), task_lib.student_prompts(s, docs)
  for d, t_, s_ in zip(docs, teacher, student):
    sol = tok.encode(d.passage)
    assert t_[1:1 + len(sol)] == sol  # the reference solution opens the teacher's prompt
    assert s_ == s.fmt.closed_book(d.train_questions[0].q)
    assert tok.decode(s_).count("Answer") == 0
  held = {q.q for q in docs[-1].eval_questions}
  assert held.isdisjoint(d.train_questions[0].q for d in docs[:-1])


def test_a_chat_model_sees_worked_corpus_problems_before_each_problem_and_environment():
  from sleep_jax.data.documents import ChatFormat
  from sleep_jax.model import fetch
  path = fetch.find_smollm2()
  if path is None:
    pytest.skip("SmolLM2 GGUF not in the cache (python -m sleep_jax.model.fetch)")
  from sleep_jax.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer.from_gguf(path)
  c = reasoning_config.get_config("test")
  model = type("M", (), dict(params=None, cfg=None, tok=tok, fmt=ChatFormat(tok),
                             base_metrics={}))
  s = reasoning.setup(c, model)
  shots = reasoning.chat_shots(c.data.arith)
  assert len(shots) == c.data.arith.chat_shots > 0
  level = c.data.arith.levels[0]
  seen = {q.q for ch in s.chunks for d in ch for q in d.train_questions + d.eval_questions}
  assert seen.isdisjoint(q for q, _ in shots)  # never a stream or held-out problem
  assert all(q.count("Then") == level for q, _ in shots)  # the stream's first level
  docs = s.chunks[0]
  teacher, student = task_lib.teacher_prompts(s, docs), task_lib.student_prompts(s, docs)
  for d, t_, s_ in zip(docs[:-1], teacher, student):
    text = tok.decode(s_)
    assert all(q in text and a in text for q, a in shots)  # earlier turns, before the problem
    assert text.index(shots[-1][1]) < text.index(d.train_questions[0].q)
    assert d.passage not in text and d.passage in tok.decode(t_)
  env = tok.decode(s.environments.prompt)  # the same problems, written as environments first
  programs = [p.program for p in arith.problems(c.data.arith.seed, level, len(shots), "corpus")]
  assert all(f"Program: {prog}" in env for prog in programs)
  assert env.count(reasoning.CHAT_ENV_PROMPT) == len(shots) + 1
  assert env.rindex(programs[-1]) < env.rindex(reasoning.CHAT_ENV_PROMPT)
  c.data.arith.chat_shots = 0
  assert tok.decode(reasoning.setup(c, model).environments.prompt).count("Program: (") == 0
  bare = reasoning.setup(c, model).fmt.closed_book(docs[0].train_questions[0].q)
  assert bare == ChatFormat(tok, reasoning.CHAT_INSTRUCTION).closed_book(
      docs[0].train_questions[0].q)
  assert len(bare) < len(student[0])


@pytest.mark.slow
def test_reasoning_driver_runs_every_method(tmp_path):
  from sleep_jax.sleep import cycle
  c = reasoning_config.get_config("test")
  res = cycle.run_experiment(c, str(tmp_path), log=lambda *_: None)
  assert set(res["methods"]) == set(reasoning_config.METHODS)
  info = res["methods"]["sleep"]["seeds"]["0"]["info"]
  assert all("envs_proposed" in i for i in info)
  assert "grpo_reward_first_round" in res["methods"]["grpo"]["seeds"]["0"]["info"][0]


def test_the_verified_teacher_checks_a_sample_by_its_final_answer():
  """``reasoning.py:verified``: a teacher sample is trusted when its final answer is the
  reference solution's, by the experiment's own metric."""
  from sleep_jax.data.documents import WorldFormat
  from sleep_jax.sleep import teacher_trust
  c = reasoning_config.get_config("verified")
  assert c.consolidation.verify_teacher and not reasoning_config.get_config(
      "replay").consolidation.verify_teacher
  tok = arith_corpus.tokenizer()
  stop = WorldFormat(tok).stop_ids
  p = arith.problems(0, 3, 1, "stream")[0]
  gold = tok.encode(p.solution) + list(stop)
  verify = teacher_trust.answer_verifier([gold, []], tok.decode, stop, c.eval.metric)
  value = arith.evaluate(p.program)
  wrong = p.solution.replace(f"Answer: {value}", f"Answer: {value + 1}")
  assert wrong != p.solution
  assert verify(0, gold) is True and verify(0, tok.encode(p.solution)) is True
  assert verify(0, tok.encode(wrong)) is False and verify(1, gold) is None
  from sleep_jax.errors import UserError
  from sleep_jax.sleep import validate
  validate.check(c)
  c.consolidation.prompt_templates = ("{context} Q: {title}",)  # items with no answer to check
  with pytest.raises(UserError, match="verify_teacher"):
    validate.check(c)
