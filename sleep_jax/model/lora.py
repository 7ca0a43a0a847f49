"""LoRA adapters as a separate pytree, so many adapters can share one frozen base model.

``delta_W = scale * A @ B`` with ``A: d_in x r`` (random) and ``B: r x d_out`` (zero), stacked over
layers like the base params. Targets: attention projections ``q k v o`` and the slowest CMS
level's dense MLP ``gate up down``. ``scale = alpha / rank`` is passed to ``transformer.apply`` as
``lora_scale``. Because the adapter is a pytree argument, ``jax.vmap`` over a batch of adapters
runs isolated fine-tuning trials that share the base weights (dreaming).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from sleep_jax.model.config import LORA_TARGETS as ALL_TARGETS, ModelConfig


def target_dims(cfg: ModelConfig, name: str):
  d, H, K, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
  F = cfg.d_ff[-1]
  dims = {"q": (d, H * hd), "k": (d, K * hd), "v": (d, K * hd), "o": (H * hd, d),
          "gate": (d, F), "up": (d, F), "down": (F, d)}
  if name not in dims:
    raise ValueError(f"unknown LoRA target {name!r}; valid: {ALL_TARGETS}")
  if name in ("gate", "up", "down") and F == 0:
    raise ValueError("LoRA on the MLP needs a dense expert in the slowest CMS level (d_ff[-1] > 0)")
  return dims[name]


def init(rng: jax.Array, cfg: ModelConfig, rank: int,
         targets: Sequence[str] = ("q", "v")) -> dict:
  """Fresh adapter: A ~ N(0, 1/d_in), B = 0, so the adapted model equals the base model."""
  out = {}
  for key, name in zip(jax.random.split(rng, len(targets)), targets):
    d_in, d_out = target_dims(cfg, name)
    a = jax.random.normal(key, (cfg.n_layers, d_in, rank), jnp.float32) * d_in ** -0.5
    out[name] = {"a": a, "b": jnp.zeros((cfg.n_layers, rank, d_out), jnp.float32)}
  return out


def scale(alpha: float, rank: int) -> float:
  return float(alpha) / float(rank)
