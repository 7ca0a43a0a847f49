"""Timing, op-level profiles, machine facts and the ``Context`` shared between parts: the
harness every part of ``python -m sleep_jax.bench`` runs in."""


import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import jax



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


def _machine_busy_s() -> Optional[float]:
  """CPU seconds the whole machine has been busy (every core, ``/proc/stat``), or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _proc_cpu_s(pid: int) -> float:
  """CPU seconds (user + system) process ``pid`` has used so far (``/proc/<pid>/stat``)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(fns: List[Callable[[], Any]], pid: Optional[int] = None) -> Dict[str, Any]:
  """Calls each of ``fns`` once, in order (compiled already), and returns their wall seconds
  with what the cores did meanwhile: the CPU seconds of the process doing the work (this one,
  or child process ``pid``) as ``cpu_util`` (its share of the cores) and ``free_cores``: the
  share of the cores every other process left it (from the machine's busy time, ``/proc/stat``;
  1.0 on an idle machine, None where unreadable). A peer ratio means something only when both
  sides had nearly all the cores."""
  own = (lambda: _proc_cpu_s(pid)) if pid else time.process_time
  here = (lambda: time.process_time()) if pid else (lambda: 0.0)
  b0, c0, h0 = _machine_busy_s(), own(), here()
  walls = []
  for fn in fns:
    t0 = time.perf_counter()
    _block(fn())
    walls.append(time.perf_counter() - t0)
  total, cpu, idle_parent = sum(walls), own() - c0, here() - h0
  b1 = _machine_busy_s()
  free = None
  if b0 is not None and b1 is not None:
    others = max(b1 - b0 - cpu - idle_parent, 0.0)
    free = max(0.0, 1.0 - others / (total * _cores()))
  return {"walls_s": walls, "cpu_util": cpu / total / _cores(), "free_cores": free}


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
