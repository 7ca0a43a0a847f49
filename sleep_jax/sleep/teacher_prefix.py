"""The teacher reads each item's prompt once per consolidation, not once per step.

Every Knowledge Seeding step asks the frozen teacher for its logits on the student's
completions: ``T(prompt_k + prefix + completion)``, where ``prompt_k`` is item k as the teacher
sees it (for OPSD the privileged passage: hundreds of tokens) and ``prefix`` the LTI cut of a
teacher sample (empty on the distillation-only side). The teacher never changes during the
event and ``prompt_k`` never changes between steps, so neither do the prompt's keys and values.
``PromptCache`` computes them once per item (a KV cache in ``transformer.init_cache``'s
layout, one row per item), and each step runs the teacher over its continuation only
(``continuation_logits``): a few dozen tokens instead of the whole prompt again.

Layout (one compiled shape for every step of a GKD side). Item k's prompt is left-padded to
``P`` tokens and the cache holds its first ``P - 1``. The prompt's last token (always a real
one under left padding) opens the continuation, so the logit that predicts the first completion
token comes out of the continuation's forward::

    continuation = [last | prefix (c) | completion (N) | pad (E - c)]      W = 1 + E + N

(``W = 1 + N`` on the distillation side, which has no prefix), and the ``N + 1`` logits the
losses read (``consolidation.completion_logits``' window) start at row offset ``c``. The padding
sits after every position a logit is read from, so under causal attention these are the logits
of the whole sequence ``[prompt | prefix | completion]``: the same function as one forward over
it, summed in another order (equal to float rounding, not to the bit:
``tests/test_teacher_prefix.py``).

An item's prompt is read the first time a step draws it (one prefill of the step's new items)
and kept, ``layers x (P - 1 + W) x kv_heads x head_dim x 2`` values an item, while the kept
caches fit ``BUDGET_BYTES``; past that, a drawn item that is not kept is read again. Both GKD
sides of a step continue the same cache. So a consolidation reads at most one prompt per drawn
row (before the cache: one per drawn row and side), and with every item kept one per item.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model import sampler, transformer
from sleep_jax.model.config import ModelConfig

BUDGET_BYTES = 1 << 30  # the most a consolidation keeps of its teachers' prompt caches

# The batch axis of each entry of a ``transformer.init_cache`` cache (None: shared by all rows).
_ROW_AXIS = {"k": 1, "v": 1, "gate_max": 2, "index": None}


def bucket(n: int, b: int = 16) -> int:
  """``n`` rounded up to a multiple of ``b`` (at least ``b``): few compiled prompt widths."""
  return max(b, -(-n // b) * b)


@functools.partial(jax.jit, static_argnames=("cfg", "length"))
def prefill(params, tokens, valid, slot_mask, cfg: ModelConfig, length: int):
  """A KV cache of ``length`` slots holding the left-padded ``tokens`` (B, T)."""
  cache = transformer.init_cache(cfg, tokens.shape[0], length)
  # The forward's output is not used: the output head reads one position only.
  _, cache = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask,
                               cache=cache, return_hidden=True, logits_from=tokens.shape[1] - 1)
  return cache


@functools.partial(jax.jit, static_argnames=("cfg", "n_new"))
def continuation_logits(params, cache, head, head_len, completion, completion_live, slot_mask,
                        cfg: ModelConfig, n_new: int):
  """Logits (B, n_new + 1, V) of a cached prompt's continuation (module docstring's layout).

  ``head`` (B, W) holds ``[last | prefix]`` left-aligned and ``head_len`` (B,) its length
  ``1 + c``; ``completion`` / ``completion_live`` (B, n_new) follow it. Entry i predicts
  completion token i (the last predicts past the end), as in ``completion_logits``.
  """
  B, W = head.shape
  j = jnp.arange(W)[None, :]
  k = j - head_len[:, None]  # index into the completion
  in_comp = (k >= 0) & (k < n_new)
  kc = jnp.clip(k, 0, n_new - 1)
  tokens = jnp.where(in_comp, jnp.take_along_axis(completion, kc, 1), head)
  valid = jnp.where(in_comp, jnp.take_along_axis(completion_live, kc, 1), j < head_len[:, None])
  h, _ = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask, cache=cache,
                           return_hidden=True)
  window = head_len[:, None] - 1 + jnp.arange(n_new + 1)[None, :]
  h = jnp.take_along_axis(h, window[:, :, None], axis=1)
  return transformer.unembed(params, h, cfg)


def take_rows(cache, rows: jax.Array):
  """The cache of items ``rows`` (B,) out of a cache with one row per item."""
  return {name: x if _ROW_AXIS.get(name, 0) is None else
          jnp.take(x, rows, axis=_ROW_AXIS.get(name, 0)) for name, x in cache.items()}


class PromptCache:
  """One teacher's prompts, read once: ``logits(rows(items), items, prefixes, completion,
  live)`` per step.

  An item's prompt is prefilled the first time a step draws it, and kept while the kept caches
  fit ``BUDGET_BYTES``: a consolidation never reads more prompts than it did before the cache
  (one per drawn row per step), and reads each at most once while they fit. ``batch``: the
  step's rows (every prefill has this many: one compilation); ``extra``: the longest LTI prefix
  (E); ``n_new``: the completion length (N).
  """

  def __init__(self, teacher, batch: int, extra: int, n_new: int, pad_id: int = 0):
    self.teacher, self.batch, self.extra, self.n_new = teacher, batch, extra, n_new
    self.pad_id = pad_id
    self.width = bucket(max(len(p) for p in teacher.prompts))  # P
    self.length = self.width - 1 + 1 + extra + n_new  # cache slots: P - 1 + W
    cfg = teacher.cfg
    self.item_bytes = (2 * cfg.n_layers * self.length * cfg.n_kv_heads * cfg.hd
                       * jnp.dtype(cfg.dtype).itemsize)
    self.kept = {}  # item -> its one-row cache

  def _prefill(self, rows: Sequence[int]):
    toks, valid = sampler.left_pad([self.teacher.prompts[k] for k in rows], self.pad_id,
                                   self.width)
    t = self.teacher
    return prefill(t.params, jnp.asarray(toks[:, :-1]), jnp.asarray(valid[:, :-1]),
                   t.slot_mask, t.cfg, self.length)

  def rows(self, items: Sequence[int]):
    """The cache of one step's items: kept rows, and one prefill for the others."""
    items = [int(k) for k in items]
    missing = [k for k in dict.fromkeys(items) if k not in self.kept]
    fresh = {}
    if missing:
      cache = self._prefill(missing + [missing[-1]] * (self.batch - len(missing)))
      for r, k in enumerate(missing):
        fresh[k] = take_rows(cache, jnp.asarray([r]))
        if (len(self.kept) + 1) * self.item_bytes <= BUDGET_BYTES:
          self.kept[k] = fresh[k]
      if missing == items:  # every row new (and distinct): the prefill is the step's cache
        return cache
    parts = [self.kept[k] if k in self.kept else fresh[k] for k in items]
    return {name: parts[0][name] if _ROW_AXIS.get(name, 0) is None else
            jnp.concatenate([p[name] for p in parts], _ROW_AXIS.get(name, 0))
            for name in parts[0]}

  def logits(self, cache, items: Sequence[int], prefixes: Sequence[Sequence[int]],
             completion: jax.Array, completion_live: jax.Array) -> jax.Array:
    """The teacher's (B, N + 1, V) logits on ``prompt_k + prefix + completion`` for each row,
    continuing ``cache`` (``rows(items)``)."""
    # Without prefixes (the distillation side) the continuation needs no room for them.
    W = 1 + (self.extra if any(len(p) for p in prefixes) else 0) + self.n_new
    head = np.full((len(items), W), self.pad_id, np.int32)
    head_len = np.zeros((len(items),), np.int32)
    for r, (k, pre) in enumerate(zip(items, prefixes)):
      pre = list(pre)
      if len(pre) > self.extra:
        raise ValueError(f"an LTI prefix of {len(pre)} tokens; the cache was laid out for "
                         f"{self.extra}")
      head[r, :1 + len(pre)] = [self.teacher.prompts[k][-1]] + pre
      head_len[r] = 1 + len(pre)
    t = self.teacher
    return continuation_logits(t.params, cache, jnp.asarray(head), jnp.asarray(head_len),
                               completion, completion_live, t.slot_mask, t.cfg, self.n_new)
