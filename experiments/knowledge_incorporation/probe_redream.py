"""Dreaming again, with other dreaming settings, from the state a finished sleep ended in. When
that sleep accepted no dream, its final parameters are the ones its consolidation left, so its
dreaming phase can be re-run alone with, say, more dreams or another temperature, without the
consolidation's 30-40 CPU minutes; prints what the sleep would record (written, tried, accepted,
dream quality).

    python experiments/knowledge_incorporation/probe_redream.py WORKDIR \\
      --set model_slot_keys=40 --set model_slot_key_len=8 --set consolidation.steps=240 \\
      --set sft.steps=240 --set dreaming.m=20 [--set dreaming.temperature=0.7]

``--set`` takes the run's own overrides (every key but ``dreaming.*`` must match the finished
run's recorded config: it is checked) and the dreaming settings to try.
"""

import argparse
import ast
import json
import os
import time

from sleep_jax.configs import knowledge
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.sleep import cycle, dream_phase, run_records
from sleep_jax.tasks import make_setup


def finished_run(workdir: str, variant: str, method: str, seed: int, sets, free: str = ""):
  """(config, setup, context, the base's state, the run's final state) of a finished run.
  ``sets``: the run's own overrides as KEY=VALUE; every recorded key that does not start with
  ``free`` must match them."""
  c = knowledge.get_config(variant)
  for item in sets:
    key, _, value = item.partition("=")
    *parents, last = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value  # a string
  out = run_records.run_dir(workdir, method, seed)
  recorded = run_records.recorded_config(os.path.join(out, run_records.CONFIG_FILE))
  differ = [k for k in run_records.differing_keys(recorded, run_records.relevant_config(c))
            if not (free and k.startswith(free))]
  if differ:
    raise SystemExit(f"error: the finished run's config differs in {differ}; pass its overrides")
  setup = make_setup(c, workdir, log=lambda *a: None)
  ctx = cycle.context(c, setup, method, seed)
  base = cycle.fresh_state(ctx)
  st = cycle.restored_state(base, ckpt_lib.Checkpointer(f"{out}/ckpt", max_to_keep=2,
                                                         async_save=False))
  return c, setup, ctx, base, st


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("workdir")
  ap.add_argument("--variant", default="smollm2_docs")
  ap.add_argument("--method", default="sleep")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = ap.parse_args()
  _, _, ctx, _, st = finished_run(args.workdir, args.variant, args.method, args.seed, args.set,
                                  free="dreaming.")
  if any(i.get("dreams_accepted", 0) for i in st.info):
    raise SystemExit("error: that sleep accepted dreams; its final state is not its "
                     "consolidation's")
  t0 = time.perf_counter()
  _, info = dream_phase.dream(st, ctx, 0)
  print(json.dumps({**info, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
  main()
