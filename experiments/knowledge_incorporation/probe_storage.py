"""Stored, or stored and extractable? For a finished SmolLM2 documents run: the slept model is
asked, closed-book, the consolidation's own prompts (``consolidation.prompt_templates``: "Tell
me about <title>.", ...), and each eval question counts as *stored* when its gold answer is in
one of those descriptions; the eval score (the question asked directly) is the *extracted*
share. The base model's descriptions and the in-context teacher's (the passage in the prompt)
are the floor and the ceiling.

    python experiments/knowledge_incorporation/probe_storage.py WORKDIR \\
      --variant smollm2_docs_written --method sleep_no_dream [--set KEY=VALUE ...]

``--set`` takes the run's own overrides (checked against its recorded config).
"""

import argparse
import json

import probe_redream  # this directory: the finished run's state
from sleep_jax.eval import answers
from sleep_jax.eval import qa as qa_eval


def describe(setup, params, mask, docs, template: str, new_tokens: int, in_context: bool):
  """Greedy answers to the consolidation's prompt per document, closed-book (the student's
  prompt) or with the passage (the teacher's)."""
  fmt = setup.fmt
  prompts = [fmt.dream_prompt(d.passage if in_context else "", template, d.title) for d in docs]
  comps = qa_eval.greedy_completions(params, setup.cfg, prompts, max_new_tokens=new_tokens,
                                     stop_tokens=fmt.stop_ids, pad_id=setup.tok.pad_id,
                                     slot_mask=mask, batch_size=8)
  return [setup.tok.decode(c) for c in comps]


def stored_share(docs, texts) -> float:
  """Share of eval questions whose gold answer (or an alias) is in its document's text."""
  hits = [any(g.lower() in t.lower() for g in q.golds) for d, t in zip(docs, texts)
          for q in d.eval_questions]
  return sum(hits) / max(len(hits), 1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("workdir")
  ap.add_argument("--variant", default="smollm2_docs_written")
  ap.add_argument("--method", default="sleep_no_dream")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = ap.parse_args()
  c, setup, _, base, st = probe_redream.finished_run(args.workdir, args.variant, args.method,
                                                     args.seed, args.set)
  docs = [d for chunk in setup.chunks for d in chunk]
  rows = {}
  for name, state, reading in (("base", base, False), ("in-context teacher", base, True),
                               (f"{args.method} (slept)", st, False)):
    per_template = [describe(setup, state.params, state.slot_mask, docs, tpl, args.new_tokens,
                             reading) for tpl in c.consolidation.prompt_templates]
    texts = ["\n".join(ts) for ts in zip(*per_template)]
    _, _, sc = answers.answer(setup, state.params, state.slot_mask, docs, c.eval,
                              in_context=reading)
    rows[name] = {"stored": round(100 * stored_share(docs, texts), 1),
                  "extracted": round(100 * float(sc[c.eval.metric].mean()), 1),
                  "example": texts[0]}
  print(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
