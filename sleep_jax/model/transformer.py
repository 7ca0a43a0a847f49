"""The one decoder-only transformer: Llama-style, pure ``init``/``apply`` over a params pytree.

RMSNorm, RoPE (configurable base, half-split "rotate_half" convention as in Hugging Face Llama,
optional Llama-3.1 frequency scaling), grouped-query attention (optional Qwen2-style q/k/v
projection biases and Qwen3-style per-head q/k RMSNorms, both before RoPE), and per layer a chain
of CMS MLP levels (``cms.py``) each added to the residual stream. Layers are stacked along a
leading "layers" axis and run with ``lax.scan`` so a 30-layer model compiles as fast as a 2-layer
one; the sampler's decode loop runs a large model's layers one by one over per-layer buffers
(``layer_layout.py``).

Every parameter has logical axis names (``param_axes``); activations are constrained by logical
names too, so sharding is the rules table in ``parallel/mesh.py``.

Padding convention: ``valid`` marks real tokens; positions are ``cumsum(valid) - 1`` per row, so
left-padded prompts (the sampler's layout) and right-padded training sequences both work.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model import cms, layer_layout, slot_keys
from sleep_jax.model.dense import dense
from sleep_jax.model.config import ModelConfig
from sleep_jax.parallel.logical import constrain

Params = Dict[str, Any]
Cache = Dict[str, jax.Array]

NEG_INF = -1e30  # finite, so fully-masked rows (left padding) give no NaN


# ----------------------------------------------------------------------------------------------
# Parameters: one table of (shape, logical axes, initialiser) per parameter.
# ----------------------------------------------------------------------------------------------
def _param_table(cfg: ModelConfig):
  d, L, hd = cfg.d_model, cfg.n_layers, cfg.hd
  H, K, S, r = cfg.n_heads, cfg.n_kv_heads, cfg.n_slots, cfg.slot_rank
  std = cfg.init_std
  normal = lambda s: ("normal", s)
  t = {
      "embed": ((cfg.vocab_size, d), ("vocab", "embed"), normal(std)),
      "final_norm": ((d,), ("embed",), ("ones",)),
      "layers": {
          "attn_norm": ((L, d), ("layers", "embed"), ("ones",)),
          "q": ((L, d, H, hd), ("layers", "embed", "q_heads", "head_dim"), normal(std)),
          "k": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
          "v": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
          "o": ((L, H, hd, d), ("layers", "q_heads", "head_dim", "embed"), normal(std)),
      },
  }
  if cfg.qkv_bias:  # zero init: the function of a model without biases
    t["layers"]["q_bias"] = ((L, H, hd), ("layers", "q_heads", "head_dim"), ("zeros",))
    t["layers"]["k_bias"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"), ("zeros",))
    t["layers"]["v_bias"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"), ("zeros",))
  if cfg.qk_norm:
    t["layers"]["q_norm"] = ((L, hd), ("layers", "head_dim"), ("ones",))
    t["layers"]["k_norm"] = ((L, hd), ("layers", "head_dim"), ("ones",))
  if not cfg.tie_embeddings:
    t["unembed"] = ((d, cfg.vocab_size), ("embed", "vocab"), normal(std))
  for j in range(cfg.n_levels):
    lvl = {"norm": ((L, d), ("layers", "embed"), ("ones",))}
    F, E = cfg.d_ff[j], cfg.n_experts[j]
    if F > 0:
      lvl["wi_gate"] = ((L, E, d, F), ("layers", "experts", "embed", "mlp"), normal(std))
      lvl["wi_up"] = ((L, E, d, F), ("layers", "experts", "embed", "mlp"), normal(std))
      lvl["wo"] = ((L, E, F, d), ("layers", "experts", "mlp", "embed"), normal(std))
      if E > 1:
        lvl["expert_router"] = ((L, d, E), ("layers", "embed", "experts"), normal(std))
    if S > 0:
      lvl["slot_router"] = ((L, d, S), ("layers", "embed", "slots"), ("zeros",))
      # A is random so an unlocked slot can learn; B is zero so unlocking preserves the function.
      lvl["slot_a"] = ((L, S, d, r), ("layers", "slots", "embed", "rank"), normal(d ** -0.5))
      lvl["slot_b"] = ((L, S, r, d), ("layers", "slots", "rank", "embed"), ("zeros",))
      if cfg.slot_gate_hidden > 0:  # the gate's hidden layer (cms.slot_scores); v = 0 at unlock
        h = cfg.slot_gate_hidden
        lvl["slot_gate_u"] = ((L, S, d, h), ("layers", "slots", "embed", "rank"), normal(d ** -0.5))
        lvl["slot_gate_v"] = ((L, S, h), ("layers", "slots", "rank"), ("zeros",))
    t["layers"][level_name(j)] = lvl
  if cfg.slot_keys:  # the names each slot is keyed on (slot_keys.py), none at first
    t["slot_keys"] = ((cfg.n_levels, S, cfg.slot_keys, cfg.slot_key_len),
                      (None, None, None, None), ("full", slot_keys.NO_KEY))
  return t


def level_name(j: int) -> str:
  """Params key of CMS level j (0-based, fastest first)."""
  return f"cms_{j}"


def _is_leaf(x):
  return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def param_axes(cfg: ModelConfig):
  """Pytree (same structure as params) of logical axis-name tuples."""
  return jax.tree.map(lambda e: e[1], _param_table(cfg), is_leaf=_is_leaf)


def param_shapes(cfg: ModelConfig):
  dt = jnp.dtype(cfg.param_dtype)
  return jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], dt), _param_table(cfg), is_leaf=_is_leaf)


def init(rng: jax.Array, cfg: ModelConfig, level: Optional[int] = None) -> Params:
  """Random parameters. Jit it with ``out_shardings`` to initialise directly on a mesh.
  ``level`` j: CMS level j's alone (``params["layers"][level_name(j)]``; every slot's B and
  router column are zero, so a masked level without a dense expert adds nothing)."""
  table = _param_table(cfg)
  if level is not None:
    table = table["layers"][level_name(level)]
  leaves, treedef = jax.tree.flatten(table, is_leaf=_is_leaf)
  keys = jax.random.split(rng, len(leaves))
  dt = jnp.dtype(cfg.param_dtype)

  def make(key, entry):
    shape, _, (kind, *args) = entry
    if kind == "normal":
      return (args[0] * jax.random.normal(key, shape, jnp.float32)).astype(dt)
    if kind == "ones":
      return jnp.ones(shape, dt)
    if kind == "full":
      return jnp.full(shape, args[0], dt)
    return jnp.zeros(shape, dt)

  return jax.tree.unflatten(treedef, [make(k, e) for k, e in zip(keys, leaves)])


def slot_mask_none(cfg: ModelConfig) -> jax.Array:
  """All slots masked: shape (n_levels, n_slots), bool."""
  return jnp.zeros((cfg.n_levels, cfg.n_slots), bool)


# ----------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------
def rms_norm(x, w, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


ATTN_EXTRAS = {"qkv_bias": ("q_bias", "k_bias", "v_bias"), "qk_norm": ("q_norm", "k_norm")}


def llama3_inv_freq(head_dim: int, base: float, scaling) -> np.ndarray:
  """RoPE inverse frequencies with Llama-3.1's "llama3" scaling (Hugging Face
  ``_compute_llama3_parameters``): long wavelengths are divided by ``factor``, short ones kept,
  the band between smoothly interpolated. ``scaling`` = (factor, low_freq_factor,
  high_freq_factor, original_max_position_embeddings). float64 numpy, shape (head_dim // 2,)."""
  factor, low, high, old_len = (float(v) for v in scaling)
  inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / inv
  out = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, (1 - smooth) * out / factor + smooth * out, out)


def rope(x, positions, base, scaling=None):
  """Rotary embedding, half-split convention. x: (B, T, H, D); positions: (B, T).
  ``scaling``: ``ModelConfig.rope_scaling`` (Llama-3.1 rule) or None."""
  half = x.shape[-1] // 2
  if scaling is None:
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  else:
    freq = jnp.asarray(llama3_inv_freq(2 * half, base, scaling), jnp.float32)
  ang = positions.astype(jnp.float32)[..., None] * freq  # (B, T, half)
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention(q, k, v, mask):
  """GQA. q: (B, T, H, D); k, v: (B, S, K, D); mask: (B, T, S) bool -> (B, T, H, D)."""
  B, T, H, D = q.shape
  K = k.shape[2]
  q = q.reshape(B, T, K, H // K, D)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (D ** -0.5)
  s = jnp.where(mask[:, None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v)
  return out.reshape(B, T, H, D)


def _lora_proj(x, w, lora, name, scale):
  """x @ w for a (d, heads, hd) projection plus an optional LoRA delta."""
  y = dense(x, w)
  if lora is not None and name in lora:
    delta = dense(dense(x, lora[name]["a"]), lora[name]["b"])
    y = y + scale * delta.reshape(y.shape)
  return y


def _check_attn_extras(params, cfg: ModelConfig):
  """The optional attention params are present exactly when the config asks for them (a params
  pytree from another config, e.g. a growth op that does not carry them, fails loudly here)."""
  layers = params["layers"][0] if layer_layout.is_per_layer(params) else params["layers"]
  for flag, names in ATTN_EXTRAS.items():
    have = [n for n in names if n in layers]
    if getattr(cfg, flag) and len(have) != len(names):
      raise ValueError(f"cfg.{flag}=True but params['layers'] lacks "
                       f"{sorted(set(names) - set(have))}; these params were not built for this "
                       "config (or an operation on them dropped the new leaves)")
    if not getattr(cfg, flag) and have:
      raise ValueError(f"params['layers'] has {have} but cfg.{flag}=False: they would be ignored; "
                       f"use a config with {flag}=True")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """Empty KV cache. ``index`` is the next slot to write (same for all rows: prompts are
  left-padded); ``pos`` is each row's next RoPE position; ``valid`` marks slots holding tokens."""
  dt = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.hd)
  cache = {
      "k": jnp.zeros(shape, dt),
      "v": jnp.zeros(shape, dt),
      "valid": jnp.zeros((batch, max_len), bool),
      "index": jnp.zeros((), jnp.int32),
      "pos": jnp.zeros((batch,), jnp.int32),
  }
  if cfg.slot_gate_sticky:  # each slot gate's running maximum (cms.slot_scores)
    cache["gate_max"] = jnp.full((cfg.n_layers, cfg.n_levels, batch, cfg.n_slots),
                                 cms.GATE_FLOOR, jnp.float32)
  if cfg.slot_keys:  # the last key_len-1 tokens and each keyed slot's state (slot_keys.py)
    cache["key_hist"], cache["key_on"] = slot_keys.empty_carry(batch, cfg)
  return cache


# ----------------------------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------------------------
def apply(params: Params, tokens: jax.Array, cfg: ModelConfig, *,
          slot_mask: Optional[jax.Array] = None, valid: Optional[jax.Array] = None,
          cache: Optional[Cache] = None, lora: Optional[Params] = None, lora_scale: float = 1.0,
          route_rng: Optional[jax.Array] = None,
          return_hidden: bool = False,
          logits_from: int = 0, return_gates: bool = False):
  """Logits for ``tokens`` (B, T). Returns ``(logits, new_cache)`` (``new_cache`` is None
  without a cache); with ``return_gates`` ``(logits, new_cache, gates)``, ``gates[j]`` the slot
  gates ``s_s(x)`` of CMS level j (L, B, T, S) for every level with slots.

  Args:
    slot_mask: (n_levels, n_slots) bool; which low-rank slots are live. Default: none.
    valid: (B, T) bool; False for padding. Default: all real tokens.
    cache: KV cache from ``init_cache``; the T tokens are written at ``cache["index"]``.
    lora: optional LoRA pytree (``lora.py``) on q/k/v/o and the slowest level's dense MLP.
    route_rng: when given, every CMS router also turns on one random extra expert (dreaming).
    return_hidden: return the final normalised hidden states instead of logits.
    logits_from: (static) only positions ``>= logits_from`` reach the output head, which then
      has ``T - logits_from`` positions. A distillation loss that reads the completion only
      needs no (B, T, V) logits over a long prompt (on a 49k vocabulary those dominate memory).
  """
  B, T = tokens.shape
  dt = jnp.dtype(cfg.dtype)
  _check_attn_extras(params, cfg)
  if valid is None:
    valid = jnp.ones((B, T), bool)
  if slot_mask is None:
    slot_mask = slot_mask_none(cfg)
  offsets = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  if cache is None:
    positions = jnp.maximum(offsets, 0)
    q_slot = jnp.arange(T)
    key_valid = valid
    mask = (q_slot[None, :, None] >= jnp.arange(T)[None, None, :]) & key_valid[:, None, :]
  else:
    positions = jnp.maximum(cache["pos"][:, None] + offsets, 0)
    idx = cache["index"]
    key_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, idx))
    S = key_valid.shape[1]
    q_slot = idx + jnp.arange(T)
    mask = (q_slot[None, :, None] >= jnp.arange(S)[None, None, :]) & key_valid[:, None, :]

  x = params["embed"].astype(dt)[tokens]
  x = constrain(x, ("batch", "length", "embed"))
  n_levels = cfg.n_levels
  key_gate = key_carry = None
  if cfg.slot_keys:  # (B, T, n_levels, n_slots): which slots the input has named so far
    carry = None if cache is None else (cache["key_hist"], cache["key_on"])
    key_gate, key_carry = slot_keys.key_gates(params["slot_keys"], tokens, valid, carry)

  def layer(h, xs):
    p, kv, rng = xs["p"], xs.get("kv"), xs.get("rng")
    lp = xs.get("lora")
    a = rms_norm(h, p["attn_norm"], cfg.norm_eps)
    q = _lora_proj(a, p["q"].astype(dt), lp, "q", lora_scale)
    k = _lora_proj(a, p["k"].astype(dt), lp, "k", lora_scale)
    v = _lora_proj(a, p["v"].astype(dt), lp, "v", lora_scale)
    if cfg.qkv_bias:
      q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if cfg.qk_norm:
      q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = rope(q, positions, cfg.rope_base, cfg.rope_scaling)
    k = rope(k, positions, cfg.rope_base, cfg.rope_scaling)
    q = constrain(q, ("batch", "length", "q_heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    if kv is not None:
      ck = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, idx, 0, 0))
      cv = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, idx, 0, 0))
      new_kv = {"k": ck, "v": cv}
      k, v = ck.astype(dt), cv.astype(dt)
    att = attention(q, k, v, mask)
    o = dense(att, p["o"].astype(dt), contract=2)
    if lp is not None and "o" in lp:
      flat = att.reshape(att.shape[:2] + (-1,))
      o = o + lora_scale * dense(dense(flat, lp["o"]["a"]), lp["o"]["b"])
    h = constrain(h + o, ("batch", "length", "embed"))
    rngs = (None,) * n_levels if rng is None else tuple(jax.random.split(rng, n_levels))
    gates, running = {}, []
    for j in range(n_levels):
      lvl = jax.tree.map(lambda w: w.astype(dt), p[level_name(j)])
      z = rms_norm(h, lvl["norm"], cfg.norm_eps)
      mlp_lora = lp if j == n_levels - 1 else None
      # Sticky gates continue from the cache's running maximum (a fresh input: from nothing).
      m0 = kv["gate_max"][j] if kv is not None and "gate_max" in kv else None
      sticky = (valid, m0) if cfg.slot_gate_sticky else None
      y = cms.level_apply(lvl, z, slot_mask[j], expert_top_k=cfg.expert_top_k,
                          slot_top_k=cfg.slot_top_k, route_rng=rngs[j], lora=mlp_lora,
                          lora_scale=lora_scale, return_scores=return_gates, sticky=sticky,
                          key_gate=None if key_gate is None else key_gate[:, :, j])
      if sticky is not None:
        y, last = y
        running.append(m0 if last is None else last)
      if return_gates:
        y, g = y
        if g is not None:
          gates[j] = g
      h = constrain(h + y, ("batch", "length", "embed"))
    if new_kv is not None and "gate_max" in kv:
      new_kv["gate_max"] = jnp.stack(running)
    return h, (new_kv, gates) if return_gates else new_kv

  if cfg.remat == "full":
    layer = jax.checkpoint(layer)
  elif cfg.remat == "dots":
    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

  per_layer = layer_layout.is_per_layer(params)  # the sampler's decode layout
  xs = {"p": params["layers"] if per_layer else
        layer_layout.squeeze_single_experts(params["layers"])}
  if cache is not None:
    xs["kv"] = {k: cache[k] for k in ("k", "v", "gate_max") if k in cache}
  if route_rng is not None:
    xs["rng"] = jax.random.split(route_rng, cfg.n_layers)
  if lora is not None:
    xs["lora"] = lora
  h, new_kv = (layer_layout.run_layers if per_layer else jax.lax.scan)(layer, x, xs)
  gates = None
  if return_gates:
    new_kv, gates = new_kv

  h = rms_norm(h[:, logits_from:], params["final_norm"], cfg.norm_eps)
  out = h if return_hidden else unembed(params, h, cfg)
  new_cache = None
  if cache is not None:
    new_cache = {"k": new_kv["k"], "v": new_kv["v"], "valid": key_valid, "index": idx + T,
                 "pos": cache["pos"] + jnp.sum(valid, axis=1, dtype=jnp.int32)}
    if "gate_max" in new_kv:
      new_cache["gate_max"] = new_kv["gate_max"]
    if key_carry is not None:
      new_cache["key_hist"], new_cache["key_on"] = key_carry
  return (out, new_cache, gates) if return_gates else (out, new_cache)


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The output head: final hidden states (B, T, D) -> float32 logits (B, T, V)."""
  w = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  out = dense(h, w.astype(jnp.dtype(cfg.dtype))).astype(jnp.float32)
  return constrain(out, ("batch", "length", "vocab"))


def logits_to_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[t+1] | tokens[:t+1]) aligned with tokens: entry t is the log-prob of token t
  (entry 0 is 0: the first token has no prediction)."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Gather with shifted (B, T) targets; slicing the (B, T, V) logits would pad in the backward.
  nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  tok = jnp.take_along_axis(lp, nxt[..., None], axis=-1)[..., 0]
  return jnp.pad(tok[:, :-1], ((0, 0), (1, 0)))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
