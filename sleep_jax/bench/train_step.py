"""``train_step``: the LM train step at the SmolLM2-135M and tiny shapes, sweep and sub-part profile."""


import dataclasses
import math
import statistics
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.bench.flops import TRAIN_FLOPS_FORMULA, _cost_flops, train_flops
from sleep_jax.bench.harness import (_is_accelerator, cpu_rate, measure, op_profile,
                                     published_peak_tflops, timeit)
from sleep_jax.bench.matmul import Context



# ----------------------------------------------------------------------------------------------
# train_step.
# ----------------------------------------------------------------------------------------------
def _train_setup(cfg, batch: int, seq: int, seed: int = 0):
  import ml_collections
  from sleep_jax.losses import lm as lm_losses
  from sleep_jax.model import transformer
  from sleep_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
  opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.95,
                                       weight_decay=0.0, grad_clip=1.0))
  # As the LM job builds it: every slot masked, the slot arrays frozen (not differentiated).
  tx, trainable = opt_lib.with_masked_slots_frozen(opt_lib.make_optimizer(opt), cfg)
  extras = {"slot_mask": np.asarray(transformer.slot_mask_none(cfg))}
  state, _ = state_lib.create_train_state(seed, lambda r: transformer.init(r, cfg), tx,
                                          trainable=trainable, extras=extras)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  data = {"tokens": tokens, "valid": jnp.ones((batch, seq), bool),
          "loss_mask": jnp.ones((batch, seq), bool)}
  step = step_lib.make_train_step(lm_losses.make_lm_loss(cfg), tx,
                                  differentiate=state_lib.trainable_arrays(trainable))
  return state, data, step, lm_losses.make_lm_loss(cfg)


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
  from sleep_jax.losses import lm as lm_losses
  loss_fn = lm_losses.make_lm_loss(cfg)
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

  head_name = "embed" if cfg.tie_embeddings else "unembed"

  def head_loss(h, w):
    logits = transformer.unembed({head_name: w}, h, cfg)  # the model's own output head
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)

  head = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  th = timeit(lambda: head(hidden, params[head_name]), repeats)
  out["lm_head_loss_fwd_bwd_s"] = th["best_s"]
  head_flops = 6 * cfg.d_model * cfg.vocab_size * batch * seq
  out["lm_head_loss_gflops_cpu_normalised"] = cpu_rate(head_flops, th) / 1e9
  return out


def part_train_step(ctx: Context) -> Dict[str, Any]:
  from sleep_jax.bench.sharding import one_b_config  # sharding imports this module
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
                               [("none", 16, 512), ("none", 32, 512), ("dots", 64, 512)]),
              "tiny": (mcfg.tiny(dtype=dtype), [("none", 256, 256)]),
              # The ~1B Llama-style shape of the sharding part: the GPU MFU target's shape.
              "one_b": (dataclasses.replace(one_b_config(), dtype=dtype),
                        [("dots", 16, 1024), ("none", 16, 1024)])}
  else:
    shapes = {"smollm2_135m": (mcfg.smollm2_135m(dtype=dtype),
                               [("none", 8, 256), ("dots", 8, 256), ("full", 8, 256)]),
              "tiny": (mcfg.tiny(dtype=dtype), [("none", 64, 64), ("dots", 64, 64),
                                                 ("none", 32, 256)])}
  # The best of 3 steps after the compiling call, as every other timing here (one step alone
  # ran up to 1.4x a standalone run's best of 4 on CPU).
  steps = 1 if ctx.quick else 3
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
  shape = mcfg.tiny if ctx.quick else mcfg.smollm2_135m
  out["masked_slots"] = _masked_vs_no_slots(shape(dtype=dtype, remat="none"),
                                            *((4, 32) if ctx.quick else (4, 128)))
  return out


def _masked_vs_no_slots(cfg, batch: int, seq: int, rounds: int = 3, block: int = 3
                        ) -> Dict[str, Any]:
  """Step time of a model whose slots are all masked against the same model built without
  slots (what masked capacity costs a job that does not use it): both steps compiled, then
  run alternately in ``rounds`` blocks of ``block`` steps (medians). The first step of each
  block is dropped: right after the other model's steps it ran 1.3-1.4x slower (both models'
  temporaries re-allocated), which a job training one model never sees. Each block records
  the cores' share left to it (``harness.measure``)."""
  runs = {}
  for name, c in (("no_slots", dataclasses.replace(cfg, n_slots=0)), ("all_masked", cfg)):
    keep: Dict[str, Any] = {}
    _time_train(c, batch, seq, steps=1, keep=keep)
    runs[name] = keep["run"]
  walls: Dict[str, list] = {name: [] for name in runs}
  free = []
  for _ in range(rounds):
    for name, run in runs.items():
      m = measure([run] * block)
      walls[name].extend(m["walls_s"][1:])
      free.append(m["free_cores"])
  med = {name: statistics.median(w) for name, w in walls.items()}
  ratio = med["all_masked"] / med["no_slots"]
  print(f"  train_step masked slots: {ratio:.3f}x the step without slots", flush=True)
  return {"batch": batch, "seq": seq, "n_slots": cfg.n_slots, "slot_rank": cfg.slot_rank,
          "rounds": rounds, "block": block, "no_slots_step_s": med["no_slots"],
          "all_masked_step_s": med["all_masked"], "walls_s": walls, "ratio": ratio,
          "min_free_cores": min((f for f in free if f is not None), default=None)}


def _count(cfg) -> int:
  from sleep_jax.model import transformer
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(transformer.param_shapes(cfg))))
