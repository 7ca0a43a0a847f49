"""The one training loop and the state it starts from.

``fit`` is the loop of every optimisation in the project: a consolidation (its batches sample the
student on-policy), the SFT baselines and dream training (``fit_rows``), the base-model recipe
(``tasks/pretrain.py``) and the LM job (``train/lm_job.py``). What differs between them is how a
batch is made and what happens after a step (evaluation, checkpoints, a progress bar): the two
callbacks. ``new_state`` builds the ``TrainState`` of a run that starts from existing parameters;
on a mesh the state lands where its parameters are and the step pins it there.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from sleep_jax.losses.registry import build_loss
from sleep_jax.parallel import logical
from sleep_jax.train import state as state_lib
from sleep_jax.train.optimizer import make_optimizer
from sleep_jax.train import step as step_lib
from sleep_jax.train.state import TrainState

Batch = Dict[str, Any]


def fit(state: TrainState, step_fn: Callable, next_batch: Callable[[int, TrainState], Batch],
        steps: int, *, first: int = 0,
        on_step: Optional[Callable[[int, TrainState, Dict[str, Any]], bool]] = None
        ) -> Tuple[TrainState, int]:
  """Steps ``first ... steps - 1``: ``state, m = step_fn(state, next_batch(i, state))``, then
  ``on_step(i, state, m)``; a True return stops early. Returns (state, steps taken in total)."""
  i = first
  while i < steps:
    state, metrics = step_fn(state, next_batch(i, state))
    i += 1
    if on_step is not None and on_step(i - 1, state, metrics):
      break
  return state, i


def mesh_of(params) -> Optional[jax.sharding.Mesh]:
  """The mesh the parameters are sharded on, or None for single-device parameters (then every
  step is a plain single-device jit, exactly as before the cycle ran on meshes)."""
  sh = getattr(jax.tree.leaves(params)[0], "sharding", None)
  if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
    return sh.mesh
  return None


def new_state(params, tx, rng, trainable, extras: Optional[Dict[str, Any]] = None
              ) -> Tuple[TrainState, Optional[TrainState]]:
  """``(state, shardings)`` of a run from existing ``params``: a copy of them (the step donates
  its state; the caller keeps its own arrays, which may be a teacher's), fresh optimizer state,
  ``rng``'s key data, the trainable mask and ``extras`` (e.g. the slot mask). On a mesh the copy
  keeps the parameters' shardings and ``shardings`` (``state_lib.state_shardings``) says where
  every leaf lives; off a mesh it is None."""
  p = jax.tree.map(jnp.copy, params)
  # The optimizer sees the arrays with a trainable element only (``train_step_for``'s step).
  opt_state = tx.init(step_lib.select(p, state_lib.trainable_arrays(trainable)))
  st = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt_state,
                  rng=jnp.copy(state_lib.rng_data(rng)),
                  trainable=jax.tree.map(lambda m: jnp.array(m, bool), trainable),
                  extras={k: jnp.array(v) for k, v in (extras or {}).items()})
  mesh = mesh_of(params)
  if mesh is None:
    return st, None
  shardings = state_lib.state_shardings(st, jax.tree.map(lambda x: x.sharding, p), mesh)
  return jax.device_put(st, shardings), shardings


def place_batch(batch: Batch, mesh) -> Batch:
  """Host rows -> arrays sharded over the logical "batch" axis of ``mesh`` (replicated along it
  when the mesh's data axes do not divide the row count); as-is off a mesh."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  return {k: jax.device_put(v, logical.logical_to_sharding(("batch",), np.shape(v), mesh))
          for k, v in batch.items()}


def train_step_for(loss_key, make_loss_fn, opt_cfg, trainable, shardings):
  """``(optimizer, step)`` of ``step_lib.cached_train_step``; only the arrays with a trainable
  element are differentiated."""
  return step_lib.cached_train_step(loss_key, make_loss_fn, opt_cfg,
                                    state_lib.trainable_arrays(trainable), shardings=shardings)


def fit_rows(params, slot_mask, cfg, rows: Batch, trainable, *, steps: int, opt_cfg,
             batch_size: int, rng: jax.Array, loss: str = "lm",
             on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Any:
  """``steps`` optimizer steps of the registered ``loss`` (default: the masked LM loss, eq. in
  ``losses/lm.py``) on rows of ``rows`` (tokens, valid, loss_mask) drawn with replacement; only
  ``trainable`` changes; ``on_step(i, metrics)`` after each step (host floats). Returns the new
  parameters (the inputs are untouched)."""
  n = rows["tokens"].shape[0]
  if n == 0 or steps == 0:
    return params
  make_loss = lambda: build_loss(loss, cfg=cfg, per_example=True)
  st0, shardings = new_state(params, make_optimizer(opt_cfg), rng, trainable,
                             {"slot_mask": slot_mask})
  _, step = train_step_for((loss, cfg), make_loss, opt_cfg, trainable, shardings)
  mesh = mesh_of(params)
  host = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())

  def next_batch(i, state):
    idx = host.integers(0, n, size=batch_size)
    return place_batch({k: v[idx] for k, v in rows.items()}, mesh)

  def after(i, state, m):
    if on_step is not None:
      on_step(i, {k: float(v) for k, v in m.items() if np.ndim(v) == 0})
    return False

  st, _ = fit(st0, step, next_batch, steps, on_step=after)
  return st.params
