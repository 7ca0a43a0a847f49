"""Memory consolidation = Knowledge Seeding (docs/method.md section 3), the first stage of sleep.

One consolidation event moves what memory level ``l* - 1`` holds into a newly unlocked low-rank
slot of CMS level ``l*``:

1. *Expand*: unlock a slot in the target level (zero ``B``: the function is unchanged). The model
   before expansion is the teacher ``T``; after expansion the student ``S``. When the source is
   the context (memory level 0) the teacher sees the privileged context, the student does not
   (on-policy self-distillation, OPSD); when the source is a fast CMS level the student runs
   with that level's slots switched off, so it must carry their knowledge itself.
2. *Distil, GKD-style* and 3. *learn to imitate*, together (the registered objective
   ``config.objective``, by default ``losses.objectives.knowledge_seeding_loss``):

       L = alpha [ (1 - lambda) F_D + lambda F_S ] + (1 - alpha) L_PG(r)

   ``F_D``: per-token divergence F(T||S) on teacher samples D (drawn once, before training);
   ``F_S``: the same on student samples; ``L_PG``: policy gradient for the imitation reward
   ``r = gamma r_sem + (1 - gamma) r_abs`` of a student completion of a random prefix of a
   teacher sample. ``alpha = 1`` drops imitation, ``lambda = 0`` is off-policy distillation.
   No gradient flows through sampling; the teacher's logits are computed outside the gradient.
4. Only the new slot trains (an elementwise trainable mask; everything else keeps its bits).
5. *Prune*: the source level's slots are reset (their knowledge now lives in level ``l*``).

The general form, ``seed_knowledge``, distils one or several (smaller) teacher models into a
student of any size sharing the vocabulary; ``consolidate`` is its self-distillation case.
Every paper ablation is a config value (a row of ``methods.METHODS``), not a code path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleep_jax.losses import rewards as rewards_lib
from sleep_jax.losses.registry import build_loss, get_divergence
from sleep_jax.model import growth, sampler, slot_keys, transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.sleep import consolidation_config, teacher_prefix, teacher_trust
from sleep_jax.train import fit as fit_lib
from sleep_jax.train import optimizer as opt_lib
from sleep_jax.train import state as state_lib


default_config = consolidation_config.default_config  # every knob: ``config.consolidation``


# ----------------------------------------------------------------------------------------------
# Parties of a distillation.
# ----------------------------------------------------------------------------------------------
class Teacher(NamedTuple):
  """A frozen teacher and how it is prompted: ``prompts[i]`` is item i as this teacher sees it
  (with the privileged context for OPSD)."""
  params: object
  cfg: ModelConfig
  slot_mask: jax.Array
  prompts: List[List[int]]


class Student(NamedTuple):
  params: object
  cfg: ModelConfig
  slot_mask: jax.Array
  trainable: object  # elementwise trainable mask (``state.slot_trainable`` / ``all_trainable``)
  prompts: List[List[int]]


@dataclasses.dataclass
class Result:
  params: object
  slot_mask: jax.Array
  slot: object  # the unlocked slot (-1 without expansion; a tuple with ``slots > 1``)
  history: List[dict]


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len"))
def completion_logits(params, tokens, valid, slot_mask, cfg, prompt_len):
  """Logits (B, N + 1, V) of ``[prompt (P) | completion (N)]`` at positions ``P - 1 ... P + N - 1``:
  entry i predicts completion token i (the last predicts past the end and is always masked).
  Teacher and student windows line up entry by entry whatever their prompt lengths."""
  return transformer.apply(params, tokens, cfg, valid=valid, slot_mask=slot_mask,
                           logits_from=prompt_len - 1)[0]


def _pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int):
  toks, valid = sampler.left_pad(seqs, pad_id, length)
  return jnp.asarray(toks), jnp.asarray(valid)


_bucket = teacher_prefix.bucket


def item_draw(host_rng: np.random.Generator, n_items: int, batch: int,
              gate_targets: Optional[Sequence[float]], anchor_share: float) -> np.ndarray:
  """(batch,) item indices: uniform over the items, or with ``anchor_share`` > 0 each row an
  anchor (gate target 0) with that probability and otherwise a new item."""
  y = np.asarray(gate_targets if gate_targets is not None else [], np.float32)
  anchors, new = np.flatnonzero(y < 0.5), np.flatnonzero(y >= 0.5)
  if anchor_share <= 0 or not len(anchors) or not len(new):
    return host_rng.integers(0, n_items, size=batch)
  pick_anchor = host_rng.random(batch) < anchor_share
  return np.where(pick_anchor, anchors[host_rng.integers(len(anchors), size=batch)],
                  new[host_rng.integers(len(new), size=batch)])


def teacher_completions(teacher: Teacher, kcfg: ml_collections.ConfigDict, rng: jax.Array, *,
                        stop_tokens: Sequence[int], pad_id: int = 0,
                        width: Optional[int] = None, offset: int = 0) -> List[List[List[int]]]:
  """The teacher dataset D of one teacher: ``kcfg.teacher_samples`` completions of item i
  (``teacher.prompts[i]``), at most ``kcfg.max_new_tokens`` each, top-k ``kcfg.sample_top_k``
  at temperature 1 (top-k 1: the greedy answer), drawn ``kcfg.batch_size`` items at a time.
  ``width``: the left-padded prompt width (default: the longest prompt, bucketed); ``offset``
  tells the teachers of one distillation apart in the random stream. Returns [item][sample]."""
  n_items, B = len(teacher.prompts), int(kcfg.batch_size)
  width = width or _bucket(max(len(p) for p in teacher.prompts))
  comps = [[] for _ in range(n_items)]
  for r in range(int(kcfg.teacher_samples)):
    for start in range(0, n_items, B):
      idx = list(range(start, min(start + B, n_items)))
      idx_full = idx + [idx[-1]] * (B - len(idx))  # constant batch shape
      toks, valid = _pad_left([teacher.prompts[i] for i in idx_full], width, pad_id)
      out = sampler.sample(teacher.params, toks, valid,
                           jax.random.fold_in(rng, offset + r * 7919 + start), cfg=teacher.cfg,
                           max_new_tokens=int(kcfg.max_new_tokens), temperature=1.0,
                           top_k=int(kcfg.sample_top_k), stop_tokens=tuple(stop_tokens),
                           pad_id=pad_id, slot_mask=teacher.slot_mask)
      toks = np.asarray(out.tokens[:, width:])
      live = np.asarray(out.completion_mask[:, width:])
      for row, i in enumerate(idx):
        comps[i].append(toks[row][live[row]].tolist())
  return comps


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
def seed_knowledge(teachers: Sequence[Teacher], student: Student, kcfg: ml_collections.ConfigDict,
                   rng: jax.Array, *, stop_tokens: Sequence[int], pad_id: int = 0,
                   judge: Optional[rewards_lib.Judge] = None,
                   decode: Optional[Callable[[Sequence[int]], str]] = None,
                   on_step: Optional[Callable[[int, dict], None]] = None,
                   dataset: Optional[Sequence[Sequence[int]]] = None,
                   golds: Optional[Sequence[Sequence[int]]] = None,
                   gate_targets: Optional[Sequence[float]] = None,
                   verify: Optional[teacher_trust.Verifier] = None) -> tuple:
  """General Knowledge Seeding: distil ``teachers`` into ``student`` with the KS objective.

  Step ``i`` uses teacher ``i mod len(teachers)`` (several smaller models seed one larger one).
  Items are ``student.prompts[k]`` / ``teacher.prompts[k]``, aligned by index. ``dataset``: one
  given completion per item (e.g. accepted dreams) used as the off-policy data D instead of
  teacher samples; the teachers still give the soft targets on it. ``golds``: one supported
  answer per item (``completion + stop``; empty: none) for the cross-entropy term
  (``kcfg.ce_weight > 0``). ``gate_targets``: per item 1 (new) or 0 (anchor), gate term.
  ``verify``: the teacher is trusted only on the items where one of its samples passes this
  check (``teacher_trust.py``); elsewhere only the cross-entropy term teaches.

  Returns ``(params, history)``: the student's trained parameters and per-step metrics.
  """
  n_items = len(student.prompts)
  if not n_items:
    raise ValueError("Knowledge Seeding got no items to distil (no questions, dreams or "
                     "consolidation.prompt_templates)")
  if any(len(t.prompts) != n_items for t in teachers):
    raise ValueError("every teacher needs one prompt per student prompt")
  if any(t.cfg.vocab_size != student.cfg.vocab_size for t in teachers):
    raise ValueError("Knowledge Seeding needs teachers and student to share the vocabulary")
  N, B = int(kcfg.max_new_tokens), int(kcfg.batch_size)
  alpha, lam = float(kcfg.alpha), float(kcfg.lam)
  need_off, need_on, need_pg = lam < 1.0, lam > 0.0 or alpha < 1.0, alpha < 1.0
  stop_tokens = tuple(int(s) for s in stop_tokens)
  # The objective and its divergence are registered names (``losses/``); a misspelt name or
  # hyper-parameter fails here, before any compute. The step is memoised under them.
  hparams = dict(alpha=alpha, lam=lam, divergence=kcfg.divergence,
                 divergence_kwargs=dict(kcfg.divergence_kwargs),
                 temperature=float(kcfg.temperature), advantage=kcfg.advantage)
  ce_weight = float(kcfg.ce_weight)
  if ce_weight > 0:
    if golds is None or len(golds) != n_items:
      raise ValueError("consolidation.ce_weight > 0 needs one supported answer per item")
    hparams["ce_weight"] = ce_weight  # only then: an objective without the term still plugs in
  gate_weight = float(kcfg.get("gate_weight", 0.0))
  if gate_weight > 0:
    if gate_targets is None or len(gate_targets) != n_items:
      raise ValueError("consolidation.gate_weight > 0 needs a gate target per item")
    hparams["gate_weight"] = gate_weight
    if kcfg.get("gate_positions", "answer") != "answer":
      hparams["gate_positions"] = kcfg.gate_positions
    gate_slots = jnp.asarray(student.slot_mask) & ~jnp.asarray(teachers[0].slot_mask)
  anchor_share = float(kcfg.get("anchor_share", 0.0))
  make_loss = lambda: build_loss(kcfg.objective, cfg=student.cfg, **hparams)
  make_loss()
  get_divergence(kcfg.divergence)
  host_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  rng, d_rng = jax.random.split(rng)

  # Fixed (bucketed) prompt widths: one compilation for every step. LTI prefixes add up to N.
  extra = N if need_pg else 0
  s_len = _bucket(max(len(p) for p in student.prompts) + extra)
  g_len = max(max((len(g) for g in golds), default=1), 1) if ce_weight > 0 else 0
  t_lens = [_bucket(max(len(p) for p in t.prompts) + extra) for t in teachers]

  def sample(params, cfg, mask, prompts, width, key, temperature):
    toks, valid = _pad_left(prompts, width, pad_id)
    out = sampler.sample(params, toks, valid, key, cfg=cfg, max_new_tokens=N,
                         temperature=temperature, top_k=int(kcfg.sample_top_k),
                         stop_tokens=stop_tokens, pad_id=pad_id, slot_mask=mask)
    return out

  # 1. The teacher dataset D: ``teacher_samples`` completions per item from every teacher.
  D = [] if dataset is None else [[[list(map(int, c))] for c in dataset]] * len(teachers)
  for t, (teacher, t_len) in enumerate(zip(teachers, t_lens) if dataset is None else ()):
    D.append(teacher_completions(teacher, kcfg, d_rng, stop_tokens=stop_tokens, pad_id=pad_id,
                                 width=t_len, offset=t * 1_000_003))
  trusted = None
  if verify is not None:
    D, trusted = teacher_trust.verified_dataset(D, verify)

  # 2. Optimisation state: only ``student.trainable`` changes.
  # The step donates its state; the student's frozen arrays may be the teacher's own buffers
  # (self-distillation), so the student trains on a copy (``new_state``).
  st, shardings = fit_lib.new_state(student.params, opt_lib.make_optimizer(kcfg.optimizer), rng,
                                    student.trainable, {"slot_mask": jnp.array(student.slot_mask,
                                                                               bool)})
  _, step_fn = fit_lib.train_step_for(
      (kcfg.objective, student.cfg, json.dumps(hparams, sort_keys=True)), make_loss,
      kcfg.optimizer, student.trainable, shardings)
  mesh = fit_lib.mesh_of(student.params)

  def completion_arrays(comps):
    toks = np.full((B, N), pad_id, np.int32)
    live = np.zeros((B, N), bool)
    for r, c in enumerate(comps):
      c = c[:N]
      toks[r, :len(c)] = c
      live[r, :len(c)] = True
    return jnp.asarray(toks), jnp.asarray(live)

  # Each teacher reads an item's prompt once while its cache row fits (``teacher_prefix.py``);
  # a step continues it with an LTI prefix (shorter than the longest sample in D) and a
  # completion.
  lti_len = max(max((len(c) for d in D for cs in d for c in cs), default=0) - 1, 0) * need_pg
  caches = [teacher_prefix.PromptCache(t, B, lti_len, N, pad_id) for t in teachers]

  def side(prefix, t_idx, t_cache, items, lti, student_prompts, comp_toks, comp_live):
    """Student sequences + the teacher's logits on their completions, for one batch of
    ``items``; ``lti``: each row's LTI prefix (the teacher reads ``prompt + lti + completion``).
    The completions of items the teacher is not trusted on enter no term."""
    st_, sv = _pad_left(student_prompts, s_len, pad_id)
    scored = comp_live if trusted is None else comp_live & trusted[t_idx][items][:, None]
    return {f"{prefix}_tokens": jnp.concatenate([st_, comp_toks], 1),
            f"{prefix}_valid": jnp.concatenate([sv, comp_live], 1),
            f"{prefix}_completion_mask": jnp.concatenate([jnp.zeros_like(sv), scored], 1),
            f"{prefix}_teacher_logits": caches[t_idx].logits(t_cache, items, lti, comp_toks,
                                                               comp_live)}

  history = []

  def next_batch(i, st):
    t_idx = i % len(teachers)
    items = item_draw(host_rng, n_items, B, gate_targets, anchor_share)
    picks = [D[t_idx][k][host_rng.integers(len(D[t_idx][k]))] for k in items]
    t_cache = caches[t_idx].rows(items)  # one prompt pass (or none) for both sides
    batch = {}
    if need_off:
      ct, cl = completion_arrays(picks)
      batch.update(side("off", t_idx, t_cache, items, [()] * B,
                        [student.prompts[k] for k in items], ct, cl))
    if need_on:
      # LTI: the student continues a random prefix of a teacher sample; with imitation off the
      # prefix is empty and these are plain on-policy samples.
      cuts = [int(host_rng.integers(0, max(len(d), 1))) if need_pg else 0 for d in picks]
      s_prompts = [student.prompts[k] + d[:c] for k, d, c in zip(items, picks, cuts)]
      out = sample(st.params, student.cfg, student.slot_mask, s_prompts, s_len,
                   jax.random.fold_in(rng, 1_000_000 + i), float(kcfg.sample_temperature))
      ct, cl = out.tokens[:, s_len:], out.completion_mask[:, s_len:]
      batch.update(side("on", t_idx, t_cache, items, [d[:c] for d, c in zip(picks, cuts)],
                        s_prompts, ct, cl))
      if need_pg:
        preds = rewards_lib.masked_token_lists(ct, cl)
        refs = [d[c:] for d, c in zip(picks, cuts)]
        r = rewards_lib.lti_rewards(preds, refs, gamma=float(kcfg.gamma),
                                    z0=float(kcfg.z0) if kcfg.z0 > 0 else None, judge=judge,
                                    decode=decode)
        if trusted is not None:
          r = teacher_trust.masked_row_rewards(r, trusted[t_idx][items])
        batch["on_rewards"] = jnp.asarray(r, jnp.float32)
    if ce_weight > 0:
      st_, sv = _pad_left([student.prompts[k] for k in items], s_len, pad_id)
      gt = np.full((B, g_len), pad_id, np.int32)
      gl = np.zeros((B, g_len), bool)
      for r, k in enumerate(items):
        gt[r, :len(golds[k])], gl[r, :len(golds[k])] = golds[k], True
      batch.update(gold_tokens=jnp.concatenate([st_, jnp.asarray(gt)], 1),
                   gold_valid=jnp.concatenate([sv, jnp.asarray(gl)], 1),
                   gold_answer_mask=jnp.asarray(gl))
    if gate_weight > 0:
      batch.update(gate_target=jnp.asarray([gate_targets[k] for k in items], jnp.float32),
                   gate_slots=gate_slots)
    return batch if mesh is None else fit_lib.place_batch(batch, mesh)

  def record(i, st, metrics):
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["step"] = i
    if trusted is not None:  # the share of items whose teacher answer checks out
      metrics["teacher_verified"] = float(trusted.mean())
    history.append(metrics)
    if on_step is not None:
      on_step(i, metrics)
    return False

  st, _ = fit_lib.fit(st, step_fn, next_batch, int(kcfg.steps), on_step=record)
  return st.params, history


def consolidate(params, slot_mask, cfg: ModelConfig, teacher_prompts: Sequence[Sequence[int]],
                student_prompts: Sequence[Sequence[int]], kcfg: ml_collections.ConfigDict,
                rng: jax.Array, keys: Optional[Sequence[Sequence[int]]] = None,
                **kwargs) -> Result:
  """One sleep consolidation event of the model itself (docs/method.md section 3 steps 1-6).

  Args:
    params, slot_mask, cfg: the model at the end of wake (the teacher).
    teacher_prompts: item i as the teacher sees it (with the privileged context when
      ``kcfg.source_level == -1``; identical to ``student_prompts`` otherwise).
    student_prompts: item i as the student sees it (no privileged context).
    kcfg: ``default_config()`` with a method's overrides (``methods.consolidation_config``).
    keys: with a keyed model (``cfg.slot_keys``), the names the unlocked slots are keyed on
      (``slot_keys.py``): they are on only for inputs that name one. None: unkeyed.
    **kwargs: ``stop_tokens``, ``pad_id``, ``judge``, ``decode``, ``on_step``
      (see ``seed_knowledge``).
  """
  slot_mask = jnp.asarray(slot_mask)
  k_unlock, k_train = jax.random.split(rng)
  teacher = Teacher(params, cfg, slot_mask, [list(p) for p in teacher_prompts])
  src, tgt = int(kcfg.source_level), int(kcfg.target_level)
  if kcfg.expand:
    s_params, s_mask, slots = params, slot_mask, []
    for i in range(int(kcfg.slots)):
      # The first slot keeps the one-slot key (same results with slots=1).
      s_params, s_mask, s = growth.unlock_slot(s_params, s_mask, tgt,
                                               jax.random.fold_in(k_unlock, i) if i else k_unlock)
      slots.append(int(s))
    slot = slots[0] if len(slots) == 1 else tuple(slots)
    if keys is not None and cfg.slot_keys:
      s_params = slot_keys.write(s_params, tgt, slots,
                                 slot_keys.encode(keys, cfg.slot_keys, cfg.slot_key_len))
    trainable = state_lib.slot_trainable(s_params, transformer.param_axes(cfg), tgt, slots)
  else:
    s_params, s_mask, slot = params, slot_mask, -1
    trainable = state_lib.all_trainable(params)
    # A fresh zero slot tolerates a large step; the whole pretrained model does not.
    kcfg = ml_collections.ConfigDict(kcfg.to_dict())
    kcfg.optimizer.lr = float(kcfg.lr_existing)
  if src >= 0:
    if src == tgt:
      raise ValueError("consolidation source and target levels must differ")
    s_mask = s_mask.at[src].set(False)  # the student must do without the fast slots
  student = Student(s_params, cfg, s_mask, trainable, [list(p) for p in student_prompts])
  new_params, history = seed_knowledge([teacher], student, kcfg, k_train, **kwargs)
  new_mask = s_mask if src < 0 else s_mask.at[src].set(slot_mask[src])
  if kcfg.prune and src >= 0:
    new_params, new_mask = growth.reset_level(new_params, new_mask, src)
  return Result(new_params, new_mask, slot, history)


def consolidate_data(params, slot_mask, cfg: ModelConfig,
                     teacher_prompts: Sequence[Sequence[int]],
                     student_prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]], kcfg: ml_collections.ConfigDict,
                     level: int, slot: int, rng: jax.Array, **kwargs) -> Result:
  """Distils given completions (a sleep's accepted dreams) into slot ``slot`` of CMS level
  ``level``, the capacity this sleep unlocked (docs/method.md section 4, last step).

  D is the completions themselves (off-policy, ``lambda = 0``, ``alpha = 1``); the soft targets
  come from the model that reads ``teacher_prompts`` (the dream's own prompt, with the passage),
  the student reads ``student_prompts`` (closed-book); only that slot trains, so everything
  the model knew before keeps its bits. ``**kwargs`` as in ``seed_knowledge``.
  """
  slot_mask = jnp.asarray(slot_mask)
  trainable = state_lib.slot_trainable(params, transformer.param_axes(cfg), level, slot)
  teacher = Teacher(params, cfg, slot_mask, [list(p) for p in teacher_prompts])
  student = Student(params, cfg, slot_mask, trainable, [list(p) for p in student_prompts])
  kcfg = ml_collections.ConfigDict(kcfg.to_dict())
  kcfg.alpha, kcfg.lam, kcfg.ce_weight, kcfg.gate_weight = 1.0, 0.0, 0.0, 0.0
  kcfg.max_new_tokens = max(max(len(c) for c in completions), 1)
  new_params, history = seed_knowledge([teacher], student, kcfg, rng, dataset=completions,
                                       **kwargs)
  return Result(new_params, slot_mask, slot, history)
