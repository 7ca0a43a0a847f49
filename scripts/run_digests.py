"""Parameter digests of every method on the three ``test`` variants: the check that a restructuring
changed no behaviour (two trees end in the same model iff every ``params_sha1`` is equal).

    python scripts/run_digests.py --out digests.json [--compare old.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from sleep_jax.configs import few_shot, knowledge, long_horizon
from sleep_jax.sleep import cycle

RUNS = (("knowledge.py:test", knowledge, knowledge.ALL_METHODS),
        ("few_shot.py:test", few_shot, few_shot.METHODS + ("base", "sft")),
        ("long_horizon.py:test", long_horizon, long_horizon.METHODS))


def digests() -> dict:
  out = {}
  for name, module, methods in RUNS:
    c = module.get_config("test")
    c.methods = tuple(methods)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
      res = cycle.run_experiment(c, work, log=lambda *_: None)
    for m, e in res["methods"].items():
      for seed, r in e["seeds"].items():
        out[f"{name} {m} seed {seed}"] = r["params_sha1"]
    print(f"{name}: {len(methods)} methods in {time.time() - t0:.0f} s", flush=True)
  return out


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--compare", default="")
  a = p.parse_args()
  d = digests()
  with open(a.out, "w") as f:
    json.dump(d, f, indent=1, sort_keys=True)
  if not a.compare:
    return 0
  with open(a.compare) as f:
    old = json.load(f)
  bad = [k for k in sorted(set(old) | set(d)) if old.get(k) != d.get(k)]
  for k in bad:
    print(f"DIFFERS {k}: {old.get(k)} -> {d.get(k)}")
  print(f"{len(d) - len(bad)} of {len(set(old) | set(d))} digests equal")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
