"""The world base model's report card: closed-book and in-context exact match on the world's
populations, and the quality of the dreams it writes about a passage."""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.data import world as world_lib
from sleep_jax.eval import qa as qa_eval
from sleep_jax.model.config import ModelConfig


def eval_sets(world: world_lib.World, n_heldout: Optional[int] = None,
              n_closed: Optional[int] = 200) -> Dict[str, list]:
  """The base model's report card (eval question templates unless named ``*_train_tpl``).

  * ``incontext_heldout``: reading skill on never-seen people, held-out question wording;
  * ``closed_qa`` / ``closed_qa_train_tpl``: recall of the QA population's memorised facts;
  * ``closed_pretrain``: closed-book on people whose biographies were only read;
  * ``closed_new``: closed-book on never-seen people (chance level).
  """
  held = world.population("heldout")[:n_heldout]
  sub = lambda pop: world.population(pop)[:n_closed]
  new = [p for k in range(world.cfg.n_chunks) for p in world.chunk(k)]
  return {
      "incontext_heldout": world.in_context_set(held, "eval"),
      "closed_qa": world.closed_book_set(sub("qa"), "eval"),
      "closed_qa_train_tpl": world.closed_book_set(sub("qa"), "train"),
      "closed_pretrain": world.closed_book_set(sub("pretrain"), "eval"),
      "closed_new": world.closed_book_set(new, "eval"),
  }


def evaluate(params, cfg: ModelConfig, world: world_lib.World, seq_len: int = 64,
             **kwargs) -> Dict[str, float]:
  tok = world.tokenizer
  return {k: qa_eval.exact_match(params, cfg, tok, v, seq_len=seq_len)
          for k, v in eval_sets(world, **kwargs).items()}


def dream_quality(params, cfg: ModelConfig, world: world_lib.World, people, *,
                  samples_per_person: int = 2, max_new_tokens: int = 32,
                  temperature: float = 1.0, seed: int = 0) -> Dict[str, float]:
  """What the cycle's dreaming would write: samples ``bos + passage`` (variant 0) continuations
  at ``temperature`` and parses them as ``Q: <question> A: <answer> eos``.

  Returns fractions of samples: ``format_ok`` (``Q: ... A: <one word> eos``, any question),
  ``well_formed`` (a known question template about this person,
  a one-word answer, then eos), ``correct`` (well-formed and the answer is the person's value of
  the asked attribute), ``eos_first`` (the continuation is empty: the model just ends the
  passage), and ``distinct_attributes`` (mean number of distinct attributes asked per person)."""
  from sleep_jax.model import sampler
  tok = world.tokenizer
  people = list(people)
  rows = [tok.encode(world.passage(p, 0), add_bos=True) for p in people
          for _ in range(samples_per_person)]
  owners = [p for p in people for _ in range(samples_per_person)]
  toks, valid = sampler.left_pad(rows, tok.pad_id)
  out = sampler.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.PRNGKey(seed),
                       cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
  comp = np.asarray(out.tokens[:, toks.shape[1]:])
  live = np.asarray(out.completion_mask[:, toks.shape[1]:])
  n_ok = n_correct = n_eos = n_fmt = 0
  asked: Dict[int, set] = {}
  for person, c, m in zip(owners, comp, live):
    ids = [int(t) for t in c[m]]
    if ids[:1] == [tok.eos_id]:
      n_eos += 1
      continue
    if not ids or ids[-1] != tok.eos_id:
      continue
    text = tok.decode(ids[:-1])
    if not (text.startswith("Q: ") and " A: " in text):
      continue
    q, a = text[3:].rsplit(" A: ", 1)
    n_fmt += len(tok.encode(a)) == 1
    hit = [attr for attr in world_lib.ATTRIBUTES for t in range(len(world_lib.QUESTIONS[attr]))
           if world.question(person, attr, t) == q]
    if not hit or len(tok.encode(a)) != 1:
      continue
    n_ok += 1
    n_correct += a == person.attrs[hit[0]]
    asked.setdefault(person.pid, set()).add(hit[0])
  n = max(len(rows), 1)
  return {"format_ok": round(n_fmt / n, 4), "well_formed": round(n_ok / n, 4),
          "correct": round(n_correct / n, 4),
          "eos_first": round(n_eos / n, 4),
          "distinct_attributes": round(float(np.mean([len(v) for v in asked.values()]))
                                       if asked else 0.0, 2)}
