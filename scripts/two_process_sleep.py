"""A tiny sleep (a consolidation into a new slot, then a dreaming round with ReST-EM) run by
several JAX processes over localhost.

    python scripts/two_process_sleep.py --out ref.npz                            # one process
    python scripts/two_process_sleep.py --out two.npz --processes 2 --process_id 0 --port P &
    python scripts/two_process_sleep.py --out two.npz --processes 2 --process_id 1 --port P

With ``--processes N`` every process owns one CPU device, ``jax.distributed`` connects them (CPU
collectives over gloo) and the model is sharded over a (data=1, fsdp=1, tensor=N) mesh spanning
the processes; process 0 writes the slept parameters. ``tests/test_multiprocess.py`` checks that
they equal the one-process result.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# One CPU device per process (before jax is imported).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--port", type=int, default=12355)
  a = ap.parse_args()
  if a.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{a.port}", num_processes=a.processes,
                               process_id=a.process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  import tiny_kv as kv
  from sleep_jax.model import transformer
  from sleep_jax.parallel import mesh as mesh_lib
  from sleep_jax.sleep import consolidation, dream_inputs, dreaming

  params = transformer.init(jax.random.key(0), kv.CFG)
  facts = kv.facts(4, seed=3)
  teacher = [kv.with_context(k, v, q) for k, v in facts for q in kv.TRAIN_Q]
  student = [kv.closed_book(k, q) for k, v in facts for q in kv.TRAIN_Q]
  kcfg = consolidation.default_config()
  kcfg.update(dict(steps=3, batch_size=4, max_new_tokens=2, teacher_samples=1, gamma=0.0,
                   alpha=1.0, lam=0.5, divergence="fkl", target_level=1))
  kcfg.optimizer.lr = 1e-2
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": a.processes})
  with mesh_lib.use_mesh(mesh) if a.processes > 1 else contextlib.nullcontext():
    if a.processes > 1:
      params = jax.device_put(params, mesh_lib.param_shardings(kv.CFG, mesh))
    res = consolidation.consolidate(params, transformer.slot_mask_none(kv.CFG), kv.CFG, teacher,
                                    student, kcfg, jax.random.key(1), stop_tokens=(kv.EOS,))
    # One dreaming round: sampled dreams, gradient scores, vmapped LoRA trials, ReST-EM.
    dcfg = dreaming.default_config()
    dcfg.update(dict(rounds=1, m=4, k=2, b=1, max_new_tokens=4, inner_steps=1, margin=-1e9))
    tau = dream_inputs.task_batch(student, [[v, kv.EOS] for k, v in facts for q in kv.TRAIN_Q],
                                 kv.EOS, 0)
    gen = dreaming.init_generator(jax.random.key(2), kv.CFG, 4, 8.0, ("q", "v"))
    dreams = dreaming.dream(res.params, kv.CFG, res.slot_mask, teacher[:2], tau,
                            jax.random.key(3), dcfg, generator=gen, stop_tokens=(kv.EOS,))
    out = {"params": res.params, "generator": dreams.generator.lora}
    if a.processes > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
  if jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    np.savez(a.out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
    print(f"wrote {a.out}: {len(flat)} arrays, slot {res.slot}, "
          f"loss {res.history[-1]['loss']:.4f}, dreams accepted {len(dreams)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
