"""Test setup: 8 fake CPU devices for sharding tests (must precede any jax import)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test run, shared by the xdist workers and the
# subprocesses the tests start: a program both workers (or a CLI test) compile is compiled once.
# Keyed by the run, so nothing carries over from an earlier run.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"sleep_jax_test_xla_cache_{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
