"""results.md as a report: the verdict computed from the numbers, the legend, spreads only with
two or more seeds."""

import os

import numpy as np

from sleep_jax.eval import verdict
from sleep_jax.tasks import world


def _run(acq, reading, seconds=1.0, dreams=None):
  info = [{"seconds_consolidation": seconds, "cpu_seconds_consolidation": 3 * seconds, **({"dreams_written": 4 * dreams,
                                                 "dreams_tried": 2 * dreams,
                                                 "dreams_accepted": dreams,
                                                 "dream_acceptance": 0.5} if dreams else {})}]
  return {"metrics": {"acquisition": acq, "closed_book_final": acq, "in_context_heldout": reading,
                      "BWT": 0.0}, "R": [[acq]], "info": info}


def _results(seeds):
  rows = {"base": (0.05, 0.90), "in_context": (0.85, 0.90), "sft": (0.15, 0.45),
          "sleep": (0.45, 0.81)}
  out = {"methods": {}}
  for m, (a, r) in rows.items():
    out["methods"][m] = {"seeds": {str(s): _run(a + 0.01 * s, r, dreams=3 if m == "sleep" else None)
                                   for s in range(seeds)}}
  return out


def test_one_seed_report_has_the_verdict_the_legend_and_no_spread(tmp_path):
  md = world.write_report(_results(1), str(tmp_path))
  assert "**Verdict.** Closed-book right after sleeping on a chunk: sft 15.0% (12% of the gap); " \
         "sleep 45.0% (50% of the gap)." in md
  assert "Most stored: sleep (+30.0 points over sft)." in md
  assert "Kept of the base's reading skill (90.0%): sft 50%, sleep 90%." in md
  assert "* **closed-book (just slept)**: closed-book accuracy on a chunk right after" in md
  assert "known facts" not in md.split("Columns:")[1]  # no run has it: not defined either
  table = md.split("| method | closed-book (final)")[1].split("\n\n")[0]
  assert "±" not in table and "| sleep | 45.0 |" in table
  # Dreams per chunk: written, tried, accepted; acceptance rate of the tried ones.
  assert "| sleep | 12.0 | 6.0 | 3.0 | 50% |" in md
  assert "one seed per method: no spread." in md and "standard deviation" not in md
  assert "| sft | 0 | 1 (3) | 0 | 0 | 0 | 1 (3) |" in md  # wall (CPU) seconds per phase
  assert (tmp_path / "results.md").read_text().startswith("# Knowledge incorporation")


def test_three_seeds_show_mean_and_spread(tmp_path):
  md = world.write_report(_results(3), str(tmp_path))
  assert "| sleep | 46.0 ± 1.0 |" in md
  assert "mean ± sample standard deviation over seeds where there are 2 or more" in md
  assert np.isclose(verdict.stored_share(_results(3), "sleep"), 0.5)


def test_every_plot_is_written_with_labelled_axes_and_colour_bars(tmp_path):
  from sleep_jax.eval import plots
  res = _results(2)
  figs = dict(plots.figures(res))
  assert set(figs) == {"accuracy_matrices", "accuracy_over_chunks", "tradeoff_in_context_heldout"}
  for stem, fig in figs.items():
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    for ax in axes:
      if ax.axison:
        assert ax.get_xlabel() and ax.get_ylabel(), stem
  bars = [a for a in figs["accuracy_matrices"].axes if a.get_label() == "<colorbar>"]
  assert len(bars) == 4 and all(b.get_ylabel() == "closed-book accuracy (%)" for b in bars)
  over = figs["accuracy_over_chunks"].axes[0]
  labels = over.get_legend_handles_labels()[1]
  assert "in-context ceiling" in labels and "base (closed-book)" in labels
  trade = figs["tradeoff_in_context_heldout"].axes[0]
  assert "in-context ceiling" in [t.get_text() for t in trade.get_legend().get_texts()]
  assert len(trade.collections) == 4  # one scatter per method (2 seeds each)
  paths = plots.plot_results(res, str(tmp_path / "plots"))
  assert len(paths) == 6 and all(os.path.getsize(p) > 1000 for p in paths)


def test_learning_curves_are_read_from_the_runs_and_plotted(tmp_path):
  from sleep_jax.eval import plots
  from sleep_jax.eval.metrics_writer import RunLog
  for method, phase, metrics in (("sleep", "consolidation", {"loss": 1.0, "agreement_teacher_data": 0.5}),
                                 ("sft", "sft", {"loss": 2.0})):
    log = RunLog(str(tmp_path / "runs" / method / "seed_0"), enabled=True)
    for t in range(2):
      for i in range(3):
        log.step(phase, t, {k: v / (i + 1) for k, v in metrics.items()})
      log.chunk(t, {"closed_book_just_slept": 0.1})
    log.commit()
    log.close()
  curves = plots.read_curves(str(tmp_path / "runs"))
  assert [r["step"] for r in curves["sleep"]] == [1, 2, 3, 4, 5, 6]
  fig = dict(plots.figures(_results(1), curves))["learning_curves"]
  sft_loss, sft_agree, loss, agree = fig.axes  # methods in name order
  assert len(loss.lines) == 4 and loss.get_ylabel() == "loss"  # raw + smoothed per sleep
  assert [x.get_text() for x in loss.get_legend().get_texts()] == ["chunk 0", "chunk 1"]
  assert agree.get_ylabel() == "top-1 agreement (%)" and agree.lines[0].get_ydata()[0] == 50.0
  assert sft_agree.texts[0].get_text() == "no teacher" and len(sft_loss.lines) == 4


def test_progress_in_a_log_file_is_one_line_per_loop():
  import io
  from sleep_jax.eval.metrics_writer import LineProgress
  out = io.StringIO()
  bar = LineProgress(total=3, desc="sleep seed 0 chunk 1 consolidation", stream=out)
  for _ in range(3):
    bar.update(1)
  bar.set_postfix(loss="0.5")
  bar.close()
  bar.close()
  lines = out.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sleep seed 0 chunk 1 consolidation: 3/3 in ")
  assert lines[0].endswith("loss=0.5")
  out = io.StringIO()
  bar = LineProgress(total=4, desc="slow loop", stream=out)
  bar.every = 0.0  # a long loop: a line per interval with the ETA, then the final one
  bar.set_postfix(stage="scored")  # which part of a long step it is in (dreaming's stages)
  bar.update(1)
  bar.close()
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and lines[0].startswith("slow loop: 1/4, ") and "ETA" in lines[0]
  assert lines[0].endswith("stage=scored")


def test_tradeoff_sweep_is_one_curve_per_method_labelled_by_its_budget(tmp_path, capsys):
  """experiments/.../plot_tradeoff.py over driver workdirs (one per sweep point): points of
  one method form a curve labelled by the budget keys that differ between the workdirs (not by
  the other keys that differ), seeds of one budget are one point (mean ± sample std), the base
  is the reference level, and the figure is written."""
  import importlib.util
  import json
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "knowledge_incorporation",
                      "plot_tradeoff.py")
  spec = importlib.util.spec_from_file_location("plot_tradeoff", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  dirs = []
  for steps, m in ((30, 6), (60, 20)):
    d = tmp_path / f"steps{steps}"
    d.mkdir()
    sft = {str(s): {"metrics": {"acquisition": steps / 100 + 0.04 * s, "known_facts": 0.5,
                                "kl_to_base": 0.1}} for s in range(2 if steps == 30 else 1)}
    res = {"config": {"consolidation": {"steps": steps}, "dreaming": {"m": m}},
           "methods": {"base": {"seeds": {"0": {"metrics": {"acquisition": 0.0,
                                                            "known_facts": 1.0}}}},
                       "sft": {"seeds": sft}}}
    (d / "results.json").write_text(json.dumps(res))
    dirs.append(str(d))
  mod.main(*dirs, str(tmp_path / "t.png"))
  out = capsys.readouterr().out
  assert "| sft | consolidation.steps=30 | 2 | 32.0 ± 2.8 | 50.0 ± 0.0 | 0.100 ± 0.000 |" in out
  assert "| sft | consolidation.steps=60 | 1 | 60.0 | 50.0 | 0.100 |" in out
  assert "dreaming.m" not in out and "| base |" not in out
  assert (tmp_path / "t.png").stat().st_size > 0
