"""``sleep_step``: one consolidation step of a sleep at the SmolLM2-135M shape, part by part,
against the lower bound from the same run's roofs.

A sleep on a real model is this step many times: the student samples on-policy, the teacher
(the model with the passage in context) scores both sides, LTI compares the student's samples
with the teacher's, and the new slot takes a gradient step. The part runs the library's own
loop (``consolidation.seed_knowledge`` with Sleep's consolidation config) twice on the same
items: once as it is (the step-to-step time users wait for) and once with each part timed
(every part waits for its result), so that ``host`` = the instrumented step minus its timed
parts. The lower bound counts the same work at the measured roofs: each decode step reads the
model's own weights once at the measured bandwidth (or does its FLOPs at the matmul peak, if
more), each forward is 2 FLOPs per matmul parameter per token (the teacher's over its
continuation of the prompt it read once per sleep, ``sleep/teacher_prefix.py``; the judge's),
and the update of a student whose base is frozen is 4 (forward, and the backward through the
activations only); the output head only where the loss reads logits (the completion window) or
the sampler does (a prompt's last position); attention, norms and the host count 0.
``lower_bound_whole_prompt_s`` is the bound with the teacher over the whole prompt every step,
as it ran before the prompt cache (the bound of earlier runs).
"""

import contextlib
import time
import zlib
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.bench.flops import matmul_params
from sleep_jax.bench.matmul import Context
from sleep_jax.bench.sampler import _smollm2

PARTS = ("sample", "teacher_forward", "rewards", "student_update")


@contextlib.contextmanager
def _timed_parts(cons, events: List[tuple]):
  """Inside: the loop's sampler calls, teacher forwards, LTI rewards and train steps append
  ``(part, start, seconds)`` to ``events``, each waiting for its own result."""
  tp = cons.teacher_prefix
  originals = (cons.sampler.sample, tp.continuation_logits, cons.rewards_lib.lti_rewards,
               cons.fit_lib.train_step_for, tp.prefill)

  def timed(part, fn):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*a, **k))
      events.append((part, t0, time.perf_counter() - t0))
      return out
    return wrapper

  def step_for(*a, **k):
    key, step_fn = originals[3](*a, **k)
    return key, timed("student_update", step_fn)

  cons.sampler.sample = timed("sample", originals[0])
  tp.continuation_logits = timed("teacher_forward", originals[1])
  cons.rewards_lib.lti_rewards = timed("rewards", originals[2])
  cons.fit_lib.train_step_for = step_for
  tp.prefill = timed("teacher_forward", originals[4])  # per step only when nothing is kept
  try:
    yield
  finally:
    (cons.sampler.sample, tp.continuation_logits, cons.rewards_lib.lti_rewards,
     cons.fit_lib.train_step_for, tp.prefill) = originals


def _lower_bound(ctx: Context, cfg, B: int, s_len: int, t_lens: Sequence[float], N: int,
                 judge_len: int) -> Dict[str, float]:
  """Seconds of one step's work at the measured roofs (module docstring); ``t_lens`` the tokens
  the teacher reads before the completion, a row of each GKD side."""
  peak = ctx.peak_gflops() * 1e9
  bw = ctx.bandwidth_gbps() * 1e9
  mm = matmul_params(cfg)
  head, body = mm["lm_head"], mm["total"] - mm["lm_head"]
  own_bytes = mm["total"] * jnp.dtype(cfg.param_dtype).itemsize
  decode_step = max(own_bytes / bw, 2 * mm["total"] * B / peak)
  window = N + 1  # positions whose logits the losses read
  return {
      "sample": 2 * B * (body * s_len + head) / peak + N * decode_step,  # head: last only
      "teacher_forward": sum(2 * B * (body * (t + N) + head * window) / peak for t in t_lens),
      "rewards": 2 * B * (body * judge_len + head) / peak,  # the judge's forward
      "student_update": len(t_lens) * 4 * B * (body * (s_len + N) + head * window) / peak,
      "host": 0.0}


def part_sleep_step(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.model import config as mcfg
  from sleep_jax.losses.rewards import ModelJudge
  from sleep_jax.model import growth, transformer
  from sleep_jax.sleep import consolidation as cons
  from sleep_jax.sleep import methods
  from sleep_jax.train import state as state_lib

  if ctx.quick:
    cfg = mcfg.tiny()
    params, source = transformer.init(jax.random.key(0), cfg), {"weights": "random (tiny)"}
    B, ctx_len, q_len, N, steps = 2, 24, 8, 6, 3
  else:
    cfg, params, source = _smollm2(False)
    B, ctx_len, q_len, N, steps = 4, 200, 16, 24, 4
  rng = np.random.default_rng(0)
  contexts = rng.integers(3, cfg.vocab_size, (B, ctx_len)).tolist()
  questions = rng.integers(3, cfg.vocab_size, (B, q_len)).tolist()
  t_mask = transformer.slot_mask_none(cfg)
  s_params, s_mask, slot = growth.unlock_slot(params, t_mask, 0, jax.random.key(1))
  trainable = state_lib.slot_trainable(s_params, transformer.param_axes(cfg), 0, int(slot))
  kcfg = methods.consolidation_config(methods.get("sleep"), cons.default_config())
  kcfg.batch_size, kcfg.max_new_tokens, kcfg.teacher_samples = B, N, 1
  kcfg.steps = steps + 2  # the first step compiles, the second follows the first's compilation
  # LTI's semantic reward asks a frozen judge (the model as it woke up) whether the student's
  # sample means the teacher's: a forward over a prompt of both texts. Token ids are written as
  # words and hashed back, so the judge's prompts have the lengths a tokenizer would give.
  decode = lambda ids: " ".join(f"w{int(i)}" for i in ids)
  encode = lambda text: [3 + zlib.crc32(w.encode()) % (cfg.vocab_size - 3) for w in text.split()]
  judge = ModelJudge(params, cfg, encode, slot_mask=t_mask, pad_id=0)
  judge_len = -(-len(judge.prompt_ids(decode([0] * N), decode([0] * N))) // judge.bucket
                ) * judge.bucket
  teacher = cons.Teacher(params, cfg, t_mask, [c + q for c, q in zip(contexts, questions)])
  student = cons.Student(s_params, cfg, s_mask, trainable, questions)

  def run(events=None):
    stamps: List[float] = []
    with (_timed_parts(cons, events) if events is not None else contextlib.nullcontext()):
      cons.seed_knowledge([teacher], student, kcfg, jax.random.key(3), stop_tokens=(-1,),
                          judge=judge, decode=decode,
                          on_step=lambda i, m: stamps.append(time.perf_counter()))
    return stamps

  t0 = time.perf_counter()
  plain = run()
  first_call = time.perf_counter() - t0
  plain = run()  # compiled: what every later sleep pays per step
  events: List[tuple] = []
  stamps = run(events)
  # Step k's work lies between stamps k-1 and k (next_batch, then the train step).
  parts = {p: [] for p in PARTS}
  steps_inst = []
  for a, b in zip(stamps[1:], stamps[2:]):
    for p in PARTS:
      parts[p].append(sum(d for q, t, d in events if q == p and a <= t < b))
    steps_inst.append(b - a)
  med = {p: float(np.median(v)) for p, v in parts.items()}
  step_inst = float(np.median(steps_inst))
  med["host"] = max(step_inst - sum(med.values()), 0.0)
  step = float(np.median(np.diff(plain[1:])))
  extra = N if float(kcfg.alpha) < 1.0 else 0  # LTI prefixes widen the prompts (as the loop)
  s_len = cons._bucket(q_len + extra)
  t_len = cons._bucket(ctx_len + q_len + extra)
  sides = (float(kcfg.lam) < 1.0) + (float(kcfg.lam) > 0.0 or float(kcfg.alpha) < 1.0)
  # The teacher continues its cached prompt with the prompt's last token, then on the
  # on-policy side an LTI prefix (uniform over 0..N-1 tokens: the loop's samples never stop
  # here), then the completion.
  off = int(float(kcfg.lam) < 1.0)
  cont = [1.0] * off + [1 + (N - 1) / 2 * bool(extra)] * (sides - off)
  bound = _lower_bound(ctx, cfg, B, s_len, cont, N, judge_len)
  total_bound = sum(bound.values())
  whole_prompt = sum(_lower_bound(ctx, cfg, B, s_len, [t_len] * sides, N, judge_len).values())
  return {
      "model": source, "batch": B, "context_len": ctx_len, "question_len": q_len,
      "new_tokens": N, "student_prompt_width": s_len, "teacher_prompt_width": t_len,
      "judge_prompt_width": judge_len,
      "sides": sides, "config": {k: kcfg[k] for k in ("objective", "alpha", "lam", "divergence",
                                                      "gamma", "ce_weight")},
      "first_call_s": first_call, "step_s": step, "instrumented_step_s": step_inst,
      "parts_s": med, "lower_bound_parts_s": bound, "lower_bound_s": total_bound,
      "step_over_bound": step / total_bound, "lower_bound_whole_prompt_s": whole_prompt,
      "note": ("step_s: median step-to-step time of consolidation.seed_knowledge (Sleep's "
               "consolidation config), compiled; parts_s: the same loop with each part waiting "
               "for its result (host = the rest); lower bound: see bench/sleep_step.py")}
