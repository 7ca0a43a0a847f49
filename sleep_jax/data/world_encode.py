"""World examples as token ids: ``bos + prompt + target + eos`` with per-token loss weights, and
right-padded batches of them (sequences are never silently truncated)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.data.world import Example


def encode_weighted(tok: WordTokenizer, ex: Example, max_len: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """``bos + prompt + target + eos`` and its float32 loss weights (0 on bos + prompt; 1 on the
  target, or per ``ex.segments``; ``ex.eos_weight`` on the eos).

  Raises if the sequence is longer than ``max_len`` (sequences are never silently truncated)."""
  p = tok.encode(ex.prompt, add_bos=True)
  if ex.segments:
    t, w = [], []
    for text, weight in ex.segments:
      ids = tok.encode(text)
      t += ids
      w += [float(weight)] * len(ids)
  else:
    t = tok.encode(ex.target)
    w = [1.0] * len(t)
  ids = np.asarray(p + t + [tok.eos_id], np.int32)
  weights = np.asarray([0.0] * len(p) + w + [float(ex.eos_weight)], np.float32)
  if max_len is not None and len(ids) > max_len:
    raise ValueError(f"example of {len(ids)} tokens exceeds max_len={max_len}: {ex.prompt!r}")
  return ids, weights


def encode(tok: WordTokenizer, ex: Example, max_len: Optional[int] = None
           ) -> Tuple[np.ndarray, np.ndarray]:
  """``bos + prompt + target + eos`` and its loss mask (True on target + eos tokens with a
  positive loss weight, see ``encode_weighted``).

  Raises if the sequence is longer than ``max_len`` (sequences are never silently truncated)."""
  ids, w = encode_weighted(tok, ex, max_len)
  return ids, w > 0


def encode_batch(tok: WordTokenizer, examples: Sequence[Example], seq_len: int
                 ) -> Dict[str, np.ndarray]:
  """Right-padded ``tokens`` (B, seq_len), ``valid`` and ``loss_mask`` (B, seq_len) bool, and
  ``loss_weight`` (B, seq_len) float32 (``encode_weighted``; > 0 exactly where ``loss_mask``).

  ``loss_mask[b, t]`` marks tokens whose prediction (from position t - 1) is trained."""
  B = len(examples)
  tokens = np.full((B, seq_len), tok.pad_id, np.int32)
  valid = np.zeros((B, seq_len), bool)
  weight = np.zeros((B, seq_len), np.float32)
  for i, ex in enumerate(examples):
    ids, w = encode_weighted(tok, ex, seq_len)
    tokens[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
    weight[i, :len(ids)] = w
  return {"tokens": tokens, "valid": valid, "loss_mask": weight > 0, "loss_weight": weight}
