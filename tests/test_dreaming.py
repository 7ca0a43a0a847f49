"""Dreaming (docs/method.md section 4): sampling switch, gradient scores, selection, vmapped trials, ReST-EM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.data.tokenizer import ByteTokenizer
from sleep_jax.model import config, lora as lora_lib, sampler, transformer as T
from sleep_jax.sleep import dream_batches as DB, dream_trials as DT, dreaming as D
from sleep_jax.sleep import methods

CFG = config.tiny(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(0, 64), n_experts=(1, 2),
                  expert_top_k=1, n_slots=1, slot_rank=4, vocab_size=64, max_seq_len=64)


def key(i):
  # "rbg" keys: the same library code, but XLA compiles their RNG ~4x faster than threefry's on
  # CPU, and compilation is most of this file's run time.
  return jax.random.key(i, impl="rbg")


STOP = (2,)
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13]]
M, N_NEW = 4, 6
SCALE = lora_lib.scale(8.0, 4)
TRIAL_TARGETS = ("q", "v", "o", "up", "down")
INNER = dict(inner_steps=3, optimizer="adam")
REST = dict(steps=5, optimizer="adam")


@pytest.fixture(scope="module")
def setup():
  params = jax.jit(T.init, static_argnums=1)(key(0), CFG)
  # Larger router weights so the two experts are clearly routed (and the switch clearly matters).
  lvl = params["layers"]["cms_1"]
  lvl["expert_router"] = lvl["expert_router"] * 50.0
  mask = T.slot_mask_none(CFG).at[1, 0].set(True)  # a live (freshly unlocked: B = 0) slot
  # Every test shares these shapes and static arguments (and the dream loop test the same
  # generator/trial adapters), so each function compiles once for the whole file.
  gen = DT.init_generator(key(5), CFG, 4, 8.0, ("q", "v"), "adam")
  out = D.sample_dreams(params, CFG, mask, PROMPTS, key(1), M, N_NEW, 1.0, True,
                        gen.lora, gen_lora_scale=gen.scale, stop_tokens=STOP)
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(3, CFG.vocab_size, (3, 10)), jnp.int32)
  cm = np.zeros((3, 10), bool)
  cm[:, 6:] = True
  task = {"tokens": toks, "valid": jnp.ones((3, 10), bool), "completion_mask": jnp.asarray(cm)}
  lora0 = DT.init_adapter(key(2), CFG, 4, TRIAL_TARGETS)
  return params, mask, DB.as_dreams(out), task, lora0, gen


# ----------------------------------------------------------------------------------------------
# Sampling and the random-expert switch.
# ----------------------------------------------------------------------------------------------
def test_random_expert_switch_changes_distribution_only_when_on(setup):
  params, mask, dreams, _, _, gen = setup
  x, v = dreams.tokens, dreams.valid
  g = dict(lora_scale=gen.scale)
  plain = DT.sequence_logprobs(params, gen.lora, CFG, mask, x, v, **g)
  routed = DT.sequence_logprobs(params, gen.lora, CFG, mask, x, v, route_rng=key(3), **g)
  assert float(jnp.max(jnp.abs(jnp.where(v, routed - plain, 0.0)))) > 1e-3

  kw = dict(gen_lora_scale=gen.scale, stop_tokens=STOP)
  sd = lambda on: D.sample_dreams(params, CFG, mask, PROMPTS, key(4), M, N_NEW, 1.0, on,
                                  gen.lora, **kw)
  off, off2, on = sd(False), sd(False), sd(True)
  toks, valid, _ = DB.prompt_batch(PROMPTS, M)
  ref = sampler.sample(params, toks, valid, key(4), cfg=CFG, max_new_tokens=N_NEW,
                       temperature=1.0, top_k=0, top_p=1.0, stop_tokens=STOP, pad_id=0,
                       slot_mask=mask, lora=gen.lora, lora_scale=gen.scale, random_expert=False)
  for a, b in zip(off, off2):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(off, ref):  # off == the plain sampler, bit for bit
    np.testing.assert_array_equal(a, b)
  # Same noise, different distribution: the first generated token's log-prob differs.
  P = toks.shape[1]
  assert not np.allclose(on.logprobs[:, P], off.logprobs[:, P], atol=1e-4)
  # And the "off" log-probs are the teacher-forced log-probs of the plain model.
  tf = DT.sequence_logprobs(params, gen.lora, CFG, mask, off.tokens, off.valid, **g)
  np.testing.assert_allclose(np.where(off.completion_mask, tf, 0.0), off.logprobs, atol=1e-4)


def test_prompt_batch_tiles_and_templates():
  toks, valid, idx = DB.prompt_batch(PROMPTS, 5)
  assert toks.shape == (5, 5) and list(idx) == [0, 1, 2, 0, 1]
  assert list(np.asarray(toks[1])[np.asarray(valid[1])]) == PROMPTS[1]
  t = DB.DreamTemplates({"qa": "{context} Q:", "imp": "{context} so"})
  assert t.format("Ann.") == [("qa", "Ann. Q:"), ("imp", "Ann. so")]
  ids, tags = t.prompts(ByteTokenizer(), ["a", "bc"])
  assert tags == [(0, "qa"), (0, "imp"), (1, "qa"), (1, "imp")]
  assert ids[0] == ByteTokenizer().encode("a Q:", add_bos=True)
  assert set(DB.DreamTemplates.from_config(D.default_config()).templates) == set(DB.DEFAULT_TEMPLATES)


# ----------------------------------------------------------------------------------------------
# Scores and selection.
# ----------------------------------------------------------------------------------------------
def test_gradient_scores(setup):
  params, mask, dreams, task, lora0, _ = setup
  kw = dict(lora_scale=SCALE)
  score = lambda rule: DT.score_dreams(params, CFG, mask, lora0, dreams, task, key(0),
                                      rule=rule, **kw)
  norm, align = score("grad_norm"), score("grad_align")
  assert norm.shape == align.shape == (M,)
  assert np.all(np.asarray(norm) > 0) and np.all(np.abs(np.asarray(align)) <= 1 + 1e-5)
  # At B = 0 the forward pass does not depend on the LoRA scale s and dL/dB is linear in s, so
  # grad_norm scales with s and grad_align (a cosine) does not (same compilation: s is traced).
  kw2 = dict(lora_scale=2 * SCALE)
  norm2 = DT.score_dreams(params, CFG, mask, lora0, dreams, task, key(0), rule="grad_norm", **kw2)
  align2 = DT.score_dreams(params, CFG, mask, lora0, dreams, task, key(0), rule="grad_align", **kw2)
  np.testing.assert_allclose(norm2, 2 * norm, rtol=1e-5)
  np.testing.assert_allclose(align2, align, rtol=1e-4, atol=1e-6)
  assert len(set(np.round(np.asarray(norm), 6).tolist())) == M  # per-dream, not a batch value
  rnd = score("random")
  assert rnd.shape == (M,) and np.all((np.asarray(rnd) >= 0) & (np.asarray(rnd) < 1))
  with pytest.raises(ValueError):
    score("nope")


def test_tree_norm_and_dot_rows():
  rng = np.random.default_rng(0)
  g = {"q": {"b": rng.normal(size=(3, 2, 4, 5))}, "v": {"b": rng.normal(size=(3, 2, 4, 3))}}
  h = {"q": {"b": rng.normal(size=(2, 4, 5))}, "v": {"b": rng.normal(size=(2, 4, 3))}}
  flat_g = np.concatenate([g["q"]["b"].reshape(3, -1), g["v"]["b"].reshape(3, -1)], axis=1)
  flat_h = np.concatenate([h["q"]["b"].ravel(), h["v"]["b"].ravel()])
  np.testing.assert_allclose(DT._tree_sq_norm_rows(g), (flat_g ** 2).sum(1), rtol=1e-5)
  np.testing.assert_allclose(DT._tree_dot_rows(g, h), flat_g @ flat_h, rtol=1e-5)


@pytest.mark.parametrize("n,k,b", [(10, 3, 2), (10, 0, 4), (10, 4, 0), (5, 3, 5), (5, 7, 1)])
def test_select_topk_plus_random(n, k, b):
  scores = jnp.asarray(np.random.default_rng(n + k + b).permutation(n).astype(np.float32))
  kk, bb = min(k, n), min(b, n - min(k, n))
  top = set(np.argsort(-np.asarray(scores))[:kk].tolist())
  seen = set()
  for seed in range(20):
    idx = np.asarray(DT.select(scores, k, b, key(seed)))
    assert idx.shape == (kk + bb,) and len(set(idx.tolist())) == kk + bb
    assert set(idx[:kk].tolist()) == top
    assert not set(idx[kk:].tolist()) & top and all(0 <= j < n for j in idx)
    seen.update(idx[kk:].tolist())
  if bb and n - kk > bb:  # the extra ones are random, not fixed
    assert len(seen) > bb


# ----------------------------------------------------------------------------------------------
# Isolated trials: vmapped == one at a time.
# ----------------------------------------------------------------------------------------------
def test_vmapped_trials_match_sequential(setup):
  params, mask, dreams, task, lora0, _ = setup
  # The same keyword set as Dreamer.round passes, so the dream loop test reuses this compilation.
  kw = dict(inner_lr=1e-2, lora_scale=SCALE, margin=0.0, task_score_fn=DT.task_log_likelihood,
            sft_context="prompt", **INNER)
  vm = DT.run_trials(params, CFG, mask, lora0, dreams, task, **kw)
  sq = DT.run_trials_sequential(params, CFG, mask, lora0, dreams, task, **kw)
  for a, b in zip(jax.tree.leaves(vm.lora), jax.tree.leaves(sq.lora)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(vm.scores, sq.scores, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(vm.base_score, sq.base_score)
  np.testing.assert_array_equal(vm.rewards, (np.asarray(vm.scores) > float(vm.base_score)))
  # Trials really trained (B moved away from 0) and were isolated (different dreams, different B).
  b = np.asarray(vm.lora["v"]["b"])
  assert np.abs(b).max() > 0 and not np.allclose(b[0], b[1])
  assert not np.allclose(vm.scores, vm.base_score)


def test_dreams_in_groups_equal_all_at_once(setup):
  """``parallel_dreams`` (memory bound on real models) changes nothing but the grouping: 4 dreams
  as a group of 3 and a group of 1 give the scores and trials of one vmap."""
  params, mask, dreams, task, lora0, _ = setup
  score = lambda p: DT.score_dreams(params, CFG, mask, lora0, dreams, task, key(0),
                                   rule="grad_norm", lora_scale=SCALE, parallel=p)
  np.testing.assert_allclose(score(3), score(0), rtol=1e-5)
  kw = dict(inner_lr=1e-2, lora_scale=SCALE, margin=0.0, task_score_fn=DT.task_log_likelihood,
            sft_context="prompt", **INNER)
  trials = lambda p: DT.run_trials(params, CFG, mask, lora0, dreams, task, parallel=p, **kw)
  whole, grouped = trials(0), trials(3)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(grouped)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_logprobs_in_row_groups_equal_one_pass(setup, monkeypatch):
  """Past the logits budget the output head runs over row groups (3 rows as 2 + 1): the same
  log-probs and the same gradient of tau."""
  params, mask, _, task, lora0, _ = setup
  logprobs = DT.sequence_logprobs.__wrapped__  # unjitted: the budget is read at each trace

  def tau(lo):
    lp = logprobs(params, lo, CFG, mask, task["tokens"], task["valid"], lora_scale=SCALE)
    return jnp.sum(lp * task["completion_mask"]), lp

  whole = jax.value_and_grad(tau, has_aux=True)(lora0)
  heads, unembed = [], T.unembed
  monkeypatch.setattr(T, "unembed", lambda *a: heads.append(a[1].shape) or unembed(*a))
  monkeypatch.setattr(DT, "LOGITS_BUDGET", 2 * 4 * 10 * CFG.vocab_size)  # two rows' logits
  grouped = jax.value_and_grad(tau, has_aux=True)(lora0)
  assert heads and heads[0][0] == 2  # the head saw groups of 2 rows
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(grouped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tau_gradient_rematerialised_past_budget_is_the_same(setup, monkeypatch):
  """Past ``BACKWARD_BUDGET`` the backward of g_tau (``grad_align``) recomputes each layer
  (SmolLM2's 226 tau rows otherwise asked for one 40 GB buffer): the same alignment scores."""
  params, mask, dreams, task, lora0, _ = setup
  scores = DT.gradient_scores.__wrapped__  # unjitted: the budget is read at each trace
  kw = dict(rule="grad_align", lora_scale=SCALE)
  whole = scores(params, CFG, mask, lora0, dreams, task, **kw)
  remats, apply = [], T.apply
  monkeypatch.setattr(T, "apply", lambda *a, **k: remats.append(a[2].remat) or apply(*a, **k))
  monkeypatch.setattr(DT, "BACKWARD_BUDGET", 0)
  remat = scores(params, CFG, mask, lora0, dreams, task, **kw)
  assert remats.count("full") == 1  # g_tau's pass, not the dreams' own gradients
  np.testing.assert_allclose(remat, whole, rtol=1e-5, atol=1e-6)


def test_trials_scored_on_their_own_passage(setup):
  """``tau_scope="passage"``: each trial is scored on the tau rows of its own group, against the
  base on those rows; an offered candidate (prompt -1) on every row. Reference: the same trial
  function on the masked batch, one dream at a time."""
  params, mask, dreams, task, lora0, _ = setup
  n_rows = task["tokens"].shape[0]
  row_group = np.arange(n_rows) % 2
  n = dreams.tokens.shape[0]
  masks = D.passage_masks(task, row_group, np.array([1, 0]), np.resize([0, 1, -1], n))
  kw = dict(inner_lr=1e-2, lora_scale=SCALE, margin=0.0, task_score_fn=DT.task_log_likelihood,
            sft_context="prompt", **INNER)
  out = DT.run_trials(params, CFG, mask, lora0, dreams, task, **kw, **masks)
  rows = np.asarray(masks["task_rows"])  # a trial reads its own group's rows alone
  evens = list(range(0, n_rows, 2))
  assert rows.shape == (3, n_rows) and list(rows[0, :len(evens)]) == evens
  no_candidate = D.passage_masks(task, row_group, np.array([1, 0]), np.resize([0, 1], n))
  assert no_candidate["task_rows"].shape == (2, (n_rows + 1) // 2)
  cm = np.asarray(task["completion_mask"], bool)
  for i, g in enumerate(np.asarray(masks["groups"])):
    keep = cm & ((row_group == g)[:, None] if g < 2 else True)
    t_i = {**task, "completion_mask": jnp.asarray(keep)}
    ref = DT.run_trials_sequential(params, CFG, mask, lora0, DB.take(dreams, np.array([i])),
                                   t_i, **kw)
    np.testing.assert_allclose(out.scores[i], ref.scores[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.base_score[i], ref.base_score, atol=1e-6, rtol=1e-6)
    assert float(out.rewards[i]) == float(ref.scores[0] > ref.base_score)


# ----------------------------------------------------------------------------------------------
# ReST-EM.
# ----------------------------------------------------------------------------------------------
def _gen_loglik(params, mask, gen, dreams, rows):
  lp = DT.sequence_logprobs(params, gen.lora, CFG, mask, dreams.tokens, dreams.valid,
                           lora_scale=gen.scale)
  cm = np.asarray(dreams.completion_mask)
  return float((np.asarray(lp) * cm)[rows].sum() / cm[rows].sum())


def test_rest_em_raises_rewarded_likelihood_and_noop_without_reward(setup):
  params, mask, dreams, _, _, gen = setup
  rewards = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  kw = dict(lr=1e-2, lora_scale=gen.scale, **REST)
  before = _gen_loglik(params, mask, gen, dreams, [0, 2])
  l1, s1, m1 = DT.rest_em_round(params, CFG, mask, gen.lora, gen.opt_state, dreams, rewards, **kw)
  gen1 = DT.Generator(l1, s1, gen.scale)
  after = _gen_loglik(params, mask, gen1, dreams, [0, 2])
  assert after > before + 1e-3, (before, after)
  assert float(m1["rest_em_loss_after"]) < float(m1["rest_em_loss_before"]) and int(m1["rest_em_n"]) == 2
  # No reward: generator and optimizer state bit-identical (even with non-zero Adam moments).
  l2, s2, m2 = DT.rest_em_round(params, CFG, mask, l1, s1, dreams, jnp.zeros(4), **kw)
  for a, b in zip(jax.tree.leaves((l1, s1)), jax.tree.leaves((l2, s2))):
    np.testing.assert_array_equal(a, b)
  assert int(m2["rest_em_n"]) == 0


# ----------------------------------------------------------------------------------------------
# The loop and the config.
# ----------------------------------------------------------------------------------------------
def _small_config(**kw):
  c = D.default_config()
  c.update(dict(m=M, k=2, b=2, rounds=2, max_new_tokens=N_NEW, inner_lr=1e-2,
                inner_steps=INNER["inner_steps"], inner_optimizer=INNER["optimizer"]))
  c.lora.update(dict(rank=4, alpha=8.0, targets=TRIAL_TARGETS))
  c.rest_em.update(dict(rank=4, alpha=8.0, targets=("q", "v"), lr=1e-2, **REST))
  c.update(kw)
  return c


def test_dream_loop_accepts_by_margin_and_disables(setup):
  params, mask, _, task, _, _ = setup
  stages = []
  run = lambda c: D.dream(params, CFG, mask, PROMPTS, task, key(7), c, stop_tokens=STOP,
                          on_stage=stages.append)
  everything = run(_small_config(margin=-1e9))
  assert stages == list(D.STAGES) * 2  # the progress bar moves within each round
  assert len(everything) == 2 * 4 and [m["n_accepted"] for m in everything.metrics] == [4, 4]
  assert everything.tokens.shape[1] == 5 + N_NEW
  assert np.all(everything.completion_mask <= everything.valid)
  assert set(everything.prompt_index.tolist()) <= {0, 1, 2} and list(everything.round) == [0] * 4 + [1] * 4
  m0 = everything.metrics[0]
  assert len(m0["scores"]) == M and len(m0["selected"]) == 4 and m0["acceptance_rate"] == 1.0
  assert m0["rest_em_loss_after"] < m0["rest_em_loss_before"]
  # Nothing rewarded: nothing accepted, the generator never moves.
  nothing = run(_small_config(margin=1e9, score="random"))
  assert len(nothing) == 0 and all(m["acceptance_rate"] == 0.0 for m in nothing.metrics)
  fresh = DT.init_generator(jax.random.split(key(7))[0], CFG, 4, 8.0, ("q", "v"))
  for a, b in zip(jax.tree.leaves(fresh.lora), jax.tree.leaves(nothing.generator.lora)):
    np.testing.assert_array_equal(a, b)
  off = run(_small_config(enabled=False))
  assert len(off) == 0 and off.metrics == []


def test_own_dreams_off_accepts_only_the_offered_candidates(setup):
  """``accept_own=False``: the same rounds (selection, trials, the generator's ReST-EM), and of
  the accepted dreams only the offered candidates (dream simulation's trajectories) remain."""
  params, mask, _, task, _, _ = setup
  cand = DB.fixed_dreams([[1, 5, 6], [1, 9]], [[20, 21, 2], [22, 2]])
  run = lambda **kw: D.dream(params, CFG, mask, PROMPTS, task, key(7),
                             _small_config(margin=-1e9, k=4, b=2, **kw), stop_tokens=STOP,
                             candidates=cand)
  both, offered = run(), run(accept_own=False)
  assert (both.prompt_index >= 0).any() and (both.prompt_index < 0).any()
  assert len(offered) == int((both.prompt_index < 0).sum()) > 0
  assert (offered.prompt_index < 0).all()
  assert [m["selected"] for m in both.metrics] == [m["selected"] for m in offered.metrics]
  for a, b in zip(jax.tree.leaves(both.generator.lora), jax.tree.leaves(offered.generator.lora)):
    np.testing.assert_array_equal(a, b)


def test_config_ablations():
  """The dreaming ablations are rows of the one method table, applied as config overrides."""
  dc = lambda name: methods.dreaming_config(methods.get(name), D.default_config())
  assert dc("sleep_no_grad_selection").score == "random"
  assert dc("sleep_no_random_expert").random_expert is False
  assert dc("sleep") == D.default_config()
  c = D.default_config()
  for key in ("m", "k", "b", "inner_steps", "inner_lr", "inner_optimizer", "rounds", "score",
              "random_expert", "margin", "sft_context"):
    assert key in c
  assert {"rank", "alpha", "targets"} <= set(c.lora) and {"steps", "lr", "rank"} <= set(c.rest_em)
  with pytest.raises(ValueError, match="Did you mean 'sleep'"):
    methods.get("slep")


def test_sft_context_none_ignores_the_prompt(setup):
  params, mask, dreams, _, _, gen = setup
  other = dreams.tokens.at[:, :3].set(7)  # change (part of) every prompt, keep the completions
  other = jnp.where(dreams.completion_mask, dreams.tokens, other)
  loss = lambda toks, ctx: float(DT.sft_loss(params, gen.lora, CFG, mask, toks, dreams.valid,
                                            dreams.completion_mask, lora_scale=gen.scale,
                                            sft_context=ctx))
  np.testing.assert_allclose(loss(other, "none"), loss(dreams.tokens, "none"), rtol=1e-6)
  assert abs(loss(other, "prompt") - loss(dreams.tokens, "prompt")) > 1e-4


def test_m_step_past_budget_runs_on_the_rewarded_rows_only(setup, monkeypatch):
  """Past ``BACKWARD_BUDGET`` ReST-EM's M-step (48 kept SmolLM2 dreams asked for 26 GB)
  rematerialises each layer and drops the rows that weigh 0 (unrewarded kept dreams): the same
  generator update; with no rewarded row it keeps one, weighted 0."""
  params, mask, dreams, _, _, _ = setup
  gen = DT.init_generator(jax.random.key(3), CFG, 4, 8.0, ("q", "v"), "adam")
  rewards = jnp.asarray([1.0, 0.0] + [0.0] * (dreams.tokens.shape[0] - 2))
  kw = dict(steps=2, lr=1e-2, lora_scale=gen.scale)
  assert D.m_step_rows(dreams, rewards, CFG)[0] is dreams  # under the budget: as they are
  monkeypatch.setattr(DT, "BACKWARD_BUDGET", 0)
  rows, w = D.m_step_rows(dreams, rewards, CFG)
  assert rows.tokens.shape[0] == 1 and np.asarray(w).tolist() == [1.0]
  ref, _, _ = DT.rest_em_round(params, CFG, mask, gen.lora, gen.opt_state, dreams, rewards, **kw)
  remats, apply = [], T.apply
  monkeypatch.setattr(T, "apply", lambda *a, **k: remats.append(a[2].remat) or apply(*a, **k))
  out, _, _ = DT.rest_em_round(params, CFG, mask, gen.lora, gen.opt_state, rows, w, **kw)
  assert remats and set(remats) == {"full"}  # traced for the one-row shape under the budget
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  rows, w = D.m_step_rows(dreams, jnp.zeros_like(rewards), CFG)
  assert rows.tokens.shape[0] == 1 and np.asarray(w).tolist() == [0.0]
