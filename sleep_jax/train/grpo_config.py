"""Every GRPO knob (``grpo.py``): ``config.grpo``. Kept apart from the loop so that a config
file imports no jax."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """One round: ``prompts_per_round`` prompts x ``group_size`` samples, scored by the checker,
  then ``updates`` clipped steps (``clip_eps``) with ``kl_coef`` x KL to the starting policy."""
  return ml_collections.ConfigDict(dict(
      rounds=20, prompts_per_round=8, group_size=8, updates=2, clip_eps=0.2, kl_coef=0.0,
      max_new_tokens=16, temperature=1.0,
      optimizer=ml_collections.ConfigDict(dict(name="adam", lr=1e-3, b1=0.9, b2=0.95,
                                               grad_clip=1.0))))
