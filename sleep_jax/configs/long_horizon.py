"""Long-horizon memory (experiments/long_horizon): streams far longer than the context window.

    python -m sleep_jax.main --config=sleep_jax/configs/long_horizon.py:needles --workdir=/tmp/lh

A stream (``data.long_horizon``) is read one chunk per wake; only a chunk fits the model's
context, so what the model knows about earlier chunks at the end lives in its weights. Every run
seed reads its own stream (``data.stream.seed = -1``: stream seed = run seed); the base model is
pretrained on streams of other seeds (``StreamCorpus``: 1000+, never 0, 1, 2) with train
question templates only, and is cached in WORKDIR/base (or ``base_cache``).

Methods: ``base`` (closed-book, no learning), ``in_context`` (the chunk holding the answer in the
prompt: an oracle upper bound), ``in_context_window`` (only the last chunk read fits: the
truncated window), ``sft`` (fine-tune on every chunk's text), ``sleep_l1`` / ``sleep_l2`` /
``sleep_l4`` (consolidation into CMS level 0 every chunk, plus a cascade over 1, 2 or 4 CMS
levels with frequencies ``sleep_every = (1, 2, 4, 8)``: level l receives level l-1 every C_l
chunks; no dreaming). The base model has 4 CMS levels (three slots-only fast levels and the MLP).

Variants (``--config=...long_horizon.py:VARIANT``): ``needles`` (multi-key needles), ``story``
(bAbI-style moves), ``test`` (seconds-long, for the unit tests).
"""

from __future__ import annotations

import ml_collections

from sleep_jax.configs import knowledge
from sleep_jax.data import long_horizon as lh
from sleep_jax.tasks import pretrain_recipe

METHODS = ("base", "in_context", "in_context_window", "sft", "sleep_l1", "sleep_l2", "sleep_l4")


def stream_recipe() -> pretrain_recipe.PretrainConfig:
  """The stream base model: 4 CMS levels (slots-only fast levels; the MLP is the slowest), 8
  slots per level (sleep_l1 puts all 8 chunks of a stream into level 0)."""
  return pretrain_recipe.PretrainConfig(
      corpus="streams", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(0, 0, 0, 128),
      n_experts=(1, 1, 1, 1), chunk_sizes=(1, 1, 1, 1), n_slots=8, slot_rank=8, seq_len=96,
      train_seq_len=128, batch_size=32, lr=3e-3, warmup_steps=50, max_steps=1500,
      mixture=(("closed", 0.2), ("incontext_multi", 0.6), ("text", 0.2)), eval_every=100,
      eval_people=50, target_incontext=0.95,
      qk_norm=False)  # the recipe experiments/long_horizon/README.md was measured with


def _stream_block(cfg) -> ml_collections.ConfigDict:
  """``data.stream``: the generator config's fields plus the stream seed (-1: the run seed)."""
  return ml_collections.ConfigDict(dict(seed=-1, **{
      k: getattr(cfg, k) for k in cfg.__dataclass_fields__}))


HELP = {
    "needles": "multi-key needles in a stream longer than the context",
    "story": "a story whose facts change over the stream",
    "test": "seconds-long, for the unit tests",
}


def get_config(variant: str = "needles") -> ml_collections.ConfigDict:
  c = knowledge.get_config("base_r")
  c.base = knowledge._base_recipe(stream_recipe())
  c.seq_len = c.base.seq_len
  c.seeds = (0, 1, 2)
  c.methods = METHODS
  c.sleep_every = (1, 2, 4, 8)  # C_l of CMS levels 0..3 (chunks)
  c.deep_every = 2  # = sleep_every[1]; read by nothing else here
  c.consolidation.steps = 30
  c.consolidation.batch_size = 8
  c.sft.steps = 30
  c.sft.batch_size = 8
  c.eval.max_new_tokens = 2  # one-token answers + eos
  if variant == "needles":
    c.data.source = "needles"
    c.data.stream = _stream_block(lh.NeedleConfig(n_chunks=8, n_keys=12))
  elif variant == "story":
    c.data.source = "story"
    c.data.stream = _stream_block(lh.StoryConfig(n_chunks=8))
  elif variant == "test":
    c.mesh.data = 1  # one device: the unit tests' 8 fake devices would only slow them
    r = stream_recipe()
    c.base = knowledge._base_recipe(pretrain_recipe.PretrainConfig(
        corpus="streams", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(0, 0, 0, 32),
        n_experts=(1, 1, 1, 1), chunk_sizes=(1, 1, 1, 1), n_slots=4, slot_rank=4,
        seq_len=r.seq_len, train_seq_len=r.seq_len, batch_size=4, max_steps=2, eval_every=2,
        eval_people=10, warmup_steps=1, mixture=r.mixture, qk_norm=False))
    c.seeds = (0,)
    c.methods = ("in_context_window", "sleep_l4")
    c.data.source = "story"  # story chunks can hold no end query: exercises the NaN path
    c.data.stream = _stream_block(lh.StoryConfig(n_chunks=4, moves_per_chunk=2, n_before=2))
    c.data.stream.seed = 19  # its chunk 1 holds no end-of-stream query: R[:, 1] is nan
    c.consolidation.steps = 2
    c.consolidation.batch_size = 2
    c.consolidation.teacher_samples = 1
    c.sft.steps = 2
    c.sft.batch_size = 2
  else:
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(HELP)}")
  return c
