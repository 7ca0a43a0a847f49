"""The phases of one wake/sleep chunk, as functions ``phase(state, ctx, t) -> (state, metrics)``.

``state`` is the run's ``SleepState``; ``ctx`` (``run_context.Context``) holds what does not
change during a run: the config, the task's ``Setup``, the method, the seed and the callbacks.
Which phases run for a method is the table's business (``methods.METHODS``): a phase that has
nothing to do for it returns the state unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import jax
import numpy as np

from sleep_jax.eval import answers
from sleep_jax.model import growth, slot_keys
from sleep_jax.sleep import consolidation, consolidation_config, dream_qa, dreaming, teacher_trust
from sleep_jax.sleep import methods as methods_lib
from sleep_jax.sleep.memory import Episode
from sleep_jax.sleep.run_context import Context, with_progress
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import base as task_lib
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import state as state_lib

Metrics = Dict[str, Any]
FAST_LEVEL = 0  # the CMS level a chunk's consolidation (and its dreams) write into
DREAM_QUESTIONS = "dream_questions"  # episodic-memory meta: a passage's accepted dream questions


# ----------------------------------------------------------------------------------------------
# Wake and evaluation.
# ----------------------------------------------------------------------------------------------
def wake(st: SleepState, ctx: Context, t: int) -> Tuple[SleepState, Metrics]:
  """The chunk arrives: its passages and questions go to the episodic memory; the model answers
  with the passage in context (the in-context score)."""
  docs = ctx.setup.chunks[t]
  # With ``consolidation.prompt_templates`` no method gets the task's questions: the memory
  # keeps the passages only (a sleep adds its accepted dreams' questions to them).
  asked = not ctx.config.consolidation.get("prompt_templates", ())
  st.memory.add([Episode(id=d.id, context=d.passage, cycle=t,
                         prompts=[q.q for q in d.train_questions] if asked else [])
                 for d in docs])
  return st, answers.wake_score(ctx.setup, st.params, st.slot_mask, docs, ctx.config.eval)


def evaluate(st: SleepState, ctx: Context, t: int) -> Tuple[SleepState, Metrics]:
  """Row t of R; the answers of the latest row (with ``eval.rows="latest"``: of every chunk's
  own row)."""
  e = ctx.config.eval
  in_ctx = ctx.method.in_context or bool(e.in_context)
  row, recs = answers.eval_row(ctx.setup, st.params, st.slot_mask, e, t, in_ctx)
  st.R.append(row)
  st.answers = st.answers + recs if e.rows == "latest" else recs
  if int(e.get("samples", 0)) > 0:  # avg@k / pass@k of every chunk (verifiable tasks)
    return st, answers.sampled_row(ctx.setup, st.params, st.slot_mask, e, ctx.key(t, "eval"))
  return st, {}


# ----------------------------------------------------------------------------------------------
# Consolidation (memory level 0 -> CMS level 0) and deep sleep (level l-1 -> l).
# ----------------------------------------------------------------------------------------------
def _consolidate(st: SleepState, ctx: Context, teacher, student, kcfg, t, phase, golds=None,
                 gate_targets=None, keys=None):
  judge = None
  if kcfg.gamma > 0 and kcfg.alpha < 1:
    from sleep_jax.losses.rewards import ModelJudge
    # The frozen judge is the model as it woke up (before this sleep changed anything).
    judge = ModelJudge(st.params, ctx.setup.cfg, ctx.setup.tok.encode, slot_mask=st.slot_mask,
                       pad_id=ctx.setup.tok.pad_id)
  verify = None
  if kcfg.get("verify_teacher", False) and golds is not None:
    verify = teacher_trust.answer_verifier(golds, ctx.setup.tok.decode, ctx.setup.fmt.stop_ids,
                                           ctx.config.eval.metric)
  return with_progress(ctx, t, phase, int(kcfg.steps), lambda on_step: consolidation.consolidate(
      st.params, st.slot_mask, ctx.setup.cfg, teacher, student, kcfg, ctx.key(t, phase),
      stop_tokens=ctx.setup.fmt.stop_ids, pad_id=ctx.setup.tok.pad_id,
      decode=ctx.setup.tok.decode, judge=judge, on_step=on_step, golds=golds,
      gate_targets=gate_targets, keys=keys, verify=verify))


def consolidate(st: SleepState, ctx: Context, t: int, extra=None,
                anchors=()) -> Tuple[SleepState, Metrics]:
  """Knowledge Seeding from the model that sees the passage into a new slot of CMS level 0 (the
  SFT baselines fine-tune here instead).

  The items are the task's wake questions, or with ``consolidation.prompt_templates`` one item
  per document and template (the task's questions go to no method), plus ``extra``
  (teacher prompts, student prompts): questions the model wrote about the passages
  (``dream_phase.consolidate``), with no supported answer given. Replayed documents of earlier
  chunks bring their own items or their stored dream questions (``consolidation.replay_items``).
  ``anchors``: more anchor prompts for this sleep (e.g. decoys about no one)."""
  m = ctx.method
  if m.learn == "sft":
    st.params = sft(st, ctx, t)
    return st, {}
  if m.learn == "grpo":
    st.params, out = grpo_learn(st, ctx, t)
    return st, out
  if m.learn != "sleep" or m.consolidation is None:
    return st, {}
  kcfg = methods_lib.consolidation_config(m, ctx.config.consolidation)
  kcfg.source_level, kcfg.target_level = -1, FAST_LEVEL
  # A keyed slot (model/slot_keys.py) is shut on every input that does not name this chunk's
  # people: replayed documents and anchors could not reach it and would only take rows from
  # the new items. Methods that train existing weights keep them.
  keyed = _keyed(st, m)  # (a keyed jsonl setup has titles: tasks/world.py: jsonl_setup)
  replayed = [] if keyed else replayed_documents(ctx, t, float(kcfg.replay_fraction))
  mode = str(kcfg.get("replay_items", "passages"))
  old_teacher, old_student, covered = replayed_dream_items(st, ctx, replayed, mode)
  n_replayed = len(old_student)
  if mode == "passages_kept":  # the replayed documents' own items, as anchors (below)
    old_student, covered = task_lib.student_prompts(ctx.setup, replayed), {d.id for d in replayed}
  docs = ctx.setup.chunks[t] + [d for d in replayed if d.id not in covered]
  anchors = [] if keyed else ctx.setup.anchor_prompts[:int(kcfg.anchor_prompts)] + (
      task_lib.value_anchors(ctx.setup, docs, int(kcfg.get("value_anchors", 0)),
                             np.random.default_rng([ctx.seed, t])) + list(anchors))
  if mode in ("dreams_kept", "passages_kept"):  # kept as the model woke up, new slot shut
    anchors, old_teacher, old_student = anchors + old_student, [], []
  templates = tuple(kcfg.get("prompt_templates", ()))
  if templates:
    teacher, student = task_lib.template_items(ctx.setup, docs, templates)
    golds = [[]] * len(student)
  else:
    teacher, student = (task_lib.teacher_prompts(ctx.setup, docs),
                        task_lib.student_prompts(ctx.setup, docs))
    golds = task_lib.gold_answers(ctx.setup, docs)
  extra = extra or ([], [])
  teacher = teacher + list(extra[0]) + old_teacher
  student = student + list(extra[1]) + old_student
  golds = golds + [[]] * (len(student) - len(golds))
  # A keyed model's new slots answer only to the names of this chunk's documents.
  res = _consolidate(st, ctx, teacher + anchors, student + anchors, kcfg, t, "consolidation",
                     golds=golds + [[]] * len(anchors),
                     gate_targets=[1.0] * len(student) + [0.0] * len(anchors),
                     keys=task_lib.entity_names(ctx.setup, ctx.setup.chunks[t]) if keyed else None)
  st.params, st.slot_mask, st.slot = res.params, res.slot_mask, res.slot
  out = {"consolidation_loss": res.history[-1].get("loss") if res.history else None}
  if res.history and "teacher_verified" in res.history[-1]:
    out["teacher_verified"] = res.history[-1]["teacher_verified"]
  if mode.startswith("dreams"):  # how many earlier dream questions this sleep replayed
    out["replayed_dream_questions"] = n_replayed
  bad = [i for i, h in enumerate(res.history) if not math.isfinite(h.get("loss", 0.0))]
  if bad:  # the run stops on it (cycle.check_finite), naming this step
    out["nonfinite_step"] = bad[0]
  return st, out


def _keyed(st: SleepState, method: methods_lib.Method) -> bool:
  """Whether this method's consolidation writes into keyed slots (model/slot_keys.py)."""
  return "slot_keys" in st.params and method.expands


def replayed_dream_items(st: SleepState, ctx: Context, replayed, mode: str):
  """(teacher prompts, student prompts, ids of the documents they are about) of the replayed
  documents' stored dream questions (``consolidation.replay_items``): the teacher reads the
  passage, the student is asked closed-book. Empty for ``"passages"`` and
  ``"passages_kept"``."""
  if mode not in consolidation_config.REPLAY_ITEMS:
    raise ValueError(f"consolidation.replay_items={mode!r}; valid: "
                     + ", ".join(map(repr, consolidation_config.REPLAY_ITEMS)))
  if mode in ("passages", "passages_kept"):
    return [], [], set()
  stored = st.memory.meta_by_id(DREAM_QUESTIONS)
  triples = [(d.passage, q, "") for d in replayed for q in stored.get(d.id, [])]
  return (*dream_qa.qa_items(ctx.setup.fmt, triples),
          {d.id for d in replayed if stored.get(d.id)})


def replayed_documents(ctx: Context, t: int, fraction: float) -> list:
  """Replay: ``fraction`` x as many documents as chunk t has, drawn uniformly from the earlier
  chunks (their passages are the episodic memory), so a sleep re-distils what earlier sleeps
  stored instead of overwriting it. The draw depends on (seed, chunk) only: every method
  replays the same documents."""
  old = [d for ch in ctx.setup.chunks[:t] for d in ch]
  n = min(len(old), int(round(fraction * len(ctx.setup.chunks[t]))))
  if n == 0:
    return []
  pick = jax.random.choice(ctx.key(t, "replay"), len(old), (n,), replace=False)
  return [old[int(i)] for i in np.asarray(pick)]


def chunk_with_replay(ctx: Context, t: int) -> list:
  """Chunk t's documents plus the replayed earlier ones (``consolidation.replay_fraction``):
  the learners that train existing weights (SFT, GRPO) get the replay the consolidation gets,
  so that every method sees the same data."""
  frac = float(ctx.config.consolidation.get("replay_fraction", 0.0))
  return list(ctx.setup.chunks[t]) + replayed_documents(ctx, t, frac)


def deep_sleep(st: SleepState, ctx: Context, t: int) -> Tuple[SleepState, Metrics]:
  """The cascade, fastest level first: CMS level l-1 -> l for every level due after chunk t."""
  if ctx.method.learn != "sleep":
    return st, {}
  for level in methods_lib.levels_due(ctx.schedule, t):
    st = _deep_level(st, ctx, t, level)
  return st, {}


def _deep_level(st: SleepState, ctx: Context, t: int, level: int) -> SleepState:
  """Level ``level - 1`` -> ``level`` from the episodic memory's questions of the last ``C_level``
  chunks (what the source level has held since it was last pruned), then prune it."""
  c = ctx.config
  kcfg = methods_lib.consolidation_config(ctx.method, c.consolidation)
  if not kcfg.expand:
    return st
  # Level 1 keeps the 2-level driver's random streams (same results); deeper levels their own.
  rng = np.random.default_rng([ctx.seed, t] if level == 1 else [ctx.seed, t, level])
  phase = "deep" if level == 1 else f"deep{level}"
  eps = [e for k in range(t - ctx.schedule[level] + 1, t + 1)
         for e in st.memory.sample_for_sleep(k, rng, float(c.consolidation.replay_fraction))]
  # The wake questions, or where the task gave none, the accepted dreams' questions, or where
  # a sleep accepted none, the document's consolidation items (``prompt_templates``).
  prompts = [p for e in eps for p in _deep_prompts(ctx, e)]
  kcfg.source_level, kcfg.target_level = level - 1, level
  kcfg.alpha, kcfg.lam = 1.0, float(c.deep_lam)  # fast level -> slow level: pure GKD
  kcfg.ce_weight = 0.0  # the source is a CMS level: no document answers to anchor on
  # The same anchors (and gate) as the fast sleep: the slow level's new capacity must not
  # disturb what it was not trained for either. Measured on the world (README, fourteenth
  # session): reading skill after the stream 54% without them, 78% with them.
  anchors = ctx.setup.anchor_prompts[:int(kcfg.anchor_prompts)]
  # A keyed model's target slot answers to every name the source level's slots held (and is
  # shut on the anchors, which then have nothing to do).
  keys = None
  if _keyed(st, ctx.method):
    keys = slot_keys.held(st.params, level - 1, growth.live_slots(st.slot_mask, level - 1))
    anchors = []
  res = _consolidate(st, ctx, prompts + anchors, prompts + anchors, kcfg, t, phase,
                     gate_targets=[1.0] * len(prompts) + [0.0] * len(anchors), keys=keys)
  st.params, st.slot_mask = res.params, res.slot_mask
  return st


def _deep_prompts(ctx: Context, e: Episode) -> list:
  """The closed-book prompts a deep sleep moves an episode's knowledge with."""
  qs = e.prompts or e.meta.get(DREAM_QUESTIONS, [])
  templates = tuple(ctx.config.consolidation.get("prompt_templates", ()))
  if qs or not templates:
    return [ctx.setup.fmt.closed_book(q) for q in qs]
  doc = next(d for d in ctx.setup.chunks[e.cycle] if d.id == e.id)
  return task_lib.template_items(ctx.setup, [doc], templates)[1]


# ----------------------------------------------------------------------------------------------
# Baselines that fine-tune every parameter.
# ----------------------------------------------------------------------------------------------
def sft(st: SleepState, ctx: Context, t: int):
  """SFT on the chunk's passages (TTT: on task variants), plus self-written dreams (``selfgen``),
  the consolidation's items with the model's own answers (``items``), the wake questions."""
  c, s, docs = ctx.config, ctx.setup, chunk_with_replay(ctx, t)
  if ctx.method.variants:
    # TTT: the demonstrations as leave-one-out tasks plus task variants, loss on the answers.
    rows, starts = task_lib.variant_rows(s, docs, np.random.default_rng([ctx.seed, t, 29]),
                                         int(c.sft.variants))
  else:
    rows, starts = task_lib.passage_rows(s, docs)
  if ctx.method.questions:
    # The wake questions with their supported answers, closed-book: the data consolidation
    # distils on, so SFT can be compared with Sleep on equal data.
    q_rows, q_starts = task_lib.question_rows(s, docs)
    rows, starts = rows + q_rows, starts + q_starts
  if ctx.method.items:
    i_rows, i_starts = item_rows(st, ctx, t, docs)
    rows, starts = rows + i_rows, starts + i_starts
  batch = task_lib.pad_rows(rows, starts, int(c.seq_len), s.tok.pad_id)
  if ctx.method.selfgen:
    dcfg = c.dreaming
    out = dreaming.sample_dreams(st.params, s.cfg, st.slot_mask,
                                 task_lib.dream_prompts(s, docs, dcfg.templates),
                                 ctx.key(t, "selfgen"), int(dcfg.m), int(dcfg.max_new_tokens),
                                 float(dcfg.temperature), bool(dcfg.random_expert),
                                 stop_tokens=s.fmt.stop_ids, pad_id=s.tok.pad_id,
                                 copy=task_lib.entity_copy(s, docs, dcfg.templates,
                                                           bool(dcfg.copy_title)))
    # A dream written after "Q: <name>" is studied after it (the query format), others alone.
    heads = task_lib.dream_heads(s.fmt, docs, dcfg.templates, bool(dcfg.copy_title))
    extra = dreams_as_rows(dreaming.as_dreams(out), [heads[i % len(heads)]
                                                     for i in range(int(dcfg.m))],
                           int(c.seq_len), s.tok.pad_id)
    batch = {k: np.concatenate([batch[k], extra[k]]) for k in batch}
  return with_progress(ctx, t, "sft", int(c.sft.steps), lambda on_step: fit_lib.fit_rows(
      st.params, st.slot_mask, s.cfg, batch, state_lib.all_trainable(st.params),
      steps=int(c.sft.steps), opt_cfg=c.sft.optimizer, batch_size=int(c.sft.batch_size),
      rng=ctx.key(t, "sft"), loss=c.sft.loss, on_step=on_step), hook=False)


def item_rows(st: SleepState, ctx: Context, t: int, docs) -> tuple:
  """The consolidation's passage items (``consolidation.prompt_templates``) as closed-book SFT
  rows: the student's prompt followed by each answer the model reading the passage wrote (the
  teacher dataset D of ``consolidation.teacher_completions``, drawn with the consolidation's
  own settings), loss on the answer. Returns (rows, loss starts); none without templates."""
  kcfg = ctx.config.consolidation
  templates = tuple(kcfg.get("prompt_templates", ()))
  if not templates:
    return [], []
  teacher, student = task_lib.template_items(ctx.setup, docs, templates)
  comps = consolidation.teacher_completions(
      consolidation.Teacher(st.params, ctx.setup.cfg, st.slot_mask, teacher), kcfg,
      ctx.key(t, "items"), stop_tokens=ctx.setup.fmt.stop_ids, pad_id=ctx.setup.tok.pad_id)
  pairs = [(p, c) for p, cs in zip(student, comps) for c in cs]
  return [list(p) + c for p, c in pairs], [len(p) for p, _ in pairs]


def grpo_learn(st: SleepState, ctx: Context, t: int):
  """GRPO (``train/grpo.py``, ``config.grpo``) on chunk t's wake questions asked closed-book,
  every parameter; the reward of a completion is the task's score of it against the question's
  supported answers (``eval.metric``: for arithmetic the checker). Returns (params, metrics)."""
  from sleep_jax.eval import qa as qa_eval
  from sleep_jax.train import grpo
  s, c = ctx.setup, ctx.config
  if "grpo" not in c:
    raise ValueError("method 'grpo' needs a config.grpo block (configs/reasoning.py has one)")
  qs = [q for d in chunk_with_replay(ctx, t) for q in d.train_questions]
  prompts = [s.fmt.closed_book(q.q) for q in qs]
  stop, metric = set(s.fmt.stop_ids), str(c.eval.metric)

  def reward(i: int, completion) -> float:
    text = s.tok.decode([x for x in completion if x not in stop])
    return float(qa_eval.score_answers([text], [qs[i].golds])[metric][0])

  params, hist = with_progress(ctx, t, "grpo", int(c.grpo.rounds), lambda on_step: grpo.train(
      st.params, st.slot_mask, s.cfg, prompts, reward, c.grpo, ctx.key(t, "grpo"),
      trainable=state_lib.all_trainable(st.params), stop_tokens=s.fmt.stop_ids,
      pad_id=s.tok.pad_id, on_round=on_step), hook=False)
  return params, {"grpo_reward_first_round": hist[0]["reward_mean"],
                  "grpo_reward_last_round": hist[-1]["reward_mean"],
                  "grpo_loss": hist[-1].get("loss")}


def dreams_as_rows(dreams: dreaming.Dreams, prefix, seq_len: int, pad_id: int):
  """Dreams become closed-book training rows: ``prefix + completion`` (the passage that prompted
  them is not shown, as in SEAL's self-edits), loss on the completion. ``prefix``: one token
  list for every row, or a list of them (one per row)."""
  toks = np.asarray(dreams.tokens)
  cm = np.asarray(dreams.completion_mask, bool)
  heads = prefix if prefix and isinstance(prefix[0], (list, tuple)) else [prefix] * len(toks)
  rows = [list(h) + t[m].tolist() for h, t, m in zip(heads, toks, cm)]
  return task_lib.pad_rows(rows, [len(h) for h in heads], seq_len, pad_id)
