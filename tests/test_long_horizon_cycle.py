"""Long-horizon streams through the wake/sleep driver: the n-level sleep cascade, NaN-safe
chunks without eval questions, accuracy by distance, and an end-to-end run of the stream setup."""

import math
import os

import numpy as np
import pytest

from sleep_jax.configs import knowledge, long_horizon
from sleep_jax.eval import continual, report
from sleep_jax.sleep import cycle
from sleep_jax.sleep import methods as M


def _due(schedule, T):
  return {t: M.levels_due(schedule, t) for t in range(T) if M.levels_due(schedule, t)}


def test_cascade_schedule_four_levels():
  every = tuple(long_horizon.get_config("needles").sleep_every)
  sched = M.sleep_schedule(every, M.get("sleep_l4"), n_levels=4)
  assert sched == (1, 2, 4, 8)
  # Level l receives level l-1 after every C_l-th chunk, fastest level first.
  assert _due(sched, 8) == {1: [1], 3: [1, 2], 5: [1], 7: [1, 2, 3]}
  assert M.sleep_schedule(every, M.get("sleep_l2"), 4) == (1, 2)
  assert M.sleep_schedule(every, M.get("sleep_l1"), 4) == (1,)
  for n in (1, 2, 4):  # the same truncation for Sleep with dreaming (knowledge.py:table3_levels)
    name = f"sleep_{n}_level{'s' if n > 1 else ''}"
    assert M.sleep_schedule(every, M.get(name), 4) == every[:n] and M.get(name).dreaming == {}
  assert _due((1,), 8) == {}
  assert M.sleep_schedule(every, M.get("sleep_l4"), n_levels=2) == (1, 2)


def test_two_level_default_is_the_old_deep_sleep_schedule():
  """Without ``sleep_every`` the cascade is the old rule: deep sleep level 0 -> 1 after chunk t
  iff the method deep-sleeps, the model has 2+ levels and (t + 1) % deep_every == 0."""
  c = knowledge.get_config("base_r")
  assert tuple(c.sleep_every) == ()
  for deep_every in (1, 2, 3):
    for name, m in M.METHODS.items():
      if m.levels is not None:  # the long-horizon methods are new
        continue
      for n_levels in (1, 2, 3):
        sched = M.sleep_schedule((1, deep_every), m, n_levels)
        for t in range(7):
          old = m.deep and n_levels > 1 and (t + 1) % deep_every == 0
          assert M.levels_due(sched, t) == ([1] if old else [])


def test_bad_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple"):
    M.sleep_schedule((1, 3, 4), M.get("sleep"), 3)


def test_continual_metrics_skip_chunks_without_questions():
  nan = float("nan")
  R = np.array([[0.5, nan, 0.0], [0.5, nan, 0.5], [0.0, nan, 1.0]])
  m = continual.continual_metrics(R)
  assert m["ACC"] == pytest.approx(0.5)  # mean of R[-1] over scored chunks
  assert m["BWT"] == pytest.approx(-0.5)  # only chunk 0 (chunk 1 has no questions)
  assert m["forgetting"] == pytest.approx(0.5)
  assert math.isnan(continual.nanmean([nan, nan]))
  full = np.array([[0.2, 0.1], [0.3, 0.7]])
  assert continual.nanmean(full[-1]) == float(np.mean(full[-1]))
  assert report._mean_spread([nan, 0.5, None]) == "50.0"


def test_accuracy_by_distance_and_kind():
  answers = [{"q": "a", "em": 1.0}, {"q": "b", "em": 0.0}, {"q": "c", "em": 1.0},
             {"q": "d", "em": 1.0}, {"q": "unknown", "em": 0.0}]
  info = {"distance": {"a": 0, "b": 0, "c": 10, "d": 2},
          "kind": {"a": "needle", "b": "latest", "c": "latest", "d": "before"}}
  by = report.accuracy_by(answers, info)
  assert by == {"distance": {"0": 0.5, "2": 1.0, "10": 1.0},
                "kind": {"before": 1.0, "latest": 0.5, "needle": 1.0}}
  results = {"methods": {"m": {"seeds": {"0": {"by_query": by},
                                         "1": {"by_query": {"distance": {"0": 1.0}}}}}}}
  table = report.grouped_table(results, "distance")
  assert "| method \\ distance | 0 | 2 | 10 | seeds |" in table  # numeric order
  assert "| m | 75.0 ± 35.4 | 100.0 | 100.0 | 2 |" in table


def test_stream_setup_runs_end_to_end(tmp_path):
  c = long_horizon.get_config("test")
  res = cycle.run_experiment(c, str(tmp_path), log=lambda *_: None)
  for method in c.methods:
    r = res["methods"][method]["seeds"]["0"]
    R = np.asarray(r["R"])
    assert R.shape == (4, 4) and np.isnan(R[:, 1]).all() and not np.isnan(R[:, 0]).any()
    assert not math.isnan(r["metrics"]["closed_book_final"])
    assert set(r["by_query"]) == {"distance", "kind"}
    assert {int(d) for d in r["by_query"]["distance"]} <= set(range(4))
  # sleep_l4 over 4 chunks: level 1 got chunks 0-1 (pruned at chunk 3), level 2 chunks 0-3.
  live = np.asarray(res["methods"]["sleep_l4"]["seeds"]["0"]["live_slots"])
  assert live.sum(axis=1).tolist() == [0, 0, 1, 0]
  for f in ("results.md", "plots/accuracy_by_distance.png", "plots/accuracy_matrices.png"):
    assert os.path.exists(tmp_path / f)
  assert "by distance" in (tmp_path / "results.md").read_text()
