"""The Knowledge Seeding objective (docs/method.md section 3 steps 2-4): the loss every consolidation runs.

  J_KS = E_x [ (1 - alpha) E_{y~S} r(y) - alpha E_{y~S} D(T||S)(y|x) ]      (maximised)

with the divergence part in its GKD form, so the loss minimised is

  L = alpha [ (1 - lambda) F_D + lambda F_S ] + (1 - alpha) L_PG(r) + beta CE(a* | x)
      + eta G(y)

``F_D``: per-token divergence F(T||S) on teacher samples D (drawn once, before training);
``F_S``: the same on student samples; ``L_PG``: policy gradient (``rl.pg_loss`` with a registered
advantage estimator) for the learning-to-imitate reward ``r = gamma r_sem + (1 - gamma) r_abs`` of
a student completion of a random prefix of a teacher sample. ``alpha = 1`` drops imitation,
``lambda = 0`` is off-policy distillation. No gradient flows through sampling; the teacher's
logits are computed outside the gradient (``sleep/teacher_prefix.py``). ``CE(a* | x)``
(weight ``beta = ce_weight``, 0 by default) is the student's cross-entropy on an answer the
source supports (a document's gold answer): distillation alone is capped by the teacher's own
in-context errors. ``G`` (weight ``eta = gate_weight``, 0 by default) teaches the new slot's
gate when to open: on for items about the new material, off for anchor items (unrelated
behaviour), ``gate_loss``.

A replacement objective registered under another name (``@register_loss("mine")``) is picked by
``config.consolidation.objective = "mine"``; it receives the same batch and hyper-parameters.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sleep_jax.losses import rl
from sleep_jax.losses.common import prediction_mask, sanitize
from sleep_jax.losses.distill import DistillBatch, gkd_loss
from sleep_jax.losses.registry import get_advantage, register_loss
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig

Metrics = dict


@register_loss("knowledge_seeding", "ks")
def knowledge_seeding_loss(params, batch, rng, *, cfg: ModelConfig, alpha: float, lam: float,
                           divergence: str = "fkl", divergence_kwargs: Optional[dict] = None,
                           temperature: float = 1.0, advantage: str = "reinforce",
                           ce_weight: float = 0.0, gate_weight: float = 0.0,
                           gate_positions: str = "answer") -> Tuple[jax.Array, Metrics]:
  """L = -J_KS + beta CE + eta G = alpha [(1 - lam) F_D + lam F_S] + (1 - alpha) L_PG
  + beta CE(a*|x) + eta G(y).

  The GKD part is ``distill.gkd_loss``; the imitation part is ``rl.pg_loss`` on the LTI rewards.
  ``batch`` holds the student-side sequences and the teacher's logits on their completion:
  ``off_*`` (teacher samples; present when lam < 1) and ``on_*`` (student samples; present when
  lam > 0 or alpha < 1), each with ``tokens, valid, completion_mask`` (B, Ps + N) and
  ``teacher_logits`` (B, N + 1, V) for positions ``Ps - 1 ...`` (``completion_logits``), plus
  ``on_rewards`` (B,) when alpha < 1, and the student's ``slot_mask``. Only the student's
  distributions over those N + 1 positions are computed: the prompt's enter no term. With
  ``ce_weight > 0``: ``gold_tokens, gold_valid`` (student prompt + a supported answer) and
  ``gold_answer_mask`` (the answer window). With ``gate_weight > 0``: ``gate_target`` (B,)
  and ``gate_slots`` (n_levels, S) for ``gate_loss`` on the first side present, at the
  positions that predict the completion (``gate_positions="answer"``) or, for anchor items, at
  every real position (``"anchor_all"``: the slot stays shut over the whole unrelated input, not
  only where it answers; new items still open it where they answer).
  """
  if gate_positions not in ("answer", "anchor_all"):
    raise ValueError(f"gate_positions must be 'answer' or 'anchor_all', got {gate_positions!r}")
  del rng
  sides = [side for side in ("off", "on") if f"{side}_tokens" in batch]
  data, start, gates = {}, {}, None
  for side, (logits, side_gates) in zip(sides, _student_forward(params, batch, sides, cfg,
                                                                gate_weight > 0.0)):
    start[side] = batch[f"{side}_tokens"].shape[1] - logits.shape[1]  # Ps - 1, static
    pmask = prediction_mask(batch[f"{side}_completion_mask"])[:, start[side]:]
    data[side] = DistillBatch(logits, batch[f"{side}_teacher_logits"], pmask)
    if side_gates is not None:
      # The gate mask spans every position: zeros before the completion's predictors.
      gmask = jnp.concatenate([jnp.zeros((pmask.shape[0], start[side]), bool),
                               pmask.astype(bool)], 1)
      if gate_positions == "anchor_all":
        anchor = (batch["gate_target"] < 0.5)[:, None]
        gmask = jnp.where(anchor, batch[f"{side}_valid"].astype(bool), gmask)
      gates = (side_gates, gmask)
  gkd, metrics = gkd_loss(data.get("off") if lam < 1.0 else None,
                          data.get("on") if lam > 0.0 else None, lam=lam, divergence=divergence,
                          temperature=temperature, **(divergence_kwargs or {}))
  loss = alpha * gkd
  if alpha < 1.0:
    mask = batch["on_completion_mask"][:, start["on"]:]
    # Positions that predict no completion token are zeroed before the log-softmax.
    clean = sanitize(data["on"].student_logits, data["on"].mask)
    logprobs = transformer.logits_to_logprobs(clean, batch["on_tokens"][:, start["on"]:])
    pg, _ = rl.pg_loss(logprobs, mask, get_advantage(advantage)(batch["on_rewards"]))
    loss = loss + (1.0 - alpha) * pg
    metrics["imitation_pg"] = pg
    metrics["imitation_reward"] = jnp.mean(batch["on_rewards"])
  if ce_weight > 0.0:
    ce = answer_cross_entropy(params, batch, cfg)
    loss = loss + ce_weight * ce
    metrics["answer_ce"] = ce
  if gate_weight > 0.0:
    g, g_metrics = gate_loss(gates[0], gates[1], batch["gate_target"], batch["gate_slots"])
    loss = loss + gate_weight * g
    metrics.update(g_metrics)
  metrics = {f"gkd_{k}" if k == "loss" else k: v for k, v in metrics.items()}
  return loss, metrics


def _student_forward(params, batch, sides, cfg: ModelConfig, want_gates: bool):
  """The student's logits on each side's completion window (and its slot gates on the first
  side, ``want_gates``): ``[(logits, gates or None)]`` in the order of ``sides``.

  Both sides hold the student's prompt at the same width, so when their shapes agree one
  forward runs over their rows together: half the calls, and larger products, for the same
  logits (a row's logits do not depend on the rows beside it)."""
  shapes = {(batch[f"{s}_tokens"].shape, batch[f"{s}_teacher_logits"].shape) for s in sides}
  groups = [sides] if len(shapes) == 1 else [[s] for s in sides]
  out = []
  for group in groups:
    tokens = jnp.concatenate([batch[f"{s}_tokens"] for s in group], 0)
    valid = jnp.concatenate([batch[f"{s}_valid"] for s in group], 0)
    first = tokens.shape[1] - batch[f"{group[0]}_teacher_logits"].shape[1]
    gated = want_gates and not out  # the gate term reads the first side's gates
    res = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=batch["slot_mask"],
                            logits_from=first, return_gates=gated)
    rows = batch[f"{group[0]}_tokens"].shape[0]
    for i, _ in enumerate(group):
      g = {j: v[:, :rows] for j, v in res[2].items()} if gated and i == 0 else None
      out.append((res[0][i * rows:(i + 1) * rows], g))
  return out


def gate_loss(gates, mask, target, slots) -> Tuple[jax.Array, Metrics]:
  """G(y) = -mean_{l, b, t, s} [ y_b log s_s(x_lbt) + (1 - y_b) log(1 - s_s(x_lbt)) ]

  over every layer l, the positions t of ``mask`` (B, T) (those that predict the answer) and the
  slots s of ``slots`` (n_levels, S) bool (the new ones): a binary cross-entropy that opens the
  new slot's gate for items about the new material (``target`` y = 1) and closes it on anchor
  items (y = 0), so the slot stays off for inputs it was not trained for. ``gates``: level ->
  (L, B, T, S) sigmoid gates (``transformer.apply(return_gates=True)``).
  """
  y = target.astype(jnp.float32)[None, :, None, None]
  sums = {"bce": 0.0, "w": 0.0, "on_new": 0.0, "new": 0.0, "on_anchor": 0.0, "anchor": 0.0}
  for j, g in gates.items():
    w = mask.astype(jnp.float32)[None, :, :, None] * slots[j].astype(jnp.float32)[None, None]
    w = jnp.broadcast_to(w, g.shape)
    bce = -(y * jnp.log(g + 1e-6) + (1.0 - y) * jnp.log(1.0 - g + 1e-6))
    for k, v in (("bce", bce * w), ("w", w), ("on_new", g * w * y), ("new", w * y),
                 ("on_anchor", g * w * (1.0 - y)), ("anchor", w * (1.0 - y))):
      sums[k] = sums[k] + jnp.sum(v)
  frac = lambda a, b: sums[a] / jnp.maximum(sums[b], 1.0)
  loss = frac("bce", "w")
  return loss, {"gate_loss": loss, "gate_on_new": frac("on_new", "new"),
                "gate_on_anchor": frac("on_anchor", "anchor")}


def answer_cross_entropy(params, batch, cfg: ModelConfig) -> jax.Array:
  """CE(a* | x) = -mean_t log S(a*_t | x, a*_<t) over the answer tokens of the ``gold_*`` rows:
  ``gold_tokens, gold_valid`` (B, P + A) hold prompt and answer, ``gold_answer_mask`` (B, A) the
  answer window; only its A positions reach the output head."""
  tokens, live = batch["gold_tokens"], batch["gold_answer_mask"]
  start = tokens.shape[1] - live.shape[1] - 1  # predicts the first answer token; static
  logits, _ = transformer.apply(params, tokens, cfg, valid=batch["gold_valid"],
                                slot_mask=batch["slot_mask"], logits_from=start)
  # Positions past an answer's end are zeroed before the log-softmax (they enter no term).
  logp = jax.nn.log_softmax(sanitize(logits[:, :-1], live), axis=-1)
  tok = jnp.take_along_axis(logp, tokens[:, start + 1:, None], axis=-1)[..., 0]
  m = live.astype(tok.dtype)
  return -jnp.sum(tok * m) / jnp.maximum(jnp.sum(m), 1.0)
