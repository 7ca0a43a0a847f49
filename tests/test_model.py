"""Foundation properties of the one transformer: cache decode, masked slots, LoRA, routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.model import config, layer_layout, lora, sampler, transformer as T

CFG = config.tiny(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(0, 128),
                  n_experts=(1, 2), n_slots=3, slot_rank=8)


@pytest.fixture(scope="module")
def params():
  p = T.init(jax.random.key(0), CFG)
  # Give the slots non-trivial weights so masking is actually tested.
  for j in range(CFG.n_levels):
    lvl = p["layers"][T.level_name(j)]
    lvl["slot_b"] = 0.1 * jax.random.normal(jax.random.key(10 + j), lvl["slot_b"].shape)
    lvl["slot_router"] = 0.1 * jax.random.normal(jax.random.key(20 + j), lvl["slot_router"].shape)
  return p


def _mixed_batch():
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(3, 12)).astype(np.int32)
  lengths = [12, 7, 3]
  valid = np.zeros_like(toks, bool)
  for i, n in enumerate(lengths):  # left padding, as the sampler lays prompts out
    valid[i, 12 - n:] = True
    toks[i, :12 - n] = 0
  return jnp.asarray(toks), jnp.asarray(valid)


@pytest.mark.parametrize("sticky", [False, True])
def test_cache_decode_equals_full_forward(params, sticky):
  cfg = dataclasses.replace(CFG, slot_gate_sticky=sticky)
  toks, valid = _mixed_batch()
  mask = jnp.array([[True, False, True], [False, True, False]])
  full, _ = T.apply(params, toks, cfg, valid=valid, slot_mask=mask)
  cache = T.init_cache(cfg, toks.shape[0], toks.shape[1])
  pieces, start = [], 0
  for stop in (9, 10, 11, 12):  # a prefill, then one token at a time
    out, cache = T.apply(params, toks[:, start:stop], cfg, valid=valid[:, start:stop],
                         slot_mask=mask, cache=cache)
    pieces.append(out)
    start = stop
  dec = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(np.where(valid[..., None], dec, 0),
                             np.where(valid[..., None], full, 0), atol=1e-5, rtol=1e-5)


def test_sticky_gates_are_the_running_maximum(params):
  """slot_gate_sticky: the gate at token t is the largest plain gate over the real tokens <= t
  (padding never opens it; checked on the first layer's first level, whose input sticky gates
  do not change); the outputs change with it."""
  toks, valid = _mixed_batch()
  mask = jnp.array([[True, False, True], [False, True, False]])
  sticky = dataclasses.replace(CFG, slot_gate_sticky=True)
  plain_out, _, plain = T.apply(params, toks, CFG, valid=valid, slot_mask=mask, return_gates=True)
  out, _, got = T.apply(params, toks, sticky, valid=valid, slot_mask=mask, return_gates=True)
  assert float(jnp.max(jnp.abs(out - plain_out))) > 1e-4
  v = np.asarray(valid)[:, :, None]
  want = np.maximum.accumulate(np.where(v, np.asarray(plain[0][0]), 0.0), axis=1)
  np.testing.assert_allclose(np.where(v, np.asarray(got[0][0]), 0.0), want, rtol=1e-6)
  assert not np.allclose(want, np.where(v, np.asarray(plain[0][0]), 0.0))  # it did stick


def _without_slots(params):
  """The same model built without slots: its config and its parameters."""
  p0 = jax.tree.map(lambda x: x, params)
  for j in range(CFG.n_levels):
    for k in ("slot_a", "slot_b", "slot_router"):
      del p0["layers"][T.level_name(j)][k]
  return dataclasses.replace(CFG, n_slots=0), p0


def test_masked_slots_are_exactly_absent(params):
  toks, valid = _mixed_batch()
  no_slot_cfg, p0 = _without_slots(params)
  ref, _ = T.apply(p0, toks, no_slot_cfg, valid=valid)
  got, _ = T.apply(params, toks, CFG, valid=valid, slot_mask=T.slot_mask_none(CFG))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_unlocking_zero_b_slot_keeps_function(params):
  toks, valid = _mixed_batch()
  p = jax.tree.map(lambda x: x, params)
  p["layers"]["cms_1"]["slot_b"] = p["layers"]["cms_1"]["slot_b"].at[:, 2].set(0.0)
  before = jnp.array([[True, False, False], [True, True, False]])
  after = before.at[1, 2].set(True)
  a, _ = T.apply(p, toks, CFG, valid=valid, slot_mask=before)
  b, _ = T.apply(p, toks, CFG, valid=valid, slot_mask=after)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masked_slot_gradients_are_exactly_zero(params):
  toks, valid = _mixed_batch()
  mask = jnp.array([[True, False, False], [False, False, True]])

  def loss(p):
    logits, _ = T.apply(p, toks, CFG, valid=valid, slot_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  g = jax.grad(loss)(params)
  for j in range(CFG.n_levels):
    for k in ("slot_a", "slot_b"):
      gj = np.asarray(g["layers"][T.level_name(j)][k])
      for s in range(CFG.n_slots):
        if not mask[j, s]:
          assert np.all(gj[:, s] == 0.0), (j, k, s)
    gr = np.asarray(g["layers"][T.level_name(j)]["slot_router"])
    for s in range(CFG.n_slots):
      if not mask[j, s]:
        assert np.all(gr[..., s] == 0.0)
  # Live slots do learn (B is non-zero, so A gets gradient too).
  assert np.abs(np.asarray(g["layers"]["cms_0"]["slot_a"][:, 0])).sum() > 0


def test_slot_levels_backward_equals_plain_cond(params, monkeypatch):
  """The slot branch's recomputing backward (``cms.remat_cond``) gives autodiff's gradients
  through a plain ``lax.cond`` to the bit, an idle level (0) and a live one (1) together, with
  the gates' own cotangents (as the gate losses give them)."""
  from sleep_jax.model import cms
  toks, valid = _mixed_batch()
  mask = jnp.array([[False, False, False], [False, True, True]])

  def loss(p):
    out = T.apply(p, toks, CFG, valid=valid, slot_mask=mask, return_gates=True)
    return jnp.mean(jax.nn.logsumexp(out[0], -1)) + sum(jnp.sum(g ** 2) for g in out[2].values())

  got = jax.jit(jax.grad(loss))(params)
  monkeypatch.setattr(cms, "remat_cond", lambda pred, live, idle, diff, aux: jax.lax.cond(
      pred, live, idle, diff, aux))
  want = jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(got["layers"]["cms_1"]["slot_a"][:, 1])).sum() > 0


def test_all_masked_gradients_equal_the_model_without_slots(params):
  toks, valid = _mixed_batch()
  no_slot_cfg, p0 = _without_slots(params)

  def loss(p, cfg, **kw):
    return jnp.mean(jax.nn.logsumexp(T.apply(p, toks, cfg, valid=valid, **kw)[0], -1))

  ref = jax.jit(jax.grad(loss), static_argnums=1)(p0, no_slot_cfg)
  got = jax.jit(jax.grad(lambda p: loss(p, CFG, slot_mask=T.slot_mask_none(CFG))))(params)
  for path, want in jax.tree_util.tree_flatten_with_path(ref)[0]:
    have = got
    for k in path:
      have = have[k.key]
    np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def test_lora_zero_b_is_identity_and_trains(params):
  toks, valid = _mixed_batch()
  ad = lora.init(jax.random.key(3), CFG, rank=4, targets=lora.ALL_TARGETS)
  base, _ = T.apply(params, toks, CFG, valid=valid)
  same, _ = T.apply(params, toks, CFG, valid=valid, lora=ad, lora_scale=2.0)
  np.testing.assert_allclose(same, base, atol=1e-6)

  def loss(a):
    logits, _ = T.apply(params, toks, CFG, valid=valid, lora=a, lora_scale=2.0)
    return jnp.mean(logits[..., 5])

  g = jax.grad(loss)(ad)
  for name in lora.ALL_TARGETS:
    assert np.abs(np.asarray(g[name]["b"])).sum() > 0, name


def test_random_expert_changes_outputs_only_when_on(params):
  toks, valid = _mixed_batch()
  mask = jnp.ones((CFG.n_levels, CFG.n_slots), bool)
  off1, _ = T.apply(params, toks, CFG, valid=valid, slot_mask=mask)
  off2, _ = T.apply(params, toks, CFG, valid=valid, slot_mask=mask)
  on, _ = T.apply(params, toks, CFG, valid=valid, slot_mask=mask, route_rng=jax.random.key(0))
  np.testing.assert_array_equal(off1, off2)
  assert float(jnp.max(jnp.abs(on - off1))) > 1e-4  # 2 experts, top-1: the extra one runs


@pytest.mark.parametrize("sticky", [False, True])
def test_per_layer_layout_is_bit_identical_to_the_scan(params, sticky):
  """The decode layout (per-layer weights and caches, ``layer_layout.py``) gives the scan's
  logits, gates and cache to the bit, with random experts and LoRA on."""
  cfg = dataclasses.replace(CFG, slot_gate_sticky=sticky)
  toks, valid = _mixed_batch()
  mask = jnp.array([[True, False, True], [False, True, False]])
  lo = lora.init(jax.random.key(3), cfg, rank=2)
  lo = jax.tree.map(lambda a: a + 0.05, lo)  # B != 0: the adapter changes the outputs

  def decode(p, per_layer):
    cache, outs = T.init_cache(cfg, toks.shape[0], toks.shape[1]), []
    for start, stop in ((0, 9), (9, 10), (10, 11)):
      if per_layer and start:
        cache = layer_layout.per_layer_cache(cache)
      out, cache, gates = T.apply(p if not (per_layer and start) else layer_layout.per_layer(p),
                                  toks[:, start:stop], cfg, valid=valid[:, start:stop],
                                  slot_mask=mask, cache=cache, lora=lo, return_gates=True,
                                  route_rng=jax.random.key(stop))
      outs.append((out, gates))
    return outs, {k: jnp.stack(v) if isinstance(v, tuple) else v for k, v in cache.items()}

  f = jax.jit(decode, static_argnums=1)
  (ref, ref_cache), (new, new_cache) = f(params, False), f(params, True)
  jax.tree.map(np.testing.assert_array_equal, ref, new)
  jax.tree.map(np.testing.assert_array_equal, ref_cache, new_cache)


def test_sampler_decodes_as_the_scan_did(params, monkeypatch):
  """The sampler's tokens and log-probs with the per-layer decode (forced on this small model)
  equal those of the stacked scan, to the bit, greedy and sampled."""
  toks, valid = _mixed_batch()
  kw = dict(cfg=CFG, max_new_tokens=7, slot_mask=jnp.ones((2, 3), bool), random_expert=True)
  statics = ("cfg", "max_new_tokens", "greedy", "random_expert")
  run = lambda fn: [fn(params, toks, valid, jax.random.key(5), greedy=g, **kw)
                    for g in (True, False)]
  cache = T.init_cache(CFG, 3, 19)
  assert layer_layout.for_decode(params, cache)[0] is params  # small: the scan
  ref = run(sampler.sample)
  monkeypatch.setattr(layer_layout, "PER_LAYER_MIN_BYTES", 0)
  assert layer_layout.is_per_layer(layer_layout.for_decode(params, cache)[0])
  # A function of its own, so that jit traces the body again (the sampler's own jit would
  # reuse its trace with the scan).
  new = run(jax.jit(lambda *a, **k: sampler.sample.__wrapped__(*a, **k), static_argnames=statics))
  for a, b in zip(ref, new):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_sampler_logprobs_match_apply(params):
  toks, valid = _mixed_batch()
  out = sampler.sample(params, toks, valid, jax.random.key(1), cfg=CFG, max_new_tokens=6)
  logits, _ = T.apply(params, out.tokens, CFG, valid=out.valid)
  lp = T.logits_to_logprobs(logits, out.tokens)
  m = np.asarray(out.completion_mask)
  assert m.sum() == 3 * 6
  np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(out.logprobs)[m], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.tokens[:, :12]), np.asarray(toks))


def test_greedy_is_deterministic_and_matches_argmax(params):
  toks, valid = _mixed_batch()
  a = sampler.sample(params, toks, valid, jax.random.key(1), cfg=CFG, max_new_tokens=5, greedy=True)
  b = sampler.sample(params, toks, valid, jax.random.key(2), cfg=CFG, max_new_tokens=5, greedy=True)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  # Each greedy token is the argmax of the full forward pass on the prefix.
  logits, _ = T.apply(params, a.tokens, CFG, valid=a.valid)
  pred = np.asarray(jnp.argmax(logits[:, 11:-1], -1))
  np.testing.assert_array_equal(pred, np.asarray(a.tokens[:, 12:]))


def test_stop_tokens_give_correct_completion_mask(params):
  toks, valid = _mixed_batch()
  # Stop on every token the model can emit except a few: rows stop at different times.
  out = sampler.sample(params, toks, valid, jax.random.key(4), cfg=CFG, max_new_tokens=8,
                       temperature=2.0, stop_tokens=tuple(range(3, 120)), pad_id=0)
  comp = np.asarray(out.tokens[:, 12:])
  mask = np.asarray(out.completion_mask[:, 12:])
  stop = set(range(3, 120))
  for row, mrow in zip(comp, mask):
    seen_stop = False
    for tok, m in zip(row, mrow):
      assert m == (not seen_stop)
      if not m:
        assert tok == 0
      seen_stop = seen_stop or tok in stop
  assert mask.sum() < mask.size  # something stopped early
  assert np.all(np.asarray(out.logprobs)[:, 12:][~mask] == 0)


def test_top_k_one_equals_greedy(params):
  toks, valid = _mixed_batch()
  g = sampler.sample(params, toks, valid, jax.random.key(1), cfg=CFG, max_new_tokens=4, greedy=True)
  k1 = sampler.sample(params, toks, valid, jax.random.key(7), cfg=CFG, max_new_tokens=4, top_k=1)
  p0 = sampler.sample(params, toks, valid, jax.random.key(8), cfg=CFG, max_new_tokens=4,
                      top_p=1e-6)
  np.testing.assert_array_equal(g.tokens, k1.tokens)
  np.testing.assert_array_equal(g.tokens, p0.tokens)


def test_nucleus_filter_only_below_one():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  # top_p = 1 keeps every token exactly (the sort is skipped); below 1 the nucleus is cut.
  np.testing.assert_array_equal(sampler._filter_logits(logits, 0, jnp.float32(1.0)), logits)
  cut = np.asarray(sampler._filter_logits(logits, 0, jnp.float32(0.7)))
  np.testing.assert_array_equal(np.isfinite(cut), [[True, True, False, False]])


def test_config_validation():
  with pytest.raises(ValueError, match="n_experts"):
    config.tiny(n_experts=(1, 1, 1))
  with pytest.raises(ValueError, match="unknown model config keys"):
    config.ModelConfig.from_config({"d_modle": 3})


def test_output_head_from_a_position_equals_the_tail_of_the_full_forward(params):
  toks, valid = _mixed_batch()
  full, _ = T.apply(params, toks, CFG, valid=valid)
  tail, _ = T.apply(params, toks, CFG, valid=valid, logits_from=8)
  assert tail.shape == (3, 4, CFG.vocab_size)
  np.testing.assert_allclose(tail, full[:, 8:], rtol=1e-5, atol=1e-6)


def test_entity_copy_writes_the_span_where_the_first_name_would_start(params):
  """Greedy with copying: every token is the argmax of the forward pass on its prefix, except
  the span, which starts where that argmax is first a trigger token; a row with an empty span
  samples as without copying; log-probs stay those of the tokens written."""
  toks, valid = _mixed_batch()
  plain = sampler.sample(params, toks, valid, jax.random.key(1), cfg=CFG, max_new_tokens=8,
                         greedy=True)
  trigger = np.zeros(CFG.vocab_size, bool)
  trigger[int(plain.tokens[0, 13])] = True  # row 0 names someone at its second new token
  span = np.array([[5, 6, 7], [5, 6, 7], [9, 8, 0]], np.int32)
  lens = np.array([3, 0, 2], np.int32)
  out = sampler.sample(params, toks, valid, jax.random.key(1), cfg=CFG, max_new_tokens=8,
                       greedy=True, copy_span=jnp.asarray(span), copy_len=jnp.asarray(lens),
                       copy_trigger=jnp.asarray(trigger))
  np.testing.assert_array_equal(out.tokens[1], plain.tokens[1])
  logits, _ = T.apply(params, out.tokens, CFG, valid=out.valid)
  pred = np.asarray(jnp.argmax(logits[:, 11:-1], -1))
  comp = np.asarray(out.tokens[:, 12:])
  for b in range(3):
    hits = [i for i in range(8) if trigger[pred[b, i]]] if lens[b] else []
    start = hits[0] if hits else 8
    forced = range(start, min(start + lens[b], 8))
    assert list(comp[b, start:start + len(forced)]) == list(span[b, :len(forced)])
    free = [i for i in range(8) if i not in forced]
    np.testing.assert_array_equal(comp[b, free], pred[b, free])
    if b == 0:  # the plain row named someone at its second token at the latest: copied there
      assert start <= 1 and comp[0, start:start + 3].tolist() == [5, 6, 7]
  lp = T.logits_to_logprobs(logits, out.tokens)
  np.testing.assert_allclose(np.asarray(lp)[:, 12:], np.asarray(out.logprobs)[:, 12:], atol=1e-5)


def test_dense_is_the_einsum_and_refuses_mismatched_axes():
  from sleep_jax.model.dense import dense
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(4, 2, 7)), jnp.float32)
  np.testing.assert_allclose(dense(x, w2, contract=2), jnp.einsum("bthk,hkd->btd", x, w2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(x, w1), jnp.einsum("bthk,kij->bthij", x, w1),
                             rtol=1e-5, atol=1e-5)
  gx, gw = jax.grad(lambda a, b: jnp.sum(jnp.sin(dense(a, b, contract=2))), (0, 1))(x, w2)
  ex, ew = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum("bthk,hkd->btd", a, b))),
                    (0, 1))(x, w2)
  np.testing.assert_allclose(gx, ex, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, ew, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not share"):
    dense(x, w1, contract=2)
