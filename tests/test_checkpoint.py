"""Checkpoints: kill/resume bit-identity, resharding across meshes, clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_jax.train import lm_job as train
from sleep_jax.configs import default as default_config
from sleep_jax.model import transformer
from sleep_jax.model.config import tiny
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import optimizer as opt_lib, state as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(32, 64),
           n_experts=(1, 1), n_slots=2, slot_rank=4, chunk_sizes=(2, 1), max_seq_len=32)


def _numpy_init(cfg, seed=0):
  rs = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: (0.1 * rs.randn(*s.shape)).astype(np.float32),
                        transformer.param_shapes(cfg))
  return lambda r: jax.tree.map(jnp.asarray, params)


def _tx(cfg):
  return opt_lib.with_cms_frequencies(optax.adamw(1e-3), transformer.param_shapes(cfg),
                                 chunk_sizes=cfg.chunk_sizes)


def _state_on(mesh, cfg=CFG, seed=0):
  with mesh_lib.use_mesh(mesh):
    return st.create_train_state(seed, _numpy_init(cfg, seed), _tx(cfg), mesh=mesh,
                                 param_shardings=mesh_lib.param_shardings(cfg, mesh))


def _abstract_on(mesh, cfg=CFG):
  return st.abstract_train_state(0, _numpy_init(cfg), _tx(cfg), mesh=mesh,
                                 param_shardings=mesh_lib.param_shardings(cfg, mesh))[0]


def _assert_trees_bit_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, st.path_str(path)
    assert x.tobytes() == y.tobytes(), f"{st.path_str(path)} differs"


# ----------------------------------------------------------------------------------------------
def _run_config(steps):
  c = default_config.get_config("test")
  c.unlock()
  c.train.steps = steps
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.checkpoint.async_save = True
  c.sample.num = 0
  c.lock()
  return c


def _final_checkpoint(workdir, config):
  """(state, next batch) restored from a run's last checkpoint."""
  mesh = mesh_lib.mesh_from_config(config)
  cfg, tx, trainable, extras = train.build_model_and_optimizer(config)
  with mesh_lib.use_mesh(mesh):
    abstract, _ = st.abstract_train_state(
        config.seed, lambda r: transformer.init(r, cfg), tx, mesh=mesh,
        param_shardings=mesh_lib.param_shardings(cfg, mesh), trainable=trainable,
        extras=extras)
    it = train.make_train_iterator(config, workdir, train.ByteTokenizer())
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), handle_sigterm=False)
    restored = ck.restore(abstract, data_iterator=it)
    ck.close()
  return restored, next(it)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from sleep_jax import main
    from sleep_jax.train import lm_job as train

    def kill_at(step, state):
      if step == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: a hard crash

    orig = train.run
    train.run = lambda config, workdir: orig(config, workdir, hooks=[kill_at])
    main.run([sys.argv[0], "--config={repo}/sleep_jax/configs/default.py:test",
              "--workdir={workdir}", "--config.train.steps=8", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.sample.num=0"])
""")


def test_kill_and_resume_is_bit_identical(tmp_path):
  data_dir = str(tmp_path / "tfds")  # shared, so the corpus is generated once
  # Uninterrupted reference run: 8 steps.
  ref_dir = str(tmp_path / "ref")
  config = _run_config(8)
  config.unlock()
  config.data.data_dir = data_dir
  config.lock()
  ref = train.run(config, ref_dir)
  assert ref["step"] == 8 and not ref["preempted"]

  # Interrupted run, 1: a subprocess (through sleep_jax.main) is SIGKILLed at step 5, after the
  # async save of step 4 was started. Whatever was not committed must be invisible.
  work = str(tmp_path / "work")
  script = KILL_SCRIPT.format(repo=REPO, kill_step=5, workdir=work)
  script = script.replace('"--config.sample.num=0"',
                          f'"--config.sample.num=0", "--config.data.data_dir={data_dir}"')
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]
  steps = ckpt_lib.Checkpointer(os.path.join(work, "checkpoints"), handle_sigterm=False)
  committed = steps.all_steps()
  steps.close()
  assert committed and max(committed) in (2, 4), committed

  # 2: resume in this process; SIGTERM (preemption) arrives after step 6, so the loop finishes
  # step 7, saves it and returns cleanly.
  def sigterm_at_6(step, state):
    del state
    if step == 6:
      os.kill(os.getpid(), 15)
  out = train.run(config, work, hooks=[sigterm_at_6])
  assert out["preempted"] and out["step"] == 7
  # 3: resume again and finish.
  out = train.run(config, work)
  assert out["step"] == 8 and not out["preempted"]

  # Same params, optimizer state, rng, step, masks, and the same next data batch.
  (r_ref, next_ref), (r_res, next_res) = (_final_checkpoint(ref_dir, config),
                                          _final_checkpoint(work, config))
  assert r_ref.step == r_res.step == 8
  _assert_trees_bit_equal(r_ref.state, r_res.state)
  _assert_trees_bit_equal(ref["state"], out["state"])
  for k in next_ref:
    np.testing.assert_array_equal(next_ref[k], next_res[k])
  assert r_res.position["phase"] == "train_lm" and r_res.position["step"] == 8
  # Metrics of the resumed run continue the same log.
  with open(os.path.join(work, "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged[-1] == 8


def test_checkpoint_from_8_devices_restores_on_1_and_back(tmp_path):
  mesh8 = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mesh1 = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  s8, _ = _state_on(mesh8)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "a"), handle_sigterm=False)
  assert ck.save(3, s8, position={"cycle": 2, "phase": "sleep"})
  ck.wait()

  r1 = ck.restore(_abstract_on(mesh1))
  assert r1.step == 3 and r1.position == {"step": 3, "cycle": 2, "phase": "sleep"}
  q = r1.state.params["layers"]["q"]
  assert len(q.sharding.device_set) == 1
  _assert_trees_bit_equal(r1.state, s8)
  ck.close()

  ck1 = ckpt_lib.Checkpointer(str(tmp_path / "b"), handle_sigterm=False)
  ck1.save(4, r1.state)
  ck1.wait()
  r8 = ck1.restore(_abstract_on(mesh8))
  q8 = r8.state.params["layers"]["q"]
  assert len(q8.sharding.device_set) == 8
  assert q8.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  _assert_trees_bit_equal(r8.state, s8)
  ck1.close()


def test_truncated_checkpoint_gives_clear_error_and_is_kept(tmp_path):
  mesh1 = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  s, _ = _state_on(mesh1)
  ck = ckpt_lib.Checkpointer(str(tmp_path), handle_sigterm=False)
  ck.save(1, s)
  ck.wait()
  files = []
  for root, _, names in os.walk(tmp_path / "1" / "state"):
    files += [os.path.join(root, n) for n in names]
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  with open(biggest, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match=r"step 1 .* unreadable"):
    ck.restore(_abstract_on(mesh1))
  # Never overwritten silently: the bad step stays, and saving the same step writes nothing.
  assert not ck.save(1, s)
  ck.wait()
  assert os.path.getsize(biggest) == size // 2
  ck.close()


def test_mismatched_checkpoint_names_the_differences(tmp_path):
  mesh1 = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  s, _ = _state_on(mesh1)
  ck = ckpt_lib.Checkpointer(str(tmp_path), handle_sigterm=False)
  ck.save(1, s)
  ck.wait()
  other = tiny(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=(32, 64),
               n_experts=(1, 1), n_slots=2, slot_rank=4, chunk_sizes=(2, 1), max_seq_len=32)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(_abstract_on(mesh1, other))
  msg = str(e.value)
  assert "params/embed" in msg and "(64, 32)" in msg and "(64, 48)" in msg
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint step 7"):
    ck.restore(_abstract_on(mesh1), step=7)
  ck.close()
