"""What a sleep's dreams are measured against and how scoring and the trials read them: tau's
batch (``dream_inputs``: the closed-book likelihood of the in-context model's answers, of gold
answers, or of the model's own written questions), the dream prompts, and the trial views
(``closed_book_view``: the passage hidden; ``qa_view``: the item a question dream would be
consolidated as)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.eval import answers
from sleep_jax.eval import qa as qa_eval
from sleep_jax.sleep import dream_batches, dream_qa, dreaming
from sleep_jax.sleep.run_context import Context
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import base as task_lib


def task_batch(prompts, completions, stop_id: int, pad_id: int):
  """tau's batch: closed-book prompts followed by target completions (+ stop), sampler layout."""
  width = max(len(p) for p in prompts)
  n = max(len(c) for c in completions) + 1
  toks = np.full((len(prompts), width + n), pad_id, np.int32)
  valid = np.zeros(toks.shape, bool)
  cm = np.zeros(toks.shape, bool)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    c = list(c) + [stop_id]
    toks[i, width - len(p):width] = p
    valid[i, width - len(p):width] = True
    toks[i, width:width + len(c)] = c
    valid[i, width:width + len(c)] = True
    cm[i, width:width + len(c)] = True
  return {"tokens": jnp.asarray(toks), "valid": jnp.asarray(valid),
          "completion_mask": jnp.asarray(cm)}


def written_questions(st: SleepState, ctx: Context, docs, dcfg, key):
  """(teacher prompts, student prompts, document index of each) of questions the waking model
  writes about ``docs`` with the first dream template, ``dcfg.tau_samples`` per document (no
  random expert, no generator), de-duplicated: the teacher reads the passage, the student is
  asked closed-book."""
  s = ctx.setup
  tpl = dict(list(dcfg.templates.items())[:1])
  prompts = task_lib.dream_prompts(s, docs, tpl)
  out = dreaming.sample_dreams(st.params, s.cfg, st.slot_mask, prompts, key,
                               int(dcfg.tau_samples) * len(prompts), int(dcfg.max_new_tokens),
                               float(dcfg.temperature), False, stop_tokens=s.fmt.stop_ids,
                               pad_id=s.tok.pad_id,
                               copy=task_lib.entity_copy(s, docs, tpl, bool(dcfg.copy_title)))
  toks, cm = np.asarray(out.tokens), np.asarray(out.completion_mask, bool)
  dreams = [(r[c_].tolist(), i % len(prompts)) for i, (r, c_) in enumerate(zip(toks, cm))]
  texts, passages = dream_texts(s.tok, docs, tpl, dreams, bool(dcfg.copy_title))
  titles, named = {d.passage: d.title for d in docs}, bool(dcfg.get("qa_named", False))
  items = list(dict.fromkeys((p, q, "") for x, p in zip(texts, passages)
                             for q, _ in dream_qa.entity_pairs(x, titles[p], named)))
  index = {d.passage: i for i, d in enumerate(docs)}
  return (*dream_qa.qa_items(s.fmt, items), [index[p] for p, _, _ in items])


def dream_inputs(st: SleepState, ctx: Context, docs, dcfg, rng: np.random.Generator, key=None,
                 dream_docs=None):
  """Dream prompts (from ``dream_docs``, by default ``docs``), tau's batch, the task-variant
  candidate dreams for ``docs`` and the document (index into ``docs``) of each tau row."""
  s = ctx.setup
  prompts = task_lib.dream_prompts(s, docs if dream_docs is None else dream_docs,
                                   dcfg.templates)
  student = task_lib.student_prompts(s, docs)
  tau_doc = [i for i, d in enumerate(docs) for _ in d.train_questions]
  if dcfg.tau_target == "written":
    # tau without any of the task's questions: the model's own questions about the passages,
    # answered by the model reading them; the score is the closed-book likelihood of those.
    teacher, student, tau_doc = written_questions(st, ctx, docs, dcfg,
                                                  jax.random.fold_in(key, 5))
    if not student:  # nothing parsed: what the reader says after each template prompt
      teacher, student = task_lib.template_items(s, docs, list(dcfg.templates.values())[0])
      tau_doc = list(range(len(docs)))
    comps = qa_eval.greedy_completions(
        st.params, s.cfg, teacher, max_new_tokens=int(ctx.config.eval.max_new_tokens),
        stop_tokens=s.fmt.stop_ids, pad_id=s.tok.pad_id, slot_mask=st.slot_mask)
  elif dcfg.tau_target == "gold":
    # tau on the known answers of the wake questions (ARC: leave-one-out demonstrations).
    comps = [s.tok.encode(q.answer) for d in docs for q in d.train_questions]
  else:
    # tau: closed-book likelihood of the in-context model's own answers (no labels needed).
    _, comps, _ = answers.answer(s, st.params, st.slot_mask, docs, ctx.config.eval,
                                 in_context=True, train=True)
  tau = task_batch(student, comps, s.fmt.stop_ids[0], s.tok.pad_id)
  cand = None
  n = int(dcfg.variants)
  if n and s.task_variants is not None:
    # Task variants compete with the model's own dreams as standalone texts (bos + row).
    rows, _ = task_lib.variant_rows(s, docs, rng, n)
    b = s.fmt.bos()
    cand = dream_batches.fixed_dreams([b] * len(rows), [r[len(b):] for r in rows], s.tok.pad_id)
  return prompts, tau, cand, np.asarray(tau_doc, np.int32)


def closed_book_view(fmt, docs, templates, copy_title: bool = False):
  """``trial_view`` of dreams written from ``"{context} ... {title}"`` templates (or, copying
  the entity, ``"{context} Q:"``): the passage is hidden (``valid`` False; positions count
  visible tokens only), so scoring and the trials read each dream exactly as bos + the
  template's question opening (``Q: <title>``) + the dream: the closed-book format it is
  consolidated and asked in."""
  tpls, bos = list(templates.values()), fmt.bos()
  keep = []  # per prompt: its trailing tokens that stay visible
  for d in docs:
    for tpl in tpls:
      full, tail = fmt.dream_prompt(d.passage, tpl, d.title), fmt.dream_prompt("", tpl, d.title)
      tail = tail[len(bos):]
      if not task_lib.opens_question(tpl, copy_title) or full[len(full) - len(tail):] != tail:
        raise ValueError(f"dreaming.trial_view='closed_book' needs templates that end in a "
                         f"question's opening with {{title}}; got {tpl!r}")
      keep.append(len(tail))

  def view(dreams: dreaming.Dreams, prompt_index) -> dreaming.Dreams:
    valid = np.array(dreams.valid, bool)
    prompt = valid & ~np.asarray(dreams.completion_mask, bool)
    for r, pi in enumerate(prompt_index):
      if pi >= 0:
        pos = np.flatnonzero(prompt[r])
        valid[r, pos[len(bos):len(pos) - keep[pi]]] = False
    return dreams._replace(valid=jnp.asarray(valid))

  return view


def qa_view(st: SleepState, ctx: Context, docs, dream_docs, dcfg):
  """``trial_view = "qa"`` for question-writing templates (``dreaming.qa_items``): scoring and
  the trials read each dream as the item consolidation would distil from it, its first question
  (naming the entity, with ``dreaming.qa_named``) asked closed-book with the answer of the
  waking model reading the passage (``dream_qa.trial_rows``). The dream's own answer, which a
  small writer often invents, is never trained on; a trial then measures what the kept item
  would teach."""
  s, tpls = ctx.setup, list(dcfg.templates.values())
  named = bool(dcfg.get("qa_named", False))
  passage = {d.id: d.passage for d in docs}  # the teacher reads the passage as it came

  def view(dreams: dreaming.Dreams, prompt_index) -> dreaming.Dreams:
    toks, cm = np.asarray(dreams.tokens), np.asarray(dreams.completion_mask, bool)
    items = []
    for r, c_, pi in zip(toks, cm, (int(i) for i in prompt_index)):
      pairs = []
      if pi >= 0:  # the model's own dream (an offered candidate has no question)
        d = dream_docs[pi // len(tpls)]
        (text,), _ = dream_texts(s.tok, dream_docs, dcfg.templates, [(r[c_].tolist(), pi)],
                                 bool(dcfg.copy_title))
        pairs = dream_qa.entity_pairs(text, d.title, named)
      items.append((passage[d.id], pairs[0][0]) if pairs else None)
    teacher = [s.fmt.with_context(p, q) for p, q in filter(None, items)]
    comps = qa_eval.greedy_completions(
        st.params, s.cfg, teacher, max_new_tokens=int(ctx.config.eval.max_new_tokens),
        stop_tokens=s.fmt.stop_ids, pad_id=s.tok.pad_id, slot_mask=st.slot_mask)
    return dream_batches.fixed_dreams(*dream_qa.trial_rows(s.fmt, items, comps), s.tok.pad_id)

  return view


def dream_texts(tok, docs, templates, dreams, copy_title: bool = False):
  """The text of each (completion tokens, prompt index) dream the model wrote (prompt index
  >= 0: not an offered task variant) about ``docs`` and the passage it was prompted with. A
  template that ends in a question's opening (``"{context} Q: {title}"``; ``"{context} Q:"``
  with ``copy_title``) begins the dream's text with it."""
  tpls = list(templates.values())
  own = [(toks, pi) for toks, pi in dreams if pi >= 0]

  def text(toks, pi):
    head = tpls[pi % len(tpls)].split("{context}")[-1].format(title=docs[pi // len(tpls)].title)
    body = tok.decode([int(x) for x in toks])
    opens = task_lib.opens_question(tpls[pi % len(tpls)], copy_title)
    return f"{head.strip()} {body}".strip() if opens else body

  return ([text(toks, pi) for toks, pi in own],
          [docs[pi // len(tpls)].passage for _, pi in own])
