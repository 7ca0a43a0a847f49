"""``sampler``: greedy decode tokens/s against the bandwidth bound and the Hugging Face peer."""


import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.bench.flops import matmul_params
from sleep_jax.bench.harness import op_profile, timeit
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
