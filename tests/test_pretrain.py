"""Base-model recipe: a few-step pretraining runs, caches, and a second call loads it exactly."""

import dataclasses

import jax
import numpy as np
import pytest

from sleep_jax.data import world_encode
from sleep_jax.eval import qa as qa_eval, world_probes
from sleep_jax.tasks import base_cache, pretrain as pretrain_lib, pretrain_recipe as recipe_lib


def test_pretrain_caches_and_reloads_bit_identically(tmp_path):
  recipe = recipe_lib.runlocal()
  logs = []
  base = base_cache.pretrain_or_load(str(tmp_path), recipe, log=logs.append)
  assert base.metrics["steps"] == recipe.max_steps
  assert np.isfinite(base.metrics["history"][-1]["loss"])
  assert set(base.metrics["final"]) >= {"incontext_heldout", "closed_qa", "closed_new"}
  assert base.cfg.vocab_size == base.tokenizer.vocab_size == base.world.tokenizer.vocab_size

  logs2 = []
  again = base_cache.pretrain_or_load(str(tmp_path), recipe, log=logs2.append)
  assert any("loaded" in m for m in logs2) and not any("step" in m for m in logs2)
  assert again.cfg == base.cfg and again.recipe == recipe
  assert again.tokenizer.itos == base.tokenizer.itos
  assert jax.tree.structure(again.params) == jax.tree.structure(base.params)
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(base.params)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert again.metrics == base.metrics

  # Same answers from the loaded model.
  exs = base.world.in_context_set(base.world.population("heldout")[:3], "eval")
  np.testing.assert_array_equal(
      qa_eval.exact_match_per_example(base.params, base.cfg, base.tokenizer, exs),
      qa_eval.exact_match_per_example(again.params, again.cfg, again.tokenizer, exs))

  # Another recipe in the same directory is refused rather than silently mixed up.
  with pytest.raises(ValueError, match="another recipe"):
    base_cache.pretrain_or_load(str(tmp_path), dataclasses.replace(recipe, lr=1e-4),
                                  log=logs2.append)



def _tiny_world_model():
  """The unit-test world of ``runlocal()`` and an untrained model over its vocabulary."""
  from sleep_jax.data import world as world_lib
  from sleep_jax.model import transformer
  recipe = recipe_lib.runlocal()
  w = world_lib.World(recipe.world)
  cfg = recipe.model_config(w.tokenizer.vocab_size)
  return w, w.tokenizer, cfg, transformer.init(jax.random.PRNGKey(1), cfg)

def test_exact_match_agrees_with_greedy_sampler():
  from sleep_jax.model import sampler
  w, tok, cfg, params = _tiny_world_model()
  exs = (w.in_context_set(w.population("heldout")[:2], "eval")[:6]
         + w.closed_book_set(w.population("qa")[:1], "train")[:4])
  first = qa_eval.first_answer_tokens(params, cfg, tok, exs)
  prompts, valid = sampler.left_pad([tok.encode(e.prompt, add_bos=True) for e in exs])
  out = sampler.sample(params, prompts, valid, jax.random.PRNGKey(0), cfg=cfg, max_new_tokens=2,
                       greedy=True)
  greedy = np.asarray(out.tokens[:, prompts.shape[1]:])
  np.testing.assert_array_equal(first, greedy[:, 0])
  # Relabel each example with the model's own greedy answer: exact match iff it then says eos.
  keep = greedy[:, 0] >= len(tok.SPECIALS)  # a special token cannot be written as a target
  relabeled = [e._replace(target=tok.itos[int(g)]) for e, g, k in zip(exs, greedy[:, 0], keep)
               if k]
  ok = qa_eval.exact_match_per_example(params, cfg, tok, relabeled)
  np.testing.assert_array_equal(ok, greedy[keep, 1] == tok.eos_id)
  assert qa_eval.exact_match(params, cfg, tok, exs) == pytest.approx(0.0, abs=0.2)


def test_recipe_json_round_trip():
  r = recipe_lib.PretrainConfig()
  assert recipe_lib.PretrainConfig.from_json(r.to_json()) == r
  # A recipe saved before a field existed reads as what it was trained with, not as the default.
  old = r.to_json()
  for k in ("qk_norm", "multi_min_sentences", "multi_max_sentences", "head_dim",
            "sentence_curriculum_steps"):
    del old[k]
  legacy = recipe_lib.PretrainConfig.from_json(old)
  assert legacy != r and not legacy.qk_norm and legacy.multi_min_sentences == 5


def test_weighted_loss_and_dream_quality():
  w, tok, cfg, params = _tiny_world_model()
  p = w.population("reading")[0]
  exs = [w.multi_question(p, ["city", "field"], [0, 1], question_weight=0.5),
         w.in_context(p, "city", 0)]
  batch = world_encode.encode_batch(tok, exs, 64)
  loss_w, _ = pretrain_lib.masked_lm_loss(params, batch, cfg)
  unweighted = {k: v for k, v in batch.items() if k != "loss_weight"}
  loss_u, _ = pretrain_lib.masked_lm_loss(params, unweighted, cfg)
  assert np.isfinite(loss_w) and np.isfinite(loss_u) and abs(float(loss_w - loss_u)) > 1e-6
  # All-ones weights reproduce the mask-only loss.
  ones = dict(batch, loss_weight=batch["loss_mask"].astype(np.float32))
  np.testing.assert_allclose(pretrain_lib.masked_lm_loss(params, ones, cfg)[0], loss_u, rtol=1e-6)

  dq = world_probes.dream_quality(params, cfg, w, w.population("heldout")[:3],
                                  samples_per_person=2, max_new_tokens=4)
  assert set(dq) == {"format_ok", "well_formed", "correct", "eos_first", "distinct_attributes"}
  assert 0.0 <= dq["correct"] <= dq["well_formed"] <= dq["format_ok"] <= 1.0


def test_packaged_base_is_the_default_recipe_and_reads():
  """The shipped base model (sleep_jax/assets) is what the default recipe would train: same
  recipe, same vocabulary, and it reads never-seen people in context with held-out wordings."""
  recipe = recipe_lib.PretrainConfig()
  d = base_cache.packaged_base(recipe)
  assert d is not None, ("no packaged base model for PretrainConfig(): retrain it with "
                         "`python -m sleep_jax.tasks.pretrain sleep_jax/assets/world_base`")
  base = base_cache.load(d)
  people = base.world.population("heldout")[:20]
  examples = base.world.in_context_set(people, "eval")
  acc = qa_eval.exact_match(base.params, base.cfg, base.tokenizer, examples, seq_len=recipe.seq_len)
  assert acc >= 0.8, acc  # every attribute read (74-99%; chance ~3%; NOTES_world.md)
  # The recorded report card matches a fresh measurement on the same people (within sampling).
  assert abs(acc - base.metrics["final"]["incontext_heldout"]) < 0.15


def test_packaged_base_is_used_by_pretrain_or_load(tmp_path):
  log = []
  base = base_cache.pretrain_or_load(str(tmp_path / "base"), recipe_lib.PretrainConfig(),
                                     log=log.append)
  assert "packaged" in log[0] and base_cache.is_cached(str(tmp_path / "base"))
  assert base_cache.packaged_base(recipe_lib.PretrainConfig(lr=1.0)) is None
  assert base.recipe == recipe_lib.PretrainConfig()


def test_sentence_curriculum_grows_the_passage():
  """``sentence_curriculum_steps``: the most sentences a multi-question passage keeps grows
  linearly from ``multi_min_sentences`` to ``multi_max_sentences``; without it (the default)
  every step keeps 1-5 sentences."""
  default = recipe_lib.PretrainConfig()
  assert pretrain_lib.sample_kwargs(default, 1)["n_sentences"] == (1, 5)
  r = dataclasses.replace(default, sentence_curriculum_steps=400)
  his = [pretrain_lib.sample_kwargs(r, s)["n_sentences"] for s in (0, 99, 100, 250, 399, 400)]
  assert his == [(1, 1), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
  assert pretrain_lib.sample_kwargs(r)["n_sentences"] == (1, 5)
  world = pretrain_lib.corpus_for(r)
  rng = np.random.default_rng(0)
  ex = [world.sample_train_example(rng, dict(r.mixture), **pretrain_lib.sample_kwargs(r, 0))
        for _ in range(50)]
  assert all(e.prompt.count(".") == 1 for e in ex if e.kind == "multi")  # one sentence each


def test_closed_book_stage_trains_recall_batches_and_checks_its_parent():
  """Every other step is a short all-closed-book batch; the stopping rule reports QA recall;
  a second stage refuses a parent whose model config is not the recipe's."""
  recipe = dataclasses.replace(recipe_lib.runlocal(), closed_batch_size=8, target_closed=0.5)
  base = pretrain_lib.pretrain(recipe, log=lambda *_: None)
  assert all("closed_book_qa" in h for h in base.metrics["history"])
  with pytest.raises(ValueError, match="init_from='world_base'"):
    pretrain_lib.pretrain(dataclasses.replace(recipe, init_from="world_base"),
                          log=lambda *_: None)
  # The shipped second-stage base is found for its recipe (the knowledge config's "recall").
  assert base_cache.packaged_base(recipe_lib.recall_recipe()).endswith("world_base_recall")
