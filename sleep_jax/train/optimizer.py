"""The one optimizer factory (``make_optimizer``) and the CMS update frequencies
(docs/method.md section 1): parameters of CMS level ``j`` (``params["layers"]["cms_j"]``) change only every
``C_j = chunk_sizes[j]`` steps, by the optimizer's update for the *mean* gradient accumulated over
that chunk (``optax.MultiSteps`` per level, so each level keeps its own Adam statistics and step
count); arrays frozen when the optimizer is built get no optimizer state at all."""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

import jax
import optax

from sleep_jax.model import transformer
from sleep_jax.train.state import _any, _level_of, all_trainable, idle_slots_frozen, path_str


# Optional keys of an optimizer block and their values when absent; any other key is a mistake.
OPTIMIZER_DEFAULTS = dict(warmup_steps=0, decay_steps=0, final_lr_fraction=0.1, b1=0.9, b2=0.95,
                          weight_decay=0.0, momentum=0.0, grad_clip=0.0)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """optax optimizer from ``config.optimizer``.

  Keys: name ("adamw" | "adam" | "sgd"), lr, warmup_steps (linear from 0), decay_steps (cosine
  to ``final_lr_fraction * lr`` at that step; 0 = constant after warmup), b1, b2, weight_decay,
  momentum (sgd), grad_clip (global norm; 0 = off); absent keys take ``OPTIMIZER_DEFAULTS``, an
  unknown key fails with the valid ones. Schedules count this transform's own updates (for a
  CMS level with chunk C, its updates, not the train steps).
  """
  unknown = sorted(set(opt_cfg) - set(OPTIMIZER_DEFAULTS) - {"name", "lr"})
  if unknown:
    near = {k: difflib.get_close_matches(k, list(OPTIMIZER_DEFAULTS), n=1) for k in unknown}
    raise ValueError(f"unknown optimizer key(s) {unknown} (did you mean {near}?); valid: name, "
                     f"lr, {', '.join(OPTIMIZER_DEFAULTS)}")
  get = lambda k: opt_cfg[k] if k in opt_cfg else OPTIMIZER_DEFAULTS[k]
  name = opt_cfg.name if hasattr(opt_cfg, "name") else opt_cfg["name"]
  lr = float(opt_cfg["lr"])
  warmup = int(get("warmup_steps") or 0)
  decay = int(get("decay_steps") or 0)
  if decay > warmup:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, decay, end_value=lr * get("final_lr_fraction"))
  elif warmup > 0:
    sched = optax.linear_schedule(0.0, lr, warmup)  # then constant
  else:
    sched = lr
  if name == "adamw":
    tx = optax.adamw(sched, b1=get("b1"), b2=get("b2"), weight_decay=get("weight_decay"))
  elif name == "adam":
    tx = optax.adam(sched, b1=get("b1"), b2=get("b2"))
  elif name == "sgd":
    tx = optax.sgd(sched, momentum=get("momentum") or None)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'adamw', 'adam' or 'sgd'")
  if get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(get("grad_clip")), tx)
  return tx


def param_labels(params, *, chunk_sizes: Optional[Sequence[int]] = None, trainable=None):
  """Label per parameter: 'frozen' (mask all False), 'cms_j' (level j with C_j > 1), 'base'."""
  chunk_sizes = tuple(chunk_sizes or ())
  masks = trainable if trainable is not None else all_trainable(params)

  def label(path, _, m):
    p = path_str(path)
    if not _any(m):
      return "frozen"
    j = _level_of(p)
    if j is not None and j < len(chunk_sizes) and int(chunk_sizes[j]) > 1:
      return f"cms_{j}"
    return "base"

  return jax.tree_util.tree_map_with_path(label, params, masks)


def with_cms_frequencies(tx: optax.GradientTransformation, params, *,
                         chunk_sizes: Optional[Sequence[int]] = None,
                         trainable=None) -> optax.GradientTransformation:
  """Wraps ``tx`` so CMS level j updates every ``chunk_sizes[j]`` steps and frozen arrays get
  no optimizer state.

  Level j's arrays go through ``optax.MultiSteps(tx, C_j)``: for C_j - 1 steps the mean
  gradient accumulates and the update is exactly zero; on every C_j-th step (steps C_j, 2 C_j,
  ... counted from the optimizer's creation) ``tx`` is applied to the accumulated mean. Each
  partition has its own copy of ``tx``'s state. Global-norm clipping inside ``tx`` then acts per
  partition; clip before this wrapper if a global clip over all parameters is wanted.
  """
  labels = param_labels(params, chunk_sizes=chunk_sizes, trainable=trainable)
  used = sorted(set(jax.tree.leaves(labels)))
  if used == ["base"]:
    return tx
  transforms = {}
  for lab in used:
    if lab == "base":
      transforms[lab] = tx
    elif lab == "frozen":
      transforms[lab] = optax.set_to_zero()
    else:
      k = int(chunk_sizes[int(lab.split("_")[1])])
      transforms[lab] = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return optax.multi_transform(transforms, labels)


def with_masked_slots_frozen(tx: optax.GradientTransformation, cfg):
  """``(optimizer, trainable)`` of a job that trains model ``cfg`` with every slot masked (the LM
  job, the base recipe): ``tx`` with the CMS update frequencies and the slot arrays frozen
  (``state.idle_slots_frozen``). Pass ``state.trainable_arrays(trainable)`` as the step's
  ``differentiate``, so that frozen arrays are not differentiated either."""
  shapes = transformer.param_shapes(cfg)
  trainable = idle_slots_frozen(shapes, transformer.slot_mask_none(cfg))
  return with_cms_frequencies(tx, shapes, chunk_sizes=cfg.chunk_sizes,
                              trainable=trainable), trainable
