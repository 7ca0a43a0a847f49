"""What does a sleep do to the facts the base knew? After one learning phase on chunk 0 (the
``recall`` variant: base S and its storage levers), the retention probe's questions the base
answered right and now answers wrong, and how many of those wrong answers are gold values of the
chunk just learnt (a shift of the answer prior) rather than anything else.

    python experiments/knowledge_incorporation/probe_old_facts.py STEPS METHOD
    # e.g. 480 sleep_no_dream | 60 opsd | 60 sft_questions
"""

import collections
import json
import sys

from sleep_jax.configs import knowledge
from sleep_jax.eval import answers
from sleep_jax.model import transformer
from sleep_jax.sleep import cycle, phases
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.tasks import make_setup


def main(steps: int, method: str) -> None:
  c = knowledge.get_config("recall")
  c.world_chunks = 1
  c.consolidation.steps = c.sft.steps = steps
  setup = make_setup(c, "/tmp/probe_consolidation_recall", log=lambda *a: None)
  ctx = cycle.context(c, setup, method, 0)
  chunk_values = {g for d in setup.chunks[0] for q in d.eval_questions for g in q.golds}
  probe, _ = setup.extra_evals["retention_qa"]
  st = SleepState(setup.params, transformer.slot_mask_none(setup.cfg))
  before, _, _ = answers.answer(setup, st.params, st.slot_mask, probe, c.eval, in_context=False)
  st, _ = phases.consolidate(st, ctx, 0)
  after, _, _ = answers.answer(setup, st.params, st.slot_mask, probe, c.eval, in_context=False)
  lost = [a for b, a in zip(before, after) if b["em"] and not a["em"]]
  print("\n" + method, json.dumps({
      "questions": len(before), "right_before": int(sum(r["em"] for r in before)),
      "lost": len(lost), "gained": sum(1 for b, a in zip(before, after) if a["em"] > b["em"]),
      "lost_to_a_value_of_the_new_chunk": sum(a["pred"].strip() in chunk_values for a in lost),
      "chunk_values": len(chunk_values),
      "top_wrong": collections.Counter(a["pred"] for a in lost).most_common(8)}))


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
