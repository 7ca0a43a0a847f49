"""What a (method, seed) run directory records, so that nothing is silently reused.

``runs/<method>/seed_<s>/`` holds the run's checkpoints, its ``result.json`` when finished, and
``config.json``: the *result-relevant* config it ran with, every key except the presentation ones
(``PRESENTATION_KEYS``: which methods and seeds an invocation runs, how a changed config is
handled, the device layout) and the memory ones (``BATCHING_KEYS``: how many items share one
vmap, and what a train step recomputes instead of storing; they bound memory and not what is
computed: ``tests/test_dreaming.py`` and ``tests/test_convert.py`` check the equality), so that a
run killed for memory resumes with a smaller group or more recomputation. A later invocation
reuses (or resumes) the run only when that config equals its own; otherwise it stops naming
the differing keys, or with ``--config.on_config_change=restart`` starts the run afresh.
``finished_runs`` lists every finished run of the workdir with the current config, for the
results table. The record also names how the run draws its random numbers (``RANDOM_NUMBERS``):
a run recorded under another scheme is not resumed or reused either, since its checkpoints and
results came from other draws.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator, List, Tuple

from sleep_jax.errors import UserError

PRESENTATION_KEYS = ("methods", "seeds", "on_config_change", "mesh", "distributed")
BATCHING_KEYS = ("dreaming.parallel_dreams", "model_remat")
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
# How a run's random numbers derive (``run_context.Context.key``); recorded with its config. Runs
# recorded before it drew from (seed, method, chunk, phase).
RANDOM_NUMBERS = "seed, chunk, phase"


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, "runs", method, f"seed_{seed}")


def flat_config(d, prefix="") -> Dict[str, object]:
  """{dotted key: value} of a nested config dict (e.g. a ``results.json``'s ``config``)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _relevant(flat: Dict[str, object]) -> Dict[str, object]:
  return {k: v for k, v in sorted(flat.items())
          if k.split(".")[0] not in PRESENTATION_KEYS and k not in BATCHING_KEYS}


def relevant_config(config) -> Dict[str, object]:
  """The flat {dotted key: value} of every result-relevant key, JSON-normalised, and the
  random-number scheme (``random_numbers``)."""
  flat = flat_config(json.loads(config.to_json_best_effort()))
  return _relevant({**flat, "random_numbers": RANDOM_NUMBERS})


def recorded_config(path: str) -> Dict[str, object]:
  """A run's recorded config, without the keys an older version also recorded."""
  with open(path) as f:
    return _relevant(json.load(f))


def differing_keys(a: Dict, b: Dict) -> List[str]:
  return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def check_or_claim(config, out_dir: str, name: str, seed: int, log=print) -> None:
  """Before a run starts or resumes in ``out_dir``: record the config (fresh directory), accept
  an equal record, or stop / restart (``config.on_config_change``) on a different one."""
  current = relevant_config(config)
  path = os.path.join(out_dir, CONFIG_FILE)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    recorded = None
    if os.path.exists(path):
      recorded = recorded_config(path)
    if recorded != current:
      keys = differing_keys(recorded or {}, current) if recorded is not None else []
      what = (f"keys {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} differ" if keys
              else "it has no recorded config (written by an older version)")
      if config.on_config_change == "restart":
        log(f"{name} seed {seed}: the config changed ({what}); restarting the run")
        shutil.rmtree(out_dir)
      else:
        first = keys[0] if keys else None
        diff = (f" (recorded {first}={(recorded or {}).get(first)!r}, now "
                f"{current.get(first)!r})" if first else "")
        raise UserError(f"{out_dir} was run with another config: {what}{diff}. Use a new "
                        "--workdir, or --config.on_config_change=restart to discard this run")
  os.makedirs(out_dir, exist_ok=True)
  if not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=0)
    os.replace(tmp, path)


def finished_runs(config, workdir: str) -> Iterator[Tuple[str, str, dict]]:
  """(method, seed, result) of every finished run in ``workdir`` whose config is the current."""
  root = os.path.join(workdir, "runs")
  current = relevant_config(config)
  for method in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for sd in sorted(os.listdir(os.path.join(root, method))):
      d = os.path.join(root, method, sd)
      if not (sd.startswith("seed_") and os.path.exists(os.path.join(d, RESULT_FILE))):
        continue
      try:
        same = recorded_config(os.path.join(d, CONFIG_FILE)) == current
      except (OSError, ValueError):
        same = False
      if same:
        with open(os.path.join(d, RESULT_FILE)) as f:
          yield method, sd[len("seed_"):], json.load(f)
