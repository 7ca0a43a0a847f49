"""Metrics to TensorBoard event files and a JSON-lines log in the workdir; tqdm progress bars.

Only process 0 writes (every host computes the same replicated scalars). The JSON log is
append-only, one ``{"step": ..., "time": ..., name: value, ...}`` object per line, so a resumed
run keeps extending the same file and plots can be made without TensorBoard. ``RunLog`` is the
training curve of one (method, seed) run of the wake/sleep cycle: every optimizer step of every
phase on one global step axis, and per-chunk metrics with the chunk as step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import tqdm


def _to_float(v: Any) -> Optional[float]:
  try:
    x = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return x


class MetricsWriter:
  """``write(step, {"loss": ..., ...})`` to ``workdir/tensorboard`` and ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str, *, enabled: Optional[bool] = None, tensorboard: bool = True,
               filename: str = "metrics.jsonl", tb_dir: Optional[str] = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(tb_dir or os.path.join(workdir, "tensorboard"), flush_secs=30)
      self._file = open(self.path, "a")

  def write(self, step: int, scalars: Mapping[str, Any], axis: str = "step",
            extra: Optional[Mapping[str, Any]] = None) -> None:
    """Writes scalar metrics at ``step`` (recorded as ``axis``); non-scalars are skipped,
    NaN/inf are kept as null. ``extra``: fields of the JSON line only (not TensorBoard)."""
    if not self.enabled:
      return
    record = {axis: int(step), "time": time.time(), **(extra or {})}
    for k, v in scalars.items():
      x = _to_float(v)
      if x is None:
        continue
      record[k] = x if math.isfinite(x) else None
      if self._tb is not None and math.isfinite(x):  # nan = not measured: no point, no warning
        self._tb.add_scalar(k, x, int(step))
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.add_text(name, text, int(step))
    self._file.write(json.dumps({"step": int(step), "time": time.time(), name: text}) + "\n")
    self._file.flush()

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class RunLog:
  """The training curves of one (method, seed) run: TensorBoard events and ``train_log.jsonl``
  in the run's directory (``tensorboard --logdir WORKDIR/runs`` shows one run per method and
  seed).

  ``step(phase, metrics)`` records one optimizer step of a phase at the next global step
  (``"<phase>/<name>"``); ``chunk(t, metrics)`` per-chunk metrics at step t (``"chunk/<name>"``).
  Points are held until ``commit()``, which the cycle calls right before each checkpoint: a
  killed run re-runs its last phase from the checkpoint (bit-identically), and the points of a
  phase reach the files once. Points at or below what the files already hold (a kill between a
  commit and its checkpoint) are skipped, so a resumed run never duplicates a point.
  """

  def __init__(self, run_dir: str, global_step: int = 0, *, enabled: Optional[bool] = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled, self.run_dir, self.global_step = enabled, run_dir, int(global_step)
    self.path = os.path.join(run_dir, "train_log.jsonl")
    self._pending: list = []
    self._done = {"step": -1, "chunk": -1}  # the last point of each axis already in the files
    if enabled and os.path.exists(self.path):
      for r in read_jsonl(self.path):
        axis = "step" if "step" in r else "chunk"  # a step's line also names its chunk
        self._done[axis] = max(self._done[axis], int(r[axis]))
    self._writer = None

  def step(self, phase: str, t: int, metrics: Mapping[str, Any]) -> None:
    """One optimizer step of ``phase`` during chunk ``t``'s sleep."""
    self.global_step += 1
    self._pending.append(("step", self.global_step, {f"{phase}/{k}": v for k, v in
                                                     metrics.items() if k != "step"},
                          {"phase": phase, "chunk": int(t)}))

  def chunk(self, t: int, metrics: Mapping[str, Any], prefix: str = "chunk") -> None:
    self._pending.append(("chunk", int(t), {f"{prefix}/{k}": v for k, v in metrics.items()},
                          {"global_step": self.global_step}))

  def commit(self) -> None:
    pending, self._pending = self._pending, []
    if not self.enabled:
      return
    new = [p for p in pending if p[1] > self._done[p[0]]]
    if not new:
      return
    if self._writer is None:
      self._writer = MetricsWriter(self.run_dir, enabled=True, filename="train_log.jsonl",
                                   tb_dir=self.run_dir)
    for axis, step, scalars, where in new:
      self._writer.write(step, scalars, axis=axis, extra=where)
      self._done[axis] = step
    self._writer.flush()

  def close(self) -> None:
    self._pending = []
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_jsonl(path: str) -> list:
  """All records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class LineProgress:
  """A log-friendly progress bar: one line when the loop ends (count, seconds, rate) instead of
  hundreds of redraws in a log file, and for long loops one line a minute (``every`` seconds)
  with the ETA, so a log shows the run is alive. Used when stderr is not a terminal."""

  every = 60.0

  def __init__(self, total=None, initial=0, desc="", stream=None):
    self.n, self.total, self.desc, self.stream = initial, total, desc, stream or sys.stderr
    self.start_n, self.t0, self.postfix = initial, time.perf_counter(), ""
    self.last = self.t0
    self.closed = False

  def _print(self, text):
    self.stream.write(text + "\n")
    self.stream.flush()

  def update(self, n=1):
    self.n += n
    now = time.perf_counter()
    if now - self.last >= self.every and self.total:
      done = self.n - self.start_n
      eta = (now - self.t0) / done * (self.total - self.n) if done else float("nan")
      self._print(f"{self.desc}: {self.n}/{self.total}, {now - self.t0:.0f} s, ETA {eta:.0f} s"
                  + (f", {self.postfix}" if self.postfix else ""))
      self.last = now

  def set_postfix(self, **kw):
    self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

  def close(self):
    if self.closed:
      return
    self.closed = True
    dt = time.perf_counter() - self.t0
    rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
    self._print(f"{self.desc}: {self.n}/{self.total} in {dt:.1f} s ({rate:.2f}/s)"
                + (f", {self.postfix}" if self.postfix else ""))


class _Off:
  def update(self, n=1):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
             initial: int = 0, desc: str = "", enabled: Optional[bool] = None, **kwargs):
  """A bar with rate and ETA for long loops (tqdm on a terminal, ``LineProgress`` in a log
  file); silent on processes other than 0."""
  if enabled is None:
    import jax
    enabled = jax.process_index() == 0
  if iterable is None and not sys.stderr.isatty():
    return LineProgress(total, initial, desc) if enabled else _Off()
  return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, disable=not enabled,
                   dynamic_ncols=True, **kwargs)
