"""The sleep's own parts: ``on_policy_step`` (one distillation iteration, the completion-window
head), ``sleep_compile_cache`` (the step memo across sleeps) and ``dream_trials`` (vmapped LoRA
trials vs one by one)."""


import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model import lora as lora_lib, transformer
from sleep_jax.losses.objectives import knowledge_seeding_loss
from sleep_jax.sleep import methods
from sleep_jax.train import fit as fit_lib
from sleep_jax.sleep.dream_batches import Dreams
from sleep_jax.sleep.dream_trials import init_adapter, run_trials, run_trials_sequential

from sleep_jax.bench.harness import _block, op_profile, timeit
from sleep_jax.bench.matmul import Context
from sleep_jax.bench.sampler import _smollm2
from sleep_jax.bench.sharding import _memory
from sleep_jax.bench.train_step import _count



# ----------------------------------------------------------------------------------------------
# on_policy_step.
# ----------------------------------------------------------------------------------------------
def part_on_policy_step(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import growth, sampler, transformer
  from sleep_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
  from sleep_jax.sleep import consolidation as cons

  cfg = mcfg.tiny()
  B = 8 if ctx.quick else 32
  N = 8 if ctx.quick else 16
  ctx_len, q_len = (16, 8) if ctx.quick else (48, 16)
  rng = np.random.default_rng(0)
  params = transformer.init(jax.random.key(0), cfg)
  t_mask = transformer.slot_mask_none(cfg)
  s_params, s_mask, slot = growth.unlock_slot(params, t_mask, 0, jax.random.key(1))
  trainable = state_lib.slot_trainable(s_params, transformer.param_axes(cfg), 0, int(slot))
  kcfg = methods.consolidation_config(methods.get("opsd_expansion"), cons.default_config())
  tx = opt_lib.make_optimizer(kcfg.optimizer)
  st, _ = fit_lib.new_state(s_params, tx, 2, trainable, {"slot_mask": jnp.array(s_mask, bool)})
  loss_fn = lambda p, b, r: knowledge_seeding_loss(
      p, b, r, cfg=cfg, alpha=float(kcfg.alpha), lam=float(kcfg.lam), divergence=kcfg.divergence,
      divergence_kwargs=dict(kcfg.divergence_kwargs), temperature=float(kcfg.temperature),
      advantage=kcfg.advantage)
  step_fn = step_lib.make_train_step(loss_fn, tx,
                                     differentiate=state_lib.trainable_arrays(trainable))
  contexts = rng.integers(3, cfg.vocab_size, (B, ctx_len)).astype(np.int32)
  questions = rng.integers(3, cfg.vocab_size, (B, q_len)).astype(np.int32)
  s_prompts = jnp.asarray(questions)
  t_prompts = jnp.asarray(np.concatenate([contexts, questions], 1))
  s_len, t_len = q_len, ctx_len + q_len
  holder = {"st": st}
  batch_holder: Dict[str, Any] = {}
  times: Dict[str, List[float]] = {"sample": [], "teacher_forward": [], "assemble": [],
                                   "student_update": []}

  def iteration(i, record):
    t0 = time.perf_counter()
    out = sampler.sample(holder["st"].params, s_prompts, jnp.ones((B, s_len), bool),
                         jax.random.key(10 + i), cfg=cfg, max_new_tokens=N,
                         temperature=float(kcfg.sample_temperature), stop_tokens=(2,), pad_id=0,
                         slot_mask=s_mask)
    ct, cl = _block((out.tokens[:, s_len:], out.completion_mask[:, s_len:]))
    t1 = time.perf_counter()
    t_tokens = jnp.concatenate([t_prompts, ct], 1)
    t_valid = jnp.concatenate([jnp.ones((B, t_len), bool), cl], 1)
    t_logits = _block(cons.completion_logits(params, t_tokens, t_valid, t_mask, cfg, t_len))
    t2 = time.perf_counter()
    batch = _block({
        "on_tokens": jnp.concatenate([s_prompts, ct], 1),
        "on_valid": jnp.concatenate([jnp.ones((B, s_len), bool), cl], 1),
        "on_completion_mask": jnp.concatenate([jnp.zeros((B, s_len), bool), cl], 1),
        "on_teacher_logits": t_logits})
    t3 = time.perf_counter()
    batch_holder["batch"] = batch
    holder["st"], metrics = step_fn(holder["st"], batch)
    _block(metrics["loss"])
    t4 = time.perf_counter()
    if record:
      for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        times[k].append(v)

  t0 = time.perf_counter()
  iteration(0, False)  # compiles
  first = time.perf_counter() - t0
  for i in range(2 if ctx.quick else 5):
    iteration(i + 1, True)
  parts = {k: min(v) for k, v in times.items()}
  total = sum(parts.values())
  out = {"model": "tiny", "params": _count(cfg), "batch": B, "new_tokens": N,
         "student_prompt_len": s_len, "teacher_prompt_len": t_len,
         "variant": "opsd_expansion (on-policy GKD, lam=1, alpha=1; only the unlocked slot trains)",
         "first_iteration_s": first, "iteration_s": total,
         "parts_s": parts, "parts_fraction": {k: v / total for k, v in parts.items()}}

  # Evidence for a model-side change: the step differentiates every parameter, although only
  # the unlocked slot trains. Gradient of the same loss w.r.t. all params vs the trainable ones.
  try:
    p_all = holder["st"].params
    train_any = jax.tree.map(lambda m: bool(np.any(np.asarray(m))), trainable)
    last = batch_holder["batch"]
    inputs = {**last, "slot_mask": jnp.asarray(s_mask)}
    g_all = jax.jit(jax.grad(lambda p: loss_fn(p, inputs, None)[0]))

    def split_loss(tp, fp):
      full = jax.tree.map(lambda t, f, a: t if a else f, tp, fp, train_any)
      return loss_fn(full, inputs, None)[0]

    trained = jax.tree.map(lambda x, a: x if a else jnp.zeros((0,), x.dtype), p_all, train_any)
    frozen = jax.tree.map(lambda x, a: jnp.zeros((0,), x.dtype) if a else x, p_all, train_any)
    g_some = jax.jit(jax.grad(split_loss))
    ta = timeit(lambda: g_all(p_all), 3)
    tt = timeit(lambda: g_some(trained, frozen), 3)
    out["grad_all_params_s"], out["grad_trainable_only_s"] = ta["best_s"], tt["best_s"]
    out["grad_note"] = ("jax.grad of knowledge_seeding_loss w.r.t. every parameter "
                        "(what make_train_step does, "
                        "then masks) vs only the leaves whose trainable mask is not all False")
  except Exception as e:  # pragma: no cover
    out["grad_comparison_error"] = repr(e)[:300]

  if not ctx.quick:
    # The library's own loop (host-side batching included), for comparison.
    k2 = methods.consolidation_config(methods.get("opsd_expansion"), cons.default_config())
    k2.steps, k2.batch_size, k2.max_new_tokens, k2.teacher_samples = 6, B, N, 1
    stamps: List[float] = []
    teacher = cons.Teacher(params, cfg, t_mask, [list(map(int, r)) for r in np.asarray(t_prompts)])
    student = cons.Student(s_params, cfg, s_mask, trainable,
                           [list(map(int, r)) for r in np.asarray(s_prompts)])
    cons.seed_knowledge([teacher], student, k2, jax.random.key(3), stop_tokens=(2,),
                        on_step=lambda i, m: stamps.append(time.perf_counter()))
    diffs = np.diff(stamps[1:])
    out["seed_knowledge_step_s"] = float(np.min(diffs)) if len(diffs) else None
    out["seed_knowledge_note"] = ("consolidation.seed_knowledge's step-to-step time (bucketed "
                                  "prompt widths, host-side batching and float() of metrics "
                                  "included; prompts padded to multiples of 16)")
  out["logits_window"] = _ks_window(ctx)
  return out


def _ks_window(ctx: Context) -> Dict[str, Any]:
  """The consolidation step at the real-ARC shape (SmolLM2-135M, 4 sequences of a 704-token
  prompt + 128 completion tokens): the output head and the KS loss over the completion window
  only (what ``knowledge_seeding_loss`` does) vs over every position (teacher logits
  zero-padded over the prompt, which makes it take the whole sequence: what it did before).
  Same function, same run: compiled memory (arguments + temporaries + outputs) and best wall time of the
  teacher forward and of the student's loss gradient."""
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import transformer
  from sleep_jax.sleep import consolidation as cons

  if ctx.quick:
    cfg, B, P, N = mcfg.tiny(), 2, 48, 8
    params = transformer.init(jax.random.key(0), cfg)
  else:
    cfg, params, _ = _smollm2(False)
    B, P, N = 4, 704, 128
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, P + N)), jnp.int32)
  valid = jnp.ones((B, P + N), bool)
  comp = jnp.concatenate([jnp.zeros((B, P), bool), jnp.ones((B, N), bool)], 1)
  mask = transformer.slot_mask_none(cfg)
  kcfg = methods.consolidation_config(methods.get("opsd_expansion"), cons.default_config())

  def teacher(start):
    return jax.jit(lambda p: transformer.apply(p, tokens, cfg, valid=valid, slot_mask=mask,
                                               logits_from=start)[0])

  t_window, t_full = teacher(P - 1), teacher(0)
  window = _block(t_window(params))
  full = jnp.concatenate([jnp.zeros((B, P - 1, cfg.vocab_size), jnp.float32), window], 1)

  def grad_fn(t_logits):
    batch = {"on_tokens": tokens, "on_valid": valid, "on_completion_mask": comp,
             "on_teacher_logits": t_logits, "slot_mask": mask}
    loss = lambda p: knowledge_seeding_loss(
        p, batch, None, cfg=cfg, alpha=float(kcfg.alpha), lam=float(kcfg.lam),
        divergence=kcfg.divergence, divergence_kwargs=dict(kcfg.divergence_kwargs),
        temperature=float(kcfg.temperature), advantage=kcfg.advantage)[0]
    return jax.jit(jax.grad(loss))

  out = {"model": "tiny" if ctx.quick else "smollm2_135m", "batch": B, "prompt_len": P,
         "new_tokens": N, "vocab": cfg.vocab_size}
  for name, t_fn, g_fn in (("window", t_window, grad_fn(window)),
                           ("full", t_full, grad_fn(full))):
    row = {}
    for what, fn in (("teacher_forward", t_fn), ("student_grad", g_fn)):
      row[what + "_peak_bytes"] = _memory(fn.lower(params).compile().memory_analysis())[
          "peak_estimate"]
      row[what + "_s"] = timeit(lambda: fn(params), 1 if ctx.quick else 2)["best_s"]
    out[name] = row
  for what in ("teacher_forward", "student_grad"):
    out[what + "_speedup"] = out["full"][what + "_s"] / out["window"][what + "_s"]
    out[what + "_memory_ratio"] = (out["full"][what + "_peak_bytes"]
                                   / max(out["window"][what + "_peak_bytes"], 1))
  return out


# ----------------------------------------------------------------------------------------------
# sleep_compile_cache.
# ----------------------------------------------------------------------------------------------
def part_sleep_compile_cache(ctx: Context) -> Dict[str, Any]:
  """A later sleep's consolidation (same shapes as the first) with its compiled step memoised
  (``state.cached_train_step``) vs with the memo emptied before it, in one process: what every
  sleep after the first used to pay to recompile its step."""
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import transformer
  from sleep_jax.train import step as step_lib
  from sleep_jax.sleep import consolidation as cons

  cfg = mcfg.tiny()
  B, N, steps, repeats = (4, 4, 2, 1) if ctx.quick else (8, 8, 4, 2)
  rng = np.random.default_rng(0)
  params = transformer.init(jax.random.key(0), cfg)
  mask = transformer.slot_mask_none(cfg)
  questions = rng.integers(3, cfg.vocab_size, (B, 12)).tolist()
  teacher = [list(c) + q for c, q in zip(rng.integers(3, cfg.vocab_size, (B, 36)).tolist(),
                                         questions)]
  kcfg = methods.consolidation_config(methods.get("opsd_expansion"), cons.default_config())
  kcfg.steps, kcfg.batch_size, kcfg.max_new_tokens, kcfg.teacher_samples = steps, B, N, 1

  def sleep(i: int) -> float:
    t0 = time.perf_counter()
    res = cons.consolidate(params, mask, cfg, teacher, questions, kcfg, jax.random.key(i),
                           stop_tokens=(2,))
    _block(res.params)
    return time.perf_counter() - t0

  first = sleep(0)  # compiles the sampler, the teacher forward and the step
  cached = min(sleep(1 + r) for r in range(repeats))
  uncached = []
  for r in range(repeats):
    step_lib.clear_step_cache()
    uncached.append(sleep(10 + r))
  uncached_s = min(uncached)
  return {"model": "tiny", "params": _count(cfg), "batch": B, "new_tokens": N,
          "consolidation_steps": steps, "first_sleep_s": first, "later_sleep_cached_s": cached,
          "later_sleep_uncached_s": uncached_s, "speedup": uncached_s / cached,
          "note": "consolidation.consolidate (opsd_expansion) on the same prompts: first call, "
                  "then best of later calls with the step memo kept vs emptied before each"}


# ----------------------------------------------------------------------------------------------
# dream_trials.
# ----------------------------------------------------------------------------------------------
def part_dream_trials(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.sleep import dream_trials
  kw = dict(m=4, repeats=1, d_model=64, n_layers=2) if ctx.quick else dict(m=16, repeats=3)
  r = dict(benchmark_trials(**kw))
  r["source"] = "sleep_jax.bench.sleep_parts.benchmark_trials(%s)" % ", ".join(
      f"{k}={v}" for k, v in kw.items())
  if not ctx.quick:
    try:
      r["op_profiles"] = _dream_profiles(dream_trials, m=kw["m"])
    except Exception as e:
      r["op_profiles"] = {"error": repr(e)[:300]}
  return r


def _dream_profiles(dreaming, m: int, d_model: int = 128, n_layers: int = 4, prompt_len: int = 16,
                    dream_len: int = 32, inner_steps: int = 4, task_batch: int = 8,
                    task_len: int = 32, rank: int = 8) -> Dict[str, Any]:
  """Op-level traces of the vmapped trials and of one sequential trial, with the shapes of
  ``benchmark_trials``' defaults (same model, dreams and task batch)."""
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import lora as lora_lib
  from sleep_jax.model import transformer
  cfg = mcfg.tiny(d_model=d_model, n_layers=n_layers, d_ff=(0, 4 * d_model))
  rng = np.random.default_rng(0)
  params = transformer.init(jax.random.key(0), cfg)
  slot_mask = transformer.slot_mask_none(cfg)
  T = prompt_len + dream_len
  cm = np.zeros((m, T), bool)
  cm[:, prompt_len:] = True
  dreams = dreaming.Dreams(jnp.asarray(rng.integers(3, cfg.vocab_size, (m, T)), jnp.int32),
                           jnp.ones((m, T), bool), jnp.asarray(cm))
  tcm = np.zeros((task_batch, task_len), bool)
  tcm[:, task_len // 2:] = True
  tb = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (task_batch, task_len)), jnp.int32),
        "valid": jnp.ones((task_batch, task_len), bool), "completion_mask": jnp.asarray(tcm)}
  lora0 = lora_lib.init(jax.random.key(1), cfg, rank, lora_lib.ALL_TARGETS)
  kw = dict(inner_steps=inner_steps, inner_lr=1e-3, optimizer="adam",
            lora_scale=lora_lib.scale(2 * rank, rank))
  vm = lambda: dreaming.run_trials(params, cfg, slot_mask, lora0, dreams, tb, **kw)
  _block(vm())
  hlo_v = dreaming.run_trials.lower(params, cfg, slot_mask, lora0, dreams, tb,
                                    **kw).compile().as_text()
  one_kw = dict(inner_steps=inner_steps, optimizer="adam",
                task_score_fn=dreaming.task_log_likelihood, sft_context="prompt")
  one = lambda: dreaming._trial_jit(params, cfg, slot_mask, lora0, dreams.tokens[0],
                                    dreams.valid[0], dreams.completion_mask[0], tb, 1e-3,
                                    kw["lora_scale"], **one_kw)
  _block(one())
  hlo_1 = dreaming._trial_jit.lower(params, cfg, slot_mask, lora0, dreams.tokens[0],
                                    dreams.valid[0], dreams.completion_mask[0], tb, 1e-3,
                                    kw["lora_scale"], **one_kw).compile().as_text()
  tv, t1 = timeit(vm, 2), timeit(one, 3)
  return {"vmapped_all_trials": {"s": tv["best_s"], **op_profile(vm, hlo_v, top=8)},
          "one_sequential_trial": {"s": t1["best_s"], **op_profile(one, hlo_1, top=8)},
          "vmapped_over_m_times_one": tv["best_s"] / (m * t1["best_s"])}



# ----------------------------------------------------------------------------------------------
# Benchmark: vmapped vs sequential trials.
# ----------------------------------------------------------------------------------------------
def benchmark_trials(m: int = 16, d_model: int = 128, n_layers: int = 4, prompt_len: int = 16,
                     dream_len: int = 32, inner_steps: int = 4, task_batch: int = 8,
                     task_len: int = 32, rank: int = 8, optimizer: str = "adam",
                     repeats: int = 5, seed: int = 0) -> Dict[str, Any]:
  """Wall time of ``run_trials`` (one vmap) vs ``run_trials_sequential`` for ``m`` dreams.

  Model: ``config.tiny(d_model, n_layers)`` (4 heads, 2 KV heads, vocab 259); dreams of
  ``prompt_len`` prompt + ``dream_len`` completion tokens; tau on ``task_batch`` x ``task_len``.
  Both paths are compiled and run once before timing (``*_first_call_s`` include compilation);
  then ``repeats`` interleaved timed calls of each. Returns a dict with the best (``*_s``) and
  median seconds of each path, ``speedup = sequential / vmapped`` (best) and ``speedup_median``,
  and the max absolute difference of their task scores.
  """
  from sleep_jax.model import config as model_config
  cfg = model_config.tiny(d_model=d_model, n_layers=n_layers, d_ff=(0, 4 * d_model))
  rng = np.random.default_rng(seed)
  params = jax.jit(transformer.init, static_argnums=1)(jax.random.key(seed), cfg)
  slot_mask = transformer.slot_mask_none(cfg)
  T = prompt_len + dream_len
  cm = np.zeros((m, T), bool)
  cm[:, prompt_len:] = True
  dreams = Dreams(jnp.asarray(rng.integers(3, cfg.vocab_size, (m, T)), jnp.int32),
                  jnp.ones((m, T), bool), jnp.asarray(cm))
  tcm = np.zeros((task_batch, task_len), bool)
  tcm[:, task_len // 2:] = True
  tb = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (task_batch, task_len)), jnp.int32),
        "valid": jnp.ones((task_batch, task_len), bool), "completion_mask": jnp.asarray(tcm)}
  lora0 = init_adapter(jax.random.key(seed + 1), cfg, rank, lora_lib.ALL_TARGETS)
  kw = dict(inner_steps=inner_steps, inner_lr=1e-3, optimizer=optimizer,
            lora_scale=lora_lib.scale(2 * rank, rank))

  def vmapped():
    return jax.block_until_ready(run_trials(params, cfg, slot_mask, lora0, dreams, tb, **kw))

  def sequential():
    return jax.block_until_ready(
        run_trials_sequential(params, cfg, slot_mask, lora0, dreams, tb, **kw))

  # Compile (and run) both once, then interleave the timed calls so load changes on a shared
  # machine hit both paths alike; report the best and the median of each.
  t0 = time.perf_counter()
  out_v = vmapped()
  first_v = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_s = sequential()
  first_s = time.perf_counter() - t0
  tv, ts = [], []
  for _ in range(repeats):
    for f, acc in ((vmapped, tv), (sequential, ts)):
      t0 = time.perf_counter()
      f()
      acc.append(time.perf_counter() - t0)
  t_v, t_s = min(tv), min(ts)
  return {
      "m": m, "d_model": d_model, "n_layers": n_layers, "prompt_len": prompt_len,
      "dream_len": dream_len, "inner_steps": inner_steps, "optimizer": optimizer,
      "task_batch": task_batch, "task_len": task_len, "lora_rank": rank,
      "devices": str(jax.devices()), "vmapped_s": t_v, "sequential_s": t_s,
      "speedup": t_s / t_v, "vmapped_median_s": float(np.median(tv)),
      "sequential_median_s": float(np.median(ts)),
      "speedup_median": float(np.median(ts) / np.median(tv)),
      "vmapped_first_call_s": first_v, "sequential_first_call_s": first_s,
      "max_abs_score_diff": float(jnp.max(jnp.abs(out_v.scores - out_s.scores))),
  }


