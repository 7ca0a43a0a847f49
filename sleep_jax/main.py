"""absl entry point: ``python -m sleep_jax.main --config=FILE[:VARIANT] --workdir=DIR``.

A thin dispatcher: it parses the config (``ml_collections.config_flags``; overrides as
``--config.train.steps=100``), starts multi-host JAX if needed and runs the job that
``config.job`` names. Jobs are ``fn(config, workdir)`` in ``JOBS``.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sleep_jax.configs import loader

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file FILE[:VARIANT], e.g. sleep_jax/configs/default.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and data.")

# job name -> "module:function"; imported lazily so that one job's imports never slow another.
JOBS = {
    "train_lm": "sleep_jax.train.lm_job:run",
    "sleep_cycle": "sleep_jax.sleep.cycle:run",
}


def resolve_job(name: str):
  if name not in JOBS:
    near = difflib.get_close_matches(name, list(JOBS), n=3)
    raise app.UsageError(f"unknown job {name!r}" + (f"; did you mean {near}?" if near else "")
                         + f" Jobs: {sorted(JOBS)}")
  module, _, fn = JOBS[name].partition(":")
  return getattr(importlib.import_module(module), fn)


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  # Before anything touches a device: multi-host jobs must initialise jax.distributed first.
  from sleep_jax.parallel import mesh as mesh_lib
  mesh_lib.initialize_distributed(config.distributed)
  logging.info("job %s, workdir %s\n%s", config.job, _WORKDIR.value, config)
  resolve_job(config.job)(config, _WORKDIR.value)


def run(argv=None):
  """Console-script entry (``sleep-jax``) and ``python -m sleep_jax.main``."""
  argv = list(sys.argv if argv is None else argv)
  try:
    loader.validate_argv(argv)
  except loader.ConfigKeyError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  # config_flags finds the --config.* overrides in sys.argv itself, so keep the two in sync.
  sys.argv = argv
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
