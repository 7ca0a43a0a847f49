"""Metrics to TensorBoard event files and a JSON-lines log in the workdir; tqdm progress bars.

Only process 0 writes (every host computes the same replicated scalars). The JSON log is
append-only, one ``{"step": ..., "time": ..., name: value, ...}`` object per line, so a resumed
run keeps extending the same file and plots can be made without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
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
               filename: str = "metrics.jsonl"):
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
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
      self._file = open(self.path, "a")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalar metrics at ``step``; non-scalars are skipped, NaN/inf are kept as null."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
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


def read_jsonl(path: str) -> list:
  """All records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
             initial: int = 0, desc: str = "", enabled: Optional[bool] = None, **kwargs):
  """tqdm bar with rate and ETA for long loops; silent on processes other than 0."""
  if enabled is None:
    import jax
    enabled = jax.process_index() == 0
  return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, disable=not enabled,
                   dynamic_ncols=True, **kwargs)
