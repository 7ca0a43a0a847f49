"""Growth keeps the function: slot unlock/reset, HyperCloning, identity-block depth expansion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.model import config, growth, transformer as T

CFG = config.tiny(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(16, 64),
                  n_experts=(1, 2), n_slots=3, slot_rank=4, tie_embeddings=True)


def _params(cfg, seed=0, live=True):
  p = T.init(jax.random.key(seed), cfg)
  mask = jnp.zeros((cfg.n_levels, cfg.n_slots), bool)
  if live:  # one live, non-zero slot per level so growth is tested on slots too
    for j in range(cfg.n_levels):
      p, mask, s = growth.unlock_slot(p, mask, j, jax.random.key(100 + j))
      lvl = p["layers"][T.level_name(j)]
      lvl["slot_b"] = lvl["slot_b"].at[:, s].set(0.2 * jax.random.normal(jax.random.key(j), lvl["slot_b"][:, s].shape))
  return p, mask


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 10)), jnp.int32)


def test_unlock_reset_live():
  p, mask = _params(CFG, live=False)
  x = _tokens()
  base, _ = T.apply(p, x, CFG, slot_mask=mask)
  p1, m1, s = growth.unlock_slot(p, mask, 1, jax.random.key(1))
  assert int(s) == 0 and growth.live_slots(m1, 1) == [0] and growth.live_slots(m1, 0) == []
  after, _ = T.apply(p1, x, CFG, slot_mask=m1)
  np.testing.assert_array_equal(after, base)
  p2, m2, s2 = growth.unlock_slot(p1, m1, 1, jax.random.key(2))
  assert int(s2) == 1
  p3, m3 = growth.reset_level(p2, m2, 1)
  assert growth.live_slots(m3, 1) == []
  lvl = p3["layers"]["cms_1"]
  assert np.all(np.asarray(lvl["slot_a"][:, :2]) == 0) and np.all(np.asarray(lvl["slot_b"][:, :2]) == 0)
  # Other levels untouched.
  for k, v in p2["layers"]["cms_0"].items():
    np.testing.assert_array_equal(v, p3["layers"]["cms_0"][k])


def test_unlock_full_level_raises():
  p, mask = _params(CFG, live=False)
  mask = mask.at[0].set(True)
  with pytest.raises(ValueError, match="no free slot"):
    growth.unlock_slot(p, mask, 0, jax.random.key(0))


def test_slot_trainable_mask_selects_one_slot():
  p, _ = _params(CFG, live=False)
  m = growth.slot_trainable_mask(p, 1, 2)
  n_true = sum(int(np.sum(x)) for x in jax.tree.leaves(m))
  L, d, r = CFG.n_layers, CFG.d_model, CFG.slot_rank
  assert n_true == L * (d * r + r * d + d)
  assert np.all(m["layers"]["cms_1"]["slot_a"][:, 2]) and not np.any(m["layers"]["cms_1"]["slot_a"][:, :2])


@pytest.mark.parametrize("cfg", [CFG, config.tiny(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                 d_ff=(16, 64), n_slots=0, slot_rank=4)])
def test_allocate_slots_keeps_function_and_adds_capacity(cfg):
  p, mask = _params(cfg, live=cfg.n_slots > 0)
  x = _tokens()
  base, _ = T.apply(p, x, cfg, slot_mask=mask if cfg.n_slots else None)
  p2, cfg2 = growth.allocate_slots(p, cfg, 6)
  assert cfg2.n_slots == 6 and p2["layers"]["cms_0"]["slot_a"].shape[1] == 6
  m2 = jnp.zeros((cfg.n_levels, 6), bool).at[:, :cfg.n_slots].set(mask) if cfg.n_slots else \
      jnp.zeros((cfg.n_levels, 6), bool)
  after, _ = T.apply(p2, x, cfg2, slot_mask=m2)
  # Live slots are summed over a longer slot axis: equal up to the order of float sums.
  np.testing.assert_allclose(after, base, rtol=0, atol=1e-6)
  for _ in range(6 - int(m2[0].sum())):  # every free slot can be unlocked, one after the other
    p2, m2, s = growth.unlock_slot(p2, m2, 0, jax.random.key(int(m2[0].sum())))
  assert bool(m2[0].all()) and float(jnp.abs(p2["layers"]["cms_0"]["slot_a"][:, 5]).sum()) > 0
  with pytest.raises(ValueError, match="fewer than"):
    growth.allocate_slots(p2, cfg2, 2)


@pytest.mark.parametrize("tie", [True, False])
def test_hyperclone_preserves_logits(tie):
  import dataclasses
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  p, mask = _params(cfg)
  x = _tokens()
  small, _ = T.apply(p, x, cfg, slot_mask=mask)
  bp, bcfg = growth.hyperclone_width(p, cfg, 2)
  assert bcfg.d_model == 2 * cfg.d_model
  jax.tree.map(lambda a, s: None if a.shape == s.shape else (_ for _ in ()).throw(AssertionError()),
               bp, T.param_shapes(bcfg))
  big, _ = T.apply(bp, x, bcfg, slot_mask=mask)
  np.testing.assert_allclose(big, small, atol=1e-5, rtol=1e-5)


def test_expand_depth_preserves_logits():
  p, mask = _params(CFG)
  x = _tokens()
  small, _ = T.apply(p, x, CFG, slot_mask=mask)
  dp, dcfg = growth.expand_depth(p, CFG, insert_after=[0, 1, 1])
  assert dcfg.n_layers == 5
  deep, _ = T.apply(dp, x, dcfg, slot_mask=mask)
  np.testing.assert_allclose(deep, small, atol=1e-5, rtol=1e-5)


def test_hyperclone_with_qkv_bias_and_qk_norm():
  import dataclasses
  cfg = dataclasses.replace(CFG, qkv_bias=True, qk_norm=True)
  p, mask = _params(cfg)
  p["layers"]["q_bias"] = 0.1 * jax.random.normal(jax.random.key(1), p["layers"]["q_bias"].shape)
  p["layers"]["k_norm"] = 1 + 0.1 * jax.random.normal(jax.random.key(2), p["layers"]["k_norm"].shape)
  x = _tokens()
  small, _ = T.apply(p, x, cfg, slot_mask=mask)
  bp, bcfg = growth.hyperclone_width(p, cfg, 2)
  big, _ = T.apply(bp, x, bcfg, slot_mask=mask)
  np.testing.assert_allclose(big, small, atol=1e-5, rtol=1e-5)


def test_slot_gates_with_a_hidden_layer_keep_function_and_train_per_slot():
  """add_slot_gates adds a silent hidden layer to every slot's gate (the logits do not change);
  the leaves carry the slots axis, so a sleep trains only its own slots' gates; unlock and prune
  silence a slot's hidden layer again; a masked slot's gate gets exactly zero gradient."""
  from sleep_jax.train import state as state_lib
  p, mask = _params(CFG)
  x = _tokens()
  base, _ = T.apply(p, x, CFG, slot_mask=mask)
  p2, cfg2 = growth.add_slot_gates(*growth.allocate_slots(p, CFG, 6), 8)
  m2 = jnp.zeros((CFG.n_levels, 6), bool).at[:, :CFG.n_slots].set(mask)
  np.testing.assert_allclose(T.apply(p2, x, cfg2, slot_mask=m2)[0], base, rtol=0, atol=1e-6)
  jax.tree.map(lambda a, s: None if a.shape == s.shape else (_ for _ in ()).throw(AssertionError()),
               p2, T.param_shapes(cfg2))
  assert growth.add_slot_gates(p2, cfg2, 8)[1] is cfg2
  with pytest.raises(ValueError, match="already have"):
    growth.add_slot_gates(p2, cfg2, 4)
  p3, m3, s = growth.unlock_slot(p2, m2, 0, jax.random.key(1))
  s = int(s)
  lvl = dict(p3["layers"]["cms_0"])
  lvl["slot_gate_v"] = lvl["slot_gate_v"].at[:, s].set(1.0)  # as if trained
  lvl["slot_b"] = lvl["slot_b"].at[:, s].set(0.1)
  p3["layers"] = dict(p3["layers"], cms_0=lvl)
  train = state_lib.slot_trainable(p3, T.param_axes(cfg2), 0, s)["layers"]["cms_0"]
  assert train["slot_gate_v"].shape == (1, 6, 1) and bool(train["slot_gate_v"][0, s, 0])
  assert int(np.sum(train["slot_gate_u"])) == 1
  g = jax.grad(lambda q: jnp.sum(T.apply(q, x, cfg2, slot_mask=m3)[0] ** 2))(p3)
  free = ~np.asarray(m3[0])
  for name in ("slot_gate_u", "slot_gate_v"):
    assert float(jnp.abs(g["layers"]["cms_0"][name][:, free]).max()) == 0.0
  assert float(jnp.abs(g["layers"]["cms_0"]["slot_gate_u"][:, s]).max()) > 0.0
  p4, _ = growth.reset_level(p3, m3, 0)
  assert float(jnp.abs(p4["layers"]["cms_0"]["slot_gate_v"]).max()) == 0.0


def test_add_levels_keeps_function_and_the_new_levels_can_learn():
  """add_levels inserts empty slots-only levels before the slowest level: the logits keep their
  bits (slots live in the old levels, gates and keys included), the old levels keep their
  parameters under their new names, and a slot unlocked in a new level changes the output."""
  from sleep_jax.model import slot_keys
  p, mask = _params(CFG)
  p, cfg = growth.add_slot_gates(p, CFG, 4)
  p, cfg = slot_keys.add(p, cfg, 3, 2)
  x = _tokens()
  base, _ = T.apply(p, x, cfg, slot_mask=mask)
  p4, cfg4 = growth.add_levels(p, cfg, 4)
  assert (cfg4.d_ff, cfg4.n_experts, cfg4.n_levels) == ((16, 0, 0, 64), (1, 1, 1, 2), 4)
  jax.tree.map(lambda a, s: None if a.shape == s.shape else (_ for _ in ()).throw(AssertionError()),
               p4, T.param_shapes(cfg4))
  for old, new in ((0, 0), (1, 3)):
    jax.tree.map(np.testing.assert_array_equal, p["layers"][f"cms_{old}"],
                 p4["layers"][f"cms_{new}"])
  assert np.all(np.asarray(p4["slot_keys"][1:3]) == slot_keys.NO_KEY)
  m4 = jnp.zeros((4, cfg.n_slots), bool).at[0].set(mask[0]).at[3].set(mask[1])
  np.testing.assert_array_equal(T.apply(p4, x, cfg4, slot_mask=m4)[0], base)
  assert growth.add_levels(p4, cfg4, 4)[1] is cfg4
  with pytest.raises(ValueError, match="fewer than"):
    growth.add_levels(p4, cfg4, 2)
  p5, m5, s = growth.unlock_slot(p4, m4, 2, jax.random.key(5))
  lvl = dict(p5["layers"]["cms_2"])
  lvl["slot_b"] = lvl["slot_b"].at[:, int(s)].set(0.1)
  p5["layers"] = dict(p5["layers"], cms_2=lvl)
  assert float(jnp.abs(T.apply(p5, x, cfg4, slot_mask=m5)[0] - base).max()) > 1e-3
