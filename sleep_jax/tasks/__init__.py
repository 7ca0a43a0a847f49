"""One file per experiment behind one small interface (``base.Task``); ``config.data.source``
picks the task. Adding an experiment is adding a file and a line here."""

from __future__ import annotations

from sleep_jax.configs import loader
from sleep_jax.tasks import arc, long_horizon, reasoning, world
from sleep_jax.tasks.base import Task

TASKS = {t.name: t for t in (world.TASK, world.JSONL_TASK, arc.TASK, long_horizon.NEEDLES,
                             long_horizon.STORY, reasoning.TASK)}


def make_setup(config, workdir: str, log=print):
  """The task's ``Setup`` on the model ``config.model_source`` names (loaded or pretrained)."""
  from sleep_jax.tasks import models
  return get(config.data.source).setup(config, models.load(config, workdir, log=log))


def get(source: str) -> Task:
  return loader.pick(TASKS, source, "data.source")
