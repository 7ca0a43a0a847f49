"""GRPO: the loss against a NumPy reference, and a tiny run that raises a toy task's reward."""

import jax
import numpy as np

from sleep_jax import losses as L
from sleep_jax.model import config, transformer
from sleep_jax.train import grpo
from sleep_jax.train import state as state_lib


def _numpy_grpo(lp, old, ref, mask, rewards, group, eps, beta):
  g = rewards.reshape(-1, group)
  adv = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1, 1)
  ratio = np.exp(lp - old)
  per = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
  d = ref - lp
  per = per + beta * (np.exp(d) - d - 1)
  rows = [(per[i] * mask[i]).sum() / mask[i].sum() for i in range(len(per)) if mask[i].any()]
  return np.mean(rows), ((ratio - 1) * np.sign(adv) > eps)[mask].mean()


def test_grpo_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  B, T, G = 8, 5, 4
  old = -rng.random((B, T)).astype(np.float32) - 0.2
  lp = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios in and out of the clip
  ref = (old + rng.normal(0, 0.2, (B, T))).astype(np.float32)
  mask = rng.random((B, T)) < 0.8
  mask[:, 0] = True
  rewards = rng.integers(0, 2, B).astype(np.float32)
  for eps, beta in ((0.2, 0.0), (0.1, 0.05)):
    want, want_clip = _numpy_grpo(lp, old, ref, mask, rewards, G, eps, beta)
    loss, m = L.grpo_loss(lp, mask, rewards, group_size=G, old_logprobs=old, clip_eps=eps,
                          kl_coef=beta, ref_logprobs=ref)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), want_clip, atol=1e-6)


def test_tiny_grpo_run_raises_the_reward_of_a_toy_task():
  cfg = config.tiny(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=(0, 64), n_slots=0)
  params = transformer.init(jax.random.key(0), cfg)
  target = 7  # reward: the fraction of generated tokens that are token 7 (chance: 1/32)
  reward = lambda i, toks: float(np.mean([t == target for t in toks])) if toks else 0.0
  g = grpo.default_config()
  g.rounds, g.prompts_per_round, g.group_size, g.max_new_tokens = 12, 4, 8, 4
  g.optimizer.lr = 3e-2
  prompts = [[1, 2], [3, 4, 5], [6], [8, 9]]
  _, hist = grpo.train(params, None, cfg, prompts, reward, g, jax.random.key(1),
                       trainable=state_lib.all_trainable(params))
  first, last = hist[0]["reward_mean"], np.mean([h["reward_mean"] for h in hist[-3:]])
  assert first < 0.15 and last > first + 0.3, [round(h["reward_mean"], 2) for h in hist]
  assert all(np.isfinite(h["loss"]) for h in hist)
