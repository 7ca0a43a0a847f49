"""Greedy answers to a setup's questions, scored: one row of the accuracy matrix R, the retention
probes and the in-context reading at wake. ``ecfg`` is ``config.eval``."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import jax
import numpy as np

from sleep_jax.eval import kl_probe
from sleep_jax.eval import qa as qa_eval


def answer(setup, params, mask, docs, ecfg, *, in_context: bool, train: bool = False,
           context: Optional[str] = None, key=None, repeat: int = 1):
  """Greedy answers to every (eval, or with ``train`` wake) question of ``docs``:
  (records, completions, scores). ``context`` replaces each document's own passage in the
  in-context prompt. With ``key``: ``repeat`` samples per question at ``ecfg.temperature``,
  question after question."""
  qs = [(d, q) for d in docs for q in (d.train_questions if train else d.eval_questions)
        for _ in range(repeat)]
  fmt = setup.fmt
  prompts = [fmt.with_context(d.passage if context is None else context, q.q)
             if in_context else fmt.closed_book(q.q) for d, q in qs]
  comps = qa_eval.greedy_completions(
      params, setup.cfg, prompts, max_new_tokens=int(ecfg.max_new_tokens),
      stop_tokens=fmt.stop_ids, pad_id=setup.tok.pad_id, slot_mask=mask,
      batch_size=int(ecfg.batch_size), key=key,
      temperature=float(ecfg.temperature) if key is not None else 1.0)
  preds = [setup.tok.decode(c) for c in comps]
  sc = qa_eval.score_answers(preds, [q.golds for _, q in qs])
  recs = [{"doc": d.id, "q": q.q, "gold": q.golds, "pred": p, "em": float(e)}
          for (d, q), p, e in zip(qs, preds, sc["em"])]
  return recs, comps, sc


def eval_row(setup, params, mask, ecfg, t: int, in_context: Union[bool, str]):
  """Row ``t`` of R: the score on every chunk (NaN where a chunk is not scored: with
  ``ecfg.rows="latest"`` only chunk t, and chunks without eval questions), and the answers.
  ``in_context``: the passage in the prompt; "window": only chunk t's passages fit the context,
  whatever is asked."""
  if ecfg.rows not in ("all", "latest"):
    raise ValueError(f"eval.rows={ecfg.rows!r}; valid: 'all', 'latest'")
  window = (" ".join(d.passage for d in setup.chunks[t]) if in_context == "window" else None)
  row: List[float] = []
  recs: List[Dict] = []
  T = len(setup.chunks)
  for j, docs in enumerate(setup.chunks):
    if ecfg.rows == "latest" and j != t % T:
      row.append(float("nan"))  # not scored: only the chunk just learnt (R's diagonal)
      continue
    if not any(d.eval_questions for d in docs):
      row.append(float("nan"))  # nothing to score (a story chunk no end query points to)
      continue
    r, _, sc = answer(setup, params, mask, docs, ecfg, in_context=bool(in_context),
                      context=window)
    row.append(float(sc[ecfg.metric].mean()))
    recs.extend(r)
  return row, recs


def sampled_row(setup, params, mask, ecfg, key) -> Dict[str, List[float]]:
  """avg@k and pass@k (k = ``ecfg.samples`` completions per eval question at temperature
  ``ecfg.temperature``, closed-book) on every chunk with eval questions (NaN elsewhere): the
  share of right samples, and the share of questions with at least one."""
  k = int(ecfg.samples)
  avg, pas = [], []
  for j, docs in enumerate(setup.chunks):
    if not any(d.eval_questions for d in docs):
      avg.append(float("nan"))
      pas.append(float("nan"))
      continue
    _, _, sc = answer(setup, params, mask, docs, ecfg, in_context=False,
                      key=jax.random.fold_in(key, j), repeat=k)
    sc = np.asarray(sc[ecfg.metric]).reshape(-1, k)
    avg.append(float(sc.mean()))
    pas.append(float(sc.max(1).mean()))
  return {"avg_at_k": avg, "pass_at_k": pas}


def retention(setup, params, mask, ecfg) -> Dict[str, float]:
  """The setup's retention probes (``Setup.extra_evals``) and, with a ``Setup.kl_probe``,
  ``kl_to_base``: KL(base || model) on its generic prompts."""
  out = {}
  for name, (docs, in_ctx) in setup.extra_evals.items():
    _, _, sc = answer(setup, params, mask, docs, ecfg, in_context=in_ctx)
    out[name] = float(sc[ecfg.metric].mean())
  if setup.kl_probe is not None:
    out["kl_to_base"] = kl_probe.kl_to_base(setup.kl_probe, setup.params, params, setup.cfg, mask)
  return out


def wake_score(setup, params, mask, docs: Sequence, ecfg) -> Dict[str, float]:
  """In-context score of the chunk just read (NaN when it has no eval questions)."""
  if not any(d.eval_questions for d in docs):
    return {"wake_in_context": float("nan")}
  _, _, sc = answer(setup, params, mask, docs, ecfg, in_context=True)
  return {"wake_in_context": float(sc[ecfg.metric].mean())}
