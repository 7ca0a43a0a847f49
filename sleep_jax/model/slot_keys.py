"""Entity-keyed slots: a slot that is on only for inputs that name what it stores.

A sleep that consolidates a chunk of documents writes the documents' entity names (their token
sequences) into the slots it unlocks as *keys*. A slot with keys is on from the token where one
of its keys ends to the end of the input, and off everywhere before and on every input that
names none of them (docs/method.md section 4):

    k_s,t = 1  if  some key of slot s ends at a token u <= t  (the key's tokens at u-n+1 .. u)
    k_s,t = 0  otherwise;                       a slot without keys: k_s,t = 1

The slot's gate is multiplied by ``k_s,t`` (``cms.slot_experts``). The router is a lookup, not
a trained function: a prompt about anyone else gets the bits of the model without the slot, so
nothing the sleep did not train for can change (the trained gates only ever traded stored facts
for old ones, experiments/knowledge_incorporation/README.md, fifteenth to nineteenth sessions).
The slot still has to hold the facts in its weights: the key says *whether* it speaks, not what.

Keys are data, kept in the parameters so that checkpoints, shardings and growth carry them:
``params["slot_keys"]`` (n_levels, n_slots, K, n) float32 token ids, right-aligned, ``NO_KEY``
where a key is shorter than n or absent. They never train (a comparison has no gradient).
Decoding carries the last n-1 tokens and each slot's state in the KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

NO_KEY = -1.0  # no token at this position of the key (shorter key, or no key)
NOT_A_TOKEN = -2  # what padding is compared as: it never equals a key token


def key_gates(keys: jax.Array, tokens: jax.Array, valid: jax.Array,
              carry: Optional[Tuple[jax.Array, jax.Array]] = None):
  """The key gates ``k`` (B, T, n_levels, n_slots) float32 of ``tokens`` (B, T), and the carry
  for the next decode step: (the last n-1 tokens (B, n-1), each slot's state (B, L, S)).

  ``carry`` continues a cached input (``transformer.init_cache`` starts it empty)."""
  B, T = tokens.shape
  n = keys.shape[-1]
  k = keys.astype(jnp.int32)  # (L, S, K, n)
  seq = jnp.where(valid, tokens, NOT_A_TOKEN).astype(jnp.int32)
  hist = (jnp.full((B, n - 1), NOT_A_TOKEN, jnp.int32) if carry is None else carry[0])
  seq = jnp.concatenate([hist, seq], axis=1)  # (B, n-1+T)
  # windows[b, t, i] = the token i places before t's key end, oldest first: (B, T, n)
  windows = jnp.stack([seq[:, i:i + T] for i in range(n)], axis=-1)
  same = (windows[:, :, None, None, None, :] == k) | (k < 0)  # (B, T, L, S, K, n)
  exists = k[..., -1] >= 0  # (L, S, K): a key ends in its last position
  hit = jnp.any(jnp.all(same, axis=-1) & exists, axis=-1)  # (B, T, L, S)
  on = jax.lax.cummax(hit.astype(jnp.float32), axis=1)
  if carry is not None:
    on = jnp.maximum(on, carry[1][:, None])
  keyed = jnp.any(exists, axis=-1)  # (L, S): slots without keys are not routed by them
  gates = jnp.where(keyed, on, 1.0)
  return gates, (seq[:, seq.shape[1] - (n - 1):], on[:, -1])


def empty_carry(batch: int, cfg) -> Tuple[jax.Array, jax.Array]:
  return (jnp.full((batch, cfg.slot_key_len - 1), NOT_A_TOKEN, jnp.int32),
          jnp.zeros((batch, cfg.n_levels, cfg.n_slots), jnp.float32))


def encode(names: Sequence[Sequence[int]], n_keys: int, key_len: int) -> np.ndarray:
  """(n_keys, key_len) right-aligned keys of ``names`` (token sequences; a name longer than
  ``key_len`` keeps its last ``key_len`` tokens), ``NO_KEY`` after the last one."""
  names = list(dict.fromkeys(tuple(int(t) for t in nm) for nm in names if len(nm)))
  if len(names) > n_keys:
    raise ValueError(f"{len(names)} distinct names for a slot that holds {n_keys} keys; raise "
                     "model_slot_keys")
  out = np.full((n_keys, key_len), NO_KEY, np.float32)
  for i, nm in enumerate(names):
    nm = nm[-key_len:]
    out[i, key_len - len(nm):] = nm
  return out


def decode(keys: np.ndarray) -> list:
  """The names held by a (K, n) key array (``encode``'s inverse, up to order and truncation)."""
  keys = np.asarray(keys)
  return [tuple(int(t) for t in row if t >= 0) for row in keys if row[-1] >= 0]


def write(params, level: int, slots: Sequence[int], keys: np.ndarray):
  """``params`` with ``keys`` (K, n) written into each of ``slots`` of CMS level ``level``."""
  sk = params["slot_keys"]
  for s in slots:
    sk = sk.at[level, int(s)].set(jnp.asarray(keys, sk.dtype))
  return {**params, "slot_keys": sk}


def clear(params, level: int, live: jax.Array):
  """``params`` with the keys of the ``live`` (n_slots,) bool slots of ``level`` removed."""
  sk = params["slot_keys"]
  sk = sk.at[level].set(jnp.where(live[:, None, None], NO_KEY, sk[level]))
  return {**params, "slot_keys": sk}


def held(params, level: int, slots: Sequence[int]) -> list:
  """Every distinct name the given slots of ``level`` hold (a deep sleep's target inherits
  them)."""
  sk = np.asarray(params["slot_keys"][level])
  return list(dict.fromkeys(nm for s in slots for nm in decode(sk[int(s)])))


def add(params, cfg, n_keys: int, key_len: int):
  """The same model with room for ``n_keys`` keys of ``key_len`` tokens per slot, all empty
  (every slot unrouted: the function is unchanged). Returns ``(params, cfg)``."""
  if n_keys <= 0:
    return params, cfg
  if (cfg.slot_keys, cfg.slot_key_len) == (n_keys, key_len):
    return params, cfg
  if cfg.slot_keys:
    raise ValueError(f"the model's slots already hold {cfg.slot_keys} keys of "
                     f"{cfg.slot_key_len} tokens")
  cfg = dataclasses.replace(cfg, slot_keys=int(n_keys), slot_key_len=int(key_len))
  shape = (cfg.n_levels, cfg.n_slots, cfg.slot_keys, cfg.slot_key_len)
  return {**params, "slot_keys": jnp.full(shape, NO_KEY, jnp.float32)}, cfg
