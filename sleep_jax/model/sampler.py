"""The one sampler every phase uses (wake answers, teacher data, on-policy rollouts, dreams).

``sample`` is a single jitted pure function: one prefill of the whole (left-padded) prompt batch
into a preallocated KV cache, then a ``lax.while_loop`` that decodes one token per row per step
and exits early once every row has produced a stop token. It returns exactly what distillation
and RL losses consume, all aligned with ``tokens`` so that ``tokens[:, t]`` is scored by
``logits[:, t - 1]``:

* ``tokens``          (B, P + N) prompt followed by the completion (``pad_id`` after a stop);
* ``valid``           (B, P + N) real tokens (prompt tokens and completion up to the stop);
* ``completion_mask`` (B, P + N) generated tokens only, the stop token included;
* ``logprobs``        (B, P + N) log-prob of each generated token under the sampling
  distribution ``softmax(logits / temperature)`` before top-k/top-p truncation (temperature 1
  when greedy); 0 elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from sleep_jax.model import layer_layout, transformer
from sleep_jax.model.config import ModelConfig


class SampleOutput(NamedTuple):
  tokens: jax.Array
  valid: jax.Array
  completion_mask: jax.Array
  logprobs: jax.Array


def _filter_logits(logits, top_k: int, top_p):
  """Masks logits outside the top-k and outside the smallest nucleus of mass >= top_p (top_p
  >= 1 keeps every token: the full-vocabulary sort is skipped at run time)."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.lax.cond(top_p < 1.0, lambda x: _nucleus(x, top_p), lambda x: x, logits)


def _nucleus(logits, top_p):
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep a token while the mass strictly before it is < top_p (the top token is always kept).
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = before < top_p
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "stop_tokens", "pad_id",
                     "random_expert"))
def sample(params, prompts: jax.Array, prompt_valid: jax.Array, rng: jax.Array, *,
           cfg: ModelConfig, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, stop_tokens: Sequence[int] = (),
           pad_id: int = 0, slot_mask: Optional[jax.Array] = None, lora=None,
           lora_scale: float = 1.0, random_expert: bool = False,
           copy_span: Optional[jax.Array] = None, copy_len: Optional[jax.Array] = None,
           copy_trigger: Optional[jax.Array] = None) -> SampleOutput:
  """Samples ``max_new_tokens`` continuations of left-padded ``prompts`` (B, P).

  Args:
    params: model parameters (``transformer.init`` or an imported checkpoint).
    prompts: (B, P) int32, left-padded; every row needs at least one real token.
    prompt_valid: (B, P) bool, False on the left padding.
    rng: PRNG key; sampling noise and random-expert routing derive from it.
    cfg: the static model config.
    max_new_tokens: decode budget N (static: it sizes the cache and outputs).
    temperature, top_k, top_p, greedy: the sampling rule (greedy ignores the others).
    stop_tokens: token ids that end a row (the stop token is kept in the completion).
    pad_id: written after a row has stopped.
    slot_mask, lora, lora_scale: forwarded to ``transformer.apply``.
    random_expert: every CMS router also activates one random extra expert (dreaming).
    copy_span, copy_len, copy_trigger: entity copying (dreams that name their passage's
      entity): the first time row b samples a token of ``copy_trigger`` (V,) bool (e.g. any
      first name), it writes ``copy_span[b, :copy_len[b]]`` (B, K) instead, one token per step;
      the log-probs are those of the tokens written. None: plain sampling.
  """
  B, P = prompts.shape
  N = max_new_tokens
  stop = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
  rng, route_base = jax.random.split(rng)
  route = lambda i: jax.random.fold_in(route_base, i) if random_expert else None
  forward = lambda p: functools.partial(transformer.apply, p, cfg=cfg, slot_mask=slot_mask,
                                        lora=lora, lora_scale=lora_scale)
  fwd = forward(params)

  cache = transformer.init_cache(cfg, B, P + N)
  # Only the last prompt position's logits are used: a (B, P, V) prefill head on a 49k
  # vocabulary was 7 GB and 2 TFLOP for 120 dreams of 300-token prompts.
  logits, cache = fwd(prompts, valid=prompt_valid, cache=cache, route_rng=route(0),
                      logits_from=P - 1)
  # Decode over per-layer weights and caches (large models): the scan's per-token copy of
  # every layer's weights is paid once here instead (``layer_layout.py``).
  dec_params, cache = layer_layout.for_decode(params, cache)
  fwd = forward(dec_params)

  class Loop(NamedTuple):
    i: jax.Array  # number of tokens generated so far
    next_logits: jax.Array  # (B, V) logits for the token to generate now
    cache: dict  # KV cache holding the prompt and every generated token
    tokens: jax.Array  # (B, N) completion buffer
    logprobs: jax.Array  # (B, N) log-prob of each generated token
    live: jax.Array  # (B, N) whether position i of the completion is a real token
    done: jax.Array  # (B,) row has emitted a stop token
    copied: jax.Array  # (B,) tokens of the copy span written so far

  def cond_fn(s: Loop):
    return (s.i < N) & ~jnp.all(s.done)

  def body_fn(s: Loop):
    scaled = s.next_logits / (1.0 if greedy else temperature)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if greedy:
      tok = jnp.argmax(scaled, axis=-1)
    else:
      key = jax.random.fold_in(rng, s.i)
      tok = jax.random.categorical(key, _filter_logits(scaled, top_k, top_p), axis=-1)
    tok = tok.astype(jnp.int32)
    copied = s.copied
    if copy_trigger is not None:
      start = (copied == 0) & (copy_len > 0) & copy_trigger[tok]
      on = start | ((copied > 0) & (copied < copy_len))
      k = jnp.clip(copied, 0, copy_span.shape[1] - 1)
      tok = jnp.where(on, jnp.take_along_axis(copy_span, k[:, None], axis=1)[:, 0], tok)
      copied = copied + on.astype(jnp.int32)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    is_live = ~s.done
    tok = jnp.where(is_live, tok, pad_id)
    lp = jnp.where(is_live, lp, 0.0)
    done = s.done | jnp.isin(tok, stop)
    new_logits, cache = fwd(tok[:, None], valid=is_live[:, None], cache=s.cache,
                            route_rng=route(s.i + 1))
    return Loop(i=s.i + 1, next_logits=new_logits[:, -1], cache=cache,
                tokens=s.tokens.at[:, s.i].set(tok), logprobs=s.logprobs.at[:, s.i].set(lp),
                live=s.live.at[:, s.i].set(is_live), done=done, copied=copied)

  init = Loop(i=jnp.zeros((), jnp.int32), next_logits=logits[:, -1], cache=cache,
              tokens=jnp.full((B, N), pad_id, jnp.int32), logprobs=jnp.zeros((B, N), jnp.float32),
              live=jnp.zeros((B, N), bool), done=jnp.zeros((B,), bool),
              copied=jnp.zeros((B,), jnp.int32))
  out = jax.lax.while_loop(cond_fn, body_fn, init)

  zeros = jnp.zeros((B, P), bool)
  return SampleOutput(
      tokens=jnp.concatenate([prompts.astype(jnp.int32), out.tokens], axis=1),
      valid=jnp.concatenate([prompt_valid.astype(bool), out.live], axis=1),
      completion_mask=jnp.concatenate([zeros, out.live], axis=1),
      logprobs=jnp.concatenate([jnp.zeros((B, P), jnp.float32), out.logprobs], axis=1))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None):
  """Host helper: list of token lists -> (tokens, valid) numpy arrays, left-padded."""
  import numpy as np
  length = length or max(len(s) for s in seqs)
  toks = np.full((len(seqs), length), pad_id, np.int32)
  valid = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = list(s)[-length:]
    if not s:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    toks[i, length - len(s):] = s
    valid[i, length - len(s):] = True
  return toks, valid
