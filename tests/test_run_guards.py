"""Runs that never lie: config records, results of every finished run, the NaN guard, bounded
inputs, a full disk, the workdir lock and the command line's exit codes."""

import dataclasses
import errno
import json
import os
import socket

import jax
import numpy as np
import pytest

from sleep_jax import errors, main, tasks
from sleep_jax import workdir as workdir_lib
from sleep_jax.configs import knowledge
from sleep_jax.data import documents
from sleep_jax.model import transformer
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.sleep import cycle, validate


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("base"))


def _config(base_cache, methods):
  c = knowledge.get_config("test")
  c.methods, c.base_cache = tuple(methods), base_cache
  return c


def test_changed_config_stops_narrowed_methods_reuse_and_results_keep_every_run(tmp_path,
                                                                                 base_cache):
  work, logs = str(tmp_path / "w"), []
  cycle.run_experiment(_config(base_cache, ("base", "in_context")), work, log=lambda *_: None)
  # Only the methods narrowed: reused, said so, and the table keeps both finished runs.
  res = cycle.run_experiment(_config(base_cache, ("base",)), work, log=logs.append)
  assert any(m.startswith("base seed 0: finished, reused") for m in logs)
  assert set(res["methods"]) == {"base", "in_context"}
  md = open(os.path.join(work, "results.md")).read()
  assert "| base |" in md and "| in_context |" in md
  # A batching key (dreams per vmap: memory, not results) is not a config change.
  c = _config(base_cache, ("base",))
  c.dreaming.parallel_dreams = 3
  c.model_remat = "full"  # nor is what a train step recomputes (test_convert: equal values)
  logs.clear()
  cycle.run_experiment(c, work, log=logs.append)
  assert any(m.startswith("base seed 0: finished, reused") for m in logs)
  # One result-relevant key changed: stop, naming it, before anything is overwritten.
  before = open(os.path.join(work, "runs/base/seed_0/result.json")).read()
  c = _config(base_cache, ("base",))
  c.eval.retention_people = 4
  with pytest.raises(errors.UserError, match="eval.retention_people.*on_config_change=restart"):
    cycle.run_experiment(c, work, log=lambda *_: None)
  assert open(os.path.join(work, "runs/base/seed_0/result.json")).read() == before
  # ... unless asked to restart: the run is redone with the new config; the other method's run
  # (old config) is no longer in the table.
  c.on_config_change = "restart"
  res = cycle.run_experiment(c, work, log=logs.append)
  assert any("restarting the run" in m for m in logs)
  assert set(res["methods"]) == {"base"}

  # A run recorded under the earlier random-number scheme (no ``random_numbers`` key) is another
  # config: its draws were not this code's.
  path = os.path.join(work, "runs/base/seed_0/config.json")
  with open(path) as f:
    rec = json.load(f)
  del rec["random_numbers"]
  with open(path, "w") as f:
    json.dump(rec, f)
  c.on_config_change = "error"
  with pytest.raises(errors.UserError, match="random_numbers"):
    cycle.run_experiment(c, work, log=lambda *_: None)


def test_nan_stops_the_run_naming_the_phase_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                base_cache):
  c = _config(base_cache, ("sleep_no_dream",))
  c.consolidation.optimizer.lr = 3e38  # updates overflow float32
  work = str(tmp_path / "w")
  with pytest.raises(errors.NonFiniteError,
                     match=r"sleep_no_dream seed 0 chunk 0 phase consolidation.*non-finite"):
    cycle.run_experiment(c, work, log=lambda *_: None)
  run = os.path.join(work, "runs", "sleep_no_dream", "seed_0")
  assert not os.path.exists(os.path.join(run, "result.json"))
  assert not os.path.exists(os.path.join(work, "results.json"))
  setup = tasks.make_setup(c, work, log=lambda *_: None)
  ck = ckpt_lib.Checkpointer(os.path.join(run, "ckpt"), async_save=False, handle_sigterm=False)
  r = ck.restore({"params": setup.params, "slot_mask": transformer.slot_mask_none(setup.cfg)})
  ck.close()
  assert r.position["phase"] == 1 and r.position["chunk"] == 0  # saved after wake, not after
  assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(r.state["params"]))


def test_full_disk_during_a_save_is_a_user_error(tmp_path, base_cache, monkeypatch):
  def full(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", full)
  with pytest.raises(errors.UserError, match=r"disk full while saving to .*ckpt: \d+ MiB free"):
    cycle.run_experiment(_config(base_cache, ("base",)), str(tmp_path / "w"), log=lambda *_: None)


class _Fmt:
  def with_context(self, passage, q):
    return (passage + " " + q).split()


def test_a_passage_longer_than_the_context_is_refused_or_cut():
  c = knowledge.get_config("test")
  c.seq_len, c.eval.max_new_tokens, c.consolidation.max_new_tokens = 20, 2, 2
  q = documents.Question("Who ?", "x")
  doc = documents.Document("long-doc", " ".join(["w"] * 30), (q,), (q,))
  setup = dataclasses.make_dataclass("S", ["fmt", "chunks"])(_Fmt(), [[doc]])
  with pytest.raises(errors.UserError, match="'long-doc'.*> seq_len 20.*data.truncate=True"):
    validate.bound_inputs(c, setup)
  c.data.truncate, logs = True, []
  validate.bound_inputs(c, setup, log=logs.append)
  cut = setup.chunks[0][0]
  assert len(_Fmt().with_context(cut.passage, "Who ?")) + 2 == 20
  assert "long-doc" in logs[0] and "cut from 30 to 16 words" in logs[0]


def test_lock_names_the_holder_and_takes_over_a_stale_one(tmp_path):
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(errors.UserError, match=f"in use by pid {os.getpid()}"):
      workdir_lib.Lock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / ".lock")
  dead = 2 ** 22 + 12345  # above the default pid_max: no such process
  (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
  lock = workdir_lib.Lock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()


@pytest.mark.parametrize("exc,code", [(errors.UserError("x"), 2), (errors.NonFiniteError("x"), 3),
                                      (errors.Preempted("saved"), 0)])
def test_command_line_exit_codes(exc, code, monkeypatch):
  monkeypatch.delenv("SLEEP_JAX_DEBUG", raising=False)
  with pytest.raises(SystemExit) as e:
    with main._reported():
      raise exc
  assert e.value.code == code


def test_slot_demand_follows_the_schedule_and_prunes():
  # Level 0 every chunk, pruned every 2 chunks by level 1, which is never pruned.
  assert validate.slot_demand((1, 2), 3, 5) == {0: 6, 1: 6}
  assert validate.slot_demand((1, 1000), 1, 5) == {0: 5, 1: 0}  # one fast level holds all
  assert validate.slot_demand((1, 2), 4, 5, reset_between_chunks=True) == {0: 4, 1: 4}
  assert validate.slot_demand((1, 2), 1, 5, prune=False) == {0: 5, 1: 2}


def test_too_few_slots_for_the_stream_is_refused_before_any_sleep():
  from types import SimpleNamespace
  c = knowledge.get_config("test")
  c.methods = ("base", "sft", "sleep")
  setup = SimpleNamespace(cfg=SimpleNamespace(n_slots=4, n_levels=2), chunks=[[]] * 3)
  validate.slot_capacity(c, setup)  # 1 slot per sleep, 2 sleeps before a prune: fits
  c.consolidation.slots = 3
  with pytest.raises(errors.UserError, match=r"'sleep' unlocks 3 slot\(s\).*6 slots, but the "
                                             r"model has 4.*model_slots=6"):
    validate.slot_capacity(c, setup)
  c.methods = ("base", "sft", "sleep_no_expansion")  # trains existing weights: no slots
  validate.slot_capacity(c, setup)


def test_fewer_dreams_than_passages_is_warned_before_any_sleep():
  """Dream row i reads prompt i mod P: with ``dreaming.m`` below a chunk's dream prompts, the
  later passages get no dream. Said once, with the value that covers them; nothing for methods
  that do not dream or templates that read no passage."""
  from types import SimpleNamespace
  from sleep_jax.data.documents import Document
  doc = Document("d", "One. Two.", (), ())
  c = knowledge.get_config("test")
  c.methods = ("sft", "sleep_no_dream", "sleep", "sleep_no_grad_selection")
  c.dreaming.templates = {"qa": "{context} Q:"}
  setup = SimpleNamespace(chunks=[[doc] * 3, [doc] * 5])
  said = []
  c.dreaming.m = 5
  validate.dream_coverage(c, setup, log=said.append)
  assert said == []
  c.dreaming.m = 4
  validate.dream_coverage(c, setup, log=said.append)
  assert said == ["warning: sleep: dreaming.m=4 dreams a round for 5 dream prompts a chunk: "
                  "prompts 5-5 get no dream; pass --config.dreaming.m=5 (or a multiple) to "
                  "write about every passage"]
  c.dreaming.focus = "sentences"  # a prompt per sentence
  validate.dream_coverage(c, setup, log=said.append)
  assert "for 10 dream prompts" in said[-1]
  c.dreaming.templates = {"environment": "Problem:"}  # reads no passage: coverage is moot
  c.methods = ("sleep",)
  validate.dream_coverage(c, setup, log=said.append)
  assert len(said) == 2
