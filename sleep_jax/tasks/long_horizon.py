"""Long-horizon memory (experiments/long_horizon): a stream of chunks longer than the context
(``data.source`` "needles": key-value facts to recall; "story": bAbI-style moves to track), one
document per chunk, queried at the end; methods differ in how many memory levels hold the past."""

from __future__ import annotations

import dataclasses
import os

from sleep_jax.data import long_horizon as lh
from sleep_jax.eval import plots, report
from sleep_jax.tasks import models
from sleep_jax.tasks.base import Setup, Task


def stream_data(c, run_seed: int):
  """The stream's chunks and ``query_info`` (distance and kind per end-of-stream question).
  ``data.stream.seed < 0``: every run seed reads its own stream (seed = run seed)."""
  kw = c.data.stream.to_dict()
  seed = int(kw.pop("seed"))
  seed = run_seed if seed < 0 else seed
  stream = (lh.needle_stream(seed, lh.NeedleConfig(**kw)) if c.data.source == "needles"
            else lh.story_stream(seed, lh.StoryConfig(**kw)))
  return stream.chunks, {"distance": stream.distance, "kind": stream.kind}


def setup(config, model: models.Model) -> Setup:
  seeds = [int(x) for x in config.seeds]
  chunks, query_info = stream_data(config, seeds[0] if seeds else 0)
  return Setup(model.params, model.cfg, model.tok, model.fmt, chunks, {}, model.base_metrics,
               query_info=query_info)


def for_seed(config, setup_: Setup, seed: int) -> Setup:
  """``setup_`` with run seed ``seed``'s own stream where the config asks for one per seed."""
  if int(config.data.stream.seed) >= 0:
    return setup_
  chunks, query_info = stream_data(config, seed)
  return dataclasses.replace(setup_, chunks=chunks, query_info=query_info)


def finish_run(config, setup_: Setup, result):
  """The final answers grouped by how far back the answer lies, and by kind."""
  del config
  return dict(result, by_query=report.accuracy_by(result["answers"], setup_.query_info))


TABLE = (("closed_book_final", "closed-book (final, all queries)"),
         ("acquisition", "closed-book (chunk just slept)"), ("forgetting", "forgetting"),
         ("wake_in_context", "in-context (wake, own chunk)"))


def write_report(results, workdir) -> str:
  md = [f"# Long-horizon memory ({results['config']['data']['source']})", "",
        report.grouped_table(results, "distance", "Final exact match by distance (chunks "
                             "between the answer and the end of the stream)"), "",
        report.grouped_table(results, "kind", "Final exact match by kind"), "",
        report.markdown_table(results, TABLE, "Mean over chunks"), "",
        "Plots: `plots/accuracy_by_distance.png`, `plots/accuracy_matrices.png`."]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  report.plot_accuracy_by_distance(results, os.path.join(workdir, "plots",
                                                         "accuracy_by_distance.png"))
  plots.plot_results(results, os.path.join(workdir, "plots"), os.path.join(workdir, "runs"))
  return text


NEEDLES = Task("needles", setup, write_report, for_seed=for_seed, finish_run=finish_run)
STORY = Task("story", setup, write_report, for_seed=for_seed, finish_run=finish_run)
