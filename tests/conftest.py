"""Test setup: 8 fake CPU devices for sharding tests (must precede any jax import)."""

import gc
import os
import tempfile

import pytest

# LLVM at -O0: the suite is compile-bound (tiny models; about 60% of an end-to-end test is XLA
# compiling its steps and sampler), and -O0 compiles in half the time while the tiny programs run
# about as fast (the whole run on 2 idle cores: 10:52 -> 6:27, CI 2026-12-06). Every comparison
# in a test is between programs compiled with the same flags; speed is measured by the
# benchmarks, at the default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test run, shared by the xdist workers and the
# subprocesses the tests start: a program both workers (or a CLI test) compile is compiled once.
# Keyed by the run (the controlling process's id, which the workers inherit), so nothing
# carries over from an earlier run, and removed when the run ends. Programs that compile in
# 0.1 s or more are cached: at 0.5 s the clean-clone CI test run took 670 s, at 0.1 s 594 s
# (adjacent runs on idle cores, 2026-12-06).
_RUN = os.environ.setdefault("SLEEP_JAX_TEST_RUN", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"sleep_jax_test_xla_cache_{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_sessionfinish(session, exitstatus):
  """The run's compilation cache goes with the run (the controller's session ends last; an
  xdist worker's must not remove it under the others)."""
  del exitstatus
  if not hasattr(session.config, "workerinput"):
    import shutil
    shutil.rmtree(os.path.join(tempfile.gettempdir(), f"sleep_jax_test_xla_cache_{_RUN}"),
                  ignore_errors=True)


def _share_of_map_limit() -> float:
  """This process's memory maps over the kernel's limit (0 where /proc does not say)."""
  try:
    with open("/proc/self/maps") as f:
      maps = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      return maps / int(f.read())
  except (OSError, ValueError):  # not Linux
    return 0.0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program when a test file ends with the process's memory maps past 40%
  of the kernel's limit.

  XLA:CPU maps each executable's code into the process (~100 memory maps each), and a long-lived
  process keeps every program it compiled reachable from jit's caches: one process running
  test_cycle, test_dreaming and test_model held 53,166 maps, against the kernel's 65,530
  (`vm.max_map_count`). Past the limit every new mapping fails and XLA segfaults (an xdist worker
  near the end of a CI run, 2026-12-07; whole-suite `-n 0` runs). One file adds at most ~27,000
  (test_cycle), so a file starts below 40% and ends below 80%. A later file that runs a dropped
  program reads it back from the run's compilation cache.
  """
  yield
  if _share_of_map_limit() > 0.4:
    import jax
    from sleep_jax.train import step
    step.clear_step_cache()
    jax.clear_caches()
    gc.collect()


# The files with the longest end-to-end runs, longest first (CI logs' --durations). pytest.ini
# turns off xdist's reordering by test count, so the two workers start on these and the short
# files fill in at the end: the run ends when both workers do, not one file after the other.
HEAVY_FIRST = ("test_few_shot.py", "test_cycle.py", "test_long_horizon_cycle.py",
               "test_checkpoint.py", "test_consolidation.py", "test_bench.py",
               "test_cli_errors.py", "test_dreaming.py", "test_slot_keys.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda it: (rank.get(os.path.basename(str(it.fspath)), len(rank)),
                             order[id(it)]))
