"""KL(base || model) on generic prompts: how far a sleep moved behaviour it was never trained on.

The probe is fixed once per setup: each generic prompt followed by the *base* model's own greedy
continuation. After a sleep, both models read the same sequences teacher-forced and

    KL_probe = 1/N sum_n 1/|C_n| sum_{t in C_n} KL( p_base(. | x_<t) || p_model(. | x_<t) )

where C_n are the positions that predict the continuation's tokens (the base's answer, end token
included). It is exactly 0 for the base model and grows as the slept model answers generic
prompts differently; unlike a score it sees changes that do not flip an answer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.eval import qa as qa_eval
from sleep_jax.losses import divergences
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig

GENERIC_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                               "probes", "generic_prompts.txt")


def read_prompts(path: str = GENERIC_PROMPTS) -> List[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@dataclasses.dataclass(frozen=True)
class KLProbe:
  tokens: np.ndarray  # (N, W) int32: prompt + the base's continuation, right-padded
  valid: np.ndarray  # (N, W) bool: real tokens
  mask: np.ndarray  # (N, W) bool, logit-aligned: position t predicts a continuation token


def build(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, stop_ids, pad_id: int,
          new_tokens: int, batch_size: int = 16, bucket: int = 16) -> KLProbe:
  """The probe's sequences: every (already formatted) prompt and the base's greedy answer."""
  comps = qa_eval.greedy_completions(params, cfg, prompts, max_new_tokens=new_tokens,
                                     stop_tokens=stop_ids, pad_id=pad_id, batch_size=batch_size)
  seqs = [list(p) + list(c) + [int(stop_ids[0])] for p, c in zip(prompts, comps)]
  width = -(-max(len(s) for s in seqs) // bucket) * bucket
  tokens = np.full((len(seqs), width), pad_id, np.int32)
  valid = np.zeros((len(seqs), width), bool)
  mask = np.zeros((len(seqs), width), bool)
  for i, (p, s) in enumerate(zip(prompts, seqs)):
    tokens[i, :len(s)] = s
    valid[i, :len(s)] = True
    mask[i, len(p) - 1:len(s) - 1] = True  # logits at t predict s[t + 1], the continuation
  return KLProbe(tokens, valid, mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _per_sequence_kl(base_params, params, tokens, valid, mask, slot_mask, *, cfg: ModelConfig):
  base_logits, _ = transformer.apply(base_params, tokens, cfg, valid=valid)
  logits, _ = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask)
  per = divergences.token_divergence(logits, base_logits, mask, divergence="fkl")
  return per.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)


def kl_to_base(probe: KLProbe, base_params, params, cfg: ModelConfig,
               slot_mask: Optional[jax.Array] = None, batch_size: int = 8) -> float:
  """The mean over prompts of the per-token KL(base || model) on the base's continuations."""
  if slot_mask is None:
    slot_mask = transformer.slot_mask_none(cfg)
  n = len(probe.tokens)
  out = []
  for i in range(0, n, batch_size):
    idx = np.minimum(np.arange(i, i + batch_size), n - 1)  # fixed shapes: one compilation
    kl = _per_sequence_kl(base_params, params, probe.tokens[idx], probe.valid[idx],
                          probe.mask[idx], slot_mask, cfg=cfg)
    out.append(np.asarray(kl)[:min(batch_size, n - i)])
  return float(np.concatenate(out).mean())
