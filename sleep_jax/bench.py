"""Performance benchmarks of the whole stack, in one process so that ratios are fair.

    python -m sleep_jax.bench --out bench.json                 # everything (< 15 min on 2 cores)
    python -m sleep_jax.bench --only matmul_peak,train_step    # some parts
    python -m sleep_jax.bench --quick --only matmul_peak       # tiny sizes (smoke test)

Parts (``PARTS``), each a function ``part(ctx) -> dict`` recorded under ``parts.<name>``:

* ``matmul_peak``: best fp32 (and, on accelerators, bf16) GFLOP/s of large jitted matmuls: the
  ceiling every MFU below is measured against. Also the memory bandwidth (large jitted sum and
  copy) used by the sampler's bandwidth bound.
* ``train_step``: ``parallel.state.make_train_step`` + ``train.lm_loss`` (AdamW) at the
  SmolLM2-135M shape (random init) and at the tiny default shape; analytic FLOPs in the MaxText
  convention (formula in the JSON), tokens/s and MFU; a small sweep over remat x batch x sequence
  and a sub-part profile (forward, forward+backward, full step, LM head+loss alone) of the best.
* ``sampler``: ``model.sampler.sample`` greedy decode tokens/s at batch 1, 16, 64 on SmolLM2
  (the cached GGUF if present, else random weights), prefill separated from decode
  (``max_new_tokens=1`` vs ``N``); Hugging Face ``generate`` on the same GGUF and prompts when
  torch/transformers are installed; at batch 1 the memory-bandwidth bound.
* ``on_policy_step``: one on-policy distillation iteration (student sample, teacher forward,
  student update through ``consolidation.ks_loss``) on the tiny model, timed per part, and
  ``consolidation.seed_knowledge``'s own per-step time for comparison; and at the real-ARC
  shape (SmolLM2-135M), the output head and loss over the completion window only vs over the
  whole sequence (``logits_window``: compiled memory and time of both, same run).
* ``dream_trials``: ``dreaming.benchmark_trials`` (m vmapped LoRA trials vs one by one).
* ``sharding``: compiled per-device memory of a ~1B-parameter train step on 1 and 8 (fake)
  devices with FSDP (lower + compile only; the 8-device part runs in a subprocess).

On a GPU/TPU the train step runs in bfloat16 and MFU is also reported against the chip's
published dense bf16 peak (``PUBLISHED_PEAK_TFLOPS``).

Timing: every measurement is the best (minimum) of a few calls after a warm-up call that
compiles; the first call's time is reported separately. On a shared machine absolute times move
with the load; ratios measured in the same run are the meaningful figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEMA = "sleep_jax.bench/1"

# Dense (no sparsity) bf16 peak TFLOP/s by device_kind substring (lower-case), vendor figures.
PUBLISHED_PEAK_TFLOPS = {
    "h200": 989.0,  # H200 SXM
    "h100 pcie": 756.0,
    "h100": 989.0,  # H100 SXM
    "a100": 312.0,
    "l4": 121.0,
    "v100": 125.0,  # fp16 tensor cores
    "tpu v6 lite": 918.0,  # v6e
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v4": 275.0,
    "tpu v3": 123.0,
}


def published_peak_tflops(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for key in sorted(PUBLISHED_PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return PUBLISHED_PEAK_TFLOPS[key]
  return None


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def _block(x):
  return jax.block_until_ready(x)


def timeit(fn: Callable[[], Any], repeats: int = 3, min_time: float = 0.0) -> Dict[str, float]:
  """Calls ``fn`` once (compile + run: ``first_s``), then ``repeats`` more times (at least
  ``min_time`` seconds in all). Returns the best and median wall seconds, and the process CPU
  seconds of the best call (``cpu_s``) with ``cpu_util = cpu_s / (wall * cores)``: on a shared
  machine, a utilisation well below 1 means other jobs took the cores."""
  t0 = time.perf_counter()
  _block(fn())
  first = time.perf_counter() - t0
  calls: List[tuple] = []
  start = time.perf_counter()
  while len(calls) < repeats or (time.perf_counter() - start) < min_time:
    c0, t0 = time.process_time(), time.perf_counter()
    _block(fn())
    calls.append((time.perf_counter() - t0, time.process_time() - c0))
    if len(calls) >= 1000:
      break
  wall, cpu = min(calls)
  return {"first_s": first, "best_s": wall, "median_s": statistics.median(c[0] for c in calls),
          "calls": len(calls), "cpu_s": cpu, "cpu_util": cpu / wall / _cores()}


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_rate(flops: float, t: Dict[str, float]) -> float:
  """FLOP/s per fully-owned machine: flops / (cpu_s / cores). Robust to other jobs sharing the
  cores, blind to poor parallelism (an idle core costs no CPU time); pair it with the wall rate."""
  return flops / max(t["cpu_s"] / _cores(), 1e-12)


# ----------------------------------------------------------------------------------------------
# Op-level profile (jax.profiler trace -> time per XLA op, grouped).
# ----------------------------------------------------------------------------------------------
def _op_category(name: str) -> str:
  n = name.lower()
  if n.startswith(("ynn_fusion", "dot", "onednn", "cublas", "gemm", "custom-call")) or "matmul" in n:
    return "dot"
  if "copy" in n or "transpose" in n:
    return "copy/transpose"
  if "broadcast" in n:
    return "broadcast (buffer init)"
  if "dynamic-update-slice" in n or "dynamic_update_slice" in n:
    return "dynamic-update-slice"
  if "reduce" in n:
    return "reduce"
  if "scatter" in n or "gather" in n:
    return "gather/scatter"
  if n.startswith(("while", "conditional", "call")):
    return "control flow"
  return "other fusion"


def op_profile(fn: Callable[[], Any], hlo_text: Optional[str] = None, top: int = 12,
               trace_dir: Optional[str] = None) -> Dict[str, Any]:
  """Runs ``fn`` once under ``jax.profiler.trace`` and sums the XLA op events of the trace by
  category (dots, copies/transposes, buffer initialisation, ...); the top ops carry the JAX
  ``op_name`` of their HLO (from ``hlo_text``, the compiled module's ``as_text()``)."""
  import glob
  import gzip
  import re
  import shutil
  import tempfile
  d = trace_dir or tempfile.mkdtemp(prefix="sleep_jax_trace_")
  try:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      _block(fn())
    files = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))
    if not files:
      return {"error": "no perfetto trace written"}
    with gzip.open(files[-1]) as f:
      ev = json.load(f)
  finally:
    if trace_dir is None:
      shutil.rmtree(d, ignore_errors=True)
  events = ev["traceEvents"] if isinstance(ev, dict) else ev
  skip = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjRt", "pjrt", "Execute")
  per_op: Dict[str, float] = {}
  count: Dict[str, int] = {}
  for e in events:
    if e.get("ph") != "X" or str(e.get("name", "")).startswith(skip):
      continue
    per_op[e["name"]] = per_op.get(e["name"], 0.0) + e.get("dur", 0) / 1e6
    count[e["name"]] = count.get(e["name"], 0) + 1
  # while/conditional/call events enclose the events of their bodies: kept out of the sums.
  containers = {n: v for n, v in per_op.items() if _op_category(n) == "control flow"}
  per_op = {n: v for n, v in per_op.items() if n not in containers}
  cats: Dict[str, float] = {}
  for n, v in per_op.items():
    cats[_op_category(n)] = cats.get(_op_category(n), 0.0) + v
  total = sum(per_op.values()) or 1.0
  meta = {}
  if hlo_text:
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
      meta.setdefault(m.group(1), m.group(2))
  tops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return {
      "op_seconds_total": total, "op_events": int(sum(count[n] for n in per_op)),
      "control_flow_containers_s": sum(containers.values()),
      "by_category_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
      "by_category_fraction": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": n, "s": v, "calls": count[n], "jax_op": meta.get(n, "")[-140:]}
                  for n, v in tops],
      "note": "sum of XLA op events in a jax.profiler trace of one call (ops may overlap)"}


def machine_info() -> Dict[str, Any]:
  dev = jax.devices()[0]
  info = {
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "processor": platform.processor() or platform.machine(),
  }
  try:
    import jaxlib
    info["jaxlib_version"] = jaxlib.__version__
  except Exception:  # pragma: no cover
    pass
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
    info["load_average"] = list(os.getloadavg())
  except OSError:
    pass
  peak = published_peak_tflops(dev.device_kind) if info["backend"] != "cpu" else None
  if peak:
    info["published_peak_bf16_tflops"] = peak
  return info


def _is_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")


class Context:
  """Shared state between parts (the measured peak and bandwidth are reused)."""

  def __init__(self, quick: bool, results: Dict[str, Any]):
    self.quick = quick
    self.results = results

  def peak_gflops(self, dtype: str = "float32") -> float:
    mp = self.results.get("matmul_peak")
    if not mp or "error" in mp:
      mp = self.results["matmul_peak"] = part_matmul_peak(self)
    return mp["best_gflops"][dtype]

  def peak_gflops_cpu(self, dtype: str = "float32") -> float:
    self.peak_gflops(dtype)
    return self.results["matmul_peak"]["best_gflops_cpu_normalised"][dtype]

  def bandwidth_gbps(self) -> float:
    mp = self.results.get("matmul_peak")
    if not mp or "error" in mp:
      mp = self.results["matmul_peak"] = part_matmul_peak(self)
    return mp["memory_bandwidth"]["best_GBps"]


# ----------------------------------------------------------------------------------------------
# matmul_peak (+ memory bandwidth).
# ----------------------------------------------------------------------------------------------
def part_matmul_peak(ctx: Context) -> Dict[str, Any]:
  sizes = (128, 256) if ctx.quick else (1024, 2048, 3072, 4096)
  dtypes = ["float32"] + (["bfloat16"] if _is_accelerator() else [])
  mm = jax.jit(lambda a, b: a @ b)
  rows, best, best_cpu = [], {}, {}
  for dt in dtypes:
    for n in sizes:
      ka, kb = jax.random.split(jax.random.key(n))
      a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
      b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
      t = timeit(lambda: mm(a, b), repeats=3, min_time=0.2 if ctx.quick else 1.0)
      gf = 2 * n ** 3 / t["best_s"] / 1e9
      gc = cpu_rate(2 * n ** 3, t) / 1e9
      rows.append({"dtype": dt, "n": n, "best_s": t["best_s"], "gflops": gf,
                   "median_gflops": 2 * n ** 3 / t["median_s"] / 1e9, "cpu_util": t["cpu_util"],
                   "gflops_cpu_normalised": gc})
      best[dt] = max(best.get(dt, 0.0), gf)
      best_cpu[dt] = max(best_cpu.get(dt, 0.0), gc)
      del a, b
  out = {"sizes": rows, "best_gflops": best, "best_gflops_cpu_normalised": best_cpu,
         "cores": _cores(),
         "note": "2 n^3 / best wall time of a jitted (n, n) @ (n, n), best over sizes; "
                 "cpu_normalised: 2 n^3 / (process CPU seconds / cores), i.e. the rate of the "
                 "machine if this process owned every core"}
  out["memory_bandwidth"] = _memory_bandwidth(ctx.quick)
  if _is_accelerator():
    peak = published_peak_tflops(jax.devices()[0].device_kind)
    if peak:
      out["published_peak_bf16_tflops"] = peak
      out["measured_bf16_fraction_of_published"] = best.get("bfloat16", 0) / (peak * 1e3)
  return out


def _memory_bandwidth(quick: bool) -> Dict[str, Any]:
  """Read bandwidth (jitted sum of a large array) and copy bandwidth (x + 1: read + write)."""
  n = (4 << 20) if quick else (64 << 20)  # float32 elements: 16 MiB / 256 MiB
  x = jnp.ones((n,), jnp.float32) * 1.5
  total = jax.jit(jnp.sum)
  copy = jax.jit(lambda v: v + 1.0)
  ts = timeit(lambda: total(x), repeats=3, min_time=0.2 if quick else 1.0)
  tc = timeit(lambda: copy(x), repeats=3, min_time=0.2 if quick else 1.0)
  nbytes = n * 4
  read = nbytes / ts["best_s"] / 1e9
  cp = 2 * nbytes / tc["best_s"] / 1e9
  return {"array_MiB": nbytes / 2 ** 20, "sum_read_GBps": read, "copy_GBps": cp,
          "best_GBps": max(read, cp),
          "note": "sum reads the array once; copy (x + 1) reads and writes it; best_GBps is the "
                  "larger, the conservative choice for a bound"}


# ----------------------------------------------------------------------------------------------
# FLOP and byte accounting.
# ----------------------------------------------------------------------------------------------
def matmul_params(cfg, *, executed: bool = False) -> Dict[str, int]:
  """Parameters that enter a matmul, per token (the ``N`` of ``6 N D``).

  ``executed=False`` counts the model's function (MaxText/PaLM convention): attention
  projections, the routed (``expert_top_k``) dense experts, the unembedding, and the low-rank
  slots that are live (none in these benchmarks: every slot is masked). ``executed=True`` counts
  what the implementation actually multiplies: every dense expert and every (masked) slot.
  """
  d, L, H, K, hd = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hd
  attn = d * H * hd + 2 * d * K * hd + H * hd * d
  mlp = slots = 0
  for j in range(cfg.n_levels):
    F, E = cfg.d_ff[j], cfg.n_experts[j]
    if F > 0:
      active = E if (executed or E == 1) else min(cfg.expert_top_k, E)
      mlp += active * 3 * d * F + (d * E if E > 1 else 0)
    if cfg.n_slots > 0 and executed:
      slots += cfg.n_slots * (2 * d * cfg.slot_rank) + d * cfg.n_slots
  head = d * cfg.vocab_size
  return {"attention": L * attn, "mlp": L * mlp, "masked_slots": L * slots, "lm_head": head,
          "total": L * (attn + mlp + slots) + head}


TRAIN_FLOPS_FORMULA = (
    "flops/step = 6 * N * B * T + 6 * L * H * hd * B * T^2, N = matmul params per token "
    "(attention q,k,v,o + routed dense MLP experts + lm_head d*V; embedding lookup and norms "
    "excluded; masked low-rank slots excluded), the second term is causal attention "
    "(QK^T and PV, 4 B T^2 H hd per layer forward, halved for causality, x3 for fwd+bwd) "
    "[MaxText calculate_tflops_training_per_device convention]")


def train_flops(cfg, batch: int, seq: int) -> Dict[str, float]:
  n = matmul_params(cfg)["total"]
  n_exec = matmul_params(cfg, executed=True)["total"]
  tokens = batch * seq
  attn = 6 * cfg.n_layers * cfg.n_heads * cfg.hd * batch * seq ** 2
  return {"matmul_params": n, "tokens": tokens, "dense_flops": 6 * n * tokens,
          "attention_flops": attn, "model_flops": 6 * n * tokens + attn,
          # What the code executes: masked slots are multiplied, and attention is computed on
          # the full T x T square (the causal mask is applied after the product).
          "executed_flops_estimate": 6 * n_exec * tokens + 2 * attn}


def _cost_flops(compiled) -> Optional[float]:
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return float(ca.get("flops")) if ca and "flops" in ca else None
  except Exception:
    return None


# ----------------------------------------------------------------------------------------------
# train_step.
# ----------------------------------------------------------------------------------------------
def _train_setup(cfg, batch: int, seq: int, seed: int = 0):
  import ml_collections
  from sleep_jax import train as train_lib
  from sleep_jax.model import transformer
  from sleep_jax.parallel import state as state_lib
  opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.95,
                                       weight_decay=0.0, grad_clip=1.0))
  tx = state_lib.with_cms_frequencies(state_lib.make_optimizer(opt),
                                      transformer.param_shapes(cfg), chunk_sizes=cfg.chunk_sizes)
  state, _ = state_lib.create_train_state(
      seed, lambda r: transformer.init(r, cfg), tx,
      extras={"slot_mask": np.asarray(transformer.slot_mask_none(cfg))})
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  data = {"tokens": tokens, "valid": jnp.ones((batch, seq), bool),
          "loss_mask": jnp.ones((batch, seq), bool)}
  step = state_lib.make_train_step(train_lib.make_lm_loss(cfg), tx)
  return state, data, step, train_lib.make_lm_loss(cfg)


def _time_train(cfg, batch: int, seq: int, steps: int, keep: Optional[dict] = None
                ) -> Dict[str, Any]:
  state, data, step, _ = _train_setup(cfg, batch, seq)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], data)
    return metrics["loss"]

  t = timeit(run, repeats=steps)
  fl = train_flops(cfg, batch, seq)
  out = {"batch": batch, "seq": seq, "remat": cfg.remat, "dtype": cfg.dtype,
         "step_s": t["best_s"], "median_step_s": t["median_s"], "first_call_s": t["first_s"],
         "cpu_s": t["cpu_s"], "cpu_util": t["cpu_util"],
         "tokens_per_s": fl["tokens"] / t["best_s"],
         "model_tflops_per_s": fl["model_flops"] / t["best_s"] / 1e12,
         "model_gflops_cpu_normalised": cpu_rate(fl["model_flops"], t) / 1e9, **fl}
  if keep is not None:
    keep.update(run=run, step=step, holder=holder, data=data)
  return out


def _train_profile(cfg, batch: int, seq: int, keep: dict, repeats: int = 1) -> Dict[str, Any]:
  """Where the step's time goes: an op-level trace of one step (time per XLA op category and
  the top ops with their JAX op names), XLA's FLOP count, and timings of sub-parts: forward
  loss, forward+backward, and the LM head + cross-entropy alone (forward+backward from the
  hidden states). ``keep`` holds the already compiled step of the sweep."""
  from sleep_jax.model import transformer
  out: Dict[str, Any] = {}
  holder, data, step = keep["holder"], keep["data"], keep["step"]
  try:
    compiled = step.jitted.lower(holder["state"], data, None).compile()
    out["xla_cost_analysis_flops"] = _cost_flops(compiled)
    hlo = compiled.as_text()
  except Exception as e:  # pragma: no cover
    out["xla_cost_analysis_error"], hlo = repr(e)[:300], None
  out["op_profile_step"] = op_profile(keep["run"], hlo)

  params = holder["state"].params
  from sleep_jax import train as train_lib
  loss_fn = train_lib.make_lm_loss(cfg)
  inputs = {**data, **holder["state"].extras}
  fwd = jax.jit(lambda p: loss_fn(p, inputs, None)[0])
  grad = jax.jit(jax.grad(lambda p: loss_fn(p, inputs, None)[0]))
  tf = timeit(lambda: fwd(params), repeats)
  tg = timeit(lambda: grad(params), repeats)
  out["forward_s"], out["forward_backward_s"] = tf["best_s"], tg["best_s"]
  out["backward_over_forward"] = (tg["best_s"] - tf["best_s"]) / tf["best_s"]
  out["backward_over_forward_cpu"] = (tg["cpu_s"] - tf["cpu_s"]) / tf["cpu_s"]
  tokens = data["tokens"]
  hidden = jax.jit(lambda p: transformer.apply(p, tokens, cfg, return_hidden=True)[0])(params)

  def head_loss(h, emb):
    logits = jnp.einsum("btd,dv->btv", h, emb.T).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)

  head = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  th = timeit(lambda: head(hidden, params["embed"]), repeats)
  out["lm_head_loss_fwd_bwd_s"] = th["best_s"]
  head_flops = 6 * cfg.d_model * cfg.vocab_size * batch * seq
  out["lm_head_loss_gflops_cpu_normalised"] = cpu_rate(head_flops, th) / 1e9
  return out


def part_train_step(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.model import config as mcfg
  dtype = "bfloat16" if _is_accelerator() else "float32"
  ctx.peak_gflops("float32")
  peak_dtype = dtype if dtype in ctx.results["matmul_peak"]["best_gflops"] else "float32"
  peak = ctx.peak_gflops(peak_dtype) * 1e9
  peak_cpu = ctx.peak_gflops_cpu(peak_dtype) * 1e9
  out: Dict[str, Any] = {
      "flops_formula": TRAIN_FLOPS_FORMULA, "optimizer": "adamw + clip_by_global_norm",
      "mfu_definition": ("mfu = model_flops / step wall seconds / matmul_peak (best wall "
                         f"GFLOP/s of {peak_dtype} matmuls, same run); mfu_cpu_normalised = "
                         "the same with process CPU seconds / cores in place of wall seconds "
                         "for both (robust to other jobs on the cores)"),
      "matmul_peak_gflops": peak / 1e9, "matmul_peak_gflops_cpu_normalised": peak_cpu / 1e9}
  acc_peak = published_peak_tflops(jax.devices()[0].device_kind) if _is_accelerator() else None
  if ctx.quick:
    shapes = {"tiny": (mcfg.tiny(dtype=dtype), [("none", 16, 64)])}
  elif _is_accelerator():
    shapes = {"smollm2_135m": (mcfg.smollm2_135m(dtype=dtype),
                               [("none", 16, 512), ("dots", 32, 512), ("full", 64, 512)]),
              "tiny": (mcfg.tiny(dtype=dtype), [("none", 256, 256), ("none", 1024, 256)])}
  else:
    shapes = {"smollm2_135m": (mcfg.smollm2_135m(dtype=dtype),
                               [("none", 8, 256), ("dots", 8, 256), ("full", 8, 256)]),
              "tiny": (mcfg.tiny(dtype=dtype), [("none", 64, 64), ("dots", 64, 64),
                                                 ("none", 32, 256)])}
  steps = 1 if ctx.quick or not _is_accelerator() else 3
  for name, (base, sweep) in shapes.items():
    runs, keep_best, best = [], None, None
    for remat, b, t in sweep:
      cfg = dataclasses.replace(base, remat=remat)
      keep: Dict[str, Any] = {}
      try:
        r = _time_train(cfg, b, t, steps, keep=keep)
        r["mfu"] = r["model_flops"] / r["step_s"] / peak
        r["mfu_cpu_normalised"] = r["model_gflops_cpu_normalised"] * 1e9 / peak_cpu
        r["executed_flops_utilisation"] = r["executed_flops_estimate"] / r["step_s"] / peak
        if acc_peak:
          r["mfu_vs_published_peak"] = r["model_flops"] / r["step_s"] / (acc_peak * 1e12)
      except Exception as e:  # e.g. out of memory at a large batch
        r = {"batch": b, "seq": t, "remat": remat, "error": repr(e)[:500]}
      runs.append(r)
      if "mfu" in r and (best is None or r["mfu"] > best["mfu"]):
        best, keep_best = r, keep
      keep = None
      print(f"  train_step {name} remat={remat} {b}x{t}: "
            + (f"{r['step_s']:.3f}s/step, {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%} "
               f"(cpu-normalised {r['mfu_cpu_normalised']:.1%}, util {r['cpu_util']:.2f})"
               if "step_s" in r else r["error"]), flush=True)
    entry = {"params": _count(base), "config": {k: getattr(base, k) for k in (
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "hd", "d_ff", "n_slots",
        "slot_rank", "dtype")}, "sweep": runs, "best": best}
    if best is not None and name == "smollm2_135m":
      try:
        entry["profile"] = _train_profile(dataclasses.replace(base, remat=best["remat"]),
                                          best["batch"], best["seq"], keep_best)
        p = entry["profile"]
        if p.get("xla_cost_analysis_flops"):
          p["xla_flops_over_model_flops"] = p["xla_cost_analysis_flops"] / best["model_flops"]
      except Exception as e:
        entry["profile"] = {"error": repr(e)[:500]}
    keep_best = None
    out[name] = entry
  return out


def _count(cfg) -> int:
  from sleep_jax.model import transformer
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(transformer.param_shapes(cfg))))


# ----------------------------------------------------------------------------------------------
# sampler.
# ----------------------------------------------------------------------------------------------
def _smollm2(quick: bool):
  """(cfg, params, source) for SmolLM2-135M: the cached GGUF when present, else random init."""
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import transformer
  try:
    from sleep_jax.model import convert, fetch
    path = fetch.find_smollm2()
    if path:
      cfg, params = convert.load_gguf(path)
      return cfg, params, {"weights": "gguf", "path": path}
  except Exception as e:  # no gguf package, corrupt file, ...
    err = repr(e)[:300]
  else:
    err = "GGUF not cached"
  cfg = mcfg.smollm2_135m()
  return cfg, jax.jit(lambda r: transformer.init(r, cfg))(jax.random.key(0)), {
      "weights": "random", "why": err}


def _hf_model(path: str):
  import torch
  import transformers
  torch.set_num_threads(2)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  os.environ.setdefault("TQDM_DISABLE", "1")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  model.eval()
  return model


def _hf_generate_time(model, prompts: np.ndarray, n_new: int, repeats: int,
                      warmup: bool = True) -> Dict[str, float]:
  import torch
  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def gen(n):
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0, num_beams=1)

  out = {}
  for key, n in (("t1", 1), ("tN", n_new)):
    times = []
    if warmup:
      gen(n)
    for _ in range(repeats):
      t0 = time.perf_counter()
      toks = gen(n)
      times.append(time.perf_counter() - t0)
    out[key] = min(times)
    if n == n_new:
      out["tokens"] = np.asarray(toks[:, prompts.shape[1]:])
  return out


# transformers generate is compared at these batches (batch 64 takes minutes on 2 cores).
HF_BATCHES = (1, 16)


def part_sampler(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.model import sampler
  cfg, params, source = _smollm2(ctx.quick)
  P = 16 if ctx.quick else 32
  N = 8 if ctx.quick else 24
  batches = (1,) if ctx.quick else (1, 16, 64)
  rng = np.random.default_rng(0)
  out: Dict[str, Any] = {"model": source, "prompt_len": P, "new_tokens": N, "greedy": True,
                         "params": _count(cfg)}
  # Bytes read per decode step: every parameter (the masked slots are multiplied too, and the
  # unembedding reads the whole embedding table) + the KV cache.
  n_params = _count(cfg)
  bpe = jnp.dtype(cfg.param_dtype).itemsize
  weight_bytes = n_params * bpe
  slot_bytes = matmul_params(cfg, executed=True)["masked_slots"] * bpe

  hf_model, hf_err = None, None
  if source["weights"] == "gguf" and not ctx.quick:
    try:
      hf_model = _hf_model(source["path"])
    except Exception as e:
      hf_err = repr(e)[:300]
  elif ctx.quick:
    hf_err = "skipped in --quick"
  else:
    hf_err = "no GGUF: transformers needs the same weights"
  rows = []
  for B in batches:
    prompts = rng.integers(100, cfg.vocab_size, (B, P)).astype(np.int32)
    toks, valid = jnp.asarray(prompts), jnp.ones((B, P), bool)

    def run(n):
      return sampler.sample(params, toks, valid, jax.random.key(0), cfg=cfg, max_new_tokens=n,
                            greedy=True).tokens

    reps = 1 if B >= 64 else 2 if B >= 16 else 3
    t1 = timeit(lambda: run(1), repeats=reps)
    tN = timeit(lambda: run(N), repeats=reps)
    step = (tN["best_s"] - t1["best_s"]) / (N - 1)
    r = {"batch": B, "total_s": tN["best_s"], "first_call_s": tN["first_s"],
         "decode_step_s": step, "prefill_s": t1["best_s"] - step,
         "decode_tokens_per_s": B / step,
         "end_to_end_tokens_per_s": B * N / tN["best_s"]}
    if B == 1:
      cache_bytes = 2 * cfg.n_layers * (P + N) * cfg.n_kv_heads * cfg.hd * 4
      per_tok = weight_bytes + cache_bytes
      bw = ctx.bandwidth_gbps() * 1e9
      r["bandwidth_bound"] = {
          "bytes_per_token": per_tok, "weight_bytes": weight_bytes,
          "of_which_masked_slot_bytes": slot_bytes, "kv_cache_bytes": cache_bytes,
          "measured_bandwidth_GBps": bw / 1e9,
          "bound_tokens_per_s": bw / per_tok, "fraction_of_bound": (B / step) / (bw / per_tok),
          "note": "bound = bandwidth / (all fp32 parameters + KV cache) per decode step"}
      if not ctx.quick:
        try:
          hlo = sampler.sample.lower(params, toks, valid, jax.random.key(0), cfg=cfg,
                                     max_new_tokens=N, greedy=True).compile().as_text()
        except Exception:  # pragma: no cover
          hlo = None
        prof = op_profile(lambda: run(N), hlo)
        prof["op_events_per_decode_step"] = prof["op_events"] / N
        prof["wall_per_op_event_us"] = tN["best_s"] / max(prof["op_events"], 1) * 1e6
        r["op_profile"] = prof
    if hf_model is not None and B in HF_BATCHES:
      try:
        # torch needs no compilation: after the batch-1 warm-up, bigger batches run once.
        h = _hf_generate_time(hf_model, prompts, N, repeats=1 if B >= 16 else 2,
                              warmup=B == batches[0])
        hstep = (h["tN"] - h["t1"]) / (N - 1)
        ours = np.asarray(run(N))[:, P:]
        r["transformers"] = {
            "total_s": h["tN"], "prefill_s": h["t1"], "decode_step_s": hstep,
            "decode_tokens_per_s": B / hstep, "end_to_end_tokens_per_s": B * N / h["tN"],
            "greedy_token_agreement": float(np.mean(ours == h["tokens"]))}
        r["speedup_vs_transformers_decode"] = r["decode_tokens_per_s"] / (B / hstep)
        r["speedup_vs_transformers_end_to_end"] = h["tN"] / tN["best_s"]
      except Exception as e:
        r["transformers"] = {"error": repr(e)[:300]}
    rows.append(r)
    print(f"  sampler batch {B}: decode {r['decode_tokens_per_s']:.1f} tok/s"
          + (f", transformers {r['transformers'].get('decode_tokens_per_s', float('nan')):.1f}"
             if "transformers" in r else ""), flush=True)
  out["batches"] = rows
  if hf_model is not None:
    import torch
    import transformers
    out["transformers"] = {"version": transformers.__version__, "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(), "dtype": "float32",
                           "call": "generate(greedy, min_new_tokens=max_new_tokens=N)"}
  else:
    out["transformers"] = {"skipped": hf_err}
  out["timing"] = ("decode_step_s = (t(N) - t(1)) / (N - 1), prefill_s = t(1) - decode_step_s "
                   "(our sampler runs one decode forward per emitted token); transformers: "
                   "prefill = t(max_new_tokens=1)")
  return out


# ----------------------------------------------------------------------------------------------
# on_policy_step.
# ----------------------------------------------------------------------------------------------
def part_on_policy_step(ctx: Context) -> Dict[str, Any]:
  import ml_collections
  from sleep_jax.model import config as mcfg
  from sleep_jax.model import growth, sampler, transformer
  from sleep_jax.parallel import state as state_lib
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
  kcfg = cons.variant("opsd_expansion")
  tx = state_lib.make_optimizer(kcfg.optimizer)
  st = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, s_params),
      opt_state=tx.init(s_params), rng=state_lib.rng_data(2),
      trainable=jax.tree.map(lambda m: jnp.array(m, bool), trainable),
      extras={"slot_mask": jnp.array(s_mask, bool)})
  loss_fn = lambda p, b, r: cons.ks_loss(
      p, b, r, cfg=cfg, alpha=float(kcfg.alpha), lam=float(kcfg.lam), divergence=kcfg.divergence,
      divergence_kwargs=dict(kcfg.divergence_kwargs), temperature=float(kcfg.temperature),
      advantage=kcfg.advantage)
  step_fn = state_lib.make_train_step(loss_fn, tx)
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
    out["grad_note"] = ("jax.grad of ks_loss w.r.t. every parameter (what make_train_step does, "
                        "then masks) vs only the leaves whose trainable mask is not all False")
  except Exception as e:  # pragma: no cover
    out["grad_comparison_error"] = repr(e)[:300]

  if not ctx.quick:
    # The library's own loop (host-side batching included), for comparison.
    k2 = cons.variant("opsd_expansion")
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
  only (what ``ks_loss`` does) vs over every position (teacher logits zero-padded over the
  prompt, which makes ``ks_loss`` take the whole sequence: what it did before). Same function,
  same run: compiled memory (arguments + temporaries + outputs) and best wall time of the
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
  kcfg = cons.variant("opsd_expansion")

  def teacher(start):
    return jax.jit(lambda p: transformer.apply(p, tokens, cfg, valid=valid, slot_mask=mask,
                                               logits_from=start)[0])

  t_window, t_full = teacher(P - 1), teacher(0)
  window = _block(t_window(params))
  full = jnp.concatenate([jnp.zeros((B, P - 1, cfg.vocab_size), jnp.float32), window], 1)

  def grad_fn(t_logits):
    batch = {"on_tokens": tokens, "on_valid": valid, "on_completion_mask": comp,
             "on_teacher_logits": t_logits, "slot_mask": mask}
    loss = lambda p: cons.ks_loss(
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
  from sleep_jax.parallel import state as state_lib
  from sleep_jax.sleep import consolidation as cons

  cfg = mcfg.tiny()
  B, N, steps, repeats = (4, 4, 2, 1) if ctx.quick else (8, 8, 4, 2)
  rng = np.random.default_rng(0)
  params = transformer.init(jax.random.key(0), cfg)
  mask = transformer.slot_mask_none(cfg)
  questions = rng.integers(3, cfg.vocab_size, (B, 12)).tolist()
  teacher = [list(c) + q for c, q in zip(rng.integers(3, cfg.vocab_size, (B, 36)).tolist(),
                                         questions)]
  kcfg = cons.variant("opsd_expansion")
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
    state_lib.clear_step_cache()
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
  from sleep_jax.sleep import dreaming
  if not hasattr(dreaming, "benchmark_trials"):
    raise RuntimeError("sleep_jax.sleep.dreaming has no benchmark_trials()")
  kw = dict(m=4, repeats=1, d_model=64, n_layers=2) if ctx.quick else dict(m=16, repeats=3)
  r = dict(dreaming.benchmark_trials(**kw))
  r["source"] = "sleep_jax.sleep.dreaming.benchmark_trials(%s)" % ", ".join(
      f"{k}={v}" for k, v in kw.items())
  if not ctx.quick:
    try:
      r["op_profiles"] = _dream_profiles(dreaming, m=kw["m"])
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
# sharding.
# ----------------------------------------------------------------------------------------------
def one_b_config(quick: bool = False):
  """~1B-parameter Llama-style config (exact count in the JSON); quick: a small stand-in."""
  from sleep_jax.model import config as mcfg
  if quick:
    return mcfg.tiny(d_model=128, n_layers=2, remat="full")
  return mcfg.ModelConfig(
      vocab_size=49152, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128,
      tie_embeddings=False, max_seq_len=2048, d_ff=(0, 5632), n_experts=(1, 1), n_slots=4,
      slot_rank=64, chunk_sizes=(1, 1), remat="full")


def _memory(ma) -> Dict[str, int]:
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {k: int(getattr(ma, k, 0) or 0) for k in keys}
  out["args_temps_outputs"] = (out["argument_size_in_bytes"] + out["temp_size_in_bytes"]
                               + out["output_size_in_bytes"])
  # Donated state: outputs alias the arguments, so the live peak counts them once.
  out["peak_estimate"] = out["args_temps_outputs"] - out["alias_size_in_bytes"]
  return out


def sharding_memory(n_devices: int, quick: bool, batch: int, seq: int) -> Dict[str, Any]:
  """Lowers and compiles (never runs) the ~1B train step on an FSDP mesh of ``n_devices``."""
  import ml_collections
  from sleep_jax import train as train_lib
  from sleep_jax.model import transformer
  from sleep_jax.parallel import mesh as mesh_lib
  from sleep_jax.parallel import state as state_lib
  devices = jax.devices()[:n_devices]
  if len(devices) < n_devices:
    raise RuntimeError(f"need {n_devices} devices, have {len(jax.devices())}")
  cfg = one_b_config(quick)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, grad_clip=1.0))
  tx = state_lib.make_optimizer(opt)
  t0 = time.perf_counter()
  with mesh_lib.use_mesh(mesh):
    psh = mesh_lib.param_shardings(cfg, mesh)
    abstract, shardings = state_lib.abstract_train_state(
        0, lambda r: transformer.init(r, cfg), tx, mesh=mesh, param_shardings=psh,
        extras={"slot_mask": np.asarray(transformer.slot_mask_none(cfg))})
    bsh = mesh_lib.batch_sharding(mesh)
    data = {k: jax.ShapeDtypeStruct((batch, seq), dt, sharding=bsh)
            for k, dt in (("tokens", jnp.int32), ("valid", bool), ("loss_mask", bool))}
    step = state_lib.make_train_step(train_lib.make_lm_loss(cfg), tx, state_shardings=shardings,
                                     batch_shardings=bsh)
    lowered = step.jitted.lower(abstract, data, None)
    compiled = lowered.compile()
  mem = _memory(compiled.memory_analysis())
  n_params = _count(cfg)
  arg_state = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return {"n_devices": n_devices, "mesh": dict(mesh.shape), "params": n_params,
          "batch": batch, "seq": seq, "remat": cfg.remat, "compile_s": time.perf_counter() - t0,
          "state_bytes_global": int(arg_state), "memory_per_device": mem}


def part_sharding(ctx: Context) -> Dict[str, Any]:
  cfg = one_b_config(ctx.quick)
  batch, seq = (8, 64) if ctx.quick else (8, 1024)
  c = cfg
  out: Dict[str, Any] = {
      "config": {k: getattr(c, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                            "n_kv_heads", "hd", "d_ff", "n_slots", "slot_rank",
                                            "tie_embeddings", "remat")},
      "params": _count(cfg), "matmul_params": matmul_params(cfg)["total"],
      "optimizer": "adamw (2 moments) + grad clip", "note": "lower + compile only, never run"}
  if jax.device_count() == 1:
    one = sharding_memory(1, ctx.quick, batch, seq)
  else:
    one = _sharding_subprocess(1, ctx.quick, batch, seq)
  out["devices_1"] = one
  eight = _sharding_subprocess(8, ctx.quick, batch, seq)
  out["devices_8"] = eight
  for key in ("args_temps_outputs", "peak_estimate"):
    ideal = one["memory_per_device"][key] / 8
    out[f"ratio_to_ideal_{key}"] = eight["memory_per_device"][key] / ideal
  for key in ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes"):
    out.setdefault("ratio_to_ideal_by_kind", {})[key] = (
        eight["memory_per_device"][key] / max(one["memory_per_device"][key] / 8, 1))
  out["ideal"] = "1/8 of the 1-device figure"
  return out


def _sharding_subprocess(n: int, quick: bool, batch: int, seq: int) -> Dict[str, Any]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count", "--_ignored") +
      f" --xla_force_host_platform_device_count={n}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "sleep_jax.bench", "--_sharding_worker", str(n),
         "--_batch", str(batch), "--_seq", str(seq)] + (["--quick"] if quick else [])
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  if p.returncode != 0:
    raise RuntimeError(f"sharding worker ({n} devices) failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Targets and the summary table.
# ----------------------------------------------------------------------------------------------
def _get(d, *path):
  for p in path:
    if isinstance(d, dict) and p in d:
      d = d[p]
    elif isinstance(d, list) and isinstance(p, int) and p < len(d):
      d = d[p]
    else:
      return None
  return d


def targets(parts: Dict[str, Any]) -> List[Dict[str, Any]]:
  out = []

  def add(name, goal, measured, ok):
    out.append({"name": name, "target": goal, "measured": measured,
                "met": None if measured is None else bool(ok)})

  mfu = _get(parts, "train_step", "smollm2_135m", "best", "mfu")
  add("train_step smollm2 MFU (CPU, wall time vs measured matmul peak)", ">= 0.60", mfu,
      mfu is not None and mfu >= 0.6)
  runs = _get(parts, "train_step", "smollm2_135m", "sweep") or []
  mfu_c = max((r["mfu_cpu_normalised"] for r in runs if "mfu_cpu_normalised" in r), default=None)
  add("train_step smollm2 MFU (CPU-time normalised, best of sweep)", ">= 0.60", mfu_c,
      mfu_c is not None and mfu_c >= 0.6)
  rows = {r["batch"]: r for r in (_get(parts, "sampler", "batches") or [])}
  sp = _get(rows, 16, "speedup_vs_transformers_decode")
  add("sampler decode speed-up vs transformers at batch 16", ">= 3.0", sp,
      sp is not None and sp >= 3.0)
  fr = _get(rows, 1, "bandwidth_bound", "fraction_of_bound")
  add("sampler batch-1 fraction of the bandwidth bound", ">= 0.70", fr,
      fr is not None and fr >= 0.7)
  sc = _get(parts, "sleep_compile_cache", "speedup")
  add("later sleep's consolidation, step memo kept vs emptied", ">= 2.0", sc,
      sc is not None and sc >= 2.0)
  dt = _get(parts, "dream_trials", "speedup")
  add("dream trials vmapped speed-up, m=16", ">= 4.0", dt, dt is not None and dt >= 4.0)
  sh = _get(parts, "sharding", "ratio_to_ideal_args_temps_outputs")
  add("FSDP 8 devices per-device memory / ideal 1/8", "<= 1.5", sh, sh is not None and sh <= 1.5)
  return out


def _fmt(x, spec=".3g"):
  if x is None:
    return "-"
  if isinstance(x, float):
    return format(x, spec)
  return str(x)


def summary_markdown(res: Dict[str, Any]) -> str:
  parts, m = res["parts"], res["machine"]
  lines = [f"Machine: {m.get('cpu_model', m['device_kind'])}, {m['cpu_count']} cores, "
           f"backend {m['backend']}, jax {m['jax_version']}, load average at start "
           f"{_fmt(_get(m, 'load_average', 0), '.1f')}", "",
           "| part | measure | value |", "| --- | --- | --- |"]
  mp = parts.get("matmul_peak") or {}
  for dt, v in (mp.get("best_gflops") or {}).items():
    lines.append(f"| matmul_peak | best {dt} GFLOP/s | {v:.1f} |")
  bw = mp.get("memory_bandwidth")
  if bw:
    lines.append(f"| matmul_peak | memory bandwidth GB/s (read / copy) | "
                 f"{bw['sum_read_GBps']:.1f} / {bw['copy_GBps']:.1f} |")
  ts = parts.get("train_step") or {}
  for name in ("smollm2_135m", "tiny"):
    b = _get(ts, name, "best")
    if b:
      lines.append(f"| train_step {name} | best: remat={b['remat']} {b['batch']}x{b['seq']} | "
                   f"{b['tokens_per_s']:.0f} tok/s, {b['step_s']:.2f} s/step, MFU "
                   f"{b['mfu']:.1%} (CPU-normalised {b['mfu_cpu_normalised']:.1%}, CPU "
                   f"utilisation {b['cpu_util']:.2f}) |")
  prof = _get(ts, "smollm2_135m", "profile")
  if prof and "forward_s" in prof:
    lines.append(f"| train_step smollm2_135m | forward / forward+backward / LM head+CE fwd+bwd "
                 f"(s); backward/forward | {prof['forward_s']:.2f} / "
                 f"{prof['forward_backward_s']:.2f} / {prof['lm_head_loss_fwd_bwd_s']:.2f}; "
                 f"{prof['backward_over_forward']:.2f} |")
    cats = _get(prof, "op_profile_step", "by_category_fraction") or {}
    if cats:
      lines.append("| train_step smollm2_135m | op time by category (trace) | " + ", ".join(
          f"{k} {v:.0%}" for k, v in list(cats.items())[:5]) + " |")
  for r in _get(parts, "sampler", "batches") or []:
    hf = r.get("transformers", {})
    extra = ""
    if "decode_tokens_per_s" in hf:
      extra = (f"; transformers {hf['decode_tokens_per_s']:.1f} tok/s "
               f"(x{r['speedup_vs_transformers_decode']:.2f} decode, "
               f"x{r['speedup_vs_transformers_end_to_end']:.2f} end-to-end)")
    bb = r.get("bandwidth_bound")
    if bb:
      extra += (f"; bound {bb['bound_tokens_per_s']:.1f} tok/s, "
                f"{bb['fraction_of_bound']:.0%} of it")
    lines.append(f"| sampler batch {r['batch']} | decode tok/s; prefill s | "
                 f"{r['decode_tokens_per_s']:.1f}; {r['prefill_s']:.3f}{extra} |")
  op = parts.get("on_policy_step") or {}
  if "parts_s" in op:
    ps = op["parts_s"]
    lines.append(f"| on_policy_step tiny b{op['batch']} | iteration s (sample / teacher / "
                 f"assemble / update) | {op['iteration_s']:.3f} ({ps['sample']:.3f} / "
                 f"{ps['teacher_forward']:.3f} / {ps['assemble']:.3f} / "
                 f"{ps['student_update']:.3f}); seed_knowledge step "
                 f"{_fmt(op.get('seed_knowledge_step_s'))} s |")
  lw = op.get("logits_window") or {}
  if "student_grad_speedup" in lw:
    lines.append(f"| on_policy_step {lw['model']} b{lw['batch']} prompt {lw['prompt_len']} + "
                 f"{lw['new_tokens']} | head over the whole sequence / the completion window: "
                 f"teacher forward, student gradient (time; compiled memory) | "
                 f"x{lw['teacher_forward_speedup']:.2f}, x{lw['student_grad_speedup']:.2f}; "
                 f"x{lw['teacher_forward_memory_ratio']:.1f}, "
                 f"x{lw['student_grad_memory_ratio']:.1f} |")
  sc = parts.get("sleep_compile_cache") or {}
  if "speedup" in sc:
    lines.append(f"| sleep_compile_cache tiny | first / later sleep s, memo kept / emptied, "
                 f"speed-up | {sc['first_sleep_s']:.2f} / {sc['later_sleep_cached_s']:.2f} / "
                 f"{sc['later_sleep_uncached_s']:.2f}, x{sc['speedup']:.2f} |")
  dt = parts.get("dream_trials") or {}
  if "speedup" in dt:
    lines.append(f"| dream_trials m={dt['m']} | vmapped / sequential s, speed-up | "
                 f"{dt['vmapped_s']:.3f} / {dt['sequential_s']:.3f}, x{dt['speedup']:.2f} |")
  sh = parts.get("sharding") or {}
  if "devices_8" in sh:
    g = lambda n: sh[f"devices_{n}"]["memory_per_device"]["args_temps_outputs"] / 2 ** 30
    lines.append(f"| sharding {sh['params'] / 1e9:.2f}B params | per-device GiB 1 dev / 8 dev, "
                 f"ratio to ideal 1/8 | {g(1):.2f} / {g(8):.2f}, "
                 f"{sh['ratio_to_ideal_args_temps_outputs']:.2f} |")
  for name, e in (res.get("errors") or {}).items():
    lines.append(f"| {name} | error | {e.strip().splitlines()[-1][:120]} |")
  lines += ["", "| target | goal | measured | met |", "| --- | --- | --- | --- |"]
  for t in res.get("targets", []):
    met = {True: "yes", False: "no", None: "not run"}[t["met"]]
    lines.append(f"| {t['name']} | {t['target']} | {_fmt(t['measured'])} | {met} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------------
PARTS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "matmul_peak": part_matmul_peak,
    "train_step": part_train_step,
    "sampler": part_sampler,
    "on_policy_step": part_on_policy_step,
    "sleep_compile_cache": part_sleep_compile_cache,
    "dream_trials": part_dream_trials,
    "sharding": part_sharding,
}


def parse_only(values: Optional[Sequence[str]]) -> List[str]:
  if not values:
    return list(PARTS)
  names = [n.strip() for v in values for n in v.split(",") if n.strip()]
  unknown = [n for n in names if n not in PARTS]
  if unknown:
    raise SystemExit(f"unknown part(s) {unknown}; valid: {list(PARTS)}")
  return [n for n in PARTS if n in names]  # canonical order (matmul_peak first)


def run(only: Sequence[str], quick: bool = False) -> Dict[str, Any]:
  start = time.time()
  res: Dict[str, Any] = {"schema": SCHEMA, "command": " ".join(["python -m sleep_jax.bench"]
                                                               + sys.argv[1:]),
                         "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                         "quick": quick, "machine": machine_info(), "parts": {}, "part_wall_s": {},
                         "errors": {}}
  ctx = Context(quick, res["parts"])
  for name in only:
    print(f"[bench] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
      res["parts"][name] = PARTS[name](ctx)
    except Exception:
      res["errors"][name] = traceback.format_exc()
      res["parts"][name] = {"error": traceback.format_exc().strip().splitlines()[-1]}
      print(res["errors"][name], file=sys.stderr, flush=True)
    res["part_wall_s"][name] = time.perf_counter() - t0
    print(f"[bench] {name} done in {res['part_wall_s'][name]:.1f}s", flush=True)
  res["targets"] = targets(res["parts"])
  res["wall_s"] = time.time() - start
  return res


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m sleep_jax.bench",
                               description="sleep_jax performance benchmarks (see module doc)")
  ap.add_argument("--out", default="bench.json", help="JSON file to write")
  ap.add_argument("--only", action="append", help=f"part(s) to run, repeatable or comma "
                                                  f"separated; default all of {list(PARTS)}")
  ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  ap.add_argument("--markdown", default=None, help="also write the summary table here")
  ap.add_argument("--_sharding_worker", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--_batch", type=int, default=8, help=argparse.SUPPRESS)
  ap.add_argument("--_seq", type=int, default=1024, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._sharding_worker:
    r = sharding_memory(args._sharding_worker, args.quick, args._batch, args._seq)
    print(json.dumps(_jsonable(r)))
    return 0
  res = run(parse_only(args.only), quick=args.quick)
  with open(args.out, "w") as f:
    json.dump(_jsonable(res), f, indent=1)
  try:
    table = summary_markdown(res)
  except Exception:
    table = "summary table failed:\n" + traceback.format_exc()
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  print(table)
  print(f"[bench] wrote {args.out} ({res['wall_s']:.0f}s)")
  return 1 if res["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
