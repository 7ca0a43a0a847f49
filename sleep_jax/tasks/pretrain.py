"""The base-model recipe: pretrain a tiny CMS transformer on the synthetic world, cache it.

What the base model learns (the world in ``data/world.py``):

* to *read* biographies of the ``pretrain`` population (language-model loss on the passage);
* closed-book QA on the disjoint ``qa`` population (it memorises their facts from the answers);
* in-context QA on the disjoint ``reading`` population (many people, each seen a few times, so
  answers must be read, not recalled), as *multi-question* examples
  ``<passage> Q: q1 A: a1 Q: q2 A: a2 ...`` (all six attributes in random order, loss on the
  answers + final eos; component ``incontext_multi``). The first question is exactly the eval
  format ``<passage> Q: ... A:`` -> answer, and every passage supervises all attributes at once:
  with one question per passage the model learnt to read one attribute at a time (city first)
  and plateaued at ~20% for 1000+ steps (experiments/knowledge_incorporation/NOTES_world.md);
* to *write* questions about a passage (``incontext_generate``: ``<passage>`` ->
  ``Q: <question> A: <answer>`` + eos, loss on all of it), the format of the cycle's dreams
  (sampled from ``bos + passage``). The eos closing a biography is not trained by default
  (``bio_eos_weight=0``), so a passage is always continued by a question.
  ``eval.world_probes.dream_quality`` measures the fraction of sampled dreams that are well-formed and correct.

No question is ever asked about a ``pretrain`` person, so the model never learns to turn a read
biography into an answer -- the gap that dreaming and consolidation are meant to close. Training
stops once in-context exact match on never-seen ``heldout`` people with held-out question
templates reaches ``target_incontext`` (checked every ``eval_every`` steps) or at ``max_steps``.
Losses are answer-only for QA (the prompt is context, not target) and per-example normalised, so
a two-token QA target weighs as much as a 40-token biography.

``base_cache.pretrain_or_load(cache_dir, recipe)`` trains once and caches params + tokenizer +
configs + metrics in ``cache_dir``; a later call with the same recipe loads them bit-identically.

The loop is the one trainer's ``fit`` with ``train.step.make_train_step`` (single device).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax.data import world as world_lib, world_encode
from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.eval import qa as qa_eval
from sleep_jax.eval.world_probes import dream_quality, evaluate
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.losses.lm import lm_loss
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import optimizer as opt_lib, state as state_lib, step as step_lib
from sleep_jax.tasks.pretrain_recipe import PretrainConfig


def _print(msg: str) -> None:
  print(msg, flush=True)


class BaseModel(NamedTuple):
  params: Any
  cfg: ModelConfig
  tokenizer: WordTokenizer
  world: Any  # the corpus (``corpus_for``): a world_lib.World for the world recipe
  recipe: PretrainConfig
  metrics: Dict[str, Any]  # training log and final accuracies


# ----------------------------------------------------------------------------------------------
# Loss and update step.
# ----------------------------------------------------------------------------------------------
def masked_lm_loss(params, batch, cfg: ModelConfig, slot_mask=None):
  """``losses.lm.lm_loss`` averaged per example (optional ``loss_weight``); ``(loss, metrics)``."""
  batch = dict(batch)
  if slot_mask is not None:
    batch["slot_mask"] = slot_mask
  loss, m = lm_loss(params, batch, None, cfg=cfg, per_example=True)
  return loss, {"loss": loss, "token_acc": m["accuracy"]}


def make_optimizer(recipe: PretrainConfig) -> optax.GradientTransformation:
  """The recipe's AdamW (warmup, cosine to ``final_lr_fraction`` x lr, global-norm clip) via the
  one optimizer factory, ``train.optimizer.make_optimizer``."""
  import ml_collections
  return opt_lib.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", lr=recipe.lr, warmup_steps=recipe.warmup_steps,
      decay_steps=max(recipe.max_steps, recipe.warmup_steps + 1),
      final_lr_fraction=recipe.final_lr_fraction,
      b1=0.9, b2=0.98, weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip)))


def loss_fn_for(cfg: ModelConfig) -> Callable:
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` in ``train.step``'s interface."""

  def loss_fn(params, batch, rng):
    del rng
    return masked_lm_loss(params, batch, cfg, slot_mask=batch.get("slot_mask"))

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Corpora: the world, or any object with the same small interface (``tokenizer``,
# ``sample_train_example(rng, mixture, **sample_kwargs)``, ``probe_sets(n)``, ``eval_sets()``).
# ----------------------------------------------------------------------------------------------
def corpus_for(recipe: PretrainConfig):
  """The corpus ``recipe.corpus`` names."""
  if recipe.corpus == "world":
    return world_lib.World(recipe.world)
  if recipe.corpus == "streams":
    from sleep_jax.data import long_horizon
    return long_horizon.StreamCorpus()
  if recipe.corpus.startswith("arc:"):  # generated ARC-like tasks (experiments/few_shot)
    from sleep_jax.data import arc_corpus
    return arc_corpus.ArcCorpus.from_name(recipe.corpus)
  if recipe.corpus.startswith("arith:"):  # arithmetic word problems (experiments/reasoning)
    from sleep_jax.data import arith_corpus
    return arith_corpus.ArithCorpus.from_name(recipe.corpus)
  raise ValueError(f"corpus={recipe.corpus!r}; valid: 'world', 'streams', 'arc:<spec>' "
                   "(arc_corpus.corpus_name), 'arith:<spec>' (arith_corpus.corpus_name)")


def probe_sets(corpus, n: int):
  """(probe, probe_train_tpl, groups): the stopping rule's in-context set (eval templates), its
  train-template twin, and the ``Example.attribute`` values accuracy is reported per."""
  if isinstance(corpus, world_lib.World):
    people = corpus.population("heldout")[:n]
    return (corpus.in_context_set(people, "eval"), corpus.in_context_set(people, "train")[::3],
            world_lib.ATTRIBUTES)
  return corpus.probe_sets(n)


def report_card(params, cfg: ModelConfig, corpus, recipe: PretrainConfig) -> Dict[str, Any]:
  """Final accuracies (``evaluate``), plus ``dream_quality`` for the world."""
  if isinstance(corpus, world_lib.World):
    return {"final": evaluate(params, cfg, corpus, seq_len=recipe.seq_len),
            "dreams": dream_quality(params, cfg, corpus,
                                    corpus.population("heldout")[:recipe.eval_people])}
  return {"final": {k: qa_eval.exact_match(params, cfg, corpus.tokenizer, v,
                                           seq_len=recipe.seq_len)
                    for k, v in corpus.eval_sets().items()}}


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------
def sample_kwargs(recipe: PretrainConfig, step: Optional[int] = None) -> Dict[str, Any]:
  """``World.sample_train_example`` keyword arguments of ``recipe`` (at training ``step``, for
  the reading curriculum; None = after it)."""
  lo, hi = recipe.multi_min_sentences, recipe.multi_max_sentences
  if step is not None and step < recipe.sentence_curriculum_steps:
    hi = lo + (hi - lo) * step // recipe.sentence_curriculum_steps
  return dict(n_questions=(recipe.multi_min_questions, recipe.multi_max_questions),
              question_weight=recipe.question_weight,
              first_q_weight=None if recipe.first_q_weight < 0 else recipe.first_q_weight,
              max_len=max(recipe.seq_len, recipe.train_seq_len),
              bio_eos_weight=recipe.bio_eos_weight,
              n_sentences=(lo, hi))


def encode_train_batch(tok: WordTokenizer, examples, recipe: PretrainConfig,
                       min_width: Optional[int] = None) -> Dict[str, np.ndarray]:
  """``world.encode_batch`` padded to the longest example rounded up to 16 tokens (at least
  ``min_width``, default ``seq_len``; at most ``train_seq_len``): few shapes, little padding."""
  longest = max(len(tok.encode(e.prompt)) + len(tok.encode(e.target)) + 2 for e in examples)
  lo = recipe.seq_len if min_width is None else min_width
  width = min(max(lo, -(-longest // 16) * 16), max(recipe.seq_len, recipe.train_seq_len))
  return world_encode.encode_batch(tok, examples, width)


def pretrain(recipe: PretrainConfig, log: Callable[[str], None] = _print) -> BaseModel:
  """Trains the base model from scratch (no caching; see ``base_cache.pretrain_or_load``)."""
  world = corpus_for(recipe)
  tok = world.tokenizer
  cfg = recipe.model_config(tok.vocab_size)
  init_params = lambda r: transformer.init(r, cfg)
  if recipe.init_from:
    from sleep_jax.tasks import base_cache  # the cache builds on this module
    parent = base_cache.load(os.path.join(base_cache.ASSETS_DIR, recipe.init_from))
    if parent.cfg != cfg or parent.tokenizer.itos != tok.itos:
      raise ValueError(f"init_from={recipe.init_from!r}: its model config or vocabulary is not "
                       "this recipe's")
    init_params = lambda r: jax.tree.map(jnp.array, parent.params)
  optimizer, trainable = opt_lib.with_masked_slots_frozen(make_optimizer(recipe), cfg)
  state, _ = state_lib.create_train_state(recipe.seed, init_params, optimizer, trainable=trainable)
  step_fn = step_lib.make_train_step(loss_fn_for(cfg), optimizer,
                                     differentiate=state_lib.trainable_arrays(trainable))
  mixture = dict(recipe.mixture)
  rng = np.random.default_rng([recipe.seed, 7])
  probe, probe_train_tpl, groups = probe_sets(world, recipe.eval_people)
  history, t0, clock = [], time.time(), {"train_s": 0.0, "step_start": 0.0}
  reached = {}

  closed_probe = (world.closed_book_set(world.population("qa")[:recipe.eval_people], "eval")
                  if recipe.target_closed > 0 else None)

  def next_batch(i, state):
    step = i + 1
    if recipe.closed_batch_size and step % 2 == 0:
      examples = [world.sample_train_example(rng, {"closed": 1.0})
                  for _ in range(recipe.closed_batch_size)]
      clock["step_start"] = time.time()
      return encode_train_batch(tok, examples, recipe, min_width=16)
    examples = [world.sample_train_example(rng, mixture, **sample_kwargs(recipe, step))
                for _ in range(recipe.batch_size)]
    batch = encode_train_batch(tok, examples, recipe)
    clock["step_start"] = time.time()
    return batch

  def after_step(i, state, m) -> bool:
    """Every ``eval_every`` steps: in-context exact match on held-out people; stop at target."""
    step = i + 1
    if step % recipe.eval_every and step != recipe.max_steps:
      clock["train_s"] += time.time() - clock["step_start"]
      return False
    jax.block_until_ready(state)
    clock["train_s"] += time.time() - clock["step_start"]
    ok = qa_eval.exact_match_per_example(state.params, cfg, tok, probe, seq_len=recipe.seq_len)
    acc = float(ok.mean())
    acc_tr = qa_eval.exact_match(state.params, cfg, tok, probe_train_tpl, seq_len=recipe.seq_len)
    in_group = {a: np.array([e.attribute == a for e in probe], bool) for a in groups}
    per_attr = {a: round(float(ok[g].mean()), 2) for a, g in in_group.items() if g.any()}
    rec = {"step": step, "train_s": round(clock["train_s"], 1),
           "wall_s": round(time.time() - t0, 1), "loss": round(float(m["loss"]), 4),
           "incontext_heldout": round(acc, 4), "incontext_heldout_train_tpl": round(acc_tr, 4),
           "per_attribute": per_attr}
    done = acc >= recipe.target_incontext
    if closed_probe is not None:
      rec["closed_book_qa"] = round(qa_eval.exact_match(state.params, cfg, tok, closed_probe,
                                                        seq_len=recipe.seq_len), 4)
      done = done and rec["closed_book_qa"] >= recipe.target_closed
    for thr in (0.5, 0.7, 0.8, 0.9):
      if acc >= thr and str(thr) not in reached:
        reached[str(thr)] = {"step": step, "wall_s": rec["wall_s"]}
    history.append(rec)
    log(json.dumps(rec))
    return done

  state, step = fit_lib.fit(state, step_fn, next_batch, recipe.max_steps, on_step=after_step)
  train_time = clock["train_s"]
  params = jax.block_until_ready(state.params)
  wall = round(time.time() - t0, 1)
  card = report_card(params, cfg, world, recipe)
  metrics = {"history": history, "reached": reached, **card,
             "steps": step, "wall_s": wall, "train_s": round(train_time, 1),
             "n_params": transformer.count_params(params)}
  log(json.dumps({**card, "steps": step, "wall_s": wall}))
  return BaseModel(params, cfg, tok, world, recipe, metrics)


def main(argv=None):
  """``python -m sleep_jax.tasks.pretrain CACHE_DIR [key=value ...]`` (recipe overrides)."""
  import sys
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit(main.__doc__)
  recipe = PretrainConfig()
  over = {}
  for kv in argv[1:]:
    k, v = kv.split("=", 1)
    over[k] = json.loads(v)
  if over:
    d = recipe.to_json()
    for k, v in over.items():
      if k.startswith("world."):
        d["world"][k[6:]] = v
      else:
        d[k] = v
    recipe = PretrainConfig.from_json(d)
  from sleep_jax.tasks import base_cache  # the cache builds on this module
  base_cache.pretrain_or_load(argv[0], recipe)


if __name__ == "__main__":
  main()
