"""Question-answering exact match by teacher-forced argmax (equal to greedy decoding).

An example is correct when the argmax prediction at every target position -- the answer tokens
and the closing eos -- equals the target: exactly what greedy decoding would produce, without a
decode loop. For the synthetic world (one-token answers) that is one forward pass per batch.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.data import world as world_lib
from sleep_jax.data import world_encode
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg",))
def _correct(params, tokens, valid, loss_mask, slot_mask, *, cfg: ModelConfig):
  logits, _ = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask)
  pred = jnp.argmax(logits[:, :-1], axis=-1)  # pred[:, t] is the guess for tokens[:, t + 1]
  hit = (pred == tokens[:, 1:]) | ~loss_mask[:, 1:]
  return jnp.all(hit, axis=1)


def exact_match_per_example(params, cfg: ModelConfig, tok, examples: Sequence[world_lib.Example],
                            *, seq_len: int = 64, batch_size: int = 128,
                            slot_mask: Optional[jax.Array] = None) -> np.ndarray:
  """(N,) bool: greedy answer (+ eos) of each example equals its target."""
  if slot_mask is None:
    slot_mask = transformer.slot_mask_none(cfg)
  out = []
  for i in range(0, len(examples), batch_size):
    chunk = list(examples[i:i + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # fixed shapes: one compilation
    b = world_encode.encode_batch(tok, chunk, seq_len)
    ok = _correct(params, b["tokens"], b["valid"], b["loss_mask"], slot_mask, cfg=cfg)
    out.append(np.asarray(ok)[:n])
  return np.concatenate(out) if out else np.zeros((0,), bool)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _first_answer(params, tokens, valid, loss_mask, slot_mask, *, cfg: ModelConfig):
  logits, _ = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask)
  pred = jnp.argmax(logits[:, :-1], axis=-1)
  first = jnp.argmax(loss_mask[:, 1:], axis=1)  # first target position (minus one)
  return jnp.take_along_axis(pred, first[:, None], axis=1)[:, 0]


def first_answer_tokens(params, cfg: ModelConfig, tok, examples: Sequence[world_lib.Example], *,
                        seq_len: int = 64, slot_mask: Optional[jax.Array] = None) -> np.ndarray:
  """(N,) int: the greedy first answer token for each example's prompt."""
  if slot_mask is None:
    slot_mask = transformer.slot_mask_none(cfg)
  b = world_encode.encode_batch(tok, examples, seq_len)
  return np.asarray(_first_answer(params, b["tokens"], b["valid"], b["loss_mask"], slot_mask,
                                  cfg=cfg))


def exact_match(params, cfg: ModelConfig, tok, examples: Sequence[world_lib.Example],
                **kwargs) -> float:
  """Fraction of ``examples`` whose greedy answer (+ eos) is exactly the target."""
  ok = exact_match_per_example(params, cfg, tok, examples, **kwargs)
  return float(ok.mean()) if len(ok) else float("nan")


# ----------------------------------------------------------------------------------------------
# Free-form answers by greedy decoding (any tokenizer, multi-token answers).
# ----------------------------------------------------------------------------------------------
def greedy_completions(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                       max_new_tokens: int, stop_tokens: Sequence[int], pad_id: int = 0,
                       slot_mask: Optional[jax.Array] = None, batch_size: int = 64,
                       bucket: int = 16, key: Optional[jax.Array] = None,
                       temperature: float = 1.0) -> list:
  """Greedy completion token lists (stop token dropped) for each prompt, with the one sampler;
  with ``key``, sampled at ``temperature`` instead (avg@k / pass@k).

  Prompts are left-padded to a multiple of ``bucket`` and batches have a fixed size, so a whole
  evaluation compiles a handful of times at most."""
  from sleep_jax.model import sampler
  out = []
  width = -(-max(len(p) for p in prompts) // bucket) * bucket if prompts else bucket
  stop = set(int(s) for s in stop_tokens)
  for i in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[i:i + batch_size]]
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    toks, valid = sampler.left_pad(chunk, pad_id, width)
    res = sampler.sample(params, jnp.asarray(toks), jnp.asarray(valid),
                         jax.random.key(0) if key is None else jax.random.fold_in(key, i),
                         cfg=cfg, max_new_tokens=max_new_tokens, greedy=key is None,
                         temperature=temperature, stop_tokens=tuple(stop), pad_id=pad_id,
                         slot_mask=slot_mask)
    comp = np.asarray(res.tokens[:, width:])
    live = np.asarray(res.completion_mask[:, width:])
    for r in range(n):
      out.append([int(t) for t in comp[r][live[r]] if int(t) not in stop])
  return out


def score_answers(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
  """Exact match (SQuAD normalisation, any alias), 'contains' (a normalised gold occurs in the
  normalised prediction: fair to chat models that answer in a sentence) and 'checked' (the
  final answer of a worked solution, ``arith.extract_answer``: the last ``Answer: N`` or else
  the last integer, equals the gold's; 0 where the gold has no number)."""
  from sleep_jax.data.arith import extract_answer
  from sleep_jax.losses.rewards import exact_match, normalize_answer
  em = np.array([exact_match(p, g) for p, g in zip(predictions, golds)], np.float32)
  contains = np.array([float(any(normalize_answer(a) and f" {normalize_answer(a)} " in
                                 f" {normalize_answer(p)} " for a in g))
                       for p, g in zip(predictions, golds)], np.float32)
  checked = np.array([float(any(extract_answer(a) is not None
                                 and extract_answer(p) == extract_answer(a) for a in g))
                      for p, g in zip(predictions, golds)], np.float32)
  return {"em": em, "contains": contains, "checked": checked}
