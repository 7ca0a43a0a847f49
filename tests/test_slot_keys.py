"""Entity-keyed slots: off until a key is named, exact elsewhere, decoded like the full forward,
written by consolidation, carried by growth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.model import config, growth, sampler, slot_keys, transformer as T
from sleep_jax.sleep import consolidation as C

import tiny_kv as kv

CFG = config.tiny(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(0, 64), n_slots=3,
                  slot_rank=4)


def _keyed_model(n_keys=3, key_len=2):
  """A model with a live, non-zero slot in every level, before and after adding keys."""
  p = T.init(jax.random.key(0), CFG)
  mask = T.slot_mask_none(CFG)
  for j in range(CFG.n_levels):
    p, mask, s = growth.unlock_slot(p, mask, j, jax.random.key(10 + j))
    lvl = p["layers"][T.level_name(j)]
    lvl["slot_b"] = lvl["slot_b"].at[:, s].set(0.3)
  pk, cfgk = slot_keys.add(p, CFG, n_keys, key_len)
  return p, pk, cfgk, mask


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (3, 12)), jnp.int32)


def test_a_model_with_room_for_keys_but_none_is_the_model_without():
  p, pk, cfgk, mask = _keyed_model()
  toks = _tokens()
  np.testing.assert_array_equal(T.apply(pk, toks, cfgk, slot_mask=mask)[0],
                                T.apply(p, toks, CFG, slot_mask=mask)[0])


def test_a_keyed_slot_is_off_until_its_name_and_on_after_it():
  p, pk, cfgk, mask = _keyed_model()
  toks = _tokens()
  name = [int(toks[0, 4]), int(toks[0, 5])]
  keyed = slot_keys.write(pk, 0, growth.live_slots(mask, 0), slot_keys.encode([name], 3, 2))
  keyed = slot_keys.write(keyed, 1, growth.live_slots(mask, 1), slot_keys.encode([name], 3, 2))
  # Named nowhere else: the rows that do not name it are the model with every slot masked.
  toks = toks.at[1:, :].set(jnp.where(toks[1:] == name[1], name[1] + 1, toks[1:]))
  out = T.apply(keyed, toks, cfgk, slot_mask=mask)[0]
  off = T.apply(p, toks, CFG, slot_mask=T.slot_mask_none(CFG))[0]
  np.testing.assert_array_equal(out[1:], off[1:])
  np.testing.assert_array_equal(out[0, :5], off[0, :5])  # before the name ends
  assert float(jnp.abs(out[0, 5:] - off[0, 5:]).min(-1).max()) > 0  # on from the name's end
  # The gates the model reports are the keyed ones.
  gates = T.apply(keyed, toks, cfgk, slot_mask=mask, return_gates=True)[2]
  s = growth.live_slots(mask, 0)[0]
  assert float(gates[0][:, 0, :5, s].max()) == 0.0 and float(gates[0][:, 0, 5:, s].min()) > 0


def test_decoding_carries_the_keys_across_steps():
  """Token-by-token decoding through the KV cache (the name split over two calls) gives the full
  forward's logits, and the sampler's tokens are the greedy ones of the full forward."""
  p, pk, cfgk, mask = _keyed_model()
  toks = _tokens()
  name = [int(toks[0, 4]), int(toks[0, 5])]
  keyed = slot_keys.write(pk, 0, growth.live_slots(mask, 0), slot_keys.encode([name], 3, 2))
  full = T.apply(keyed, toks, cfgk, slot_mask=mask)[0]
  cache = T.init_cache(cfgk, 3, 12)
  outs = []
  for t in range(12):
    lg, cache = T.apply(keyed, toks[:, t:t + 1], cfgk, slot_mask=mask, cache=cache)
    outs.append(lg)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  out = sampler.sample(keyed, toks[:, :5], jnp.ones((3, 5), bool), jax.random.key(0), cfg=cfgk,
                       max_new_tokens=3, greedy=True, slot_mask=mask)
  gen = out.tokens[:, 5:]
  ref = toks[:, :5]
  for i in range(3):
    nxt = jnp.argmax(T.apply(keyed, ref, cfgk, slot_mask=mask)[0][:, -1], -1)
    np.testing.assert_array_equal(gen[:, i], nxt)
    ref = jnp.concatenate([ref, nxt[:, None]], 1)


def test_keys_never_train_and_are_kept_by_growth():
  _, pk, cfgk, mask = _keyed_model()
  keyed = slot_keys.write(pk, 0, [0], slot_keys.encode([[5, 6], [9]], 3, 2))
  g = jax.grad(lambda q: T.apply(q, _tokens(), cfgk, slot_mask=mask)[0].sum())(keyed)
  assert float(jnp.abs(g["slot_keys"]).max()) == 0.0
  assert slot_keys.held(keyed, 0, [0]) == [(5, 6), (9,)]
  grown, cfg5 = growth.allocate_slots(keyed, cfgk, 5)
  assert grown["slot_keys"].shape == (2, 5, 3, 2) and slot_keys.held(grown, 0, [0, 3, 4]) == [
      (5, 6), (9,)]
  pruned, _ = growth.reset_level(keyed, mask, 0)
  assert slot_keys.held(pruned, 0, [0, 1, 2]) == []
  with pytest.raises(ValueError, match="raise model_slot_keys"):
    slot_keys.encode([[1], [2], [3], [4]], 3, 2)
  with pytest.raises(ValueError, match="set both"):
    config.tiny(slot_keys=2)


def test_consolidation_writes_the_names_and_changes_nothing_else():
  """The tiny fact task, keyed on the facts' keys: the slot stores the facts (held-out wording)
  and every question about another key gets the base's logits to the bit."""
  base = kv.base_model()
  params, cfg = slot_keys.add(base, kv.CFG, 8, 1)
  facts = kv.facts()
  t = [kv.with_context(k, v, q) for k, v in facts for q in kv.TRAIN_Q]
  s = [kv.closed_book(k, q) for k, v in facts for q in kv.TRAIN_Q]
  kcfg = C.default_config()
  kcfg.update(dict(steps=80, batch_size=16, max_new_tokens=2, teacher_samples=2, gamma=0.0,
                   source_level=-1, target_level=1, divergence="fkl", lam=0.0, alpha=1.0,
                   ce_weight=1.0))
  kcfg.optimizer.lr = 3e-2
  res = C.consolidate(params, T.slot_mask_none(cfg), cfg, t, s, kcfg, jax.random.key(0),
                      keys=[[k] for k, _ in facts], stop_tokens=(kv.EOS,),
                      golds=[[v, kv.EOS] for k, v in facts for q in kv.TRAIN_Q])
  assert sorted(slot_keys.held(res.params, 1, [res.slot])) == sorted((k,) for k, _ in facts)
  held_out = jnp.asarray([kv.closed_book(k, kv.HELD_OUT_Q) for k, _ in facts], jnp.int32)
  pred = np.asarray(jnp.argmax(T.apply(res.params, held_out, cfg,
                                       slot_mask=res.slot_mask)[0][:, -1], -1))
  assert np.mean(pred == np.array([v for _, v in facts])) >= 0.6
  others = [k for k in kv.KEYS if k not in {k for k, _ in facts}]
  probe = jnp.asarray([kv.closed_book(k, q) for k in others for q in kv.TRAIN_Q], jnp.int32)
  np.testing.assert_array_equal(T.apply(res.params, probe, cfg, slot_mask=res.slot_mask)[0],
                                T.apply(base, probe, kv.CFG)[0])

