"""Continual-learning metrics from an accuracy matrix (the paper's Table 3).

``R[i, j]`` is the accuracy on task (chunk) j after learning task i, for T tasks. With ``b[j]``
the accuracy of the model before any learning:

* ACC  = 1/T sum_j R[T-1, j]                                  (final average accuracy)
* BWT  = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])            (backward transfer; < 0 forgets)
* FWT  = 1/(T-1) sum_{j>0} (R[j-1, j] - b[j])                  (forward transfer)
* forgetting = 1/(T-1) sum_{j<T-1} max_{i<T-1} (R[i, j] - R[T-1, j])     (Chaudhry et al.)

(Lopez-Paz & Ranzato 2017, GEM; Chaudhry et al. 2018, RWalk.)

A chunk without eval questions has ``R[:, j] = nan`` (long-horizon stories): every mean and max
skips nan entries (a mean or max over nothing is nan), so the metrics cover the scored chunks.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def nanmean(x) -> float:
  """Mean of the non-nan entries (nan if there are none); ``np.mean`` when nothing is nan."""
  v = np.asarray(x, np.float64).ravel()
  v = v[~np.isnan(v)]
  return float(v.mean()) if v.size else float("nan")


def _nanmax(x) -> float:
  v = np.asarray(x, np.float64)
  v = v[~np.isnan(v)]
  return float(v.max()) if v.size else float("nan")


def continual_metrics(R, base: Optional[np.ndarray] = None) -> Dict[str, float]:
  R = np.asarray(R, np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1]:
    raise ValueError(f"accuracy matrix must be square (T, T); got shape {R.shape}")
  T = R.shape[0]
  out = {"ACC": nanmean(R[-1])}
  if T > 1:
    out["BWT"] = nanmean([R[-1, j] - R[j, j] for j in range(T - 1)])
    out["forgetting"] = nanmean([_nanmax(R[:-1, j]) - R[-1, j] for j in range(T - 1)])
    if base is not None:
      b = np.asarray(base, np.float64)
      out["FWT"] = nanmean([R[j - 1, j] - b[j] for j in range(1, T)])
  else:
    out.update(BWT=0.0, forgetting=0.0)
    if base is not None:
      out["FWT"] = 0.0
  return out
