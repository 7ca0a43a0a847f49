"""Default config: train the tiny CMS transformer on the built-in text corpus.

    python -m sleep_jax.main --config=sleep_jax/configs/default.py:tiny --workdir=/tmp/run

``get_config(arg)``: ``arg`` names a variant (``default``, ``tiny``, ``test``); every knob can be
overridden with ``--config.key=value``. The config is locked: a mistyped key is an error.
"""

from __future__ import annotations

import difflib
from typing import Optional

import ml_collections

from sleep_jax.model.config import tiny as tiny_model

SAMPLE_PROMPTS = ("Ada lives in", "In Oslo lives", "Cy counts: 3", "Hal")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train_lm"  # which sleep_jax.main job runs (main.JOBS)
  c.seed = 0
  c.distributed = "auto"  # jax.distributed.initialize(): auto | on | off

  # Mesh axis sizes; -1 takes the devices the other axes leave.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.model = tiny_model().to_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = "tiny_corpus"  # sleep_jax.data.builders.BUILDERS
  c.data.data_dir = ""  # "" = WORKDIR/tfds
  c.data.split = "train"
  c.data.seq_len = 64
  c.data.batch_size = 32  # global, over all hosts
  c.data.mode = "pack"  # pack | pad
  c.data.read_threads = 0

  steps = ml_collections.FieldReference(2000)
  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.log_every = 20

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.decay_steps = steps  # cosine to final_lr_fraction * lr at the last step
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.0
  c.optimizer.grad_clip = 1.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 4
  c.sample.max_new_tokens = 40
  c.sample.prompts = SAMPLE_PROMPTS
  return c


def _default(c):
  del c  # the base config as is


def _tiny(c):
  """A couple of minutes on 2 CPU cores."""
  c.model.d_model = 64
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = [0, 256]
  c.model.chunk_sizes = [1, 1]
  c.model.max_seq_len = 128
  c.train.steps = 300
  c.train.log_every = 10
  c.checkpoint.every = 100
  c.data.batch_size = 16
  c.data.seq_len = 64


def _test(c):
  """Seconds; unit and integration tests. Level 0 updates every 2 steps."""
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.model.d_ff = [32, 64]
  c.model.n_slots = 2
  c.model.slot_rank = 4
  c.model.chunk_sizes = [2, 1]
  c.model.max_seq_len = 64
  c.train.steps = 8
  c.train.log_every = 1
  c.optimizer.warmup_steps = 2
  c.checkpoint.every = 2
  c.data.batch_size = 8
  c.data.seq_len = 32
  c.sample.num = 2
  c.sample.max_new_tokens = 8


VARIANTS = {"default": _default, "tiny": _tiny, "test": _test}
HELP = {"default": "train the tiny CMS transformer on the built-in corpus (2000 steps)",
        "tiny": "the same, minutes on a CPU", "test": "seconds-long, for the unit tests"}


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    near = difflib.get_close_matches(variant, list(VARIANTS), n=3)
    raise ValueError(f"unknown config variant {variant!r}"
                     + (f"; did you mean {' or '.join(map(repr, near))}?" if near else "")
                     + f" Variants: {sorted(VARIANTS)}")
  c = base()
  VARIANTS[variant](c)
  c.lock()
  return c
