"""GRPO with a verifiable reward: the policy-gradient baseline of the reasoning experiment.

One round samples ``group_size`` completions of each prompt from the current policy (the one
sampler), scores them on the host with the task's reward (a checker: 1 or 0), then takes
``updates`` optimizer steps of the registered ``grpo`` loss (``losses/rl.py``) on that batch:

    A_i = (r_i - mean_g r) / (std_g r + eps)
    L   = agg_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta k3_t(pi, pi_ref) ]

with ``rho_t = pi(y_t) / pi_old(y_t)``. ``pi_old`` is the policy that sampled the round; its
log-probs are recomputed by one forward pass, so any sampling temperature gives the exact
ratio. The first update of a round is on-policy (rho = 1), later ones are where the clip
acts. ``pi_ref`` is the policy before training (``kl_coef`` > 0 only).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleep_jax.losses import rl
from sleep_jax.model import sampler, transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.train import fit as fit_lib, grpo_config
from sleep_jax.train.optimizer import make_optimizer

# reward_fn(prompt_index, completion_token_ids) -> reward (host float)
RewardFn = Callable[[int, List[int]], float]


default_config = grpo_config.default_config  # every knob: ``config.grpo``


def completion_logprobs(params, tokens, valid, completion_mask, slot_mask, cfg: ModelConfig
                        ) -> Tuple[jax.Array, jax.Array]:
  """(log pi(y_t | y_<t) aligned with ``tokens``, and the mask of the generated tokens)."""
  logits = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask)[0]
  return transformer.logits_to_logprobs(logits, tokens), completion_mask


def make_loss(cfg: ModelConfig, *, group_size: int, clip_eps: float, kl_coef: float):
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` of ``rl.grpo_loss`` on a sampled batch
  (tokens, valid, completion_mask, rewards, old_logprobs[, ref_logprobs], slot_mask)."""

  def loss_fn(params, batch, rng):
    del rng
    lp, mask = completion_logprobs(params, batch["tokens"], batch["valid"],
                                   batch["completion_mask"], batch.get("slot_mask"), cfg)
    return rl.grpo_loss(lp, mask, batch["rewards"], group_size=group_size,
                        old_logprobs=batch["old_logprobs"], clip_eps=clip_eps, kl_coef=kl_coef,
                        ref_logprobs=batch.get("ref_logprobs"))

  return loss_fn


_logprobs = jax.jit(completion_logprobs, static_argnames=("cfg",))


def train(params, slot_mask, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
          reward_fn: RewardFn, gcfg: ml_collections.ConfigDict, rng: jax.Array, *, trainable,
          stop_tokens: Sequence[int] = (), pad_id: int = 0,
          on_round: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Tuple[dict, List[Dict[str, float]]]:
  """``gcfg.rounds`` GRPO rounds over ``prompts`` (token lists); only ``trainable`` changes.
  Returns the new parameters and one metrics dict per round (``reward_mean`` is the round's
  sampled reward, before its updates)."""
  G, n_prompts = int(gcfg.group_size), int(gcfg.prompts_per_round)
  if G < 2:
    raise ValueError(f"grpo.group_size must be >= 2 (advantages are relative), got {G}")
  st, shardings = fit_lib.new_state(params, make_optimizer(gcfg.optimizer), rng, trainable,
                                    {} if slot_mask is None else {"slot_mask": slot_mask})
  key = ("grpo", cfg, G, float(gcfg.clip_eps), float(gcfg.kl_coef))
  _, step = fit_lib.train_step_for(key, lambda: make_loss(
      cfg, group_size=G, clip_eps=float(gcfg.clip_eps), kl_coef=float(gcfg.kl_coef)),
      gcfg.optimizer, trainable, shardings)
  ref = params if float(gcfg.kl_coef) else None
  host = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  length = max(len(p) for p in prompts)
  history = []
  for r in range(int(gcfg.rounds)):
    pick = host.choice(len(prompts), size=min(n_prompts, len(prompts)), replace=False)
    rows = [int(i) for i in pick for _ in range(G)]  # groups: G consecutive rows per prompt
    toks, valid = sampler.left_pad([prompts[i] for i in rows], pad_id, length)
    out = sampler.sample(st.params, jnp.asarray(toks), jnp.asarray(valid),
                         jax.random.fold_in(rng, r), cfg=cfg,
                         max_new_tokens=int(gcfg.max_new_tokens),
                         temperature=float(gcfg.temperature), stop_tokens=stop_tokens,
                         pad_id=pad_id, slot_mask=slot_mask)
    gen, cm = np.asarray(out.tokens), np.asarray(out.completion_mask, bool)
    rewards = np.asarray([reward_fn(i, gen[k][cm[k]].tolist()) for k, i in enumerate(rows)],
                         np.float32)
    old, _ = _logprobs(st.params, out.tokens, out.valid, out.completion_mask, slot_mask, cfg)
    batch = {"tokens": out.tokens, "valid": out.valid, "completion_mask": out.completion_mask,
             "rewards": jnp.asarray(rewards), "old_logprobs": old}
    if ref is not None:
      batch["ref_logprobs"] = _logprobs(ref, out.tokens, out.valid, out.completion_mask,
                                        slot_mask, cfg)[0]
    batch = fit_lib.place_batch(batch, fit_lib.mesh_of(params))
    for _ in range(int(gcfg.updates)):
      st, m = step(st, batch)
    metrics = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    metrics["reward_mean"] = float(rewards.mean())
    history.append(metrics)
    if on_round is not None:
      on_round(r, metrics)
  return st.params, history
