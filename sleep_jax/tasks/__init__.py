"""One file per experiment behind one small interface (``base.Task``); ``config.data.source``
picks the task. Adding an experiment is adding a file and a line here."""

from __future__ import annotations

from sleep_jax.configs import loader

# data.source -> "module:attribute" of its Task. A task module is imported on first use only, so
# that checking a config's source (``sleep/validate.py``) and loading a config file need no jax.
SOURCES = {
    "world": "sleep_jax.tasks.world:TASK",
    "jsonl": "sleep_jax.tasks.world:JSONL_TASK",
    "arc": "sleep_jax.tasks.arc:TASK",
    "needles": "sleep_jax.tasks.long_horizon:NEEDLES",
    "story": "sleep_jax.tasks.long_horizon:STORY",
    "arith": "sleep_jax.tasks.reasoning:TASK",
}


def make_setup(config, workdir: str, log=print):
  """The task's ``Setup`` on the model ``config.model_source`` names (loaded or pretrained)."""
  from sleep_jax.tasks import models
  return get(config.data.source).setup(config, models.load(config, workdir, log=log))


def check_source(source: str) -> str:
  """``source`` if it names a task, else a UserError naming the nearest one (imports nothing)."""
  loader.pick(SOURCES, source, "data.source")
  return source


def get(source: str):
  """The ``base.Task`` of ``source``."""
  return loader.import_ref(SOURCES[check_source(source)])
