"""Does one consolidation store the chunk's facts? Closed-book exact match of the student on the
chunk's *training* and *held-out* question wordings before and after one sleep, the in-context
teacher's accuracy on the training wordings, and the retention probes (old facts, reading).

    python experiments/knowledge_incorporation/probe_consolidation.py STEPS [key=json ...]
        [--variant=recall] [--out=FILE.jsonl]
    # e.g. 240 consolidation.optimizer.lr=0.03 consolidation.lam=0.0

``--variant`` picks the knowledge config variant (default: questions); ``--out`` appends one JSON
line (the overrides, before and after) per run, for ``plot_tradeoff.py``.

Uses a knowledge config (chunk 0 of the world, its base model, method ``sleep_no_dream``: the
consolidation phase alone, or ``--method=sft_questions`` etc.: that method's learning phase);
the workdir is /tmp/probe_consolidation_<variant>.
"""

import dataclasses
import json
import sys
import time

from sleep_jax.configs import knowledge
from sleep_jax.eval import answers
from sleep_jax.model import transformer
from sleep_jax.sleep import cycle, phases
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import make_setup


def override(c, kv: str) -> None:
  key, value = kv.split("=", 1)
  *head, last = key.split(".")
  node = c
  for h in head:
    node = node[h]
  node[last] = json.loads(value)


def main(argv):
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  argv = [a for a in argv if not a.startswith("--")]
  steps, overrides = int(argv[0]), argv[1:]
  c = knowledge.get_config(opts.get("variant", "questions"))
  c.world_chunks = 1
  c.consolidation.steps = c.sft.steps = steps  # the learning phase's steps, whichever it is
  for kv in overrides:
    override(c, kv)
  setup = make_setup(c, f"/tmp/probe_consolidation_{opts.get('variant', 'questions')}",
                     log=lambda *a: None)
  last = {}  # the learning phase's last step metrics (gate openings, losses)
  ctx = dataclasses.replace(cycle.context(c, setup, opts.get("method", "sleep_no_dream"), 0),
                            log_step=lambda phase, t, m: last.update(m))
  docs = setup.chunks[0]

  def report(st, tag):
    out = {}
    for train in (True, False):
      _, _, sc = answers.answer(setup, st.params, st.slot_mask, docs, c.eval, in_context=False,
                                train=train)
      out["student_train_wordings" if train else "student_heldout_wordings"] = round(
          float(sc["em"].mean()), 3)
    _, _, sc = answers.answer(setup, st.params, st.slot_mask, docs, c.eval, in_context=True,
                              train=True)
    out["teacher_train_wordings"] = round(float(sc["em"].mean()), 3)
    out.update({k: round(v, 3) for k, v in
                answers.retention(setup, st.params, st.slot_mask, c.eval).items()})
    print(tag, json.dumps(out), flush=True)
    return out

  st = SleepState(setup.params, transformer.slot_mask_none(setup.cfg))
  before = report(st, "before")
  t0 = time.perf_counter()
  st, m = phases.consolidate(st, ctx, 0)
  seconds = time.perf_counter() - t0
  print(f"{ctx.name}: {seconds:.0f} s, last step "
        + json.dumps({k: round(v, 4) for k, v in last.items()}), flush=True)
  after = report(st, f"after {steps} steps {overrides}")
  if "out" in opts:
    with open(opts["out"], "a") as f:
      f.write(json.dumps({"method": ctx.name, "steps": steps, "overrides": overrides,
                          "variant": opts.get("variant", "questions"), "seconds": round(seconds, 1),
                          "before": before, "after": after}) + "\n")


if __name__ == "__main__":
  main(sys.argv[1:])
