"""How far a student is from its teacher on the teacher's own answers: the evaluation measure
of a consolidation (``tests/test_consolidation.py`` checks that a sleep brings it down)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_jax.losses.common import prediction_mask, token_mean
from sleep_jax.losses.divergences import token_divergence
from sleep_jax.model import sampler
from sleep_jax.sleep.consolidation import Teacher, _bucket, _pad_left, completion_logits


def teacher_student_divergence(teacher: Teacher, student_params, student_cfg, student_mask,
                               student_prompts, *, max_new_tokens: int, stop_tokens, pad_id=0,
                               divergence: str = "fkl") -> float:
  """Mean per-token F(T||S) on the teacher's greedy completions (an evaluation measure)."""
  t_len = _bucket(max(len(p) for p in teacher.prompts))
  s_len = _bucket(max(len(p) for p in student_prompts))
  tt, tv = _pad_left(teacher.prompts, t_len, pad_id)
  out = sampler.sample(teacher.params, tt, tv, jax.random.key(0), cfg=teacher.cfg,
                       max_new_tokens=max_new_tokens, greedy=True, stop_tokens=tuple(stop_tokens),
                       pad_id=pad_id, slot_mask=teacher.slot_mask)
  ct, cl = out.tokens[:, t_len:], out.completion_mask[:, t_len:]
  t_logits = completion_logits(teacher.params, out.tokens, out.valid, teacher.slot_mask,
                               teacher.cfg, t_len)
  st_, sv = _pad_left(student_prompts, s_len, pad_id)
  s_tokens = jnp.concatenate([st_, ct], 1)
  s_valid = jnp.concatenate([sv, cl], 1)
  s_logits = completion_logits(student_params, s_tokens, s_valid, student_mask, student_cfg, s_len)
  pmask = prediction_mask(jnp.concatenate([jnp.zeros_like(sv), cl], 1))[:, s_len - 1:]
  per = token_divergence(s_logits, t_logits, pmask, divergence=divergence)
  return float(token_mean(per, pmask))
