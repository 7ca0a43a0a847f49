"""``sharding``: compiled per-device memory of a ~1B-parameter train step on 1 and 8 (fake)
devices with FSDP."""


import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.bench.flops import matmul_params
from sleep_jax.bench.matmul import Context
from sleep_jax.bench.train_step import _count



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
  from sleep_jax.losses import lm as lm_losses
  from sleep_jax.model import transformer
  from sleep_jax.parallel import mesh as mesh_lib
  from sleep_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
  devices = jax.devices()[:n_devices]
  if len(devices) < n_devices:
    raise RuntimeError(f"need {n_devices} devices, have {len(jax.devices())}")
  cfg = one_b_config(quick)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, grad_clip=1.0))
  tx = opt_lib.make_optimizer(opt)
  t0 = time.perf_counter()
  with mesh_lib.use_mesh(mesh):
    psh = mesh_lib.param_shardings(cfg, mesh)
    abstract, shardings = state_lib.abstract_train_state(
        0, lambda r: transformer.init(r, cfg), tx, mesh=mesh, param_shardings=psh,
        extras={"slot_mask": np.asarray(transformer.slot_mask_none(cfg))})
    bsh = mesh_lib.batch_sharding(mesh)
    data = {k: jax.ShapeDtypeStruct((batch, seq), dt, sharding=bsh)
            for k, dt in (("tokens", jnp.int32), ("valid", bool), ("loss_mask", bool))}
    step = step_lib.make_train_step(lm_losses.make_lm_loss(cfg), tx, state_shardings=shardings,
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
