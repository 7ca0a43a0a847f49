"""Train state: sharded step == single-device step, frozen masks, CMS update frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sleep_jax.model import transformer
from sleep_jax.model.config import tiny
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import optimizer as opt_lib, state as st, step as step_lib
from sleep_jax.train.lm_job import make_lm_loss

CFG = tiny(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(32, 64),
           n_experts=(1, 1), n_slots=2, slot_rank=4, chunk_sizes=(2, 1), max_seq_len=32)


def _batches(n, cfg=CFG, b=8, t=16, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    tok = rs.randint(3, cfg.vocab_size, (b, t)).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[:, -3:] = rs.rand(b, 3) > 0.5  # some right padding
    valid = np.cumprod(valid, axis=1).astype(bool)
    out.append({"tokens": tok, "valid": valid, "loss_mask": valid.copy()})
  return out


def _numpy_init(cfg, seed=0):
  """Random params as constants: the optimizer tests need values, not the (slow to compile on
  CPU) threefry initialiser that the sharded-init test already covers."""
  rs = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: (0.1 * rs.randn(*s.shape)).astype(np.float32),
                        transformer.param_shapes(cfg))
  return lambda r: jax.tree.map(jnp.asarray, params)


def _live_slots(cfg):
  return {"slot_mask": np.ones((cfg.n_levels, cfg.n_slots), bool)}


def _bits(x):
  return np.asarray(x).view(np.uint32)


def test_sharded_step_matches_single_device_and_is_sharded_by_rules():
  assert jax.device_count() == 8
  tx = opt_lib.with_cms_frequencies(optax.sgd(0.1, momentum=0.9), transformer.param_shapes(CFG),
                               chunk_sizes=CFG.chunk_sizes)
  loss_fn = make_lm_loss(CFG)
  batches = _batches(2)

  # Same random values on both sides (the threefry initialiser itself is tested sharded in
  # test_parallel_mesh; here constants keep compile time down).
  init = _numpy_init(CFG, 0)
  single, _ = st.create_train_state(0, init, tx, extras=_live_slots(CFG))
  step1 = step_lib.make_train_step(loss_fn, tx)
  losses1 = []
  for b in batches:
    single, m = step1(single, b)
    losses1.append(float(m["loss"]))

  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with mesh_lib.use_mesh(mesh):
    sharded, shardings = st.create_train_state(
        0, init, tx, mesh=mesh, param_shardings=mesh_lib.param_shardings(CFG, mesh),
        extras=_live_slots(CFG))
    step8 = step_lib.make_train_step(loss_fn, tx, state_shardings=shardings,
                               batch_shardings=mesh_lib.batch_sharding(mesh))
    losses8 = []
    for b in batches:
      sharded, m = step8(sharded, mesh_lib.shard_batch(b, mesh))
      losses8.append(float(m["loss"]))

  np.testing.assert_allclose(losses8, losses1, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(single.opt_state), jax.tree.leaves(sharded.opt_state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)

  # Parameters live where the rules table says, and each device holds only its shard.
  p = sharded.params
  assert p["embed"].sharding.spec == P("tensor", "fsdp")
  assert p["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert p["layers"]["k"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert p["layers"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert p["layers"]["cms_1"]["wi_gate"].sharding.spec == P(None, None, "fsdp", "tensor")
  assert p["layers"]["cms_1"]["wo"].sharding.spec == P(None, None, "tensor", "fsdp")
  assert p["layers"]["cms_0"]["slot_a"].sharding.spec == P(None, None, "fsdp", None)
  assert p["layers"]["q"].addressable_shards[0].data.shape == (2, 16, 2, 8)
  # Optimizer state (momentum, CMS accumulators) follows its parameter.
  flat = jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]
  q_like = [x for path, x in flat if st.path_str(path).endswith("layers/q")]
  acc_like = [x for path, x in flat if st.path_str(path).endswith("cms_0/wi_gate")]
  assert len(q_like) == 1 and q_like[0].sharding.spec == P(None, "fsdp", "tensor", None)
  assert len(acc_like) == 2  # accumulated gradient + momentum inside MultiSteps
  assert all(x.sharding.spec == P(None, None, "fsdp", "tensor") for x in acc_like)
  assert int(sharded.step) == 2


_UPDATED = {}


@pytest.mark.parametrize("subset", [False, True])
def test_frozen_parameters_keep_exact_bits_under_adamw(subset):
  axes = transformer.param_axes(CFG)
  shapes = transformer.param_shapes(CFG)
  # Consolidation: only slot 0 of CMS level 1 trains.
  mask = st.slot_trainable(shapes, axes, level=1, slot=0)
  assert mask["layers"]["cms_1"]["slot_a"].shape == (1, CFG.n_slots, 1, 1)
  assert mask["layers"]["cms_1"]["slot_router"].shape == (1, 1, CFG.n_slots)
  tx = opt_lib.with_cms_frequencies(optax.adamw(1e-2, weight_decay=0.5), shapes,
                               chunk_sizes=CFG.chunk_sizes, trainable=mask)
  state, _ = st.create_train_state(1, _numpy_init(CFG, 1), tx, trainable=mask,
                                   extras=_live_slots(CFG))
  # A frozen -0.0 must stay -0.0 (p + 0.0 would turn it into +0.0).
  params = state.params
  params["final_norm"] = params["final_norm"].at[0].set(-0.0)
  params["layers"]["cms_1"]["slot_b"] = params["layers"]["cms_1"]["slot_b"].at[:, 1].set(-0.0)
  state = state.replace(params=params)
  before = jax.tree.map(np.asarray, state.params)
  # Structurally frozen arrays have no optimizer state at all.
  assert len(jax.tree.leaves(state.opt_state)) < len(jax.tree.leaves(state.params))

  step = step_lib.make_train_step(make_lm_loss(CFG), tx,
                            differentiate=st.trainable_arrays(mask) if subset else None)
  for b in _batches(4, seed=1):
    state, _ = step(state, b)
  after = jax.tree.map(np.asarray, state.params)
  _UPDATED[subset] = after
  if len(_UPDATED) == 2:  # differentiating only trainable arrays changes nothing but speed
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 _UPDATED[False], _UPDATED[True])

  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  for (path, b), a in zip(flat_b, flat_a):
    name = st.path_str(path)
    if name.startswith("layers/cms_1/slot"):
      ax = 2 if name.endswith("slot_router") else 1
      frozen_b, frozen_a = np.take(b, [1], axis=ax), np.take(a, [1], axis=ax)
      np.testing.assert_array_equal(_bits(frozen_a), _bits(frozen_b), err_msg=name)
      assert not np.array_equal(np.take(a, [0], axis=ax), np.take(b, [0], axis=ax)), name
    else:
      np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)


def test_idle_slots_frozen_trains_the_same_values_without_their_gradients():
  """The LM job's mask (every slot masked): the slot arrays of idle levels are frozen, a level
  with a live slot keeps its own; training with it (decay-free AdamW, CMS frequencies) ends in
  the bits of training every array, and under weight decay the masked capacity keeps its bits."""
  shapes = transformer.param_shapes(CFG)
  one_live = np.zeros((CFG.n_levels, CFG.n_slots), bool)
  one_live[1, 0] = True
  names = lambda m: sorted(st.path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(m)[0]
                           if not v)
  assert names(st.idle_slots_frozen(shapes, one_live)) == [
      "layers/cms_0/slot_a", "layers/cms_0/slot_b", "layers/cms_0/slot_router"]
  none = np.zeros_like(one_live)
  frozen = st.idle_slots_frozen(shapes, none)
  assert len(names(frozen)) == 6 and all("/slot_" in n for n in names(frozen))

  def train(trainable, weight_decay):
    tx = opt_lib.with_cms_frequencies(optax.adamw(1e-2, weight_decay=weight_decay), shapes,
                                      chunk_sizes=CFG.chunk_sizes, trainable=trainable)
    state, _ = st.create_train_state(4, _numpy_init(CFG, 4), tx, trainable=trainable,
                                     extras={"slot_mask": none})
    diff = None if trainable is None else st.trainable_arrays(trainable)
    step = step_lib.make_train_step(make_lm_loss(CFG), tx, differentiate=diff)
    for b in _batches(4, seed=2):
      state, _ = step(state, b)
    return state

  every, idle = train(None, 0.0), train(frozen, 0.0)
  assert len(jax.tree.leaves(idle.opt_state)) < len(jax.tree.leaves(every.opt_state))
  for a, b in zip(jax.tree.leaves(every.params), jax.tree.leaves(idle.params)):
    np.testing.assert_array_equal(_bits(a), _bits(b))
  decayed = train(frozen, 0.5).params["layers"]["cms_0"]["slot_a"]
  init = _numpy_init(CFG, 4)(None)["layers"]["cms_0"]["slot_a"]
  np.testing.assert_array_equal(_bits(decayed), _bits(init))


def test_cms_level_changes_only_every_chunk_by_accumulated_update():
  cfg = tiny(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(32, 32),
             n_experts=(1, 1), n_slots=0, slot_rank=4, chunk_sizes=(4, 1), max_seq_len=32)
  lr = 0.5
  shapes = transformer.param_shapes(cfg)
  tx = opt_lib.with_cms_frequencies(optax.sgd(lr), shapes, chunk_sizes=cfg.chunk_sizes)
  loss_fn = make_lm_loss(cfg)
  state, _ = st.create_train_state(2, _numpy_init(cfg, 2), tx)
  step = step_lib.make_train_step(loss_fn, tx, donate=False)
  grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))

  lvl0 = lambda s: jax.tree.map(np.asarray, s.params["layers"]["cms_0"])
  start, grads = lvl0(state), []
  for i, b in enumerate(_batches(8, cfg, seed=2), start=1):
    grads.append(grad_fn(state.params, b)["layers"]["cms_0"])
    prev_all = jax.tree.map(np.asarray, state.params)
    state, _ = step(state, b)
    now = lvl0(state)
    # The every-step parts of the model change at every step.
    assert not np.array_equal(np.asarray(state.params["layers"]["q"]), prev_all["layers"]["q"])
    if i % 4:
      for a, b0 in zip(jax.tree.leaves(now), jax.tree.leaves(start)):
        np.testing.assert_array_equal(a, b0)
    else:
      mean = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *grads)
      expect = jax.tree.map(lambda p, g: p - lr * g, start, mean)
      for a, e, b0 in zip(jax.tree.leaves(now), jax.tree.leaves(expect), jax.tree.leaves(start)):
        assert not np.array_equal(a, b0)
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5)
      start, grads = now, []


def test_step_uses_and_advances_state_rng():
  tx = optax.sgd(0.0)

  def loss_fn(params, batch, rng):
    return jnp.sum(params["w"]) * 0.0, {"r": jax.random.uniform(rng)}

  state, _ = st.create_train_state(3, lambda r: {"w": jnp.ones(3)}, tx)
  step = step_lib.make_train_step(loss_fn, tx, donate=False)
  s1, m1 = step(state, {"x": jnp.zeros(1)})
  s1b, m1b = step(state, {"x": jnp.zeros(1)})
  _, m2 = step(s1, {"x": jnp.zeros(1)})
  _, m3 = step(state, {"x": jnp.zeros(1)}, jax.random.key(7))
  assert float(m1["r"]) == float(m1b["r"])  # pure: same state, same key
  assert float(m1["r"]) != float(m2["r"])  # the state's rng advances
  assert float(m3["r"]) != float(m1["r"])  # an explicit key overrides
  assert not np.array_equal(np.asarray(s1.rng), np.asarray(state.rng))


def test_mask_that_does_not_fit_is_rejected():
  shapes = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
  with pytest.raises(ValueError, match="does not broadcast"):
    st.create_train_state(0, lambda r: {"w": jnp.ones((3, 4))}, optax.sgd(0.1),
                          trainable={"w": np.ones((2,), bool)})
  del shapes


def test_cached_train_step_reuses_one_compiled_step_per_key():
  """Phases run once per sleep get their step from ``cached_train_step``: equal keys give the
  same jitted step (compiled once), a different optimizer or differentiated set a new one."""
  import ml_collections
  opt = lambda lr: ml_collections.ConfigDict(dict(name="adam", lr=lr, grad_clip=1.0))
  loss = lambda p, b, r: (jnp.sum(p["w"] ** 2), {})
  a = step_lib.cached_train_step(("test_loss", 1), lambda: loss, opt(0.1), {"w": True})
  b = step_lib.cached_train_step(("test_loss", 1), lambda: loss, opt(0.1), {"w": True})
  assert a is b
  assert step_lib.cached_train_step(("test_loss", 1), lambda: loss, opt(0.2), {"w": True}) is not a
  assert step_lib.cached_train_step(("test_loss", 1), lambda: loss, opt(0.1), {"w": False}) is not a
  assert step_lib.cached_train_step(("test_loss", 2), lambda: loss, opt(0.1), {"w": True}) is not a
  tx, step = a
  params = {"w": jnp.ones((3,))}
  state = st.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        rng=st.rng_data(jax.random.key(0)), trainable={"w": jnp.array(True)},
                        extras={})
  for _ in range(2):
    state, m = step(state, {})
  assert int(state.step) == 2 and float(m["loss"]) < 3.0
  assert step.jitted._cache_size() == 1  # one compilation for both calls


def test_optimizer_state_covers_only_the_trained_arrays():
  """fit.new_state gives frozen arrays no optimizer state, and the consolidation's step (only the
  trained arrays differentiated and updated) equals the full-state step bit for bit."""
  from sleep_jax.train import fit as fit_lib
  shapes = transformer.param_shapes(CFG)
  mask = st.slot_trainable(shapes, transformer.param_axes(CFG), level=1, slot=0)
  mask = jax.tree.map(lambda m, s: np.broadcast_to(m, s.shape), mask, shapes)
  params = _numpy_init(CFG, 2)(None)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  extras = _live_slots(CFG)
  sparse, _ = fit_lib.new_state(params, tx, 0, mask, extras)
  n_trained = sum(bool(np.any(m)) for m in jax.tree.leaves(mask))
  assert len(jax.tree.leaves(sparse.opt_state)) == 2 * n_trained + 1  # mu, nu per array + count
  full = sparse.replace(opt_state=tx.init(sparse.params))
  sparse_step = step_lib.make_train_step(make_lm_loss(CFG), tx, donate=False,
                                         differentiate=st.trainable_arrays(mask))
  full_step = step_lib.make_train_step(make_lm_loss(CFG), tx, donate=False)
  for b in _batches(2, seed=3):
    sparse, m_sparse = sparse_step(sparse, b)
    full, m_full = full_step(full, b)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)),
               sparse.params, full.params)
  assert float(m_sparse["grad_norm"]) == float(m_full["grad_norm"])
