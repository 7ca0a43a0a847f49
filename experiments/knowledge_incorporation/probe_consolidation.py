"""Does one consolidation store the chunk's facts? Closed-book exact match of the student on the
chunk's *training* and *held-out* question wordings before and after one sleep, and the
in-context teacher's accuracy on the training wordings.

    python experiments/knowledge_incorporation/probe_consolidation.py STEPS [key=json ...]
    # e.g. 240 consolidation.optimizer.lr=0.03

Uses the default knowledge config (chunk 0 of the world, the shipped base model, method
``sleep_no_dream``); the workdir is /tmp/probe_consolidation.
"""

import json
import sys

from sleep_jax.configs import knowledge
from sleep_jax.model import transformer
from sleep_jax.sleep import cycle


def main(argv):
  steps, overrides = int(argv[0]), argv[1:]
  c = knowledge.get_config("default")
  c.world_chunks = 1
  c.consolidation.steps = steps
  for kv in overrides:
    key, value = kv.split("=", 1)
    *head, last = key.split(".")
    node = c
    for h in head:
      node = node[h]
    node[last] = type(node[last])(json.loads(value))
  workdir = "/tmp/probe_consolidation"
  setup = cycle.make_setup(c, workdir, log=lambda *a: None)
  run = cycle.MethodRun(c, setup, "sleep_no_dream", 0, workdir, log=lambda *a: None)
  docs = setup.chunks[0]

  def report(params, mask, tag):
    out = {}
    for train in (True, False):
      _, _, sc = run.answer(params, mask, docs, in_context=False, train=train)
      out["student_train_wordings" if train else "student_heldout_wordings"] = round(
          float(sc["em"].mean()), 3)
    _, _, sc = run.answer(params, mask, docs, in_context=True, train=True)
    out["teacher_train_wordings"] = round(float(sc["em"].mean()), 3)
    print(tag, json.dumps(out), flush=True)

  mask0 = transformer.slot_mask_none(setup.cfg)
  report(setup.params, mask0, "before")
  params, mask, _, last = run.consolidation(setup.params, mask0, 0)
  print("last step", json.dumps({k: round(float(v), 4) for k, v in last.items()}))
  report(params, mask, f"after {steps} steps {overrides}")


if __name__ == "__main__":
  main(sys.argv[1:])
