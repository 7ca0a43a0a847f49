"""Language-model training job (pretraining / SFT on text) and its cross-entropy loss.

``run(config, workdir)`` reads top to bottom in the order things happen: devices and mesh,
input pipeline, model and optimizer, train state (restored or freshly initialised), the jitted
step, the loop (metrics, checkpoints, preemption), and a few greedy samples at the end.
``sleep_jax.main`` dispatches here when ``config.job == "train_lm"``; the wake/sleep cycle driver
will be another job next to it.

Resume order (what makes a resumed run bit-identical to an uninterrupted one):
  1. the TrainState (params, optimizer state, step, rng, masks) from the latest checkpoint, read
     straight into this mesh's shardings;
  2. the grain iterator state saved *after* the batch of that step was consumed, so the next
     batch is the one the uninterrupted run would have drawn;
  3. the position (step, cycle, phase) for the loop counters.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.data import builders, pipeline
from sleep_jax.data.tokenizer import ByteTokenizer
from sleep_jax.eval.metrics_writer import MetricsWriter, progress
from sleep_jax.losses.lm import make_lm_loss
from sleep_jax.model import sampler, transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib

BATCH_KEYS = ("tokens", "valid", "loss_mask")


# ----------------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Pieces of the job (also used by tests and later jobs).
# ----------------------------------------------------------------------------------------------
def prepare_builder(name: str, data_dir: str):
  """Writes the named TFDS builder's files (process 0 first on multi-host jobs)."""
  if name not in builders.BUILDERS:
    import difflib
    near = difflib.get_close_matches(name, list(builders.BUILDERS), n=3)
    raise ValueError(f"unknown data set {name!r}; known: {sorted(builders.BUILDERS)}"
                     + (f"; did you mean {near}?" if near else ""))
  cls = builders.BUILDERS[name]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      builder = builders.prepare(cls, data_dir)
    multihost_utils.sync_global_devices("sleep_jax_data_prepared")
    if jax.process_index() != 0:
      builder = builders.prepare(cls, data_dir)
    return builder
  return builders.prepare(cls, data_dir)


def make_train_iterator(config, workdir: str, tokenizer):
  """This host's checkpointable iterator of LM batches (numpy, local rows)."""
  d = config.data
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  builder = prepare_builder(d.name, data_dir)
  source = builder.as_data_source(d.split)
  n_proc = jax.process_count()
  if d.batch_size % n_proc:
    raise ValueError(f"data.batch_size={d.batch_size} is not divisible by {n_proc} processes")
  ds = pipeline.lm_dataset(source, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size // n_proc,
                           seed=config.seed, mode=d.mode, read_threads=d.read_threads)
  return iter(ds)


def build_model_and_optimizer(config):
  """``(model config, optimizer, trainable mask, extras)``. The job keeps every slot masked
  (``extras["slot_mask"]``), so the slot arrays are frozen: not differentiated and without
  optimizer state (``state_lib.idle_slots_frozen``)."""
  cfg = ModelConfig.from_config(config.model)
  tx, trainable = opt_lib.with_masked_slots_frozen(opt_lib.make_optimizer(config.optimizer), cfg)
  return cfg, tx, trainable, {"slot_mask": np.asarray(transformer.slot_mask_none(cfg))}


def greedy_samples(params, cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                   max_new_tokens: int, slot_mask=None):
  """Greedy continuations of ``prompts`` (list of strings)."""
  ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
  toks, valid = sampler.left_pad(ids, pad_id=tokenizer.pad_id)
  out = sampler.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(0), cfg=cfg,
                       max_new_tokens=max_new_tokens, greedy=True,
                       stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
                       slot_mask=slot_mask)
  gen = np.asarray(jax.device_get(out.tokens))[:, toks.shape[1]:]
  mask = np.asarray(jax.device_get(out.completion_mask))[:, toks.shape[1]:]
  return [tokenizer.decode(g[m]) for g, m in zip(gen, mask)]


# ----------------------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------------------
Hook = Callable[[int, state_lib.TrainState], None]


def run(config, workdir: str, *, hooks: Sequence[Hook] = ()) -> Dict[str, Any]:
  """Trains ``config.model`` on ``config.data`` for ``config.train.steps`` steps, resuming from
  ``workdir/checkpoints`` if present. ``hooks`` run after every step (and its checkpoint).

  Returns {"step", "preempted", "state", "metrics", "samples"}.
  """
  os.makedirs(workdir, exist_ok=True)

  # --- Devices and mesh -----------------------------------------------------------------------
  mesh_lib.initialize_distributed(config.distributed)
  mesh = mesh_lib.mesh_from_config(config)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())
  with mesh_lib.use_mesh(mesh):  # jax.set_mesh + logical rules, undone on exit
    return _run(config, workdir, mesh, hooks)


def _run(config, workdir: str, mesh, hooks: Sequence[Hook]) -> Dict[str, Any]:

  # --- Input ----------------------------------------------------------------------------------
  tokenizer = ByteTokenizer()
  train_iter = make_train_iterator(config, workdir, tokenizer)

  # --- Model, optimizer, state shapes ---------------------------------------------------------
  cfg, tx, trainable, extras = build_model_and_optimizer(config)
  if cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={cfg.vocab_size} < tokenizer vocabulary "
                     f"{tokenizer.vocab_size}")
  init_params = lambda r: transformer.init(r, cfg)
  param_sh = mesh_lib.param_shardings(cfg, mesh)
  abstract, shardings = state_lib.abstract_train_state(
      config.seed, init_params, tx, mesh=mesh, param_shardings=param_sh, trainable=trainable,
      extras=extras)

  # --- Train state: restore (state, then data iterator, then position) or initialise --------
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
  position = {"cycle": 0, "phase": "train_lm"}
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(abstract, data_iterator=train_iter)
    state = restored.state
    position.update({k: v for k, v in restored.position.items() if k != "step"})
    logging.info("resumed from step %d (%s)", restored.step, restored.position)
  else:
    state, _ = state_lib.create_train_state(config.seed, init_params, tx, mesh=mesh,
                                            param_shardings=param_sh, trainable=trainable,
                                            extras=extras)
  logging.info("model: %d parameters", transformer.count_params(state.params))

  # --- The update step ------------------------------------------------------------------------
  train_step = step_lib.make_train_step(make_lm_loss(cfg), tx, state_shardings=shardings,
                                         batch_shardings=mesh_lib.batch_sharding(mesh),
                                         differentiate=state_lib.trainable_arrays(trainable))

  # --- Loop -----------------------------------------------------------------------------------
  writer = MetricsWriter(workdir)
  first = int(jax.device_get(state.step))
  total = int(config.train.steps)
  last: Dict[str, float] = {}
  preempted = [False]
  bar = progress(total=total, initial=first, desc="train_lm")

  def next_batch(i, state):
    local = next(train_iter)
    return mesh_lib.shard_batch({k: local[k] for k in BATCH_KEYS}, mesh)

  def after_step(i, state, metrics) -> bool:
    """Log, checkpoint (every ``checkpoint.every`` steps, at the end, on preemption), hooks."""
    step = i + 1
    bar.update(1)
    if step % config.train.log_every == 0 or step == total:
      last.clear()
      last.update({k: float(v) for k, v in jax.device_get(metrics).items()})
      writer.write(step, last)
      bar.set_postfix(loss=f"{last['loss']:.3f}")
    preempted[0] = ckpt.should_stop(step)
    if step % config.checkpoint.every == 0 or step == total or preempted[0]:
      ckpt.save(step, state, data_iterator=train_iter, position=position)
    for hook in hooks:
      hook(step, state)
    if preempted[0]:
      logging.warning("stopping at step %d after a preemption request; checkpoint saved", step)
    return preempted[0]

  try:
    state, step = fit_lib.fit(state, train_step, next_batch, total, first=first,
                              on_step=after_step)
  finally:
    bar.close()
    ckpt.wait()  # a pending async save must land even if the loop failed
  preempted = preempted[0]

  # --- Samples --------------------------------------------------------------------------------
  samples = []
  if not preempted and config.sample.num > 0:
    prompts = list(config.sample.prompts)[: config.sample.num]
    completions = greedy_samples(state.params, cfg, tokenizer, prompts,
                                 config.sample.max_new_tokens, slot_mask=state.extras["slot_mask"])
    for p, c in zip(prompts, completions):
      samples.append(p + c)
      if jax.process_index() == 0:
        print(f"[sample] {p!r} -> {c!r}", flush=True)
      writer.write_text(step, "sample", p + c)
  writer.close()
  ckpt.close()  # also restores the previous SIGTERM handler
  return {"step": step, "preempted": preempted, "state": state, "metrics": last,
          "samples": samples}
