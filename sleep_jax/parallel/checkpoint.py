"""Checkpoints with orbax: train state, input-pipeline state and position in the run, together.

One checkpoint step directory holds three items written by one ``CheckpointManager.save``:

* ``state``     the TrainState (params, optimizer state, step, rng, trainable mask, extras),
                written shard by shard from every host (OCDBT/zarr via tensorstore);
* ``data``      the grain iterator state, one small JSON file per process (each host has its own
                slice of the input; grain's own checkpoint handler names the files);
* ``position``  JSON: where the run is (``step``, ``cycle``, ``phase`` and anything else).

Guarantees:

* async: ``save`` returns once device arrays are copied to host; files are written in the
  background while training continues (``wait`` blocks until the last save is on disk);
* atomic: orbax writes into a temporary directory and renames it when complete, so a process
  killed mid-save leaves only an ignored temporary directory, never a half checkpoint;
* keep-N: older steps are deleted after a newer one is committed (``max_to_keep``);
* never overwritten: saving a step that already exists writes nothing;
* resharding: ``restore`` reads into the shardings of the abstract state it is given, so a
  checkpoint from 8 devices restores onto 1 and vice versa;
* clear errors: a checkpoint whose structure, shapes or dtypes differ from the expected state
  raises ``CheckpointMismatchError`` naming the paths; an unreadable (truncated, corrupt) one
  raises ``CheckpointCorruptError`` naming the step, its directory and the other steps;
* preemption: on SIGTERM (TPU maintenance/preemption) ``should_stop`` turns True; the loop then
  saves and exits cleanly. On multi-host jobs the decision is synchronised across hosts through
  orbax's ``reached_preemption`` (JAX's preemption sync manager), because a save is collective.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Dict, NamedTuple, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, POSITION = "state", "data", "position"


class CheckpointError(RuntimeError):
  """Base class of checkpoint errors."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's tree does not match the state we are restoring into."""


class CheckpointCorruptError(CheckpointError):
  """The checkpoint files cannot be read (truncated, corrupt, missing items)."""


class Restored(NamedTuple):
  step: int
  state: Any
  position: Dict[str, Any]


class _IteratorSnapshot:
  """The iterator's state captured at save time, in the shape grain's handler expects.

  The async save may write the ``data`` item after the training loop has already advanced the
  live iterator, so the state is captured synchronously here and written later. (grain's
  handler stores ``get_state()`` bytes of non-DatasetIterator objects verbatim; ``restore`` then
  json-decodes the text into the live DatasetIterator.)
  """

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


def _names(path) -> str:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return "/".join(out)


def _flatten_metadata(tree, prefix="") -> Dict[str, Any]:
  """Orbax tree metadata (nested dicts/lists, leaves ArrayMetadata or None) -> {path: leaf}."""
  out = {}
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    if tree is not None:
      out[prefix] = tree
    return out
  for k, v in items:
    out.update(_flatten_metadata(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def _abstract(tree):
  """ShapeDtypeStructs with shardings (concrete arrays are converted, not read)."""
  def f(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      if x.sharding is None:
        raise ValueError("restore target ShapeDtypeStruct needs a sharding "
                         "(use state.abstract_with_shardings)")
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return jax.tree.map(f, tree)


class Checkpointer:
  """Saves/restores (state, data iterator, position) under ``directory/<step>/``.

  Args:
    directory: where step directories live (local path or gs://...).
    max_to_keep: keep the newest N steps (None keeps all).
    async_save: write in the background.
    handle_sigterm: install a SIGTERM handler (main thread only) that asks the loop to stop.
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True,
               handle_sigterm: bool = True, save_point: str = "the next step"):
    """``save_point``: where the loop that owns this checkpointer saves and stops after a
    SIGTERM (what the warning tells the user: a sleep finishes its current phase first)."""
    self.directory = os.fspath(directory)
    self.save_point = save_point
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       POSITION: ocp.JsonCheckpointHandler()})
    self._stop_requested = False
    self._polls = 0
    self._old_handler = None
    if handle_sigterm and threading.current_thread() is threading.main_thread():
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  # --- preemption ------------------------------------------------------------------------------
  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and stop at %s", self.save_point)
    self._stop_requested = True

  def request_stop(self) -> None:
    self._stop_requested = True

  def should_stop(self, step: int) -> bool:
    """True when the loop should save now and exit (SIGTERM or a synchronised preemption)."""
    if jax.process_count() > 1:
      # Every host must take the same decision at the same step: a save is collective.
      return bool(self.manager.reached_preemption(step))
    return self._stop_requested

  def poll(self) -> bool:
    """``should_stop`` for a loop that checks more often than it saves (the wake/sleep cycle
    checks at every optimizer step and saves at phase boundaries): each call is the next id of
    one counter, so on multi-host jobs every host asks the preemption sync manager at the same
    increasing ids."""
    self._polls += 1
    return self.should_stop(self._polls)

  # --- queries ---------------------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  # --- save ------------------------------------------------------------------------------------
  def save(self, step: int, state, *, data_iterator=None,
           position: Optional[Dict[str, Any]] = None) -> bool:
    """Saves at ``step`` (async). Returns False, writing nothing, if ``step`` already exists."""
    step = int(step)
    if step in self.manager.all_steps():
      logging.info("checkpoint step %d already exists in %s; not overwriting", step,
                   self.directory)
      return False
    pos = {"step": step}
    pos.update(position or {})
    items = {STATE: ocp.args.StandardSave(state), POSITION: ocp.args.JsonSave(pos)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=True))

  def wait(self) -> None:
    """Blocks until every pending save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

  # --- restore ---------------------------------------------------------------------------------
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _corrupt(self, step: int, what: str, err: BaseException) -> CheckpointCorruptError:
    others = [s for s in self.all_steps() if s != step]
    return CheckpointCorruptError(
        f"checkpoint step {step} at {self._step_dir(step)} is unreadable ({what}): "
        f"{type(err).__name__}: {err}. It was left untouched. Move it away to resume from an "
        f"earlier step (other steps here: {others or 'none'}), or pass step= explicitly.")

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError if the saved tree differs from ``abstract_state``."""
    try:
      meta = self.manager.item_metadata(step)[STATE]
      tree = getattr(meta, "tree", meta)
      saved = _flatten_metadata(tree)
    except Exception as e:  # unreadable metadata is corruption, not a mismatch
      raise self._corrupt(step, "metadata", e) from e
    if not saved:
      raise self._corrupt(step, "metadata", ValueError("no arrays in the state item"))
    expected = {_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    # Parameters first: they say most about what changed (the optimizer state follows them).
    order = lambda k: (not k.startswith("params/"), k)
    missing = sorted(set(expected) - set(saved), key=order)
    unexpected = sorted(set(saved) - set(expected), key=order)
    differ = []
    for k in sorted(set(expected) & set(saved), key=order):
      e, s = expected[k], saved[k]
      s_shape, s_dtype = tuple(getattr(s, "shape", ()) or ()), getattr(s, "dtype", None)
      if s_shape != tuple(e.shape) or (s_dtype is not None and np.dtype(s_dtype) != e.dtype):
        differ.append(f"{k}: checkpoint {s_shape} {s_dtype} vs expected {tuple(e.shape)} "
                      f"{e.dtype}")
    if missing or unexpected or differ:
      lines = [f"checkpoint step {step} at {self._step_dir(step)} does not match the state being "
               "restored (different model/optimizer config?):"]
      for title, xs in (("missing from checkpoint", missing),
                        ("not expected (in checkpoint only)", unexpected),
                        ("shape/dtype differs", differ)):
        if xs:
          more = f" ... and {len(xs) - 10} more" if len(xs) > 10 else ""
          lines.append(f"  {title}: " + "; ".join(xs[:10]) + more)
      raise CheckpointMismatchError("\n".join(lines))

  def restore(self, abstract_state, *, step: Optional[int] = None,
              data_iterator=None) -> Restored:
    """Restores ``step`` (default latest) into ``abstract_state``'s shapes and shardings.

    Args:
      abstract_state: TrainState of ShapeDtypeStructs with shardings (or of arrays, whose
        shardings are used): the *target* layout, which may differ from the saved one.
      data_iterator: a grain DatasetIterator built like the saved one; its state is set in place.

    Returns: Restored(step, state, position).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
    step = int(step)
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint step {step} in {self.directory}; "
                            f"available: {self.all_steps()}")
    target = _abstract(abstract_state)
    self.check_compatible(step, target)
    items = {STATE: ocp.args.StandardRestore(target), POSITION: ocp.args.JsonRestore()}
    has_data = os.path.isdir(os.path.join(self._step_dir(step), DATA))
    if data_iterator is not None:
      if not has_data:
        raise CheckpointMismatchError(
            f"checkpoint step {step} at {self._step_dir(step)} has no data-iterator state but a "
            "data iterator was given to restore")
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:
      raise self._corrupt(step, "restore", e) from e
    # Every restored array must be finite-shaped and readable now, not at first use.
    try:
      jax.block_until_ready(out[STATE])
    except Exception as e:
      raise self._corrupt(step, "arrays", e) from e
    return Restored(step=step, state=out[STATE], position=dict(out[POSITION] or {}))
