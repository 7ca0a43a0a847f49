"""Targets, the summary table, the part table and the command line of ``python -m sleep_jax.bench``."""


import argparse
import datetime
import json
import math
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from sleep_jax.bench.harness import SCHEMA, machine_info
from sleep_jax.bench.matmul import Context, part_matmul_peak
from sleep_jax.bench.train_step import part_train_step
from sleep_jax.bench.sampler import part_sampler
from sleep_jax.bench.sleep_step import part_sleep_step
from sleep_jax.bench.sleep_parts import (part_dream_trials, part_on_policy_step,
                                         part_sleep_compile_cache)
from sleep_jax.bench.sharding import part_sharding, sharding_memory


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

  def add(name, goal, measured, ok, valid=True):
    """``valid`` False: measured while other processes took the cores; not judged."""
    out.append({"name": name, "target": goal, "measured": measured,
                "met": None if measured is None or valid is False else bool(ok),
                **({"invalid": "cores shared with other processes"} if valid is False else {})})

  mfu = _get(parts, "train_step", "smollm2_135m", "best", "mfu")
  add("train_step smollm2 MFU (CPU, wall time vs measured matmul peak)", ">= 0.60", mfu,
      mfu is not None and mfu >= 0.6)
  runs = _get(parts, "train_step", "smollm2_135m", "sweep") or []
  if all(r.get("dtype", "float32") == "float32" for r in runs):  # CPU: host time is step time
    mfu_c = max((r["mfu_cpu_normalised"] for r in runs if "mfu_cpu_normalised" in r),
                default=None)
    add("train_step smollm2 MFU (CPU-time normalised, best of sweep)", ">= 0.60", mfu_c,
        mfu_c is not None and mfu_c >= 0.6)
  g = _get(parts, "train_step", "one_b", "best", "mfu_vs_published_peak")
  if g is not None:  # accelerators only
    add("train_step 1B MFU vs the chip's published bf16 peak (GPU)", ">= 0.40", g, g >= 0.4)
  ms = _get(parts, "train_step", "masked_slots", "ratio")
  add("train step with every slot masked / built without slots", "<= 1.03", ms,
      ms is not None and ms <= 1.03)
  rows = {r["batch"]: r for r in (_get(parts, "sampler", "batches") or [])}
  for b, goal in ((16, 2.0), (64, 1.5)):
    sp = _get(rows, b, "speedup_vs_transformers_decode")
    valid = _get(rows, b, "ratio_valid")
    add(f"sampler decode speed-up vs transformers at batch {b} (both sides alternated, "
        "each with >= 90% of the cores)", f">= {goal}", sp,
        sp is not None and sp >= goal, valid=valid)
  fr = _get(rows, 1, "bandwidth_bound", "fraction_of_bound")
  add("sampler batch-1 fraction of the bandwidth bound (the model's own weights)", ">= 0.85",
      fr, fr is not None and fr >= 0.85)
  ss = _get(parts, "sleep_step", "step_over_bound")
  add("sleep_step (SmolLM2 shape): consolidation step / its lower bound from the same run's roofs",
      "<= 1.5", ss, ss is not None and ss <= 1.5)
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
  for name in ("smollm2_135m", "tiny", "one_b"):
    b = _get(ts, name, "best")
    if b:
      lines.append(f"| train_step {name} | best: remat={b['remat']} {b['batch']}x{b['seq']} | "
                   f"{b['tokens_per_s']:.0f} tok/s, {b['step_s']:.2f} s/step, MFU "
                   f"{b['mfu']:.1%}" + (
                       f" (CPU-normalised {b['mfu_cpu_normalised']:.1%}, CPU utilisation "
                       f"{b['cpu_util']:.2f})" if b.get("dtype", "float32") == "float32"
                       else " of the measured matmul peak")
                   + (f", {b['mfu_vs_published_peak']:.1%} of the published peak"
                      if "mfu_vs_published_peak" in b else "") + " |")
  ms = ts.get("masked_slots") or {}
  if "ratio" in ms:
    lines.append(f"| train_step masked slots {ms['batch']}x{ms['seq']} | step s: no slots / all "
                 f"masked, ratio | {ms['no_slots_step_s']:.3f} / {ms['all_masked_step_s']:.3f}, "
                 f"x{ms['ratio']:.3f} |")
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
               f"x{r['speedup_vs_transformers_end_to_end']:.2f} end-to-end"
               + ("" if r.get("ratio_valid") else ", INVALID: cores shared") + ")")
    bb = r.get("bandwidth_bound")
    if bb:
      extra += (f"; bound {bb['bound_tokens_per_s']:.1f} tok/s, "
                f"{bb['fraction_of_bound']:.0%} of it")
      if bb.get("matvec_bound_tokens_per_s"):
        extra += f" (at XLA's matvec rate {bb['matvec_bound_tokens_per_s']:.1f} tok/s)"
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
  ss = parts.get("sleep_step") or {}
  if "parts_s" in ss:
    ps, lb = ss["parts_s"], ss["lower_bound_parts_s"]
    lines.append(f"| sleep_step b{ss['batch']} context {ss['context_len']} + "
                 f"{ss['new_tokens']} new | step s (sample / teacher / rewards / update / host); "
                 f"lower bound | {ss['step_s']:.3f} (" + " / ".join(
                     f"{ps[k]:.3f}" for k in ("sample", "teacher_forward", "rewards",
                                              "student_update", "host")) + f"); "
                 f"{ss['lower_bound_s']:.3f} (" + " / ".join(
                     f"{lb[k]:.3f}" for k in ("sample", "teacher_forward", "student_update"))
                 + f"), x{ss['step_over_bound']:.1f} (teacher over the whole prompt: "
                 f"{ss['lower_bound_whole_prompt_s']:.3f}) |")
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
    met = "invalid (cores shared)" if "invalid" in t else {True: "yes", False: "no",
                                                          None: "not run"}[t["met"]]
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
    "sleep_step": part_sleep_step,
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
