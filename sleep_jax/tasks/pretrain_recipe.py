"""The base-model recipe (``pretrain.py`` trains it): every field is part of the cache key. Kept
apart from the training loop so that a config file imports no jax."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Tuple

from sleep_jax.data import world as world_lib
from sleep_jax.model import config as config_lib
from sleep_jax.model.config import ModelConfig


# Biographies (pretrain people), closed-book QA (qa people), multi-question reading and question
# generation (reading people); see ``World.sample_train_example``. The single-question
# ``incontext`` component is redundant: a multi-question example starts with one. Reading gets
# the largest share: the skill the cycle's teacher needs (NOTES_world.md, fourth session).
DEFAULT_MIXTURE = (("bio", 0.15), ("closed", 0.15), ("incontext_multi", 0.6),
                   ("incontext_generate", 0.1))


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The whole base-model recipe (the cache key)."""
  world: world_lib.WorldConfig = world_lib.WorldConfig()
  # Model (ModelConfig fields; vocab_size comes from the world's tokenizer).
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 8  # 8 x 16-dim heads read faster than 4 x 32 (NOTES_world.md)
  n_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads
  # RMSNorm on q and k per head (a learned per-dimension scale): 63.6% in context vs 43.8%
  # without, same recipe otherwise (runs Q / G in NOTES_world.md): the failing attributes were
  # copied in short passages but lost to distractors in full ones, i.e. attention too flat.
  qk_norm: bool = True
  d_ff: Tuple[int, ...] = (0, 256)
  n_experts: Tuple[int, ...] = (1, 1)
  chunk_sizes: Tuple[int, ...] = (1, 1)
  n_slots: int = 4
  slot_rank: int = 16
  seq_len: int = 64  # evaluation / cycle sequence length
  train_seq_len: int = 128  # longest pretraining row (multi-question examples); batches are
  # padded to the longest example rounded up to 16 tokens
  # Multi-question reading examples (mixture component ``incontext_multi``, see world.py).
  multi_min_questions: int = 6
  multi_max_questions: int = 6
  # Passage sentences kept in a multi-question example, (min, max) of world.N_SENTENCES (= 5:
  # full passages). Fewer sentences = fewer distractor values to choose from; with 1-5 the model
  # learns to copy more attributes (NOTES_world.md, fourth session).
  multi_min_sentences: int = 1
  multi_max_sentences: int = world_lib.N_SENTENCES
  # Reading curriculum: over the first ``sentence_curriculum_steps`` steps the most sentences a
  # multi-question passage keeps grows linearly from multi_min_sentences to multi_max_sentences
  # (0: no curriculum). A value token is easier to find among few (NOTES_world.md, 4th session).
  sentence_curriculum_steps: int = 0
  question_weight: float = 0.0  # loss weight of the question text in incontext_multi
  first_q_weight: float = -1.0  # weight of the "Q:" opening it (< 0: question_weight)
  bio_eos_weight: float = 0.0  # loss weight of the eos closing a biography (0: after a passage
  # only incontext_generate's "Q:" is trained, so dreams from "bos + passage" start a question)
  # Optimisation.
  seed: int = 0
  batch_size: int = 32  # x ~110-token multi-question rows: ~ the tokens of 64 x 64
  lr: float = 1e-2
  warmup_steps: int = 50
  final_lr_fraction: float = 0.1  # cosine decay to this fraction of lr (1.0: constant after warmup)
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  max_steps: int = 3000  # the default recipe reaches target_incontext at step 1600 and stops
  mixture: Tuple[Tuple[str, float], ...] = DEFAULT_MIXTURE
  # Stopping rule: in-context EM on heldout people, eval templates.
  eval_every: int = 100
  eval_people: int = 100  # heldout people used for the periodic check (x 6 attributes x 2)
  target_incontext: float = 0.9
  # Closed-book recall of the QA population: every other step is a batch of this many closed-book
  # rows (0: none; short rows, so many facts per step at little cost), and the stopping rule
  # also needs closed-book EM on eval_people of that population (eval templates) >= target_closed.
  closed_batch_size: int = 0
  target_closed: float = 0.0
  # A second stage: start from the shipped base ``sleep_jax/assets/<init_from>`` (same model
  # config) instead of a random init ("": from scratch). The name is part of the cache key, the
  # parent's bytes are not: a retrained parent ships under a new name.
  init_from: str = ""
  # What the model reads: "world" (``world`` above) | "streams" (long-horizon streams,
  # ``data.long_horizon.StreamCorpus``; its own mixture components, ``world`` unused).
  corpus: str = "world"

  def model_config(self, vocab_size: int) -> ModelConfig:
    return config_lib.tiny(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim or None, qk_norm=self.qk_norm, d_ff=self.d_ff,
                           n_experts=self.n_experts, chunk_sizes=self.chunk_sizes,
                           n_slots=self.n_slots, slot_rank=self.slot_rank,
                           max_seq_len=max(self.seq_len, self.train_seq_len))

  def to_json(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    return json.loads(json.dumps(d))  # tuples -> lists, canonical

  @classmethod
  def from_json(cls, d: Dict[str, Any]) -> "PretrainConfig":
    # Fields added after a recipe was saved read as the value that recipe was trained with, not
    # today's default (an old cache must not pass for a new recipe).
    d = {**_FIELDS_BEFORE_THEY_EXISTED, **d}
    d["world"] = world_lib.WorldConfig(**d["world"])
    for k in ("d_ff", "n_experts", "chunk_sizes"):
      d[k] = tuple(d[k])
    d["mixture"] = tuple((str(a), float(b)) for a, b in d["mixture"])
    return cls(**d)


_FIELDS_BEFORE_THEY_EXISTED = dict(head_dim=0, qk_norm=False, closed_batch_size=0,
                                   target_closed=0.0, init_from="",
                                   multi_min_sentences=world_lib.N_SENTENCES,
                                   multi_max_sentences=world_lib.N_SENTENCES,
                                   sentence_curriculum_steps=0)


def recall_recipe() -> PretrainConfig:
  """The shipped base (``PretrainConfig()``) trained on: every other step a batch of 128
  closed-book questions about its QA population, lr 3e-3, until that population is recalled at
  60% (held-out wordings) or 1500 steps (``sleep_jax/assets/world_base_recall``: 1500 steps,
  709 s on 2 cores; 54.9% closed-book on its QA population, 88.3% in-context on new people)."""
  return PretrainConfig(init_from="world_base", closed_batch_size=128, target_closed=0.6,
                        lr=3e-3, warmup_steps=20, max_steps=1500)


def runlocal() -> PretrainConfig:
  """A seconds-long recipe for unit tests (tiny world, tiny model, a few steps)."""
  w = world_lib.WorldConfig(n_pretrain=20, n_qa=20, n_reading=20, n_heldout=10, n_chunks=2, chunk_size=5,
                            n_first_names=20, n_last_names=20)
  return PretrainConfig(world=w, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(0, 64),
                        n_slots=2, slot_rank=4, batch_size=8, max_steps=6, eval_every=3,
                        eval_people=5, warmup_steps=2, train_seq_len=64)  # one batch shape
