"""The language-model / SFT loss: next-token cross-entropy over target tokens."""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from sleep_jax.losses.registry import register_loss
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig


@register_loss("lm", "cross_entropy")
def lm_loss(params, batch: Mapping[str, jax.Array], rng: Optional[jax.Array], *,
            cfg: ModelConfig, per_example: bool = False):
  """Next-token cross-entropy over target tokens: the one LM/SFT loss of the codebase.

  Batch: ``tokens`` (B, T) int32; optional ``valid`` (B, T) bool (padding False), ``loss_mask``
  (B, T) bool (which tokens are *targets*: e.g. only the answer for SFT; default ``valid``),
  ``loss_weight`` (B, T) float (per-target weights, default 1) and ``slot_mask``
  (n_levels, n_slots). Token t is predicted from tokens < t, so entry 0 of the masks never
  counts. ``rng`` is unused (no dropout); kept for the step's loss interface.

  ``per_example=False``: sum_t w_t nll_t / sum_t w_t over the batch (every token weighs the same);
  ``per_example=True``: that average per row, then the mean over rows (a 2-token answer weighs as
  much as a 40-token passage).

  Returns (loss, {"loss", "ce", "accuracy", "target_tokens"}).
  """
  del rng
  tokens = batch["tokens"]
  valid = batch.get("valid")
  valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
  loss_mask = batch.get("loss_mask")
  loss_mask = valid if loss_mask is None else loss_mask.astype(bool) & valid
  logits, _ = transformer.apply(params, tokens, cfg, slot_mask=batch.get("slot_mask"),
                                valid=valid)
  # Position t predicts token t + 1. Shifting the (B, T) targets instead of slicing the
  # (B, T, V) logits avoids a full-vocabulary pad in the backward pass (bench: 400 MB/step).
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))
  targets = shift(tokens)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = shift(loss_mask).astype(jnp.float32)
  w = m * shift(batch["loss_weight"]).astype(jnp.float32) if "loss_weight" in batch else m
  if per_example:
    loss = jnp.mean(jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
  else:
    loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  n = jnp.maximum(jnp.sum(m), 1.0)
  # The target is the top token when its log-prob is the row's maximum (a tie counts as
  # correct): one max over the vocabulary, where argmax's index search took 0.2 s of a SmolLM2
  # train step (bench op trace).
  correct = (-nll >= jnp.max(logp, axis=-1)).astype(jnp.float32)
  return loss, {"loss": loss, "ce": loss, "accuracy": jnp.sum(correct * m) / n,
                "target_tokens": jnp.sum(m)}


def make_lm_loss(cfg: ModelConfig):
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` of ``lm_loss`` for ``make_train_step``."""
  return functools.partial(lm_loss, cfg=cfg)
