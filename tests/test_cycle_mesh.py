"""The sleep cycle on a device mesh: a sleep (consolidation, one dreaming round, dream training) on
a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices gives the parameters of the same sleep on
one device, and the parameters and optimizer state live where the logical-axis rules say."""

import contextlib

import jax
import numpy as np
import optax
import pytest

from sleep_jax import tasks
from sleep_jax.configs import knowledge
from sleep_jax.model import transformer
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.sleep import cycle, dream_phase
from sleep_jax.sleep.sleep_state import SleepState
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import state as state_lib

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  c = knowledge.get_config("test")
  c.base_cache = str(tmp_path_factory.mktemp("base"))
  return c, tasks.make_setup(c, str(tmp_path_factory.mktemp("w")), log=lambda *_: None)


def _sleep(config, setup, sizes):
  """wake -> consolidation -> dreaming (with dream training) of chunk 0 on a mesh of ``sizes``."""
  mesh = mesh_lib.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  with mesh_lib.use_mesh(mesh) if mesh.size > 1 else contextlib.nullcontext():
    s = cycle.place(setup, mesh)
    ctx = cycle.context(config, s, "sleep", 0)
    st = SleepState(s.params, transformer.slot_mask_none(s.cfg))
    st.generator = dream_phase.init_generator(ctx)
    infos = {}
    for fn in cycle.PHASE_FNS[:3]:
      st, info = fn(st, ctx, 0)
      infos.update(info)
  return st, infos, mesh


# Two whole sleeps (one device, then 8) compile every phase twice: ~2 minutes of the CI's two
# cores, so it runs with the slow tests (pytest -m slow tests/test_cycle_mesh.py).
@pytest.mark.slow
def test_sleep_on_a_mesh_equals_one_device(setup):
  config, s = setup
  one, info1, _ = _sleep(config, s, {"data": 1, "fsdp": 1, "tensor": 1})
  many, info8, mesh = _sleep(config, s, MESH)
  assert info1["dream_training_steps"] > 0 and info8["dreams_accepted"] == info1["dreams_accepted"]
  assert one.slot == many.slot >= 0
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  # The slept model stays where the rules put it.
  want = mesh_lib.param_shardings(s.cfg, mesh)
  got = jax.tree.map(lambda x: x.sharding, many.params)
  for w, g, x in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(many.params)):
    assert g.is_equivalent_to(w, x.ndim), (g, w)
  assert any(len(w.device_set) == 8 and not w.is_fully_replicated for w in jax.tree.leaves(want))


def test_train_state_on_a_mesh_is_sharded_by_the_rules():
  """A phase's train state (``fit.new_state``) on the mesh: parameters where the rules put them,
  Adam moments sharded like their parameter (the slow test above checks them after a sleep)."""
  from sleep_jax.model import config as model_config
  cfg = model_config.tiny(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          d_ff=(0, 64), n_experts=(1, 1), n_slots=2, slot_rank=4)
  mesh = mesh_lib.make_mesh(MESH)
  psh = mesh_lib.param_shardings(cfg, mesh)
  with mesh_lib.use_mesh(mesh):
    params = jax.device_put(transformer.init(jax.random.key(0), cfg), psh)
    tx = optax.adam(1e-3)
    st, shardings = fit_lib.new_state(params, tx, 0, state_lib.all_trainable(params),
                                      {"slot_mask": transformer.slot_mask_none(cfg)})
  assert shardings is not None
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(psh))
  for leaves in (st.params, st.opt_state[0].mu):
    for m, p, x in zip(jax.tree.leaves(leaves), jax.tree.leaves(psh), jax.tree.leaves(params)):
      assert m.sharding.is_equivalent_to(p, x.ndim)  # where the rules say
