"""Reasoning with verifiable rewards (experiments/reasoning): arithmetic word problems
(``data/arith.py``) studied chunk by chunk, scored on a disjoint held-out split by the exact
checker.

The wake stream: for each level of ``data.arith.levels`` (a curriculum, easiest first),
``data.arith.chunks_per_level`` chunks of ``data.arith.per_chunk`` problems from the train
split's ``stream`` pool (``arith.pool_of``: never a test problem, never one the tiny base was
pretrained on). Each problem is one ``Document``: its *passage* is the worked reference solution
(the privileged context: OPSD's and Sleep's teacher reads it, the student does not), its wake
question is the problem with the reference solution as the supported answer (SFT's target,
GRPO's prompt). Each chunk also holds the level's held-out test problems as a document with no
passage and no wake question: R[i, j] is the held-out accuracy of level j after sleeping chunk
i, judged by ``eval.metric = "checked"`` (the last ``Answer: N`` of the greedy answer equals the
program's value). Retention probe: held-out problems of ``data.arith.retention_levels``, the
easy ones the base already solves (what the model could do before must not be lost).

Dream simulation (``dreaming.simulate``): the task's ``Environments`` let the model write new
problems with their programs (``Problem: ... Program: ...``), which the checker runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from sleep_jax.data import arith, arith_corpus
from sleep_jax.data.documents import ChatFormat, Document, Question
from sleep_jax.eval import continual, plots, report, verdict
from sleep_jax.tasks import models
from sleep_jax.tasks.base import Setup, Task


@dataclasses.dataclass(frozen=True)
class Environments:
  """What dream simulation needs from a task: the prompt a model writes an environment after,
  and the checker. ``parse(text)``: (question, program) of a model-written environment, or None
  when the checker cannot run it; ``check(program, answer_text)``: whether an attempt is right."""
  prompt: List[int]

  @staticmethod
  def parse(text: str) -> Optional[Tuple[str, str]]:
    # The tiny base continues the prompt "Problem:"; a chat model writes the whole format.
    head = "" if arith_corpus.ENV_PROMPT in text else f"{arith_corpus.ENV_PROMPT} "
    p = arith.parse_environment(head + text)
    return None if p is None else (p.question, p.program)

  @staticmethod
  def check(program: str, text: str) -> bool:
    return arith.check(program, text)


def problem_document(p: arith.Problem, i: int) -> Document:
  return Document(f"L{p.level}-{i}", p.solution, (Question(p.question, p.solution),), ())


def heldout_document(level: int, tests: Sequence[arith.Problem]) -> Document:
  return Document(f"heldout-L{level}", "", (),
                  tuple(Question(p.question, p.solution) for p in tests))


# A chat model (SmolLM2) is asked for a worked solution in the checker's format, and for new
# problems in the environment format. Asked to "end with 'Answer: N'" it often wrote the letter.
CHAT_INSTRUCTION = "Solve it step by step and end with 'Answer: ' followed by the number."
CHAT_ENV_PROMPT = ("Write one new arithmetic word problem and a Python expression that computes "
                   f"its answer, in this format:\n{arith_corpus.ENV_PROMPT} <the problem, ending "
                   "with a question>\nProgram: <the expression>")


def _shot_problems(a) -> List[arith.Problem]:
  if not a.chat_shots:
    return []
  return arith.problems(int(a.seed), int(a.levels[0]), int(a.chat_shots), "corpus")


def chat_shots(a) -> List[Tuple[str, str]]:
  """``a.chat_shots`` worked problems of the stream's first level, from the corpus pool (never a
  stream or held-out problem), that a chat model sees as earlier turns before each problem.
  SmolLM2-135M solved 2 of 16 level-1 test problems without them and 7 with two (README); with
  shots of levels 1-3 it copied their number of steps and solved none."""
  return [(p.question, p.solution) for p in _shot_problems(a)]


def chat_env_prompt(tok, a) -> List[int]:
  """A chat model's environment prompt: the same corpus problems as ``chat_shots``, written as
  environments (``arith.environment_text``), are earlier answers to ``CHAT_ENV_PROMPT``.
  Asked without them SmolLM2-135M wrote 0 runnable environments of 32 (prose, code, riddles);
  with two, 8 of 32 at temperature 1 and 24 at 0.7 (README)."""
  turns = [turn for p in _shot_problems(a) for turn in (
      {"role": "user", "content": CHAT_ENV_PROMPT},
      {"role": "assistant", "content": arith.environment_text(p)})]
  return list(tok.encode_chat(turns + [{"role": "user", "content": CHAT_ENV_PROMPT}]))


def setup(config, model: models.Model) -> Setup:
  a = config.data.arith
  fmt = model.fmt
  env_prompt = fmt.dream_prompt("", arith_corpus.ENV_PROMPT)
  if isinstance(fmt, ChatFormat):
    fmt = ChatFormat(model.tok, CHAT_INSTRUCTION, chat_shots(a))
    env_prompt = chat_env_prompt(model.tok, a)
  chunks = []
  for level in a.levels:
    n = int(a.per_chunk) * int(a.chunks_per_level)
    train = arith.problems(int(a.seed), int(level), n, "stream")
    tests = arith.problems(int(a.seed), int(level), int(a.n_test), "test")
    for c in range(int(a.chunks_per_level)):
      part = train[c * int(a.per_chunk):(c + 1) * int(a.per_chunk)]
      chunks.append([problem_document(p, c * int(a.per_chunk) + i) for i, p in enumerate(part)]
                    + [heldout_document(int(level), tests)])
  extra = {f"solve_level{lv}": ([heldout_document(int(lv), arith.problems(
      int(a.seed), int(lv), int(a.n_test), "test"))], False) for lv in a.retention_levels}
  return Setup(model.params, model.cfg, model.tok, fmt, chunks, extra, model.base_metrics,
               environments=Environments(env_prompt))


def finish_run(config, setup: Setup, result):
  """avg@k / pass@k (``eval.samples``) of the final model over every level, and of each level
  right after its own sleep, from the per-chunk rows the evaluation phase recorded."""
  del config, setup
  m = dict(result["metrics"])
  # The wall seconds a method spent learning (consolidation or its baseline's learner,
  # dreaming, deep sleep), summed over the stream: the compute column of the table.
  m["learning_seconds"] = float(sum(i.get(f"seconds_{p}", 0.0) for i in result["info"]
                                    for p in plots.COMPUTE_PHASES))
  rows = [i.get("avg_at_k") for i in result["info"]]
  if not rows or rows[-1] is None:
    return dict(result, metrics=m)
  for name in ("avg_at_k", "pass_at_k"):
    r = np.asarray([i[name] for i in result["info"]], float)
    m[f"{name}_final"] = continual.nanmean(r[-1])
    m[f"{name}_just_slept"] = continual.nanmean(np.diag(r))
  return dict(result, metrics=m)


TABLE = (("acquisition", "held-out, just slept"), ("closed_book_final", "held-out, final"),
         ("avg_at_k_final", "avg@k, final"), ("pass_at_k_final", "pass@k, final"),
         ("BWT", "BWT"))


def write_report(results, workdir) -> str:
  retention = sorted({k for e in results["methods"].values() for s in e["seeds"].values()
                      for k in s["metrics"] if k.startswith("solve_level")
                      and not k.endswith("_change")})
  rows = TABLE + tuple((k, f"{k.replace('solve_', 'retention ')}") for k in retention) + (
      ("wake_in_context", "before sleeping (the chunk's level)"),
      ("learning_seconds", "learning wall s"))
  md = ["# Reasoning with verifiable rewards (arithmetic word problems)", "",
        report.markdown_table(results, rows, "Held-out problems solved (checker, greedy)")]
  sim = [(n, i) for n, e in results["methods"].items() for s in e["seeds"].values()
         for i in s["info"] if "envs_proposed" in i]
  if sim:
    md += ["", "Dream simulation, per sleep (summed over seeds): " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {sum(x[k] for m, x in sim if m == n)}" for k in (
            "envs_proposed", "envs_valid", "envs_solved", "trajectories_kept",
            "dreams_accepted")) for n in dict(sim))]
  trust = {n: np.asarray([[i.get("teacher_verified", np.nan) for i in sd["info"]]
                          for sd in e["seeds"].values()], float)
           for n, e in results["methods"].items()}
  trust = {n: v for n, v in trust.items() if v.size and not np.isnan(v).all()}
  if trust:  # consolidation.verify_teacher: the share of problems the teacher was trusted on
    md += ["", "Training problems whose teacher answer checked out, per sleep (mean over seeds): "
           + "; ".join(f"{n}: " + " / ".join(f"{100 * x:.0f}%" for x in np.nanmean(v, 0))
                       for n, v in trust.items())]
  md += ["", verdict.time_table(results)]
  md += ["", "Plots (PNG and SVG): `plots/accuracy_matrices` (R per method), "
         "`plots/accuracy_over_chunks`, `plots/accuracy_vs_compute` (held-out accuracy against "
         "the learning wall seconds), `plots/learning_curves`."]
  plots.plot_results(results, os.path.join(workdir, "plots"), os.path.join(workdir, "runs"))
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  return text


TASK = Task("arith", setup, write_report, finish_run=finish_run)
