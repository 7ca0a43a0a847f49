"""Dream simulation: dreams that are practice environments the model builds itself, with outcomes
a program checks (docs/method.md section 4, "Dream simulation").

One sleep (``dreaming.simulate = k > 0``, a task with ``Setup.environments``):

1. the waking model writes ``dreaming.simulate_envs`` environments after the task's environment
   prompt (arithmetic: ``Problem: <story> Program: <expression>``), sampled like any dream;
2. the checker drops those it cannot run (no program, a program the interpreter refuses, a
   value out of range) and repeats of one question: they never reach training;
3. the model attempts each valid environment ``k`` times, closed-book, at the dream
   temperature; the checker scores every attempt;
4. the first verified attempt of each solved environment is a *trajectory*: a candidate dream
   (prompt = the question closed-book, completion = the attempt) that competes with the other
   dreams in gradient selection and the isolated trials (``dreaming.dream(candidates=...)``).

An accepted trajectory is consolidated like an accepted dream: the student writes it from the
question alone; the teacher reads it as a reference solution first (``teacher_prompt``), as the
consolidation teacher reads a passage. With ``dreaming.stage = "before"`` it joins the items of
the chunk's consolidation (``dream_phase.simulated_items``), else it trains the new slot after.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from sleep_jax.sleep import dream_batches
from sleep_jax.sleep.dreaming import Dreams


class Simulated(NamedTuple):
  candidates: Optional[Dreams]  # the verified trajectories (None: none)
  # closed-book prompt tokens -> the question (to build the consolidation teacher's prompt)
  questions: Dict[Tuple[int, ...], str]
  info: Dict[str, int]


def simulate(params, setup, slot_mask, dcfg, max_answer_tokens: int, key) -> Simulated:
  """Steps 1-4 above with the model ``params``; ``info`` counts proposed / valid / solved
  environments and the trajectories kept."""
  env, fmt, tok = setup.environments, setup.fmt, setup.tok
  k_env, k_try = jax.random.split(key)
  n_env, k = int(dcfg.simulate_envs), int(dcfg.simulate)
  out = dream_batches.sample_dreams(params, setup.cfg, slot_mask, [env.prompt], k_env, n_env,
                                    int(dcfg.simulate_tokens), float(dcfg.temperature),
                                    bool(dcfg.random_expert), stop_tokens=fmt.stop_ids,
                                    pad_id=tok.pad_id)
  texts = _completions(out, tok)
  parsed = [env.parse(t) for t in texts]
  valid = list(dict.fromkeys(p for p in parsed if p is not None))  # (question, program), unique
  info = {"envs_proposed": n_env, "envs_valid": len(valid), "envs_solved": 0,
          "trajectories_kept": 0}
  if not valid:
    return Simulated(None, {}, info)
  prompts = [fmt.closed_book(q) for q, _ in valid]
  tries = dream_batches.sample_dreams(params, setup.cfg, slot_mask, prompts, k_try,
                                      k * len(prompts), int(max_answer_tokens),
                                      float(dcfg.temperature), False, stop_tokens=fmt.stop_ids,
                                      pad_id=tok.pad_id)
  toks, cm = np.asarray(tries.tokens), np.asarray(tries.completion_mask, bool)
  keep: Dict[int, List[int]] = {}
  for row in range(len(toks)):  # row r attempts environment r mod P (``prompt_batch``)
    i = row % len(prompts)
    comp = [int(x) for x in toks[row][cm[row]] if int(x) not in fmt.stop_ids]
    if i not in keep and env.check(valid[i][1], tok.decode(comp)):
      keep[i] = comp + [fmt.stop_ids[0]]
  info["envs_solved"] = info["trajectories_kept"] = len(keep)
  if not keep:
    return Simulated(None, {}, info)
  order = sorted(keep)
  cand = dream_batches.fixed_dreams([prompts[i] for i in order], [keep[i] for i in order],
                                    tok.pad_id)
  return Simulated(cand, {tuple(prompts[i]): valid[i][0] for i in order}, info)


def teacher_prompt(fmt, tok, question: str, completion: List[int]) -> List[int]:
  """The consolidation teacher of a verified trajectory: the trajectory as a reference solution
  in the context, then the question (the student sees the question alone)."""
  stop = set(fmt.stop_ids)
  return fmt.with_context(tok.decode([t for t in completion if t not in stop]), question)


def _completions(out, tok) -> List[str]:
  toks, cm = np.asarray(out.tokens), np.asarray(out.completion_mask, bool)
  return [tok.decode(r[c].tolist()) for r, c in zip(toks, cm)]
