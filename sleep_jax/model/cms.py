"""Continuum Memory System MLP level: dense expert(s) + masked low-rank expert slots + router.

One CMS level of one layer computes (docs/method.md section 1)

    y(x) = sum_e  g_e(x) * SwiGLU_e(x)  +  sum_s  m_s * s_s(x) * B_s^T silu(A_s^T x)

with dense-expert gates ``g`` (1 for a single always-on expert, else the router's softmax
probability of the top-k experts, Switch-style and not renormalised so the router learns),
slot gates ``s_s = sigmoid(w_s . x)`` (optionally with a hidden layer, ``slot_scores``) and the
slot mask ``m`` (data, not parameters). Slots do not compete in a softmax, so unlocking a slot
whose ``B`` is zero leaves every output bit unchanged, and a masked slot is multiplied by an
exact 0.0: it adds nothing and gets exactly zero gradient.

Sparse routing and the dreaming switch: with ``n_experts > expert_top_k`` (or ``slot_top_k > 0``)
only the top-k experts (slots) run per token; ``route_rng`` additionally turns on one uniformly
random *live but unselected* expert per token (and one slot). When no such expert exists (a single
always-on expert with every live slot on), the switch changes nothing, as in any MoE whose router
already selects everything.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model.dense import dense
from sleep_jax.parallel.logical import constrain


def random_extra(rng: jax.Array, candidates: jax.Array) -> jax.Array:
  """One uniformly random True entry of ``candidates`` (..., N) per row as a bool one-hot."""
  u = jax.random.uniform(rng, candidates.shape)
  pick = jnp.argmax(jnp.where(candidates, u, -1.0), axis=-1)
  onehot = jax.nn.one_hot(pick, candidates.shape[-1], dtype=bool)
  return onehot & candidates


def top_k_mask(scores: jax.Array, allowed: jax.Array, k: int) -> jax.Array:
  """Bool mask of the k highest ``scores`` among ``allowed`` entries (last axis)."""
  n = scores.shape[-1]
  if k <= 0 or k >= n:
    return allowed
  masked = jnp.where(allowed, scores, -jnp.inf)
  _, idx = jax.lax.top_k(masked, k)
  chosen = jnp.any(jax.nn.one_hot(idx, n, dtype=bool), axis=-2)
  return chosen & allowed


def _lora_delta(x, lora, name, scale, expert_axis=False):
  """LoRA delta shared by every dense expert (broadcast over the expert axis if asked)."""
  if lora is None or name not in lora:
    return 0.0
  d = scale * dense(dense(x, lora[name]["a"]), lora[name]["b"])
  return d[..., None, :] if expert_axis else d


def dense_experts(p, x, *, top_k: int, route_rng: Optional[jax.Array], lora=None, lora_scale=1.0):
  """Routed SwiGLU experts. p: wi_gate/wi_up (E, d, F), wo (E, F, d), expert_router (d, E); a
  single always-on expert comes without its expert axis, (d, F) and (F, d)
  (``layer_layout.squeeze_single_experts``)."""
  if p["wi_gate"].ndim == 2:
    g = dense(x, p["wi_gate"]) + _lora_delta(x, lora, "gate", lora_scale)
    u = dense(x, p["wi_up"]) + _lora_delta(x, lora, "up", lora_scale)
    h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    return dense(h, p["wo"]) + _lora_delta(h, lora, "down", lora_scale)
  logits = dense(x, p["expert_router"]).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  on = top_k_mask(probs, jnp.ones_like(probs, bool), top_k)
  if route_rng is not None:
    on = on | random_extra(route_rng, ~on)
  gates = jnp.where(on, probs, 0.0).astype(x.dtype)
  g = jnp.einsum("btd,edf->btef", x, p["wi_gate"]) + _lora_delta(x, lora, "gate", lora_scale, True)
  u = jnp.einsum("btd,edf->btef", x, p["wi_up"]) + _lora_delta(x, lora, "up", lora_scale, True)
  h = jax.nn.silu(g) * u
  y = jnp.einsum("btef,efd->bted", h, p["wo"])
  if lora is not None and "down" in lora:
    y = y + lora_scale * jnp.einsum("btef,fr,rd->bted", h, lora["down"]["a"], lora["down"]["b"])
  return jnp.einsum("bted,bte->btd", y, gates)


GATE_FLOOR = -1e30  # a sticky gate's running maximum before any token: sigmoid gives exactly 0


def slot_logits(p, x):
  """z_s(x) = w_s . x [+ v_s . silu(U_s^T x)], (B, T, S) in float32: the gates before the sigmoid.

  The bracketed hidden layer exists when the model has ``slot_gate_hidden`` > 0 (``slot_gate_u``
  (S, d, h), ``slot_gate_v`` (S, h): each slot's own, trained with it; random features shared
  by the slots and never trained kept fewer old facts); with v = 0 it is the linear gate."""
  z = dense(x, p["slot_router"])
  if "slot_gate_u" in p:
    hid = jax.nn.silu(dense(x, jnp.moveaxis(p["slot_gate_u"], 0, 1)))  # (B, T, S, h)
    z = z + jnp.einsum("btsh,sh->bts", hid, p["slot_gate_v"])
  return z.astype(jnp.float32)


def slot_scores(p, x, sticky=None):
  """The slot gates s_s(x) = sigmoid(z_s(x)) (B, T, S) in float32, and with ``sticky`` the
  running maximum ``m`` (B, S) to carry on (else None).

  ``sticky = (valid (B, T), m0 (B, S) or None)``: sticky gates, s_s,t = sigmoid(max(m0,
  max_{u <= t, valid} z_s,u)): a slot that opened on an earlier token of the input (the name of
  someone it stores) stays open for the rest of it, whatever the wording around the name."""
  z = slot_logits(p, x)
  if sticky is None:
    return jax.nn.sigmoid(z), None
  valid, m0 = sticky
  z = jax.lax.cummax(jnp.where(valid[..., None], z, GATE_FLOOR), axis=1)
  if m0 is not None:
    z = jnp.maximum(z, m0[:, None, :])
  return jax.nn.sigmoid(z), z[:, -1]


def slot_experts(p, x, slot_mask, *, top_k: int, route_rng: Optional[jax.Array], sticky=None,
                 key_gate=None):
  """Masked low-rank slots. p: slot_router (d, S), slot_a (S, d, r), slot_b (S, r, d).
  ``key_gate`` (B, T, S): the entity keys' gates (``slot_keys.key_gates``), multiplying the
  slots' own. Returns (output, gates, running maximum of sticky gates or None)."""
  live = jnp.broadcast_to(slot_mask.astype(bool), x.shape[:-1] + slot_mask.shape)
  scores, last = _keyed(slot_scores(p, x, sticky), key_gate)
  on = top_k_mask(scores, live, top_k)
  if route_rng is not None:
    on = on | random_extra(route_rng, live & ~on)
  # Multiplying by an exact 0.0 (not jnp.where on the output) keeps gradients of masked slots 0.
  gates = (scores * on.astype(scores.dtype)).astype(x.dtype)
  # Every slot's A in one product (a (d, S, r) view), then the gated hidden units of every slot
  # through their B's at once: sum_{s,r} gate_s h_sr B_s[r] (``dense.py`` says why 2-D).
  h = jax.nn.silu(dense(x, jnp.moveaxis(p["slot_a"], 0, 1)))
  return dense(h * gates[..., None], p["slot_b"], contract=2), scores, last


def remat_cond(pred, live_fn, idle_fn, diff, aux):
  """``lax.cond(pred, live_fn, idle_fn, diff, aux)`` whose backward pass recomputes the branch
  taken instead of storing residuals.

  Differentiated, ``lax.cond`` outputs the residuals of *both* branches (the untaken one's as
  zeros), and the layer scan stacks them per layer: a level with no live slot still wrote and
  read the slot branch's activations every train step (the SmolLM2 step with every slot
  masked took 1.09x the step of the model built without slots; 1.01x this way). Here only the
  inputs are kept, and the backward pass runs ``jax.vjp`` of the branch ``pred`` picks (the
  same operations: gradients bit-identical). ``diff``: the pytree differentiated (float
  arrays or None); ``aux``: arrays that are not (masks, keys), given a zero cotangent."""
  def run(diff, aux):
    return jax.lax.cond(aux[0], live_fn, idle_fn, diff, aux[1])

  def fwd(diff, aux):
    return run(diff, aux), (diff, aux)

  def bwd(res, ct):
    diff_, (pred_, aux_) = res
    grads = jax.lax.cond(
        pred_, lambda: jax.vjp(lambda d: live_fn(d, aux_), diff_)[1](ct)[0],
        lambda: jax.vjp(lambda d: idle_fn(d, aux_), diff_)[1](ct)[0])
    return grads, jax.tree.map(_zero_cotangent, (pred_, aux_))

  f = jax.custom_vjp(run)
  f.defvjp(fwd, bwd)
  return f(diff, (pred, aux))


def _zero_cotangent(a):
  return np.zeros(np.shape(a), jax.dtypes.float0)


def _keyed(scores_last, key_gate):
  scores, last = scores_last
  return (scores, last) if key_gate is None else (scores * key_gate, last)


def level_apply(p, x, slot_mask, *, expert_top_k, slot_top_k, route_rng=None, lora=None,
                lora_scale=1.0, return_scores=False, sticky=None, key_gate=None):
  """One CMS level on normalised input x (B, T, d); returns its residual contribution (and with
  ``return_scores`` the slot gates ``s_s(x)`` (B, T, S) in float32, None without slots). With
  ``sticky`` (``slot_scores``) it returns ``(that, running maximum (B, S))``."""
  y = jnp.zeros_like(x)
  scores = last = None
  rng_dense = rng_slots = None
  if route_rng is not None:
    rng_dense, rng_slots = jax.random.split(route_rng)
  if "wi_gate" in p:
    y = y + dense_experts(p, x, top_k=expert_top_k, route_rng=rng_dense, lora=lora,
                          lora_scale=lora_scale)
  if "slot_a" in p:
    # A level with no live slot does no slot work (its masked slots would add exact zeros):
    # shapes stay fixed, the branch is picked at run time from the mask (data, not a shape).
    # An idle level computes its gates only when they are asked for.
    need_scores = return_scores or sticky is not None

    def branch(live):
      def run(diff, aux):
        st = None if sticky is None else (aux["valid"], diff["m0"])
        if live:
          return slot_experts(diff["p"], diff["x"], aux["mask"], top_k=slot_top_k,
                              route_rng=aux["rng"], sticky=st, key_gate=diff["key_gate"])
        xx = diff["x"]
        if need_scores:
          return jnp.zeros_like(xx), *_keyed(slot_scores(diff["p"], xx, st), diff["key_gate"])
        return jnp.zeros_like(xx), jnp.zeros(xx.shape[:-1] + slot_mask.shape, jnp.float32), None
      return run

    ys, scores, last = remat_cond(
        jnp.any(slot_mask), branch(True), branch(False),
        {"p": {k: v for k, v in p.items() if k.startswith("slot_")}, "x": x,
         "key_gate": key_gate, "m0": None if sticky is None else sticky[1]},
        {"mask": slot_mask, "rng": rng_slots, "valid": None if sticky is None else sticky[0]})
    y = y + ys
  out = (y, scores) if return_scores else y
  return out if sticky is None else (out, last)
