"""``matmul_peak``: the fp32 (bf16 on accelerators) matmul ceiling and the memory bandwidth every
MFU and bound below is measured against."""


from typing import Any, Dict

import jax
import jax.numpy as jnp

from sleep_jax.bench.harness import (_cores, _is_accelerator, cpu_rate, published_peak_tflops,
                                     timeit)



# ----------------------------------------------------------------------------------------------
# matmul_peak (+ memory bandwidth).
# ----------------------------------------------------------------------------------------------
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


def part_matmul_peak(ctx: Context) -> Dict[str, Any]:
  sizes = (128, 256) if ctx.quick else (1024, 2048, 3072, 4096)
  if _is_accelerator() and not ctx.quick:
    sizes += (8192,)  # a GPU's bf16 peak needs products this large (4096 gives ~half)
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
  # What XLA's own dot reads at batch 1: a chain of vector-matrix products over distinct
  # matrices of the same total size (a decode step is such a chain).
  side = 512 if quick else 2048
  mats = [jnp.full((side, side), 1e-4 * (i + 1), jnp.float32) for i in range(n // side ** 2)]

  @jax.jit
  def matvec(ws, v):
    for w in ws:
      v = jnp.tanh(v @ w)
    return v

  tm = timeit(lambda: matvec(mats, jnp.ones((1, side), jnp.float32)), repeats=3,
              min_time=0.2 if quick else 1.0)
  return {"array_MiB": nbytes / 2 ** 20, "sum_read_GBps": read, "copy_GBps": cp,
          "best_GBps": max(read, cp), "matvec_GBps": nbytes / tm["best_s"] / 1e9,
          "note": "sum reads the array once; copy (x + 1) reads and writes it; best_GBps is the "
                  "larger, the conservative choice for a bound; matvec_GBps: a chain of (1, n) @ "
                  "(n, n) products over distinct matrices of the same total size (the rate XLA's "
                  "dot reads weights at batch 1)"}
