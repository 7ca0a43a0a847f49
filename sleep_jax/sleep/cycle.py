"""The resumable wake/sleep loop: every method x seed of a config, then the task's report.

In the order things happen: devices and mesh; the task's setup (model + wake stream); per
(method, seed): restore or start the ``SleepState``, train the dream generator (tasks that have
generator documents), then per chunk the phases wake -> consolidation -> dreaming -> deep sleep
-> eval, with a checkpoint after each. Since every random number derives from (seed, chunk,
phase) (``Context.key``), a killed run resumes at the last phase boundary and ends exactly as an
uninterrupted one. Finished runs are kept as ``result.json`` and skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import tasks
from sleep_jax import workdir as workdir_lib
from sleep_jax.errors import NonFiniteError, Preempted
from sleep_jax.eval import answers, continual
from sleep_jax.eval.metrics_writer import MetricsWriter, RunLog, progress
from sleep_jax.model import transformer
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.sleep import dream_phase, phases, run_context, run_records, validate
from sleep_jax.sleep import methods as methods_lib
from sleep_jax.sleep.sleep_state import SleepState

PHASES = ("wake", "consolidation", "dreaming", "deep", "eval")
PHASE_FNS = (phases.wake, dream_phase.consolidate, dream_phase.dream, phases.deep_sleep,
             phases.evaluate)


class Interrupted(RuntimeError):
  """Raised by a test hook to simulate a kill."""


def params_digest(params) -> str:
  """SHA-1 of every parameter's bytes: two runs ended in the same model iff equal."""
  h = hashlib.sha1()
  for x in jax.tree.leaves(params):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_finite(st: SleepState, metrics: Dict[str, Any], where: str, ckpt_dir: str) -> None:
  """NonFiniteError if a phase left a NaN/inf loss or parameter: raised before the state is
  saved or scored, so the last checkpoint (the state before the phase) stays the last good one."""
  # Losses only: a score may be NaN by design (a chunk without eval questions).
  bad = [f"{k}={v}" for k, v in metrics.items()
         if "loss" in k and isinstance(v, float) and not math.isfinite(v)]
  if not bool(_all_finite(st.params)):
    bad.append("parameters")
  if bad:
    step = metrics.get("nonfinite_step")
    raise NonFiniteError(
        f"{where}{f' step {step}' if step is not None else ''}: non-finite {', '.join(bad)}; "
        f"nothing of this phase was saved or scored, the last good checkpoint is in {ckpt_dir}. "
        "Lower the learning rate (or check the inputs) and run again")


def run_method(ctx: run_context.Context, workdir: str, log=print) -> Dict[str, Any]:
  """One (method, seed) run through every chunk; returns its result (also ``result.json``)."""
  out_dir = run_records.run_dir(workdir, ctx.name, ctx.seed)
  run_records.check_or_claim(ctx.config, out_dir, ctx.name, ctx.seed, log=log)
  done = os.path.join(out_dir, run_records.RESULT_FILE)
  if os.path.exists(done):
    log(f"{ctx.name} seed {ctx.seed}: finished, reused ({done})")
    with open(done) as f:
      return json.load(f)
  ckpt_dir = os.path.join(out_dir, "ckpt")
  # SIGTERM (preemption) stops the run at the next optimizer step or dreaming stage (``poll``
  # in ``_run_method``): the checkpoint of the last phase boundary is the resume point.
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=2, async_save=False,
                               save_point="the next step; the phase it cuts short runs again "
                               "from its start on resume")
  curves = RunLog(out_dir)
  try:
    return _run_method(dataclasses.replace(ctx, log_step=curves.step), ckpt=ckpt, done=done,
                       log=log, curves=curves)
  finally:
    curves.close()
    ckpt.close()


def chunk_scalars(st: SleepState, t: int) -> Dict[str, float]:
  """Chunk t's scalar metrics for the training curves: its phases' info, the closed-book score
  just slept (R[t, t]) and on every chunk seen so far."""
  out = {k: float(v) for k, v in st.info[t].items()
         if isinstance(v, (int, float)) and not isinstance(v, bool)}
  row = np.asarray(st.R[t], float) if len(st.R) > t else np.zeros(0)
  if row.size > t:
    out["closed_book_just_slept"] = float(row[t])
    out["closed_book_seen"] = continual.nanmean(row[:t + 1])
  return out


def fresh_state(ctx: run_context.Context) -> SleepState:
  """A run's state before its first phase: the base model with every slot masked, and the dream
  generator when the method dreams."""
  st = SleepState(ctx.setup.params, transformer.slot_mask_none(ctx.setup.cfg))
  if dream_phase.uses_generator(ctx.method):
    st.generator = dream_phase.init_generator(ctx)
  return st


def restored_state(st: SleepState, ckpt) -> SleepState:
  """``st`` (a ``fresh_state``: the shapes and shardings) with the newest checkpoint of ``ckpt``
  read into it."""
  restored = ckpt.restore(st.arrays())
  return st.restored(restored.state, restored.position)


def _run_method(ctx: run_context.Context, *, ckpt, done: str, log, curves: RunLog
                ) -> Dict[str, Any]:
  s, c = ctx.setup, ctx.config
  # The same jit cache entries as a restored state's (see ``SleepState.committed``).
  st = fresh_state(ctx).committed()
  if ckpt.latest_step() is not None:
    st = restored_state(st, ckpt)
    log(f"[{ctx.name}/seed {ctx.seed}] resumed at chunk {st.chunk} phase {PHASES[st.phase]}")
    curves.global_step = st.global_step
  else:
    st.retention_before = answers.retention(s, st.params, st.slot_mask, c.eval)

  # What the newest checkpoint holds, for the message of a stop inside a phase.
  saved = [f"chunk {st.chunk} phase {PHASES[st.phase - 1]}" if st.phase else
           f"chunk {st.chunk - 1} phase {PHASES[-1]}" if st.chunk else
           f"dream-generator step {st.generator_step}" if st.generator_step else None]

  def poll(where: str):
    """Inside a phase: a stop leaves the last boundary's checkpoint as the resume point.
    Nothing of the phase cut short was saved or logged, so the resumed run draws its random
    numbers again and ends exactly as an uninterrupted one."""
    if ckpt.poll():
      then = (f"the same command resumes from the checkpoint after {saved[0]} in "
              f"{ckpt.directory} and runs this phase again" if saved[0] else
              "nothing was saved yet: the same command starts this run again")
      raise Preempted(f"SIGTERM: {ctx.name} seed {ctx.seed} stopped in chunk {st.chunk} phase "
                      f"{PHASES[st.phase]} ({where}); {then}")

  ctx = dataclasses.replace(ctx, poll=poll)

  def save(where: str):
    st.counter += 1
    # The phase's curve points reach the files right before the checkpoint that ends it.
    st.global_step = curves.global_step
    curves.commit()
    try:
      ckpt.save(st.counter, st.arrays(), position=st.position())
    except Exception as e:  # noqa: BLE001 - only a full disk becomes a user error
      if workdir_lib.is_disk_full(e):
        last = ckpt.latest_step()
        raise workdir_lib.disk_full(ckpt.directory, os.path.join(ckpt.directory, str(last))
                                    if last is not None else "") from None
      raise
    saved[0] = where
    if ckpt.poll():
      raise Preempted(f"SIGTERM: {ctx.name} seed {ctx.seed} saved after {where} in "
                      f"{ckpt.directory}; run the same command to resume")

  # Dream-generator training before the stream, one checkpointed step per training task.
  gsteps = (int(c.generator_training.epochs) * len(s.generator_docs)
            if dream_phase.uses_generator(ctx.method) else 0)
  if st.generator_step < gsteps:
    bar = ctx.progress(total=gsteps, desc=f"{ctx.name} seed {ctx.seed} dream generator",
                       initial=st.generator_step)
    while st.generator_step < gsteps:
      st, m = dream_phase.generator_step(st, ctx, st.generator_step)
      check_finite(st, m, f"{ctx.name} seed {ctx.seed} dream-generator training step "
                   f"{st.generator_step}", ckpt.directory)
      st.generator_info.append(m)
      st.generator_step += 1
      save(f"dream-generator step {st.generator_step}")
      bar.update(1)
    bar.close()

  T = len(s.chunks)
  bar = ctx.progress(total=T * len(PHASES), desc=f"{ctx.name} seed {ctx.seed}",
                     initial=st.chunk * len(PHASES) + st.phase)
  while st.chunk < T:
    t, ph = st.chunk, PHASES[st.phase]
    t0, c0 = time.perf_counter(), time.process_time()
    if len(st.info) <= t:
      st.info.append({})
    if ph == "wake" and c.reset_between_chunks and t > 0:
      # Per-task protocol: every task starts from the post-generator model.
      st.params, st.slot_mask, st.slot = s.params, transformer.slot_mask_none(s.cfg), -1
    st, metrics = PHASE_FNS[st.phase](st, ctx, t)
    check_finite(st, metrics, f"{ctx.name} seed {ctx.seed} chunk {t} phase {ph}", ckpt.directory)
    st.info[t].update(metrics)
    # Dispatch is asynchronous: without the wait a phase's compute would be billed to the
    # checkpoint save after it.
    jax.block_until_ready((st.params, st.slot_mask))
    st.info[t][f"seconds_{ph}"] = time.perf_counter() - t0
    st.info[t][f"cpu_seconds_{ph}"] = time.process_time() - c0  # every thread of the process
    if ph == PHASES[-1]:
      curves.chunk(t, chunk_scalars(st, t))
    st.phase += 1
    if st.phase == len(PHASES):
      st.chunk, st.phase = t + 1, 0
    bar.update(1)
    save(f"chunk {t} phase {ph}")
  bar.close()

  R = np.asarray(st.R)
  metrics = continual.continual_metrics(R)
  metrics["closed_book_final"] = metrics.pop("ACC")
  metrics["acquisition"] = continual.nanmean(np.diag(R))  # chunk j right after learning it
  after = answers.retention(s, st.params, st.slot_mask, c.eval)
  metrics.update(after)
  for k, v in st.retention_before.items():
    metrics[f"{k}_change"] = after[k] - v
  metrics["wake_in_context"] = continual.nanmean([i.get("wake_in_context", np.nan)
                                                  for i in st.info])
  curves.chunk(T, metrics, prefix="final")
  curves.commit()
  result = {"metrics": metrics, "R": R.tolist(), "info": st.info, "answers": st.answers,
            "generator_info": st.generator_info,
            "live_slots": np.asarray(st.slot_mask).astype(int).tolist(),
            "params_sha1": params_digest(st.params)}
  tmp = done + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, done)
  return result


def place(setup, mesh):
  """The base model's parameters on the mesh by the logical-axis rules (a one-device mesh
  leaves everything where it is)."""
  if mesh.size == 1:
    return setup
  return dataclasses.replace(setup, params=jax.device_put(
      setup.params, mesh_lib.param_shardings(setup.cfg, mesh)))


def context(config, setup, name: str, seed: int, hook: Optional[Callable] = None
            ) -> run_context.Context:
  """What a (method, seed) run of ``config`` on ``setup`` holds fixed (``run_context.Context``)."""
  method = methods_lib.get(name)
  sched = methods_lib.sleep_schedule(tuple(config.sleep_every) or (1, config.deep_every), method,
                                     setup.cfg.n_levels)
  return run_context.Context(config, setup, name, method, int(seed), sched,
                             hook=hook or run_context.no_hook, progress=progress)


def run_experiment(config, workdir: str, hook: Optional[Callable] = None, log=print
                   ) -> Dict[str, Any]:
  """Runs ``config.methods`` x ``config.seeds`` and writes results.json / results.md / plots
  (with every finished run of the workdir that has this config, not only this invocation's)."""
  validate.check(config)  # every user mistake we can see without compute, before any
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.mesh_from_config(config)
  task = tasks.get(config.data.source)
  names = [str(m) for m in config.methods]
  # The base model is loaded (or pretrained, once) on one device, then placed on the mesh.
  setup = tasks.make_setup(config, workdir, log=log)
  if config.data.source == "jsonl":
    validate.bound_inputs(config, setup, log=log)
  validate.slot_capacity(config, setup)  # before any sleep, not at the first exhausted level
  validate.dream_coverage(config, setup, log=log)
  with mesh_lib.use_mesh(mesh) if mesh.size > 1 else contextlib.nullcontext():
    setup = place(setup, mesh)
    # The final metrics of every run, one line each (curves: ``runs/<method>/seed_<s>/``).
    writer = MetricsWriter(workdir, tensorboard=False)
    results: Dict[str, Any] = {"methods": {}, "config": json.loads(config.to_json_best_effort()),
                               "base": setup.base_metrics.get("final", {}),
                               "stream": [[d.id for d in ch] for ch in setup.chunks],
                               "generator_tasks": [d.id for d in setup.generator_docs]}
    try:  # a stop (error, SIGTERM) still flushes what was written
      for mi, name in enumerate(names):
        entry = results["methods"].setdefault(name, {"seeds": {}})
        for seed in config.seeds:
          s = task.for_seed(config, setup, int(seed))
          ctx = context(config, s, name, int(seed), hook)
          r = task.finish_run(config, s, run_method(ctx, workdir, log=log))
          entry["seeds"][str(seed)] = r
          writer.write(mi, {f"{name}/{k}": v for k, v in r["metrics"].items()})
          log(f"{name} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items()
                                                  if isinstance(v, float)))
    finally:
      writer.close()
    for name, seed, r in run_records.finished_runs(config, workdir):  # earlier invocations'
      seeds = results["methods"].setdefault(name, {"seeds": {}})["seeds"]
      if seed not in seeds:
        seeds[seed] = task.finish_run(config, task.for_seed(config, setup, int(seed)), r)
  write_outputs(results, workdir)
  return results


def write_outputs(results, workdir) -> str:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return tasks.get(results["config"]["data"]["source"]).report(results, workdir)


def run(config, workdir: str) -> None:
  """``main.JOBS['sleep_cycle']``: the README's main job."""
  run_experiment(config, workdir)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read())
