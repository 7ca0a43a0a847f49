"""``sampler``: greedy decode tokens/s against the bandwidth bound and the Hugging Face peer."""


import json
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.bench.flops import matmul_params
from sleep_jax.bench.harness import measure, op_profile
from sleep_jax.bench.matmul import Context
from sleep_jax.bench.train_step import _count



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


class _Peer:
  """The ``transformers`` peer (``hf_peer.py``) in a child process: ``generate(prompts, n)``
  returns its greedy tokens; ``pid`` lets ``measure`` count its CPU time."""

  def __init__(self, path: str):
    import subprocess
    import sys
    self.proc = subprocess.Popen([sys.executable, "-m", "sleep_jax.bench.hf_peer", path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
    self.pid = self.proc.pid
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the transformers peer exited before it was ready (is torch installed? "
                         "pip install -e '.[reference]')")
    self.info = json.loads(line)

  def generate(self, prompts: np.ndarray, n: int) -> np.ndarray:
    self.proc.stdin.write(json.dumps({"prompts": prompts.tolist(), "n": n}) + "\n")
    self.proc.stdin.flush()
    return np.asarray(json.loads(self.proc.stdout.readline())["tokens"])

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


# transformers generate is compared at these batches.
HF_BATCHES = (1, 16, 64)
# A peer ratio is valid when each side had at least this share of the cores (``measure``).
VALID_FREE_CORES = 0.9


def _round(one, full, reps: int, pid=None) -> Dict[str, Any]:
  """One round of one side: the best of ``reps`` calls of ``one`` (1 new token) and of ``full``
  (N new tokens), with what the cores did meanwhile (``measure``; ``pid``: the side's process
  when it is not this one)."""
  m = measure([one] * reps + [full] * reps, pid=pid)
  return {"t1_s": min(m["walls_s"][:reps]), "tN_s": min(m["walls_s"][reps:]),
          "cpu_util": m["cpu_util"], "free_cores": m["free_cores"]}


def _summary(rows, n_new: int, batch: int) -> Dict[str, Any]:
  """One side's rounds as medians: decode step = (t(N) - t(1)) / (N - 1) per round."""
  for x in rows:
    x["decode_step_s"] = (x["tN_s"] - x["t1_s"]) / (n_new - 1)
  step = float(np.median([x["decode_step_s"] for x in rows]))
  total = float(np.median([x["tN_s"] for x in rows]))
  frees = [x["free_cores"] for x in rows if x["free_cores"] is not None]
  return {"rounds": rows, "decode_step_s": step,
          "prefill_s": float(np.median([x["t1_s"] for x in rows])) - step, "total_s": total,
          "decode_tokens_per_s": batch / step, "end_to_end_tokens_per_s": batch * n_new / total,
          "free_cores_min": min(frees) if frees else None}


def part_sampler(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.model import sampler
  cfg, params, source = _smollm2(ctx.quick)
  P = 16 if ctx.quick else 32
  N = 8 if ctx.quick else 24
  batches = (1,) if ctx.quick else (1, 16, 64)
  rng = np.random.default_rng(0)
  out: Dict[str, Any] = {"model": source, "prompt_len": P, "new_tokens": N, "greedy": True,
                         "params": _count(cfg)}
  # Bytes read per decode step: the model's own parameters (masked slots are skipped; the
  # unembedding reads the whole embedding table) + the KV cache.
  n_params = _count(cfg)
  bpe = jnp.dtype(cfg.param_dtype).itemsize
  weight_bytes = n_params * bpe
  slot_bytes = matmul_params(cfg, executed=True)["masked_slots"] * bpe

  peer, hf_err = None, None
  if source["weights"] == "gguf" and not ctx.quick:
    try:
      peer = _Peer(source["path"])
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

    first = {n: measure([lambda n=n: run(n)])["walls_s"][0] for n in (1, N)}  # compiles
    hf = None
    if peer is not None and B in HF_BATCHES:
      hf = {n: (lambda n=n: peer.generate(prompts, n)) for n in (1, N)}
      hf[1]()  # torch needs no compilation: one warm-up call
    # The two sides alternate, round by round, so that a change of load hits both.
    rounds = 2 if B >= 64 else 3
    reps = 1 if B >= 16 else 3
    ours, theirs = [], []
    for _ in range(rounds):
      ours.append(_round(lambda: run(1), lambda: run(N), reps))
      if hf is not None:
        theirs.append(_round(hf[1], hf[N], 1, pid=peer.pid))
    r = _summary(ours, N, B)
    r.update({"batch": B, "first_call_s": first[N], "rounds_alternated": rounds})
    if B == 1:
      cache_bytes = 2 * cfg.n_layers * (P + N) * cfg.n_kv_heads * cfg.hd * 4
      own = weight_bytes - slot_bytes  # the masked slots are not the model's weights
      bw = ctx.bandwidth_gbps() * 1e9
      mv = ctx.results["matmul_peak"]["memory_bandwidth"].get("matvec_GBps")
      r["bandwidth_bound"] = {
          "bytes_per_token": own + cache_bytes, "weight_bytes": own,
          "masked_slot_bytes_not_counted": slot_bytes, "kv_cache_bytes": cache_bytes,
          "measured_bandwidth_GBps": bw / 1e9,
          "bound_tokens_per_s": bw / (own + cache_bytes),
          "fraction_of_bound": r["decode_tokens_per_s"] / (bw / (own + cache_bytes)),
          "matvec_GBps": mv,
          "matvec_bound_tokens_per_s": mv * 1e9 / (own + cache_bytes) if mv else None,
          "note": "bound = bandwidth / (the model's own fp32 weights + KV cache) per decode "
                  "step; matvec bound: the same at the rate XLA's dot reads weights at batch 1"}
      if not ctx.quick:
        try:
          hlo = sampler.sample.lower(params, toks, valid, jax.random.key(0), cfg=cfg,
                                     max_new_tokens=N, greedy=True).compile().as_text()
        except Exception:  # pragma: no cover
          hlo = None
        prof = op_profile(lambda: run(N), hlo)
        prof["op_events_per_decode_step"] = prof["op_events"] / N
        prof["wall_per_op_event_us"] = r["total_s"] / max(prof["op_events"], 1) * 1e6
        r["op_profile"] = prof
    if hf is not None:
      h = _summary(theirs, N, B)
      ours_tok = np.asarray(run(N))[:, P:]
      h["greedy_token_agreement"] = float(np.mean(ours_tok == hf[N]()))
      r["transformers"] = h
      r["speedup_vs_transformers_decode"] = r["decode_tokens_per_s"] / h["decode_tokens_per_s"]
      r["speedup_vs_transformers_end_to_end"] = h["total_s"] / r["total_s"]
      frees = [x for x in (r["free_cores_min"], h["free_cores_min"]) if x is not None]
      r["ratio_valid"] = bool(frees) and min(frees) >= VALID_FREE_CORES
    rows.append(r)
    print(f"  sampler batch {B}: decode {r['decode_tokens_per_s']:.1f} tok/s"
          + (f", transformers {r['transformers']['decode_tokens_per_s']:.1f}"
             f" ({'valid' if r['ratio_valid'] else 'INVALID: cores shared'})"
             if "transformers" in r else ""), flush=True)
  out["batches"] = rows
  if peer is not None:
    peer.close()
    out["transformers"] = {**{k: v for k, v in peer.info.items() if k != "ready"},
                           "dtype": "float32", "process": "its own (sleep_jax.bench.hf_peer)",
                           "call": "generate(greedy, min_new_tokens=max_new_tokens=N)"}
  else:
    out["transformers"] = {"skipped": hf_err}
  out["timing"] = ("decode_step_s = (t(N) - t(1)) / (N - 1), prefill_s = t(1) - decode_step_s "
                   "(our sampler runs one decode forward per emitted token); transformers: "
                   "prefill = t(max_new_tokens=1). The two sides alternate in rounds; figures "
                   "are medians over rounds; a ratio is valid when every round of both sides "
                   f"had >= {VALID_FREE_CORES:.0%} of the cores free of other processes")
  return out
