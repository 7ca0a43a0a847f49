"""Generalized knowledge distillation (GKD, Agarwal et al. 2024; docs/method.md section 3 step 2).

  L_distill = (1 - lambda) E_{(x,y)~D} F(T||S)(y|x) + lambda E_x E_{y~S(.|x)} F(T||S)(y|x)

D holds sequences sampled from the teacher, y ~ S sequences sampled from the student (on-policy),
F a registered token-level divergence (``divergences.py``), summed over completion tokens and
averaged per token. Sampling is the caller's job (``sleep_jax.model.sampler.sample``); tokens are
integers, so no gradient flows through it. Two ways to mix:

* both batches every step: ``gkd_loss(teacher_data, student_data, lam=...)`` weighs the two
  expectations exactly;
* draw the source per step or per example (``gkd_sources``), sample each row from its source,
  merge the rows (``select_rows``) and use ``gkd_mixed_loss`` on the single batch: the draws
  realise the lambda mixture, so one forward pass serves both terms.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from sleep_jax.losses.common import token_mean
from sleep_jax.losses.divergences import token_divergence
from sleep_jax.losses.registry import register_loss

Metrics = dict


class DistillBatch(NamedTuple):
  """Student and teacher logits on the same sequences, logit-aligned (see ``common.py``)."""
  student_logits: jax.Array  # (B, T, V)
  teacher_logits: jax.Array  # (B, T, V)
  mask: jax.Array  # (B, T) positions whose next-token distribution counts


def gkd_sources(rng: jax.Array, lam, batch_size: int, *, per_example: bool = True) -> jax.Array:
  """(B,) bool, True where the row should be a student (on-policy) sample: each row with
  probability ``lam`` independently (``per_example``) or the whole batch at once (per step, as in
  the GKD paper's Algorithm 1)."""
  if per_example:
    return jax.random.bernoulli(rng, lam, (batch_size,))
  return jnp.broadcast_to(jax.random.bernoulli(rng, lam, ()), (batch_size,))


def select_rows(use_student: jax.Array, teacher_tree, student_tree):
  """Row-wise merge of two same-shaped pytrees (e.g. two ``SampleOutput``s): row i comes from
  ``student_tree`` where ``use_student[i]``, else from ``teacher_tree``."""
  def pick(t, s):
    m = use_student.reshape(use_student.shape + (1,) * (t.ndim - 1))
    return jnp.where(m, s, t)
  return jax.tree.map(pick, teacher_tree, student_tree)


@register_loss("gkd")
def gkd_loss(teacher_data: Optional[DistillBatch], student_data: Optional[DistillBatch], *, lam,
             divergence: str = "jsd", temperature: float = 1.0,
             **hparams) -> Tuple[jax.Array, Metrics]:
  """L = (1 - lam) F_D + lam F_S, with F_D / F_S the per-token mean divergence on teacher- /
  student-generated sequences. A batch may be None only when its weight is exactly 0.

  Args:
    teacher_data: ``DistillBatch`` on sequences sampled from the teacher (the data D).
    student_data: ``DistillBatch`` on sequences sampled from the student.
    lam: student-data fraction lambda in [0, 1].
    divergence, temperature, **hparams: as in ``divergences.divergence_loss``.
  """
  terms = []
  for name, batch, weight in (("teacher_data", teacher_data, 1.0 - lam),
                              ("student_data", student_data, lam)):
    if batch is None:
      if not (isinstance(weight, (int, float)) and weight == 0):
        raise ValueError(f"gkd_loss: {name} is None but its weight is {weight} (lam={lam})")
      continue
    per = token_divergence(batch.student_logits, batch.teacher_logits, batch.mask,
                           divergence=divergence, temperature=temperature, **hparams)
    # Agreement: how often the student's most likely token is the teacher's (monitoring only).
    agree = jnp.argmax(batch.student_logits, -1) == jnp.argmax(batch.teacher_logits, -1)
    terms.append((name, weight, token_mean(per, batch.mask),
                  token_mean(agree.astype(jnp.float32), batch.mask)))
  loss = sum(w * f for _, w, f, _ in terms)
  metrics = {"loss": loss}
  metrics.update({f"divergence_{name}": f for name, _, f, _ in terms})
  metrics.update({f"agreement_{name}": a for name, _, _, a in terms})
  return loss, metrics


@register_loss("gkd_mixed")
def gkd_mixed_loss(student_logits, teacher_logits, mask, from_student, *, divergence: str = "jsd",
                   temperature: float = 1.0, **hparams) -> Tuple[jax.Array, Metrics]:
  """GKD on one batch whose rows were drawn from the teacher or the student with probability
  lambda (``gkd_sources`` + ``select_rows``): L = token_mean F over all rows, an estimate of
  L_distill. Metrics split the divergence by source.

  Args:
    student_logits, teacher_logits: (B, T, V) on the merged sequences.
    mask: (B, T) logit-aligned mask.
    from_student: (B,) bool, the ``gkd_sources`` draw.
  """
  per = token_divergence(student_logits, teacher_logits, mask, divergence=divergence,
                         temperature=temperature, **hparams)
  loss = token_mean(per, mask)
  on_s = mask.astype(bool) & from_student[:, None]
  on_t = mask.astype(bool) & ~from_student[:, None]
  return loss, {"loss": loss, "divergence_teacher_data": token_mean(per, on_t),
                "divergence_student_data": token_mean(per, on_s),
                "student_fraction": jnp.mean(from_student.astype(jnp.float32))}
