"""The dreaming phase of a chunk and the dream generator's training before the stream
(docs/method.md section 4), as ``phase(state, ctx, t) -> (state, metrics)`` functions
(see ``phases.py``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from sleep_jax.eval import qa as qa_eval
from sleep_jax.sleep import consolidation, dream_batches, dream_qa, dream_sim, dreaming, phases
from sleep_jax.sleep import methods as methods_lib
from sleep_jax.sleep.dream_inputs import closed_book_view, dream_inputs, dream_texts, qa_view
from sleep_jax.sleep.phases import dreams_as_rows
from sleep_jax.sleep.run_context import Context, with_progress
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import base as task_lib
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import state as state_lib

Metrics = Dict[str, Any]


def _dream(st: SleepState, ctx: Context, docs, rng_np, key, t: Optional[int] = None,
           dream_docs=None, simulated: Optional[dream_sim.Simulated] = None):
  """Dreaming on ``docs`` (dreams written from ``dream_docs``, by default ``docs``); for chunk
  ``t`` (not the generator's training) under a progress bar that moves at each stage of a round,
  with one point per round on the training curves. ``simulated``: dream simulation's verified
  trajectories, offered as candidates."""
  dcfg = methods_lib.dreaming_config(ctx.method, ctx.config.dreaming)
  prompts, tau, cand, tau_doc = dream_inputs(st, ctx, docs, dcfg, rng_np, key, dream_docs)
  if simulated is not None and simulated.candidates is not None:
    cand = simulated.candidates if cand is None else dream_batches.concat_dreams(
        cand, simulated.candidates, ctx.setup.tok.pad_id)
  groups = None
  if dcfg.tau_scope not in ("all", "passage"):
    raise ValueError(f"dreaming.tau_scope={dcfg.tau_scope!r}; valid: 'all', 'passage'")
  if dcfg.tau_scope == "passage":  # each trial on its own passage's tau questions
    index = {d.id: i for i, d in enumerate(docs)}
    groups = (tau_doc, np.asarray([index[d.id] for d in (dream_docs or docs)
                                   for _ in dcfg.templates], np.int32))
  if dcfg.trial_view not in ("as_written", "closed_book", "qa"):
    raise ValueError(f"dreaming.trial_view={dcfg.trial_view!r}; valid: 'as_written', "
                     "'closed_book', 'qa'")
  copy_title = bool(dcfg.copy_title)
  view = (closed_book_view(ctx.setup.fmt, dream_docs or docs, dcfg.templates, copy_title)
          if dcfg.trial_view == "closed_book" else
          qa_view(st, ctx, docs, dream_docs or docs, dcfg) if dcfg.trial_view == "qa" else None)
  run = lambda on_round, on_stage=None: dreaming.dream(
      st.params, ctx.setup.cfg, st.slot_mask, prompts, tau, key, dcfg, generator=st.generator,
      stop_tokens=ctx.setup.fmt.stop_ids, pad_id=ctx.setup.tok.pad_id, candidates=cand,
      on_round=on_round, trial_view=view, task_groups=groups,
      copy=task_lib.entity_copy(ctx.setup, dream_docs or docs, dcfg.templates, copy_title),
      on_stage=on_stage)
  if t is None:
    return run(None)
  return with_progress(ctx, t, "dreaming", int(dcfg.rounds), run, hook=False,
                       stages=dreaming.STAGES)


def _written_and_kept(st: SleepState, ctx: Context, t: int):
  """The chunk's dreaming (rounds of write, score, select, try, ReST-EM) and what it wrote and
  kept: (state with the generator, result, info, (passage, question, answer) triples of the
  accepted question dreams, the documents the dreams were written from)."""
  m, c = ctx.method, ctx.config
  dcfg = methods_lib.dreaming_config(m, c.dreaming)
  docs = ctx.setup.chunks[t]
  ddocs, originals = dream_qa.focused_documents(docs, dcfg.focus)
  sim = None
  if int(dcfg.simulate) > 0:
    if ctx.setup.environments is None:
      raise ValueError("dreaming.simulate > 0 needs a task with checkable environments "
                       "(Setup.environments: data.source='arith')")
    sim = dream_sim.simulate(st.params, ctx.setup, st.slot_mask, dcfg,
                             int(ctx.config.eval.max_new_tokens), ctx.key(t, "simulation"))
    ctx.poll("dream simulation")
  res = _dream(st, ctx, docs, np.random.default_rng([ctx.seed, t, 17]),
               ctx.key(t, "dreaming"), t, dream_docs=ddocs, simulated=sim)
  if not c.reset_between_chunks:
    st.generator = res.generator  # per-task reset: every task starts from the trained one
  ctx.hook("dreaming", t, 0)
  info = {"dreams_written": len(res.written),  # by the generator (offered variants come on top)
          "dreams_tried": sum(x["n_tried"] for x in res.metrics),
          "dreams_accepted": len(res),
          # of them written by the model (the rest are the task variants it was offered)
          "dreams_accepted_own": int(np.sum(res.prompt_index >= 0)),
          "dream_acceptance": float(np.mean([x["acceptance_rate"] for x in res.metrics]))
          if res.metrics else 0.0}
  if sim is not None:
    info.update(sim.info)
    info["trajectories_accepted"] = int(np.sum(res.prompt_index < 0))
  triples = []
  back = dict(zip((d.passage for d in ddocs), originals))
  # What was written and what was accepted, measured the same way: does selection keep the
  # dreams that are about the passage?
  qa = "qa" in dcfg.templates or bool(dcfg.qa_items)
  measure = dream_qa.quality if qa else dream_qa.continuation_quality
  copy_title = bool(dcfg.copy_title)
  texts, passages = dream_texts(ctx.setup.tok, ddocs, dcfg.templates, res.written, copy_title)
  passages = [back[p] for p in passages]
  info.update({f"written_{k}": v for k, v in measure(texts, passages).items()})
  texts, passages = dream_texts(ctx.setup.tok, ddocs, dcfg.templates, [
      (r[c_].tolist(), int(pi)) for r, c_, pi in zip(
          np.asarray(res.dreams.tokens), np.asarray(res.dreams.completion_mask, bool),
          np.asarray(res.prompt_index))], copy_title)
  passages = [back[p] for p in passages]
  info.update(measure(texts, passages))
  if qa:  # dreams asked to be questions about the passage
    titles, named = {d.passage: d.title for d in docs}, bool(dcfg.get("qa_named", False))
    triples = [(p, q, a) for x, p in zip(texts, passages)
               for q, a in dream_qa.entity_pairs(x, titles[p], named)]
    info["dream_qa_pairs"] = len(triples)
    info["dream_fact_coverage"] = dream_qa.fact_coverage(triples, docs)
  return st, res, info, triples, ddocs, sim


def _before(ctx: Context) -> bool:
  """Whether this method's dreams are written before consolidation and distilled with it
  (a method without consolidation, SEAL, trains its accepted dreams after, as always)."""
  if not uses_generator(ctx.method):
    return False
  stage = methods_lib.dreaming_config(ctx.method, ctx.config.dreaming).stage
  if stage not in ("before", "after"):
    raise ValueError(f"dreaming.stage={stage!r}; valid: 'before', 'after'")
  return stage == "before" and ctx.method.consolidation is not None


def consolidate(st: SleepState, ctx: Context, t: int) -> Tuple[SleepState, Metrics]:
  """The consolidation phase. With ``dreaming.stage = "before"`` the chunk's dreams come first:
  the questions of the accepted ones (each answered by the model reading the passage) join the
  items consolidation distils, in the same steps; otherwise ``phases.consolidate`` alone."""
  if not _before(ctx):
    return phases.consolidate(st, ctx, t)
  st, res, info, triples, _, sim = _written_and_kept(st, ctx, t)
  teacher, student = dream_qa.qa_items(ctx.setup.fmt, triples) if triples else ([], [])
  if sim is not None:  # accepted verified trajectories join the items (dream simulation)
    t_sim, s_sim = simulated_items(ctx.setup, res, sim)
    teacher, student = teacher + t_sim, student + s_sim
  # Each document's accepted questions go to the episodic memory: later sleeps replay them
  # (``consolidation.replay_items``).
  ids = {d.passage: d.id for d in ctx.setup.chunks[t]}
  asked: Dict[str, List[str]] = {}
  for p, q, _ in triples:
    asked.setdefault(ids[p], []).append(q)
  st.memory.annotate(t, {i: {phases.DREAM_QUESTIONS: list(dict.fromkeys(qs))}
                         for i, qs in asked.items()})
  # Hard negatives for the new slot's gate (``consolidation.decoys``): the same questions about
  # names mixed from two of the chunk's people, kept as the model woke up.
  kcfg = methods_lib.consolidation_config(ctx.method, ctx.config.consolidation)
  decoys = dream_qa.decoy_questions(triples, ctx.setup.chunks[t],
                                    np.random.default_rng([ctx.seed, t, 23]),
                                    float(kcfg.get("decoys", 0.0)))
  if decoys:
    info["decoy_anchors"] = len(decoys)
  st, out = phases.consolidate(st, ctx, t, extra=(teacher, student),
                               anchors=[ctx.setup.fmt.closed_book(q) for q in decoys])
  info["dream_training_items"] = len(teacher)
  return st, {**info, **out}


def dream(st: SleepState, ctx: Context, t: int) -> Tuple[SleepState, Metrics]:
  """Dreams from the chunk's passages, isolated trials, ReST-EM; the accepted dreams train the
  slot this sleep unlocked (SEAL, without consolidation: the existing weights). Nothing here
  with ``dreaming.stage = "before"`` (``consolidate`` did it)."""
  m, c = ctx.method, ctx.config
  if m.learn != "sleep" or m.dreaming is None or _before(ctx):
    return st, {}
  st, res, info, triples, ddocs, sim = _written_and_kept(st, ctx, t)
  dcfg = methods_lib.dreaming_config(m, c.dreaming)
  expands = m.consolidation is not None
  if len(res) == 0 or (st.slot == -1 and expands):
    return st, info
  s, dt = ctx.setup, c.dream_training
  bs = int(dt.batch_size)
  # A few passes over the accepted dreams, no more: one accepted dream trained for many steps
  # at the slot's learning rate overfits it and costs the model its reading skill.
  steps = min(int(dt.steps), -(-int(dt.epochs) * len(res) // bs))
  info["dream_training_steps"] = steps
  if not expands:
    # SEAL: the accepted dreams train the existing weights by SFT (no consolidation), each
    # studied after what sft_selfgen studies it after (a question's opening, else bos).
    heads = template_student_prompts(s.fmt, ddocs, dcfg.templates, res.prompt_index,
                                     bool(dcfg.copy_title))
    rows = dreams_as_rows(res.dreams, heads, int(c.seq_len), s.tok.pad_id)
    st.params = fit_lib.fit_rows(st.params, st.slot_mask, s.cfg, rows,
                                 state_lib.all_trainable(st.params), steps=steps,
                                 opt_cfg=dt.optimizer, batch_size=bs,
                                 rng=ctx.key(t, "dream_training"), loss=dt.loss)
    return st, info
  # Sleep: the dreams are consolidated into the slot this sleep unlocked. The teacher reads
  # each dream's own prompt (the passage); the student writes it closed-book.
  toks = np.asarray(res.dreams.tokens)
  valid = np.asarray(res.dreams.valid, bool)
  cm = np.asarray(res.dreams.completion_mask, bool)
  kcfg = methods_lib.consolidation_config(m, c.consolidation)
  kcfg.steps, kcfg.batch_size = steps, bs
  kcfg.optimizer = dt.optimizer
  teacher = [r[v & ~c_].tolist() for r, v, c_ in zip(toks, valid, cm)]
  student = [s.fmt.bos()] * len(res)
  if dcfg.get("student_prompt", "bos") == "template":
    student = template_student_prompts(s.fmt, ddocs, dcfg.templates, res.prompt_index,
                                       bool(dcfg.copy_title))
  completions = [r[c_].tolist() for r, c_ in zip(toks, cm)]
  if sim is not None:  # accepted verified trajectories: as consolidation items
    for i, pi in enumerate(np.asarray(res.prompt_index)):
      item = simulated_item(s, sim, teacher[i], completions[i], pi)
      if item is not None:
        teacher[i], student[i] = item
  if dcfg.qa_items and triples:
    # The dream's questions in the query format: the model reading the passage answers each
    # (its answer, not the dream's, is the target), the student is asked closed-book.
    teacher, student = dream_qa.qa_items(s.fmt, triples)
    completions = qa_eval.greedy_completions(
        st.params, s.cfg, teacher, max_new_tokens=int(kcfg.max_new_tokens),
        stop_tokens=s.fmt.stop_ids, pad_id=s.tok.pad_id, slot_mask=st.slot_mask)
    info["dream_training_items"] = len(teacher)
  out = with_progress(ctx, t, "dream_training", steps, lambda on_step: (
      consolidation.consolidate_data(
          st.params, st.slot_mask, s.cfg, teacher, student, completions, kcfg,
          phases.FAST_LEVEL, st.slot, ctx.key(t, "dream_training"),
          stop_tokens=s.fmt.stop_ids, pad_id=s.tok.pad_id, on_step=on_step)))
  st.params = out.params
  if out.history:
    info["dream_training_loss"] = out.history[-1]["loss"]
  return st, info


def simulated_item(setup, sim: dream_sim.Simulated, prompt, completion, prompt_index):
  """(teacher prompt, student prompt) of an accepted dream that is a verified trajectory of
  dream simulation (None otherwise): the teacher reads the trajectory as a reference solution
  before the question (``dream_sim.teacher_prompt``), the student reads the question alone."""
  q = sim.questions.get(tuple(prompt)) if prompt_index < 0 else None
  if q is None:
    return None
  return dream_sim.teacher_prompt(setup.fmt, setup.tok, q, completion), list(prompt)


def simulated_items(setup, res, sim: dream_sim.Simulated):
  """``simulated_item`` of every accepted dream: (teacher prompts, student prompts)."""
  toks, valid = np.asarray(res.dreams.tokens), np.asarray(res.dreams.valid, bool)
  cm = np.asarray(res.dreams.completion_mask, bool)
  items = [simulated_item(setup, sim, r[v & ~c_].tolist(), r[c_].tolist(), pi)
           for r, v, c_, pi in zip(toks, valid, cm, np.asarray(res.prompt_index))]
  items = [x for x in items if x is not None]
  return [t for t, _ in items], [s for _, s in items]


def template_student_prompts(fmt, docs, templates, prompt_index,
                             copy_title: bool = False) -> List[List[int]]:
  """Student prompts of dreams in the query format: each dream's template with its passage
  left out (``task_lib.dream_heads``); bos for offered task variants."""
  heads = task_lib.dream_heads(fmt, docs, templates, copy_title)
  return [heads[pi] if pi >= 0 else fmt.bos() for pi in (int(i) for i in prompt_index)]


def uses_generator(method: methods_lib.Method) -> bool:
  return method.learn == "sleep" and method.dreaming is not None


def init_generator(ctx: Context) -> dreaming.Generator:
  r = ctx.config.dreaming.rest_em
  return dreaming.init_generator(ctx.key("generator"), ctx.setup.cfg, r.rank, r.alpha,
                                 r.targets, r.optimizer)


def generator_step(st: SleepState, ctx: Context, i: int) -> Tuple[SleepState, Metrics]:
  """Dream-generator training step ``i`` (before the stream; nothing is scored): ReST-EM rounds
  on one training task (``Setup.generator_docs``, epoch after epoch); only the generator
  changes."""
  docs = ctx.setup.generator_docs
  d = docs[i % len(docs)]
  res = _dream(st, ctx, [d], np.random.default_rng([ctx.seed, i, 31]), ctx.key(i, "generator"))
  st.generator = res.generator
  ctx.hook("generator", -1, i)
  return st, {"task": d.id, "accepted": len(res),
              "rest_em_n": int(sum(x["rest_em_n"] for x in res.metrics))}
