"""Growing a model without changing its function.

* Slot operations (docs/method.md sections 1 and 3): ``unlock_slot`` turns on the next free low-rank slot of a
  CMS level with a fresh random ``A`` and a zero ``B`` (so the function is unchanged);
  ``reset_level`` prunes every live slot of a level (zero weights, masked); ``live_slots`` lists
  them. All are pure functions of ``(params, slot_mask)``; shapes never change, so jit caches and
  checkpoint structures stay valid.
* ``allocate_slots``, ``add_slot_gates``, ``add_levels``: more (masked) slots per level, a hidden
  layer in every slot's gate, more slots-only CMS levels; each leaves the function unchanged.
* ``slot_trainable_mask``: the elementwise trainable mask "only slot s of level j learns".
* Knowledge Seeding into a larger model: ``hyperclone_width`` (HyperCloning: every hidden unit and
  attention head is repeated n times and weights are split so each copy carries the same value)
  and ``expand_depth`` (new layers whose output projections are zero, i.e. identity blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model import slot_keys
from sleep_jax.model import transformer as T
from sleep_jax.model.config import ModelConfig

SLOT_KEYS = ("slot_a", "slot_b", "slot_router")


# ----------------------------------------------------------------------------------------------
# Slots.
# ----------------------------------------------------------------------------------------------
def live_slots(slot_mask, level: int) -> list:
  """Indices of the live slots of CMS level ``level`` (host-side list)."""
  return [int(i) for i in np.flatnonzero(np.asarray(slot_mask)[level])]


def _set_slot(lvl: dict, s, a, b, router_col) -> dict:
  lvl = dict(lvl)
  lvl["slot_a"] = lvl["slot_a"].at[:, s].set(a)
  lvl["slot_b"] = lvl["slot_b"].at[:, s].set(b)
  lvl["slot_router"] = lvl["slot_router"].at[..., s].set(router_col)
  if "slot_gate_v" in lvl:  # the gate's hidden layer starts silent (its U stays random)
    lvl["slot_gate_v"] = lvl["slot_gate_v"].at[:, s].set(0.0)
  return lvl


def unlock_slot(params, slot_mask, level: int, rng) -> Tuple[dict, jax.Array, jax.Array]:
  """Unlocks the first free slot of ``level``: A ~ N(0, 1/d), B = 0, router column 0.

  Returns ``(params, slot_mask, slot_index)``. Raises if the level has no free slot (checked on
  the host when the mask is concrete; under jit an exhausted level returns the inputs unchanged
  with index -1).
  """
  mask = jnp.asarray(slot_mask)
  free = ~mask[level]
  if not isinstance(mask, jax.core.Tracer) and not bool(jnp.any(free)):
    raise ValueError(f"CMS level {level} has no free slot (all {mask.shape[1]} are live); "
                     "prune it (reset_level) or allocate more slots (n_slots)")
  s = jnp.argmax(free)
  lvl = params["layers"][T.level_name(level)]
  L, _, d, r = lvl["slot_a"].shape
  a = jax.random.normal(rng, (L, d, r), lvl["slot_a"].dtype) * d ** -0.5
  has_free = jnp.any(free)
  new_lvl = _set_slot(lvl, s, a, jnp.zeros((L, r, d), lvl["slot_b"].dtype),
                      jnp.zeros(lvl["slot_router"].shape[:-1], lvl["slot_router"].dtype))
  new_lvl = jax.tree.map(lambda n, o: jnp.where(has_free, n, o), new_lvl, lvl)
  params = _replace_level(params, level, new_lvl)
  mask = mask.at[level, s].set(mask[level, s] | has_free)
  return params, mask, jnp.where(has_free, s, -1)


def reset_level(params, slot_mask, level: int) -> Tuple[dict, jax.Array]:
  """Prunes ``level``: every live slot's A, B and router column become 0 and the slot is masked."""
  mask = jnp.asarray(slot_mask)
  live = mask[level]
  lvl = dict(params["layers"][T.level_name(level)])
  lvl["slot_a"] = jnp.where(live[None, :, None, None], 0.0, lvl["slot_a"]).astype(lvl["slot_a"].dtype)
  lvl["slot_b"] = jnp.where(live[None, :, None, None], 0.0, lvl["slot_b"]).astype(lvl["slot_b"].dtype)
  lvl["slot_router"] = jnp.where(live, 0.0, lvl["slot_router"]).astype(lvl["slot_router"].dtype)
  if "slot_gate_v" in lvl:
    lvl["slot_gate_v"] = jnp.where(live[None, :, None], 0.0, lvl["slot_gate_v"]).astype(
        lvl["slot_gate_v"].dtype)
  params = _replace_level(params, level, lvl)
  if "slot_keys" in params:  # a pruned slot holds no names
    params = slot_keys.clear(params, level, live)
  return params, mask.at[level].set(False)


def _replace_level(params, level, lvl):
  params = dict(params)
  params["layers"] = dict(params["layers"])
  params["layers"][T.level_name(level)] = lvl
  return params


def _added(key: str, want: int, have: int, what: str) -> int:
  """How many ``what`` growth adds for ``key`` = ``want`` (a model only grows)."""
  if int(want) < have:
    raise ValueError(f"{key}={want} is fewer than the model's own {have} {what}; they can be "
                     "added, not removed")
  return int(want) - have


def allocate_slots(params, cfg: ModelConfig, n_slots: int):
  """The same model with ``n_slots`` pre-allocated slots per CMS level (at least its own).

  The added slots are masked (zero A, B and router column), so the function is unchanged (up to
  the order of float sums over the longer slot axis) for a slot mask of the old shape padded
  with False; ``unlock_slot`` draws their A when it turns one on. Returns ``(params, cfg)``.
  """
  extra = _added("model_slots", n_slots, cfg.n_slots, "slots per level")
  if extra == 0:
    return params, cfg
  L, d, r, S = cfg.n_layers, cfg.d_model, cfg.slot_rank, cfg.n_slots
  dt = params["embed"].dtype
  pad = lambda x, axis: jnp.concatenate(
      [x, jnp.zeros(x.shape[:axis] + (extra,) + x.shape[axis + 1:], x.dtype)], axis=axis)
  for j in range(cfg.n_levels):
    lvl = dict(params["layers"][T.level_name(j)])
    # A model built without slots has no slot leaves: start from empty ones.
    lvl["slot_a"] = pad(lvl.get("slot_a", jnp.zeros((L, S, d, r), dt)), 1)
    lvl["slot_b"] = pad(lvl.get("slot_b", jnp.zeros((L, S, r, d), dt)), 1)
    lvl["slot_router"] = pad(lvl.get("slot_router", jnp.zeros((L, d, S), dt)), 2)
    for name in ("slot_gate_u", "slot_gate_v"):
      if name in lvl:
        lvl[name] = pad(lvl[name], 1)
    params = _replace_level(params, j, lvl)
  if "slot_keys" in params:  # the added slots hold no names
    params = {**params, "slot_keys": jnp.concatenate([params["slot_keys"], jnp.full(
        (cfg.n_levels, extra) + params["slot_keys"].shape[2:], slot_keys.NO_KEY,
        params["slot_keys"].dtype)], axis=1)}
  return params, dataclasses.replace(cfg, n_slots=int(n_slots))


def add_slot_gates(params, cfg: ModelConfig, hidden: int):
  """The same model with a hidden layer of ``hidden`` units in every slot's gate
  (``cms.slot_scores``): U ~ N(0, 1/d) from a fixed key, v = 0, so the function is unchanged.
  Returns ``(params, cfg)``; a model that already has such gates is returned as it is."""
  if hidden <= 0 or cfg.slot_gate_hidden == hidden:
    return params, cfg
  if cfg.slot_gate_hidden:
    raise ValueError(f"the model's slot gates already have {cfg.slot_gate_hidden} hidden units")
  if cfg.n_slots == 0:
    raise ValueError("slot gates need slots (model_slots > 0)")
  L, d, S = cfg.n_layers, cfg.d_model, cfg.n_slots
  dt = params["embed"].dtype
  for j, key in enumerate(jax.random.split(jax.random.key(0), cfg.n_levels)):
    lvl = dict(params["layers"][T.level_name(j)])
    lvl["slot_gate_u"] = (jax.random.normal(key, (L, S, d, hidden)) * d ** -0.5).astype(dt)
    lvl["slot_gate_v"] = jnp.zeros((L, S, hidden), dt)
    params = _replace_level(params, j, lvl)
  return params, dataclasses.replace(cfg, slot_gate_hidden=int(hidden))


def add_levels(params, cfg: ModelConfig, n_levels: int):
  """The same model with ``n_levels`` CMS levels: slots-only fast levels (no dense expert, the
  model's slots, gates and keys, every slot masked) inserted before the slowest level, which
  keeps its MLP and stays last. A level with no live slot and no dense expert adds exactly
  nothing to the residual stream, so the function is unchanged. Returns ``(params, cfg)``."""
  extra = _added("model_levels", n_levels, cfg.n_levels, "CMS levels")
  if extra == 0:
    return params, cfg
  if cfg.n_slots == 0:
    raise ValueError("an added CMS level holds only slots: model_levels needs model_slots > 0")
  at = cfg.n_levels - 1

  def ins(xs, v):
    return tuple(xs[:at]) + (v,) * extra + tuple(xs[at:])

  new = dataclasses.replace(cfg, d_ff=ins(cfg.d_ff, 0), n_experts=ins(cfg.n_experts, 1),
                            chunk_sizes=ins(cfg.chunk_sizes, cfg.chunk_sizes[max(at - 1, 0)]))
  old = [params["layers"][T.level_name(j)] for j in range(cfg.n_levels)]
  # Fresh levels as ``init`` draws them (random A and gate U, zero B, router and gate v), from
  # a key of their own so that the existing levels' parameters keep their bits.
  fresh = [T.init(jax.random.fold_in(jax.random.key(2), j), new, level=j)
           for j in range(at, at + extra)]
  layers = {k: v for k, v in params["layers"].items() if not k.startswith("cms_")}
  for j, lvl in enumerate(old[:at] + fresh + old[at:]):
    layers[T.level_name(j)] = lvl
  out = {**params, "layers": layers}
  if "slot_keys" in params:  # the added levels' slots hold no names
    sk = params["slot_keys"]
    out["slot_keys"] = jnp.concatenate(
        [sk[:at], jnp.full((extra,) + sk.shape[1:], slot_keys.NO_KEY, sk.dtype), sk[at:]])
  return out, new


def slot_trainable_mask(params, level: int, slot: int):
  """Elementwise bool pytree: True only on slot ``slot`` of level ``level`` (A, B, router column,
  and its gate's hidden layer)."""
  out = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
  lvl = out["layers"][T.level_name(level)]
  lvl["slot_a"][:, slot] = True
  lvl["slot_b"][:, slot] = True
  lvl["slot_router"][..., slot] = True
  for name in ("slot_gate_u", "slot_gate_v"):  # the gate's hidden layer, when the model has one
    if name in lvl:
      lvl[name][:, slot] = True
  return out


# ----------------------------------------------------------------------------------------------
# HyperCloning width expansion.
# ----------------------------------------------------------------------------------------------
def _tile_in_out(w, n, in_axes: Sequence[int], out_axes: Sequence[int]):
  """Repeats ``w`` n times along each in/out axis (block-tiling) and divides by n per in axis.

  With input [x, ..., x] (n copies) the result produces [y, ..., y]: every output copy sums n
  equal contributions of w/n.
  """
  for ax in in_axes:
    w = jnp.concatenate([w] * n, axis=ax) / n
  for ax in out_axes:
    w = jnp.concatenate([w] * n, axis=ax)
  return w


def hyperclone_width(params, cfg: ModelConfig, n: int = 2):
  """HyperCloning (Samragh et al. 2024): an n-times wider model with exactly the same logits.

  The residual stream of the large model holds n copies of the small one's, ``h' = [h, ..., h]``;
  RMSNorm is invariant to that copy (same mean square); every linear map is block-tiled and split
  ``W' = [[W/n ...] ...]`` so it maps copies to copies; attention heads (and KV heads) are
  repeated, keeping head_dim, and the output projection divides by n to undo the repeated sum.
  With tied embeddings the final norm weight is divided by n so logits ``h'.E'^T`` are unchanged.
  MLP widths, slot ranks and expert counts are multiplied/kept so every block stays a copy.
  """
  lay = params["layers"]
  new = {"embed": jnp.concatenate([params["embed"]] * n, axis=1)}
  fn = jnp.concatenate([params["final_norm"]] * n)
  new["final_norm"] = fn / n if cfg.tie_embeddings else fn
  if not cfg.tie_embeddings:
    new["unembed"] = _tile_in_out(params["unembed"], n, [0], [])
  nl = {"attn_norm": jnp.concatenate([lay["attn_norm"]] * n, axis=1),
        "q": _tile_in_out(lay["q"], n, [1], [2]),
        "k": _tile_in_out(lay["k"], n, [1], [2]),
        "v": _tile_in_out(lay["v"], n, [1], [2]),
        # Heads are repeated (axis 1), so their sum is n times too large: divide by n once more.
        "o": _tile_in_out(lay["o"], n, [1], [3])}
  for k in ("q_bias", "k_bias", "v_bias"):  # per head: repeated with the heads
    if k in lay:
      nl[k] = jnp.concatenate([lay[k]] * n, axis=1)
  for k in ("q_norm", "k_norm"):  # over head_dim, which is unchanged
    if k in lay:
      nl[k] = lay[k]
  for j in range(cfg.n_levels):
    lv = lay[T.level_name(j)]
    out = {"norm": jnp.concatenate([lv["norm"]] * n, axis=1)}
    if "wi_gate" in lv:
      out["wi_gate"] = _tile_in_out(lv["wi_gate"], n, [2], [3])
      out["wi_up"] = _tile_in_out(lv["wi_up"], n, [2], [3])
      out["wo"] = _tile_in_out(lv["wo"], n, [2], [3])
      if "expert_router" in lv:
        out["expert_router"] = _tile_in_out(lv["expert_router"], n, [1], [])
    if "slot_a" in lv:
      out["slot_router"] = _tile_in_out(lv["slot_router"], n, [1], [])
      out["slot_a"] = _tile_in_out(lv["slot_a"], n, [2], [3])
      out["slot_b"] = _tile_in_out(lv["slot_b"], n, [2], [3])
    nl[T.level_name(j)] = out
  new["layers"] = nl
  big = dataclasses.replace(
      cfg, d_model=cfg.d_model * n, n_heads=cfg.n_heads * n, n_kv_heads=cfg.n_kv_heads * n,
      head_dim=cfg.hd, d_ff=tuple(f * n for f in cfg.d_ff), slot_rank=cfg.slot_rank * n)
  return new, big


# ----------------------------------------------------------------------------------------------
# Depth expansion with identity blocks.
# ----------------------------------------------------------------------------------------------
def expand_depth(params, cfg: ModelConfig, insert_after: Sequence[int]):
  """Inserts one new layer after each index in ``insert_after`` (0-based, in the old model).

  A new layer is a copy of the layer before it with its attention output projection and every
  MLP/slot output projection set to zero, so it adds nothing to the residual stream: the grown
  model has exactly the same function, and the zeroed projections still receive gradient (the
  copied inputs are non-trivial), so the new depth can learn (LLaMA-Pro style).
  """
  L = cfg.n_layers
  order = []
  for i in range(L):
    order.append((i, False))
    order.extend((i, True) for _ in range(list(insert_after).count(i)))
  if any(i < 0 or i >= L for i in insert_after):
    raise ValueError(f"insert_after indices must be in [0, {L}); got {list(insert_after)}")
  idx = jnp.asarray([i for i, _ in order])
  is_new = jnp.asarray([new for _, new in order])
  zero_keys = {"o", "wo", "slot_b"}

  def grow(path, x):
    x = x[idx]
    if path[-1].key in zero_keys:
      x = jnp.where(is_new.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x).astype(x.dtype)
    return x

  layers = jax.tree_util.tree_map_with_path(grow, params["layers"])
  out = dict(params)
  out["layers"] = layers
  return out, dataclasses.replace(cfg, n_layers=len(order))
