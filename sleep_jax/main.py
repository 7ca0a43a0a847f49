"""absl entry point: ``python -m sleep_jax.main --config=FILE[:VARIANT] --workdir=DIR``.

A thin dispatcher: it checks the config (``ml_collections.config_flags``; overrides as
``--config.train.steps=100``) and the workdir, locks the workdir, logs the config to
``WORKDIR/run.log``, starts multi-host JAX if needed and runs the job that ``config.job`` names.
Jobs are ``fn(config, workdir)`` in ``JOBS``.

Exit codes (``sleep_jax/errors.py``): 0 done or preempted and saved; 2 a user error, one
``error: ...`` line (``--debug`` or ``SLEEP_JAX_DEBUG=1``: with the traceback); 3 the run
diverged (NaN/inf); anything else an internal error with its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sleep_jax import errors
from sleep_jax import workdir as workdir_lib
from sleep_jax.configs import loader

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file FILE[:VARIANT], e.g. sleep_jax/configs/default.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and data.")
flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")

# job name -> "module:function"; imported lazily so that one job's imports never slow another.
JOBS = {
    "train_lm": "sleep_jax.train.lm_job:run",
    "sleep_cycle": "sleep_jax.sleep.cycle:run",
}
# job name -> "module:function(config)" that raises UserError on a bad config, run before the
# workdir is written to (a refused run leaves an existing workdir byte-identical).
CHECKS = {
    "sleep_cycle": "sleep_jax.sleep.validate:check",
}


def check_job(name: str) -> str:
  """``name`` if it is a job, else a UserError naming the nearest ones (imports nothing)."""
  if name not in JOBS:
    near = difflib.get_close_matches(name, list(JOBS), n=3)
    raise errors.UserError(f"unknown job {name!r}" + (f"; did you mean {near}?" if near else "")
                           + f" Jobs: {sorted(JOBS)}")
  return name


def resolve_job(name: str):
  return loader.import_ref(JOBS[check_job(name)])


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""
  return record.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_quiet_orbax)
  with _reported():
    if len(argv) > 1:
      raise errors.UserError(f"unexpected arguments: {argv[1:]}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    check_job(config.job)
    workdir_lib.prepare(workdir)
    if config.job in CHECKS:  # before the job's module (jax) is imported: errors come at once
      loader.import_ref(CHECKS[config.job])(config)
    lock = None
    if config.get("distributed", "off") == "off" and not workdir_lib.is_remote(workdir):
      lock = workdir_lib.Lock(workdir).acquire()
    try:
      job = resolve_job(config.job)  # the job's module imports jax: after every check above
      # Before anything touches a device: multi-host jobs must initialise jax.distributed first.
      from sleep_jax.parallel import mesh as mesh_lib
      mesh_lib.initialize_distributed(config.distributed)
      # The whole config goes to WORKDIR/run.log, not the terminal.
      workdir_lib.log_invocation(workdir, sys.argv, str(config))
      job(config, workdir)
    finally:
      if lock is not None:
        lock.release()


def _debug() -> bool:
  return "--debug" in sys.argv or os.environ.get("SLEEP_JAX_DEBUG", "") not in ("", "0")


class _reported:
  """Turns the errors of ``sleep_jax/errors.py`` into one line and an exit code."""

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is None or _debug():
      return False
    if isinstance(e, errors.Preempted):
      sys.stderr.write(f"{e}\n")
      sys.exit(0)
    if isinstance(e, (errors.UserError, errors.NonFiniteError)):
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2 if isinstance(e, errors.UserError) else 3)
    return False


def _precheck(argv) -> None:
  """What absl's flag parsing would report as a multi-line usage dump: a missing --config or
  --workdir, a config file or variant that does not exist, a mistyped override key."""
  spec, _ = loader.overrides_from_argv(argv)
  if spec is None:
    raise errors.UserError("--config=FILE[:VARIANT] is required, e.g. "
                           "--config=sleep_jax/configs/knowledge.py")
  if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv[1:]):
    raise errors.UserError("--workdir=DIR is required (checkpoints, results and logs go there)")
  try:
    loader.validate_argv(argv)
  except FileNotFoundError as e:
    raise errors.UserError(f"{e}; pass an existing file, e.g. "
                           "--config=sleep_jax/configs/knowledge.py") from None
  except errors.UserError:
    raise
  except ValueError as e:  # get_config(variant): "unknown variant ..."
    raise errors.UserError(f"--config={spec}: {e}") from None


def help_text() -> str:
  """The config files with their variants and the methods, one line each, and a working example."""
  from sleep_jax.sleep import methods as methods_lib
  here = os.path.dirname(loader.__file__)
  lines = ["usage: python -m sleep_jax.main --config=FILE[:VARIANT] --workdir=DIR "
           "[--config.KEY=VALUE ...] [--debug]", "",
           "example (the main job, ~9 minutes on 2 CPU cores):",
           "  python -m sleep_jax.main --config=sleep_jax/configs/knowledge.py "
           "--workdir=/tmp/sleep_jax_run", "", "config files (sleep_jax/configs/) and variants:"]
  for name in sorted(os.listdir(here)):
    if not name.endswith(".py") or name in ("__init__.py", "loader.py"):
      continue
    module = loader.load_module(os.path.join(here, name))
    if not hasattr(module, "get_config"):  # a part of another config file
      continue
    lines.append(f"  {name}: {(module.__doc__ or '').strip().splitlines()[0]}")
    for variant, what in getattr(module, "HELP", {}).items():
      lines.append(f"      :{variant:<26} {what}")
  lines += ["", "methods (--config.methods='(\"base\",\"sleep\")'; sleep_cycle configs):"]
  lines += [f"  {m:<24} {what}" for m, what in methods_lib.ONE_LINE.items()]
  lines += ["", "Any key can be overridden (--config.consolidation.steps=30). Exit codes: 0 done or "
            "preempted and saved, 2 a user error (one line; --debug for the traceback), 3 a "
            "diverged run (NaN/inf)."]
  return "\n".join(lines)


def run(argv=None):
  """Console-script entry (``sleep-jax``) and ``python -m sleep_jax.main``."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  with _reported():
    _precheck(argv)
  # config_flags finds the --config.* overrides in sys.argv itself, so keep the two in sync.
  sys.argv = argv
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
