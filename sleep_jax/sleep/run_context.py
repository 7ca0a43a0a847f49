"""What one (method, seed) run of the wake/sleep cycle holds fixed (``Context``), and the
progress bar, training curves, test hooks and stop checks every phase's loops go through
(``with_progress``).

``Context`` holds the config, the task's ``Setup``, the method's row of ``methods.METHODS``, the
seed and the callbacks. Every random number derives from (seed, chunk, phase) (``Context.key``),
so a resumed run draws exactly what an uninterrupted one would, and two methods draw the same
numbers where they do the same thing.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import ml_collections

from sleep_jax.sleep import methods as methods_lib
from sleep_jax.tasks import base as task_lib


def no_hook(phase: str, chunk: int, step: int) -> None:
  del phase, chunk, step


def no_log(phase: str, chunk: int, metrics: Dict[str, float]) -> None:
  del phase, chunk, metrics


@dataclasses.dataclass(frozen=True)
class Context:
  config: ml_collections.ConfigDict
  setup: task_lib.Setup
  name: str  # the method's name
  method: methods_lib.Method
  seed: int
  schedule: Tuple[int, ...]  # (C_0, C_1, ...) of this method (``methods.sleep_schedule``)
  hook: Callable[[str, int, int], None] = no_hook  # (phase, chunk, step): tests' kill points
  # (where, e.g. "consolidation step 3"): raises ``Preempted`` once a stop was asked (SIGTERM).
  # Called at every optimizer step and dreaming stage, so a long phase stops within a step.
  poll: Callable[[str], None] = lambda where: None
  progress: Callable[..., Any] = None  # tqdm-like bar factory (``metrics_writer.progress``)
  # (phase, chunk, one optimizer step's metrics): the run's training curves (``RunLog``)
  log_step: Callable[[str, int, Dict[str, float]], None] = no_log

  def key(self, *parts) -> jax.Array:
    """Every random number of a run derives from (seed, chunk, phase): resumable, and common
    to the methods. The method is not part of the key, so two methods that do the same thing in
    a phase (the same batches, slot initialisations, replay picks, samples) do it with the same
    numbers, and their difference on one seed is the methods' difference, not the draws'
    (common random numbers). With the method in the key, Sleep and Sleep without dreams
    differed on seeds where no dream reached training (experiments/reasoning/README.md)."""
    k = jax.random.key(self.seed)
    for p in parts:
      k = jax.random.fold_in(k, zlib.crc32(str(p).encode()) & 0x7FFFFFFF)
    return k


def with_progress(ctx: Context, t: int, phase: str, steps: int, run: Callable,
                  hook: bool = True, stages: Sequence[str] = ()):
  """``run(on_step)`` under a progress bar named for the method, seed, chunk and phase; every
  ``on_step(i, metrics)`` goes to the run's training curves and (with ``hook``) to the run's
  hook (tests' kill points). With ``stages`` (the named parts of one step, e.g. a dreaming
  round's) it is ``run(on_step, on_stage)`` and the bar moves at each ``on_stage(name)``
  instead: a step of minutes is not silent. Each step and stage asks ``ctx.poll`` whether the
  run must stop (SIGTERM)."""
  bar = ctx.progress(total=steps * max(1, len(stages)),
                     desc=f"{ctx.name} seed {ctx.seed} chunk {t} {phase}", leave=False)

  calls, last = [0], steps * max(1, len(stages))

  def poll(where):
    calls[0] += 1
    if calls[0] < last:  # after the last one the phase is about to end and save
      ctx.poll(where)

  def on_step(i, m):
    if not stages:
      bar.update(1)
    ctx.log_step(phase, t, m)
    if hook:
      ctx.hook(phase, t, i)
    if not stages:
      poll(f"{phase} step {i}")

  def on_stage(name):
    bar.set_postfix(stage=name)
    bar.update(1)
    poll(f"{phase}, {name}")

  try:
    return run(on_step, on_stage) if stages else run(on_step)
  finally:
    bar.close()
