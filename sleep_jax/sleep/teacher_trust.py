"""A teacher trusted only where its answer checks out (``consolidation.verify_teacher``).

The privileged teacher, the model reading the passage, can be wrong. On level-4 arithmetic
problems the tiny base reading the worked solution solves half of them
(``scripts/reasoning_teacher.py``), and a student that matches it there learns its mistakes.
With ``verify_teacher`` each sample of the teacher dataset D is checked against the item's
supported answer by the task's own metric (``eval.metric``: "checked" compares the final
answers, "em" the normalised texts). An item keeps only its verified samples. An item with none
is taught by the cross-entropy term alone (``ce_weight``): its distillation rows, off-policy,
on-policy and imitation, enter no term (``seed_knowledge`` masks their completions). Items with
no supported answer (anchors, the model's own questions) cannot be checked and stay trusted.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

# verify(item, completion tokens) -> True / False, or None where the item has no answer to check.
Verifier = Callable[[int, Sequence[int]], Optional[bool]]


def answer_verifier(golds: Sequence[Sequence[int]], decode: Callable[[Sequence[int]], str],
                    stop_tokens: Sequence[int], metric: str) -> Verifier:
  """A ``Verifier`` that scores a completion against ``golds[item]`` (tokens, stop included; empty:
  nothing to check) with ``eval.qa.score_answers``' ``metric``."""
  from sleep_jax.eval.qa import score_answers
  stop = {int(s) for s in stop_tokens}
  text = lambda toks: decode([int(t) for t in toks if int(t) not in stop])
  gold_texts = [text(g) if len(g) else None for g in golds]

  def verify(item: int, completion: Sequence[int]) -> Optional[bool]:
    gold = gold_texts[item]
    if gold is None:
      return None
    return bool(score_answers([text(completion)], [[gold]])[metric][0] > 0.5)

  return verify


def verified_dataset(D: List[List[List[List[int]]]], verify: Verifier
                     ) -> Tuple[List[List[List[List[int]]]], np.ndarray]:
  """``(D', trusted)`` for the teacher datasets ``D[teacher][item][sample]``: ``D'`` keeps each
  item's samples that do not fail ``verify`` (all of them where every one fails), ``trusted``
  (n_teachers, n_items) bool is False where every sample of that teacher fails."""
  out, trusted = [], np.ones((len(D), len(D[0]) if D else 0), bool)
  for t, items in enumerate(D):
    kept_items = []
    for k, samples in enumerate(items):
      kept = [c for c in samples if verify(k, c) is not False]
      trusted[t, k] = bool(kept)
      kept_items.append(kept or samples)
    out.append(kept_items)
  return out, trusted


def masked_row_rewards(rewards: Sequence[float], trusted_rows: np.ndarray) -> np.ndarray:
  """The imitation rewards of one batch with each untrusted row's replaced by the trusted rows'
  mean. Untrusted rows are masked out of the policy gradient. Their rewards would still enter
  the batch-mean baseline ``b = mean_j r_j``; with this replacement ``b`` is the trusted rows'
  mean."""
  r = np.asarray(rewards, np.float32)
  if not trusted_rows.any():
    return r
  return np.where(trusted_rows, r, np.mean(r[trusted_rows])).astype(np.float32)
