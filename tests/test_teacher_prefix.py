"""The teacher's prompt cache (``sleep/teacher_prefix.py``): a step's teacher logits equal one
forward over the whole sequence, for every model feature the cache carries."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.model import config as mcfg
from sleep_jax.model import slot_keys
from sleep_jax.model import transformer as T
from sleep_jax.sleep import consolidation as C
from sleep_jax.sleep import teacher_prefix as TP


def _model(kind):
  cfg = mcfg.tiny(n_slots=2, slot_rank=4)
  params = T.init(jax.random.key(0), cfg)
  mask = jnp.ones((cfg.n_levels, cfg.n_slots), bool)  # every slot live: its gates matter
  if kind == "sticky":
    cfg = dataclasses.replace(cfg, slot_gate_sticky=True)
  if kind == "keyed":  # a two-token key that spans the prompt's last token and the prefix
    params, cfg = slot_keys.add(params, cfg, 2, 2)
    params = slot_keys.write(params, 1, [0], slot_keys.encode([[7, 8]], 2, 2))
  return params, cfg, mask


@pytest.mark.parametrize("kind", ["plain", "sticky", "keyed"])
def test_continuing_the_cached_prompt_gives_the_whole_sequence_logits(kind, monkeypatch):
  params, cfg, mask = _model(kind)
  rng = np.random.default_rng(1)
  V, N, E = cfg.vocab_size, 5, 4
  prompts = [rng.integers(3, V, n).tolist() for n in (9, 3, 17, 1, 12)]
  prompts[2][-1] = 7  # item 2's key: the prompt ends in 7, its prefix starts with 8
  teacher = C.Teacher(params, cfg, mask, prompts)
  items = [2, 0, 4, 2, 3, 1]
  prefixes = [[8, 11, 12], [], rng.integers(3, V, 4).tolist(), [8], [], [5, 6]]
  comp = jnp.asarray(rng.integers(3, V, (len(items), N)), jnp.int32)
  live = jnp.asarray(np.arange(N)[None, :] < np.array([[5], [2], [5], [0], [4], [3]]))
  # One forward over each row's whole sequence (what every step ran before the cache).
  seqs = [prompts[k] + p for k, p in zip(items, prefixes)]
  width = C._bucket(max(map(len, seqs)))
  toks, valid = C._pad_left(seqs, width, 0)
  want = C.completion_logits(params, jnp.concatenate([toks, comp], 1),
                             jnp.concatenate([valid, live], 1), mask, cfg, width)
  kept = TP.PromptCache(teacher, len(items), E, N)
  kept.rows([0, 1, 1, 0, 0, 0])  # an earlier step read items 0 and 1
  got = kept.logits(kept.rows(items), items, prefixes, comp, live)  # 2, 3, 4 read now
  assert sorted(kept.kept) == [0, 1, 2, 3, 4]  # under the budget: every item read is kept
  assert got.shape == want.shape == (len(items), N + 1, V)
  scored = np.asarray(jnp.concatenate([jnp.ones((len(items), 1), bool), live], 1))
  np.testing.assert_allclose(np.asarray(got)[scored], np.asarray(want)[scored], atol=2e-5)
  # Over the budget nothing is kept; each step prefills its own rows: the same logits.
  monkeypatch.setattr(TP, "BUDGET_BYTES", 0)
  fresh = TP.PromptCache(teacher, len(items), E, N)
  fresh.rows(items)
  assert not fresh.kept
  np.testing.assert_allclose(fresh.logits(fresh.rows(items), items, prefixes, comp, live), got,
                             atol=1e-6)
  with pytest.raises(ValueError, match="laid out for 4"):
    kept.logits(kept.rows(items), items, [[1] * 5] + prefixes[1:], comp, live)


class _WholeSequence(TP.PromptCache):
  """The teacher as it ran before the cache: one forward over prompt + prefix + completion.
  Records what it was asked (``seen``)."""
  seen = []

  def rows(self, items):
    return None

  def logits(self, cache, items, prefixes, completion, completion_live):
    seqs = [self.teacher.prompts[k] + list(p) for k, p in zip(items, prefixes)]
    _WholeSequence.seen.append(seqs)
    width = C._bucket(max(len(p) for p in self.teacher.prompts) + self.extra)
    toks, valid = C._pad_left(seqs, width, self.pad_id)
    t = self.teacher
    return C.completion_logits(t.params, jnp.concatenate([toks, completion], 1),
                               jnp.concatenate([valid, completion_live], 1), t.slot_mask,
                               t.cfg, width)


def test_a_consolidation_trains_on_the_whole_sequence_teacher_logits(monkeypatch):
  """Sleep's consolidation config (both GKD sides, LTI prefixes) on a tiny random model: every
  step's loss, and the trained slot, are those of the teacher run over the whole sequence, and
  the teacher continues each row's prompt with the prefix the student continued."""
  params, cfg, _ = _model("plain")
  mask = T.slot_mask_none(cfg)
  rng = np.random.default_rng(2)
  t_prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (20, 14, 25, 9)]
  s_prompts = [[1] + p[-3:] for p in t_prompts]  # every student prompt starts with token 1
  kcfg = C.default_config()
  kcfg.update(dict(steps=4, batch_size=4, max_new_tokens=4, teacher_samples=2, source_level=-1,
                   target_level=1, gamma=0.0))
  kcfg.optimizer.update(name="sgd", lr=1.0)
  assert kcfg.alpha < 1 and 0 < kcfg.lam < 1  # both sides, with imitation
  sampled = []
  sample = C.sampler.sample

  def recording_sample(params, prompts, valid, *a, **k):
    sampled.append([np.asarray(p)[np.asarray(v)].tolist() for p, v in zip(prompts, valid)])
    return sample(params, prompts, valid, *a, **k)

  def run():
    res = C.consolidate(params, mask, cfg, t_prompts, s_prompts, kcfg, jax.random.key(0),
                        stop_tokens=(2,))
    return res.params, np.array([[h["loss"] for h in res.history]])

  cached, losses = run()
  monkeypatch.setattr(TP, "PromptCache", _WholeSequence)
  monkeypatch.setattr(C.sampler, "sample", recording_sample)
  whole, want = run()
  np.testing.assert_allclose(losses, want, rtol=1e-4)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(whole),
                                                           jax.tree.leaves(params)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, atol=moved * 1e-3)
  # Each step: the off side (no prefix), then the on side: the student's prompt was
  # ``s_prompts[k] + prefix`` and the teacher read ``t_prompts[k] + the same prefix``.
  students = [p for p in sampled if all(row[0] == 1 for row in p)]  # not the teacher's D
  assert len(students) == kcfg.steps and len(_WholeSequence.seen) == 2 * kcfg.steps
  assert any(len(row) > 4 for step in students for row in step)  # some prefix was continued
  for student_rows, off, on in zip(students, _WholeSequence.seen[::2], _WholeSequence.seen[1::2]):
    for s_row, off_row, on_row in zip(student_rows, off, on):
      k = t_prompts.index(off_row)
      assert on_row[:len(off_row)] == off_row and s_row == s_prompts[k] + on_row[len(off_row):]
