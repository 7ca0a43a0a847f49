"""The wake/sleep driver: resume after a kill mid-sleep, documents files, outputs."""

import json
import os
import signal
import types

import jax
import pytest

from sleep_jax import errors
from sleep_jax.configs import knowledge
from sleep_jax.data import documents
from sleep_jax.sleep import cycle, methods, phases


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("base"))


def _config(base_cache, methods=("sleep",)):
  c = knowledge.get_config("test")
  c.methods = tuple(methods)
  c.base_cache = base_cache
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_cache):
  """Uninterrupted runs, computed once per method for every interruption test."""
  cache = {}

  def get(method):
    if method not in cache:
      work = str(tmp_path_factory.mktemp(f"ref_{method}"))
      cache[method] = cycle.run_experiment(_config(base_cache, (method,)), work,
                                           log=lambda *_: None)["methods"][method]["seeds"]["0"]
      get.curves[method] = _curves(work, method)
    return cache[method]
  get.curves = {}
  return get


def _curves(work, method):
  """The run's training-curve points without their wall-clock times."""
  path = os.path.join(work, "runs", method, "seed_0", "train_log.jsonl")
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "time" and "seconds" not in k}
            for line in f]


def _same_curves(reference, work, method):
  """A resumed run's curves are the uninterrupted run's: every point once, same values."""
  reference(method)
  a, b = reference.curves[method], _curves(work, method)
  steps = [r["step"] for r in b if "step" in r]
  assert steps == list(range(1, len(steps) + 1))  # one point per global step, no repeats
  assert a == b


def _resume_equals(reference, base_cache, work, method):
  assert not os.path.exists(os.path.join(work, "runs", method, "seed_0", "result.json"))
  resumed = cycle.run_experiment(_config(base_cache, (method,)), work, log=lambda *_: None)
  a, b = reference(method), resumed["methods"][method]["seeds"]["0"]
  assert a["params_sha1"] == b["params_sha1"]
  assert a["R"] == b["R"] and a["answers"] == b["answers"]
  for f in ("results.json", "results.md", "plots/accuracy_matrices.png"):
    assert os.path.exists(os.path.join(work, f))
  _same_curves(reference, work, method)


def _kill_and_resume(tmp_path, base_cache, reference, method):
  def kill(phase, chunk, step):
    if phase == "consolidation" and chunk == 1 and step == 1:
      raise cycle.Interrupted("simulated kill in the middle of the second sleep")

  work = str(tmp_path / "killed")
  with pytest.raises(cycle.Interrupted):
    cycle.run_experiment(_config(base_cache, (method,)), work, hook=kill, log=lambda *_: None)
  _resume_equals(reference, base_cache, work, method)


def test_resume_after_kill_mid_sleep_equals_uninterrupted(tmp_path, base_cache, reference):
  """Consolidation and deep sleep (the compile-light path of the driver)."""
  _kill_and_resume(tmp_path, base_cache, reference, "sleep_no_dream")


def test_sigterm_mid_consolidation_stops_at_next_step_and_resumes(tmp_path, base_cache,
                                                                   reference, caplog):
  """A real SIGTERM during the first consolidation: the run stops at the next step with
  ``Preempted`` (the command line exits 0) instead of finishing a phase that can take minutes
  on a real model; the message names the checkpoint it resumes from (the wake before), and the
  resumed run, which runs the consolidation again, equals the uninterrupted one."""
  def term(phase, chunk, step):
    if phase == "consolidation" and chunk == 0 and step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  work = str(tmp_path / "preempted")
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(errors.Preempted, match="stopped in chunk 0 phase consolidation "
                     r"\(consolidation step 1\); .* checkpoint after chunk 0 phase wake"):
    cycle.run_experiment(_config(base_cache, ("sleep_no_dream",)), work, hook=term,
                         log=lambda *_: None)
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone again
  assert "stop at the next step" in caplog.text
  _resume_equals(reference, base_cache, work, "sleep_no_dream")


def test_sigterm_in_a_phase_without_steps_stops_after_its_save(tmp_path, base_cache, reference,
                                                               monkeypatch):
  """A SIGTERM during a phase that has no steps to stop at (the wake) stops the run at the
  checkpoint that ends the phase; the resumed run equals the uninterrupted one."""
  wake = cycle.PHASE_FNS[0]

  def wake_then_term(st, ctx, t):
    out = wake(st, ctx, t)
    if t == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(cycle, "PHASE_FNS", (wake_then_term,) + cycle.PHASE_FNS[1:])
  work = str(tmp_path / "preempted")
  with pytest.raises(errors.Preempted, match="saved after chunk 0 phase wake"):
    cycle.run_experiment(_config(base_cache, ("sleep_no_dream",)), work, log=lambda *_: None)
  monkeypatch.undo()
  _resume_equals(reference, base_cache, work, "sleep_no_dream")


@pytest.mark.slow
def test_resume_with_dreaming_equals_uninterrupted(tmp_path, base_cache, reference):
  _kill_and_resume(tmp_path, base_cache, reference, "sleep")


def test_documents_file_runs_end_to_end(tmp_path, base_cache):
  path = tmp_path / "docs.jsonl"
  rows = [{"id": "a", "passage": "Ada was born in 1950 .",
           "questions": [{"q": "When was Ada born?", "answer": "1950", "aliases": ["in 1950"]}]},
          {"id": "b", "passage": "Bo works for Tekcorp .",
           "questions": [{"q": "Who employs Bo?", "answer": "Tekcorp"}],
           "train_questions": [{"q": "Where does Bo work?", "answer": "Tekcorp"}]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  c = _config(base_cache, methods=("sleep_no_dream",))
  c.data.source, c.data.documents, c.data.chunk_size = "jsonl", str(path), 2
  res = cycle.run_experiment(c, str(tmp_path / "run"), log=lambda *_: None)
  ans = res["methods"]["sleep_no_dream"]["seeds"]["0"]["answers"]
  assert [a["doc"] for a in ans] == ["a", "b"]
  assert ans[0]["gold"] == ["1950", "in 1950"] and isinstance(ans[0]["pred"], str)


def test_gated_capacity_sleep_runs_end_to_end(tmp_path, base_cache):
  """The capacity levers through the driver: added slots with hidden-layer gates, anchors and
  the gate term over every anchor position; the gate's metrics reach the training log."""
  c = _config(base_cache, methods=("sleep_no_dream",))
  k = c.consolidation
  c.model_slots, c.model_gate_hidden, k.slots, c.world_chunks = 4, 4, 2, 1
  k.gate_weight, k.gate_positions, k.anchor_prompts = 1.0, "anchor_all", 4
  res = cycle.run_experiment(c, str(tmp_path / "run"), log=lambda *_: None)
  assert res["methods"]["sleep_no_dream"]["seeds"]["0"]["answers"]
  with open(tmp_path / "run" / "runs" / "sleep_no_dream" / "seed_0" / "train_log.jsonl") as f:
    rows = [json.loads(line) for line in f]
  gated = [r for r in rows if "consolidation/gate_loss" in r]
  assert len(gated) == k.steps  # every consolidation step
  # A batch without an anchor item reports 0 for the anchors' mean gate.
  assert all(0.0 <= r["consolidation/gate_on_anchor"] < 1.0 for r in gated)
  assert all(0.0 < r["consolidation/gate_on_new"] < 1.0 for r in gated)


@pytest.mark.parametrize("line,msg", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"id": 1, "passage": "x"}', "bad.jsonl:2: 'questions' must be a non-empty list"),
    ('{"id": 1, "passage": "x", "questions": [{"q": "?"}]}', "bad.jsonl:2: every entry"),
    ('{"id": 1, "passage": "x", "questions": [{"q": "?", "answer": "a"}], "extra": 1}',
     "unknown fields"),
    ('{"id": 1, "passage": "x", "questions": [{"q": "?", "answer": "a"}], "title": 3}',
     "bad.jsonl:2: 'title'"),
])
def test_malformed_documents_name_the_line(tmp_path, line, msg):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"id": 0, "passage": "ok", "questions": [{"q": "?", "answer": "a"}]}\n' + line + "\n")
  with pytest.raises(documents.DocumentError, match=msg):
    documents.load_jsonl(str(p))


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown method 'slep'. Did you mean 'sleep'"):
    methods.get("slep")


_KILL_IN_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
calls, target, orig = [0], int(os.environ["KILL_AT_SAVE"]), ocp.StandardCheckpointHandler.finalize
def finalize(self, directory):  # the arrays are written, the step not yet committed: kill -9
  calls[0] += 1
  if calls[0] == target:
    os.kill(os.getpid(), signal.SIGKILL)
  return orig(self, directory)
ocp.StandardCheckpointHandler.finalize = finalize
from sleep_jax import main
main.run(sys.argv)
"""


def test_methods_draw_common_random_numbers(tmp_path, base_cache, reference):
  """Random numbers derive from (seed, chunk, phase), not from the method: Sleep whose dreaming
  accepts nothing (its own dreams off, no simulation in this task) trains exactly what Sleep
  without dreams trains, although it wrote, scored and tried dreams in between."""
  c = _config(base_cache, ("sleep",))
  c.dreaming.accept_own = False
  sleep = cycle.run_experiment(c, str(tmp_path), log=lambda *_: None)["methods"]["sleep"]
  sleep, plain = sleep["seeds"]["0"], reference("sleep_no_dream")
  assert sum(i.get("dreams_tried", 0) for i in sleep["info"]) > 0
  assert sum(i.get("dreams_accepted", 0) for i in sleep["info"]) == 0
  assert sleep["params_sha1"] == plain["params_sha1"] and sleep["R"] == plain["R"]


def test_kill_9_of_the_command_during_a_checkpoint_save_resumes_bit_identical(
    tmp_path, base_cache, reference):
  """A real SIGKILL of ``python -m sleep_jax.main`` in the middle of its second checkpoint save
  (after the first consolidation, whose curve points were already written): the same command
  then finishes as an uninterrupted run, with every curve point once."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = str(tmp_path / "w")
  args = ["--config=sleep_jax/configs/knowledge.py:test", "--config.methods=('sleep_no_dream',)",
          f"--config.base_cache={base_cache}", f"--workdir={work}"]
  env = dict(os.environ, KILL_AT_SAVE="2")
  p = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, *args], cwd=root, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  ckpt = os.path.join(work, "runs", "sleep_no_dream", "seed_0", "ckpt")
  assert sorted(os.listdir(ckpt))[:1] == ["1"] and not os.path.exists(
      os.path.join(ckpt, "2"))  # step 2 was never committed
  assert any("consolidation/loss" in r for r in _curves(work, "sleep_no_dream"))
  env.pop("KILL_AT_SAVE")
  p = subprocess.run([sys.executable, "-m", "sleep_jax.main", *args], cwd=root, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  with open(os.path.join(work, "results.json")) as f:
    b = json.load(f)["methods"]["sleep_no_dream"]["seeds"]["0"]
  a = reference("sleep_no_dream")
  assert a["params_sha1"] == b["params_sha1"] and a["R"] == b["R"]
  _same_curves(reference, work, "sleep_no_dream")  # killed after the commit, before the save


def _written_config(base_cache, chunks=1):
  """The test config with ``knowledge.py:written``'s consolidation items and dreaming."""
  c = _config(base_cache, methods=("sleep",))
  w = knowledge.get_config("written")
  c.consolidation.prompt_templates = w.consolidation.prompt_templates
  c.consolidation.ce_weight = 0.0
  for key in ("templates", "stage", "tau_target", "tau_scope", "trial_view", "qa_items",
              "sft_context"):
    c.dreaming[key] = w.dreaming[key]
  c.dreaming.max_new_tokens, c.world_chunks = 8, chunks
  return c


def _spy_items(monkeypatch):
  """{method: [(student prompts, gate targets, the episodic memory's stored dream questions)
  of each consolidation]}, filled as they run."""
  from sleep_jax.sleep import phases
  seen = {}
  original = phases._consolidate

  def spy(st, ctx, teacher, student, *args, **kwargs):
    seen.setdefault(ctx.name, []).append((student, kwargs.get("gate_targets"),
                                          st.memory.meta_by_id(phases.DREAM_QUESTIONS)))
    return original(st, ctx, teacher, student, *args, **kwargs)

  monkeypatch.setattr(phases, "_consolidate", spy)
  return seen


# "dreams" (not the variant's mode) runs with the slow tests: the default run's 10 minutes.
@pytest.mark.parametrize("mode", ["dreams_kept", pytest.param("dreams", marks=pytest.mark.slow)])
def test_written_regime_gives_no_task_question_and_later_sleeps_replay_the_dreams(
    tmp_path, base_cache, monkeypatch, mode):
  """``knowledge.py:written``'s settings through the driver. Consolidation's items are one
  ``Q: <name>`` per passage (no task question) and the questions of Sleep's accepted dreams,
  written and tried before consolidation. Those questions go to the episodic memory, and the
  next sleep replays them closed-book (``consolidation.replay_items``): as anchors, kept as the
  model woke up with the new slot's gate shut ("dreams_kept"), or taught again from the passage
  with the gate open ("dreams"), in place of the replayed passages' ``Q: <name>`` items; the
  deep sleep distils them too."""
  from sleep_jax.sleep import dream_qa, phases
  from sleep_jax.tasks import make_setup
  c = _written_config(base_cache, chunks=2)
  c.consolidation.replay_fraction, c.consolidation.replay_items = 1.0, mode
  seen = _spy_items(monkeypatch)
  # The seconds-trained test base writes no question/answer layout: every dream is read as
  # one question (its text) with some answer.
  monkeypatch.setattr(dream_qa, "parse_qa_pairs", lambda text: [(text, "an answer")])
  work = str(tmp_path / "run")
  res = cycle.run_experiment(c, work, log=lambda *_: None)
  setup = make_setup(c, work, log=lambda *_: None)
  questions = {q.q for d in setup.chunks[0] for q in d.train_questions}
  titles = {d.title for d in setup.chunks[0]}
  (first, _, before), (second, gates, stored), (deep, _, _) = seen["sleep"]
  # Chunk 0: one item per passage (what sleep_no_dream distils), then the model's questions.
  texts = [setup.tok.decode(p) for p in first[:len(titles)]]
  assert not any(q in x for q in questions for x in texts)
  assert {x.strip() for x in texts} == {f"Q: {t}" for t in titles}
  info = res["methods"]["sleep"]["seeds"]["0"]["info"]
  assert info[0]["dreams_accepted"] > 0  # the test config accepts every tried dream
  assert info[0]["dream_training_items"] == info[0]["dream_qa_pairs"] > 0
  n_anchors = int(c.consolidation.anchor_prompts)
  assert len(first) == len(titles) + info[0]["dream_training_items"] + n_anchors
  # Chunk 1 replays chunk 0's stored questions, not its passages' "Q: <name>" items.
  ids = [{d.id for d in ch} for ch in setup.chunks]
  assert before and set(before) <= ids[0] and set(stored) - set(before) <= ids[1]
  old = [setup.tok.decode(setup.fmt.closed_book(q)) for d in setup.chunks[0]
         for q in stored.get(d.id, [])]
  second = [setup.tok.decode(p) for p in second]
  assert old and all(x in second for x in old)
  assert info[1]["replayed_dream_questions"] == len(old)
  asked = {d.title for d in setup.chunks[0] if stored.get(d.id)}
  assert not {f"Q: {t}" for t in asked} & {x.strip() for x in second}
  assert {gates[second.index(x)] for x in old} == {1.0 if mode == "dreams" else 0.0}
  # The deep sleep (level 0 -> 1) distils the stored dream questions: the episodic memory
  # holds none of the task's questions either.
  deep = [setup.tok.decode(p) for p in deep]
  every = {q.q for ch in setup.chunks for d in ch for q in d.train_questions + d.eval_questions}
  assert all(x in deep for x in old) and not any(q in x for q in every for x in deep)
  with pytest.raises(ValueError, match="replay_items"):
    phases.replayed_dream_items(None, None, [], "everything")


def test_qa_trial_view_reads_a_dream_as_the_item_it_would_become(tmp_path, base_cache):
  """``trial_view = "qa"``: scoring and the trials read a question dream as its first question
  that names the passage's entity, asked closed-book, with the greedy answer of the model
  reading the passage; a dream with no such question gets an empty completion (zero SFT
  gradient: its trial cannot move tau)."""
  import numpy as np
  from sleep_jax.eval import qa as qa_eval
  from sleep_jax.model import transformer
  from sleep_jax.sleep import dream_batches, dream_inputs
  from sleep_jax.sleep.sleep_state import SleepState
  from sleep_jax.tasks import make_setup
  c = _config(base_cache)
  c.dreaming.templates = {"qa": "{context} Write questions about {title}."}
  c.dreaming.trial_view, c.dreaming.qa_items, c.dreaming.qa_named = "qa", True, True
  setup = make_setup(c, str(tmp_path / "run"), log=lambda *_: None)
  ctx = cycle.context(c, setup, "sleep", 0)
  st = SleepState(setup.params, transformer.slot_mask_none(setup.cfg))
  docs = setup.chunks[0][:2]
  dcfg = methods.dreaming_config(ctx.method, c.dreaming)
  prompts = [setup.fmt.dream_prompt(d.passage, c.dreaming.templates["qa"], d.title)
             for d in docs]
  q = f"{docs[0].title} was born in which year?"  # words the world's tokenizer knows
  texts = [f"Q: {q} A: 1950", f"Q: {q} A: 1950"]
  dreams = dream_batches.fixed_dreams(prompts, [setup.tok.encode(x) for x in texts],
                                      setup.tok.pad_id)
  view = dream_inputs.qa_view(st, ctx, docs, docs, dcfg)(dreams, np.array([0, 1]))
  toks, valid = np.asarray(view.tokens), np.asarray(view.valid)
  cm = np.asarray(view.completion_mask)
  [reader] = qa_eval.greedy_completions(
      setup.params, setup.cfg, [setup.fmt.with_context(docs[0].passage, q)],
      max_new_tokens=int(c.eval.max_new_tokens), stop_tokens=setup.fmt.stop_ids,
      pad_id=setup.tok.pad_id)
  assert toks[0][valid[0]].tolist() == (setup.fmt.closed_book(q) + list(reader)
                                        + [setup.fmt.stop_ids[0]])
  assert toks[0][cm[0]].tolist() == list(reader) + [setup.fmt.stop_ids[0]]
  assert not cm[1].any()  # dream 1 is about passage 1 but names passage 0's person


def test_keyed_slots_through_the_driver(tmp_path, base_cache, monkeypatch):
  """Keyed slots (``model_slot_keys``) through the driver: each sleep keys its new slots on its
  chunk's names, the deep sleep on every name the fast level held; a keyed sleep gets no anchor
  or replay rows (its slots could not see them); every probe that names none of the new people
  (old facts, reading, generic prompts) answers as the base did."""
  from sleep_jax.sleep import phases
  from sleep_jax.tasks import base as task_lib, make_setup
  c = _config(base_cache, ("sleep_no_dream",))
  c.model_slot_keys, c.model_slot_key_len = 24, 2
  c.consolidation.anchor_prompts, c.consolidation.replay_fraction = 8, 1.0
  seen = []
  original = phases._consolidate

  def spy(st, ctx, teacher, student, *args, **kwargs):
    seen.append((student, kwargs.get("keys")))
    return original(st, ctx, teacher, student, *args, **kwargs)

  monkeypatch.setattr(phases, "_consolidate", spy)
  work = str(tmp_path / "run")
  res = cycle.run_experiment(c, work, log=lambda *_: None)
  setup = make_setup(c, work, log=lambda *_: None)
  assert len(setup.anchor_prompts) >= 8
  (first, k0), (second, k1), (_, kd) = seen
  names = [task_lib.entity_names(setup, ch) for ch in setup.chunks[:2]]
  assert k0 == names[0] and k1 == names[1]
  # The deep sleep distils both chunks out of level 0: its slot answers to all their names.
  assert set(map(tuple, kd)) == set(map(tuple, names[0] + names[1]))
  for t, items in enumerate((first, second)):  # the chunk's own items only
    assert items == task_lib.student_prompts(setup, setup.chunks[t])
  final = res["methods"]["sleep_no_dream"]["seeds"]["0"]["metrics"]
  for probe in ("retention_qa_change", "in_context_heldout_change", "kl_to_base"):
    assert final[probe] == 0.0, (probe, final)


def test_sft_and_grpo_get_the_replay_the_consolidation_gets():
  """``consolidation.replay_fraction``: SFT and GRPO learn from chunk t plus the same number of
  earlier documents a sleep replays (same data for every method), drawn from earlier chunks
  only; none without replay or in the first chunk."""
  c = knowledge.get_config("test")
  chunks = [[f"a{i}" for i in range(4)], [f"b{i}" for i in range(4)], [f"c{i}" for i in range(4)]]
  ctx = types.SimpleNamespace(config=c, setup=types.SimpleNamespace(chunks=chunks),
                              key=lambda *p: jax.random.fold_in(jax.random.key(0), len(p)))
  assert phases.chunk_with_replay(ctx, 2) == chunks[2]  # replay_fraction 0
  c.consolidation.replay_fraction = 0.5
  assert phases.chunk_with_replay(ctx, 0) == chunks[0]
  docs = phases.chunk_with_replay(ctx, 2)
  assert docs[:4] == chunks[2] and len(docs) == 6
  assert set(docs[4:]) <= set(chunks[0] + chunks[1]) and len(set(docs[4:])) == 2
  assert docs[4:] == phases.replayed_documents(ctx, 2, 0.5)


def test_replayed_passages_kept_are_anchors_with_the_gate_shut(tmp_path, base_cache,
                                                               monkeypatch):
  """``consolidation.replay_items = "passages_kept"``: a later sleep's replayed documents bring
  their own questions as anchors (closed-book on both sides: the model as it woke up answers
  them, gate target 0), never as new items with the passage in the teacher's prompt."""
  from sleep_jax.model import transformer
  from sleep_jax.sleep.sleep_state import SleepState
  from sleep_jax.tasks import base as task_lib, make_setup
  c = _config(base_cache, methods=("sleep_no_dream",))
  c.consolidation.replay_fraction, c.consolidation.replay_items = 1.0, "passages_kept"
  setup = make_setup(c, str(tmp_path / "run"), log=lambda *_: None)
  seen = []

  def spy(st, ctx, teacher, student, *args, **kwargs):  # what the sleep would train on
    seen.append((teacher, student, kwargs.get("gate_targets")))
    return types.SimpleNamespace(params=st.params, slot_mask=st.slot_mask, slot=0, history=[])

  monkeypatch.setattr(phases, "_consolidate", spy)
  ctx = cycle.context(c, setup, "sleep_no_dream", 0)
  phases.consolidate(SleepState(setup.params, transformer.slot_mask_none(setup.cfg)), ctx, 1)
  (teacher, student, gates), = seen
  new = task_lib.student_prompts(setup, setup.chunks[1])
  assert student[:len(new)] == new and gates[:len(new)] == [1.0] * len(new)
  old = task_lib.student_prompts(setup, setup.chunks[0])
  replayed = [(t, g) for t, s, g in zip(teacher, student, gates) if s in old]
  assert replayed and all(g == 0.0 and t in old for t, g in replayed)
  assert len(student) == len(new) + len(replayed) + int(c.consolidation.anchor_prompts)
  passages = [setup.tok.decode(t) for t in teacher]
  assert not any(d.passage in p for d in setup.chunks[0] for p in passages)
  c.consolidation.replay_items = "passages"  # the default: taught again from the passage
  phases.consolidate(SleepState(setup.params, transformer.slot_mask_none(setup.cfg)), ctx, 1)
  teacher, student, gates = seen[-1]
  assert all(g == 1.0 for s, g in zip(student, gates) if s in old)
  assert any(d.passage in setup.tok.decode(t) for d in setup.chunks[0] for t in teacher)


def test_sft_items_trains_on_the_consolidation_items_only_when_there_are_some(base_cache,
                                                                               tmp_path):
  """``sft_items`` is SFT plus the consolidation's passage items with the model's own answers:
  ``prompt_templates`` change what it learns and leave SFT's bits alone (no method gets the
  templates' data but those that ask for it)."""
  def digests(templates, work):
    c = _config(base_cache, ("sft", "sft_items"))
    c.consolidation.prompt_templates = templates
    res = cycle.run_experiment(c, str(work), log=lambda *_: None)["methods"]
    return [res[m]["seeds"]["0"]["params_sha1"] for m in ("sft", "sft_items")]
  sft, items = digests((), tmp_path / "none")
  sft2, items2 = digests(("{context} Q: {title}",), tmp_path / "tpl")
  assert sft2 == sft and items2 != items


def test_deep_sleep_moves_the_consolidation_items_when_no_question_was_given(base_cache,
                                                                              tmp_path):
  """With ``prompt_templates`` the episodic memory holds no questions; without dreams the deep
  sleep moves the fast level with the documents' own items (it once had no item at all)."""
  c = _config(base_cache, ("sleep_no_dream",))
  c.consolidation.prompt_templates = ("{context} Q: {title}",)
  res = cycle.run_experiment(c, str(tmp_path), log=lambda *_: None)
  live = res["methods"]["sleep_no_dream"]["seeds"]["0"]["live_slots"]
  assert sum(live[1]) >= 1  # the deep sleep unlocked a slot of level 1 and trained it


def test_seal_studies_its_accepted_dreams_in_the_query_format(base_cache, tmp_path,
                                                              monkeypatch):
  """SEAL trains its accepted dreams into the existing weights after what ``sft_selfgen``
  studies them after: a dream written after "<passage> Q:" follows "Q:", not bare bos."""
  from sleep_jax.sleep import dream_phase
  from sleep_jax.tasks import make_setup
  seen, fit = [], dream_phase.fit_lib.fit_rows

  def spy(params, mask, cfg, rows, *args, **kwargs):
    seen.append(rows["tokens"])
    return fit(params, mask, cfg, rows, *args, **kwargs)
  monkeypatch.setattr(dream_phase.fit_lib, "fit_rows", spy)
  c = _config(base_cache, ("seal",))
  c.world_chunks = 1
  c.dreaming.templates, c.dreaming.copy_title = {"question": "{context} Q:"}, True
  cycle.run_experiment(c, str(tmp_path / "run"), log=lambda *_: None)
  assert seen, "SEAL trained nothing: the test config accepts every kept dream"
  head = make_setup(c, str(tmp_path / "setup"), log=lambda *_: None).fmt.dream_prompt(
      "", "{context} Q:")
  assert len(head) > 1 and all(list(r[:len(head)]) == head for r in seen[-1])


def test_sleep_over_more_levels_cascades_each_chunk_to_the_slowest_level_in_use(
    base_cache, tmp_path):
  """``model_levels`` = 4 (two empty slots-only levels before the MLP level) with
  ``sleep_every`` = (1, 1, 1, 1): every sleep moves its fast level down the levels the method
  uses and prunes each source, so both chunks end in the slowest level (``sleep_2_levels``
  stops at level 1: ``sleep_schedule``'s truncation, tests/test_long_horizon_cycle.py).
  ``sleep_l4`` (no dreaming) runs the schedule ``sleep_4_levels`` runs with its dreams."""
  from sleep_jax.tasks import make_setup
  method, held = "sleep_l4", (0, 0, 0, 2)
  c = _config(base_cache, (method,))
  c.model_levels, c.sleep_every = 4, (1, 1, 1, 1)
  c.model_slot_keys, c.model_slot_key_len = 24, 2
  work = str(tmp_path / "run")
  res = cycle.run_experiment(c, work, log=lambda *_: None)["methods"][method]["seeds"]["0"]
  assert tuple(sum(live) for live in res["live_slots"]) == held
  setup = make_setup(c, work, log=lambda *_: None)
  assert setup.cfg.n_levels == 4 and setup.cfg.d_ff[1:3] == (0, 0)
