"""Dreaming (REM sleep, docs/method.md section 4), built on SEAL: the model writes, tests and keeps its own data.

Given a task ``(C, tau)`` (a context and a downstream score, higher is better) one round is

1. *Sample* ``m`` dreams ``d_i ~ LM_gen(. | prompt_j(C))`` from prompts made of configurable
   templates applied to ``C`` (implications, question/answer pairs, rewrites, task variants).
   The generator is the frozen base plus a generator LoRA; with ``random_expert`` every MoE
   router also turns on one random extra expert per token (``transformer.apply(route_rng=)``).
2. *Score* each dream by the gradient of its SFT loss w.r.t. a fresh LoRA adapter ``phi_0``
   (``B = 0``, so only ``d/dB`` is non-zero): ``g_i = grad_phi L_SFT(d_i; phi_0)``;
   ``grad_norm``: ``s_i = ||g_i||``; ``grad_align``: ``s_i = cos(g_i, g_tau)`` with
   ``g_tau = grad_phi (-tau)(phi_0)``; ``random``: ``s_i ~ U(0, 1)`` (ablation "no gradient
   selection").
3. *Select* the top-k dreams by score plus ``b`` distinct random others.
4. *Trials*: for every kept dream an isolated copy ``phi_i`` of ``phi_0`` takes ``inner_steps``
   SGD/Adam steps on ``L_SFT(d_i)``; all copies run in one ``jax.vmap`` inside one jitted function
   and share the frozen base weights (``in_axes=None``: broadcast, never copied per dream).
5. *Reward* ``r_i = 1[tau(base + phi_i) > tau(base) + margin]``.
6. *ReST-EM*: the generator LoRA takes a few optax steps of SFT on the ``(prompt -> d_i)`` pairs
   with ``r_i = 1`` (the base stays frozen); with no rewarded dream it is left bit-identical.

``dream`` runs ``rounds`` rounds and returns the accepted dreams (token arrays and masks) and
per-round metrics; the caller then trains the model on them through consolidation, so only newly
unlocked slots learn. The pure, jitted pieces live in ``dream_trials.py``, the batches and the
sampling in ``dream_batches.py``, the config in ``dreaming_config.py``; this module holds the
``Dreamer`` loop.

Layout of a dream batch (exactly the sampler's): ``tokens``/``valid``/``completion_mask`` of shape
(n, P + N), left-padded prompt then completion; ``tokens[:, t]`` is scored by ``logits[:, t - 1]``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleep_jax.model import lora as lora_lib
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.sleep.dream_batches import (Dreams, as_dreams, concat_dreams, prompt_batch,
                                           sample_dreams, take)
from sleep_jax.sleep import dream_trials, dreaming_config
from sleep_jax.sleep.dream_trials import (SCORE_RULES, Generator, init_adapter, init_generator,
                                          rest_em_round, run_trials, score_dreams, select,
                                          task_log_likelihood)


default_config = dreaming_config.default_config  # every knob: ``config.dreaming``


# ----------------------------------------------------------------------------------------------
# The loop: rounds of sample -> score -> select -> trials -> reward -> ReST-EM.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DreamResult:
  """Accepted dreams of every round (host numpy, sampler layout) and per-round metrics."""
  tokens: np.ndarray  # (n_accepted, P + N) int32
  valid: np.ndarray  # (n_accepted, P + N) bool
  completion_mask: np.ndarray  # (n_accepted, P + N) bool
  prompt_index: np.ndarray  # (n_accepted,) index into context_prompts
  round: np.ndarray  # (n_accepted,) round that accepted the dream
  metrics: List[Dict[str, Any]]  # one dict per round
  generator: Optional[Generator]  # the generator after the last round (persist across sleeps)
  # Every dream the generator wrote, accepted or not (completion tokens, prompt index), for
  # measuring what selection keeps against what is written.
  written: List[Tuple[List[int], int]] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def dreams(self) -> Dreams:
    return Dreams(self.tokens, self.valid, self.completion_mask)


# The parts of one round, in order, as ``on_stage`` reports them.
STAGES = ("written", "scored", "tried", "generator")


def _stage_reporter(on_stage: Optional[Callable[[str], None]]) -> Callable:
  """``done(name, value) -> value``: with ``on_stage``, waits for ``value`` on the device first,
  so a stage is reported when its work has finished, not when it was dispatched."""
  def done(name, value):
    if on_stage is not None:
      jax.block_until_ready(value)
      on_stage(name)
    return value
  return done


class Dreamer:
  """Runs dreaming rounds; holds only the loop state (generator LoRA + optimizer, config)."""

  def __init__(self, params, cfg: ModelConfig, config: ml_collections.ConfigDict, *,
               slot_mask=None, generator: Optional[Generator] = None, rng=None,
               task_score_fn: Callable = task_log_likelihood, stop_tokens: Sequence[int] = (),
               pad_id: int = 0, trial_view: Optional[Callable] = None,
               task_groups: Optional[Tuple[np.ndarray, np.ndarray]] = None, copy=None):
    if config.score not in SCORE_RULES:
      raise ValueError(f"dreaming score {config.score!r}; valid: {SCORE_RULES}")
    self.params, self.cfg, self.config = params, cfg, config
    self.slot_mask = transformer.slot_mask_none(cfg) if slot_mask is None else slot_mask
    self.task_score_fn, self.stop_tokens, self.pad_id = task_score_fn, tuple(stop_tokens), pad_id
    # ``trial_view(dreams, prompt_index) -> dreams``: how scoring and the trials read a dream
    # (e.g. closed-book, its passage hidden); the generator learns from the dream as written.
    self.trial_view = trial_view
    # ``(group of each tau row, group of each dream prompt)``: a trial is scored on the tau rows
    # of its own prompt's group (its passage) only; candidates on every row.
    self.task_groups = task_groups
    self.copy = copy  # entity copying per context prompt (``sample_dreams``), or None
    if generator is None:
      r = config.rest_em
      generator = init_generator(jax.random.key(0) if rng is None else rng, cfg, r.rank, r.alpha,
                                 r.targets, r.optimizer)
    self.generator = generator

  def round(self, context_prompts, task_batch, rng, candidates: Optional[Dreams] = None,
            on_stage: Optional[Callable[[str], None]] = None
            ) -> Tuple[Dreams, np.ndarray, np.ndarray, Dict[str, Any], Dreams]:
    """One round. Returns (kept dreams, their row indices in the m samples (then the
    ``candidates``: index ``m + j``), their rewards, metrics, the m written dreams) and updates
    the generator.

    ``candidates``: extra dreams (``fixed_dreams`` layout) scored, selected and trialled with the
    m sampled ones; the generator's ReST-EM step learns only from its own sampled dreams.
    ``on_stage(name)``: after each of ``STAGES`` has finished on the device (a round on a real
    model takes minutes: the progress bar moves per stage)."""
    c, cfg = self.config, self.cfg
    done = _stage_reporter(on_stage)
    r_sample, r_lora, r_score, r_select = jax.random.split(rng, 4)
    out = sample_dreams(self.params, cfg, self.slot_mask, context_prompts, r_sample, c.m,
                        c.max_new_tokens, c.temperature, c.random_expert, self.generator.lora,
                        gen_lora_scale=self.generator.scale, top_k=c.top_k, top_p=c.top_p,
                        stop_tokens=self.stop_tokens, pad_id=self.pad_id, copy=self.copy)
    dreams = written = done("written", as_dreams(out))
    if candidates is not None:
      dreams = concat_dreams(dreams, candidates, self.pad_id)
    view = dreams
    _, _, row_prompt = prompt_batch(context_prompts, c.m, self.pad_id)
    row_prompt = np.concatenate([row_prompt, np.full(dreams.tokens.shape[0] - c.m, -1)])
    if self.trial_view is not None:
      view = self.trial_view(dreams, row_prompt)
    lora0 = init_adapter(r_lora, cfg, c.lora.rank, tuple(c.lora.targets))
    lscale = lora_lib.scale(c.lora.alpha, c.lora.rank)
    parallel = int(c.parallel_dreams)
    scores = score_dreams(self.params, cfg, self.slot_mask, lora0, view, task_batch, r_score,
                          rule=c.score, lora_scale=lscale, task_score_fn=self.task_score_fn,
                          sft_context=c.sft_context, parallel=parallel)
    idx = select(done("scored", scores), c.k, c.b, r_select)
    kept = take(dreams, idx)
    masks = {}
    if self.task_groups is not None:
      masks = passage_masks(task_batch, *self.task_groups, row_prompt[np.asarray(idx)])
    trials = run_trials(self.params, cfg, self.slot_mask, lora0, take(view, idx), task_batch,
                        inner_steps=c.inner_steps, inner_lr=c.inner_lr,
                        optimizer=c.inner_optimizer, lora_scale=lscale, margin=c.margin,
                        task_score_fn=self.task_score_fn, sft_context=c.sft_context,
                        parallel=parallel, **masks)
    done("tried", trials.rewards)
    g = self.generator
    sampled = jnp.asarray(np.asarray(idx) < c.m)  # candidates are not the generator's own words
    learn, weights = m_step_rows(kept, trials.rewards * sampled, cfg)
    new_lora, new_state, rm = rest_em_round(
        self.params, cfg, self.slot_mask, g.lora, g.opt_state, learn, weights,
        steps=c.rest_em.steps, lr=c.rest_em.lr, lora_scale=g.scale, optimizer=c.rest_em.optimizer)
    self.generator = Generator(done("generator", new_lora), new_state, g.scale)
    rewards = np.asarray(trials.rewards)
    metrics = {
        "scores": np.asarray(scores).tolist(),
        "selected": np.asarray(idx).tolist(),
        "trial_scores": np.asarray(trials.scores).tolist(),
        "base_score": float(jnp.mean(trials.base_score)),
        "rewards": rewards.tolist(),
        "acceptance_rate": float(rewards.mean()) if rewards.size else 0.0,
        "n_tried": int(rewards.size),
        "n_accepted": int(rewards.sum()),
        "mean_completion_tokens": float(np.asarray(kept.completion_mask).sum(1).mean()),
        **{k: float(v) for k, v in rm.items()},
    }
    return kept, np.asarray(idx), rewards, metrics, written

  def run(self, context_prompts, task_batch, rng, candidates: Optional[Dreams] = None,
          on_round: Optional[Callable[[int, Dict[str, float]], None]] = None,
          on_stage: Optional[Callable[[str], None]] = None) -> DreamResult:
    """``config.rounds`` rounds; accepted = every kept dream with reward 1, over all rounds
    (``prompt_index`` -1 for an accepted candidate). ``on_round(i, scalars)`` after each,
    ``on_stage`` within each (``round``)."""
    _, _, prompt_idx = prompt_batch(context_prompts, self.config.m, self.pad_id)
    if candidates is not None:
      prompt_idx = np.concatenate([prompt_idx, np.full(candidates.tokens.shape[0], -1)])
    acc: Dict[str, list] = {k: [] for k in ("tokens", "valid", "completion_mask", "prompt_index",
                                            "round")}
    metrics, written = [], []
    for rnd, key in enumerate(jax.random.split(rng, self.config.rounds)):
      t0 = time.perf_counter()
      kept, idx, rewards, m, w = self.round(context_prompts, task_batch, key, candidates,
                                               on_stage)
      written += [(r[c].tolist(), int(i)) for r, c, i in zip(
          np.asarray(w.tokens), np.asarray(w.completion_mask, bool), prompt_idx)]
      ok = rewards > 0
      if not self.config.accept_own:
        ok &= prompt_idx[idx] < 0  # offered candidates only
      acc["tokens"].append(np.asarray(kept.tokens)[ok])
      acc["valid"].append(np.asarray(kept.valid)[ok])
      acc["completion_mask"].append(np.asarray(kept.completion_mask)[ok])
      acc["prompt_index"].append(prompt_idx[idx][ok])
      acc["round"].append(np.full(int(ok.sum()), rnd, np.int32))
      m["round"], m["seconds"] = rnd, time.perf_counter() - t0
      metrics.append(m)
      if on_round is not None:
        on_round(rnd, {k: v for k, v in m.items() if isinstance(v, (int, float))})
    return DreamResult(**{k: np.concatenate(v) for k, v in acc.items()}, metrics=metrics,
                       generator=self.generator, written=written)


def m_step_rows(kept: Dreams, rewards, cfg: ModelConfig) -> Tuple[Dreams, jax.Array]:
  """(dreams, rewards) ReST-EM's M-step runs on: the kept dreams as they are; past
  ``dream_trials.BACKWARD_BUDGET`` (48 kept SmolLM2 dreams of 380 tokens: minutes of work for
  rows that weigh 0) only the rewarded ones (at least one row, so the step keeps its shape
  when none is), the same loss."""
  if not dream_trials.past_backward_budget(cfg, *kept.tokens.shape):
    return kept, rewards
  on = np.flatnonzero(np.asarray(rewards) > 0)
  on = on if on.size else np.zeros(1, np.int64)
  return take(kept, on), jnp.asarray(rewards)[on]


def passage_masks(task_batch, row_group, prompt_group, dream_prompt) -> Dict[str, jax.Array]:
  """``run_trials``' ``task_rows`` / ``task_masks`` / ``groups``: group g holds the rows of tau in
  group g (``row_group``) and their completion tokens, padded to the largest group with rows
  whose mask is empty; a dream from prompt p is in group ``prompt_group[p]``; an offered
  candidate (prompt -1) in an extra group of every row (only when there is one)."""
  cm = np.asarray(task_batch["completion_mask"], bool)
  row_group, prompt_group = np.asarray(row_group), np.asarray(prompt_group)
  G = int(max(row_group.max(initial=-1), prompt_group.max(initial=-1))) + 1
  groups = np.where(np.asarray(dream_prompt) >= 0,
                    prompt_group[np.maximum(np.asarray(dream_prompt), 0)], G)
  members = [np.flatnonzero(row_group == g) for g in range(G)]
  if np.any(groups == G):
    members.append(np.arange(len(row_group)))
  R = max([1] + [len(m) for m in members])
  rows = np.zeros((len(members), R), np.int32)
  masks = np.zeros((len(members), R) + cm.shape[1:], bool)
  for g, m in enumerate(members):
    rows[g, :len(m)], masks[g, :len(m)] = m, cm[m]
  return {"task_rows": jnp.asarray(rows), "task_masks": jnp.asarray(masks),
          "groups": jnp.asarray(groups, jnp.int32)}


def _empty_result(generator) -> DreamResult:
  z = np.zeros((0, 0))
  return DreamResult(z.astype(np.int32), z.astype(bool), z.astype(bool), np.zeros(0, np.int64),
                     np.zeros(0, np.int32), [], generator)


def dream(params, cfg: ModelConfig, slot_mask, context_prompts, task_batch, rng,
          config: Optional[ml_collections.ConfigDict] = None, *,
          generator: Optional[Generator] = None, task_score_fn: Callable = task_log_likelihood,
          stop_tokens: Sequence[int] = (), pad_id: int = 0,
          candidates: Optional[Dreams] = None,
          on_round: Optional[Callable[[int, Dict[str, float]], None]] = None,
          trial_view: Optional[Callable] = None,
          task_groups: Optional[Tuple[np.ndarray, np.ndarray]] = None, copy=None,
          on_stage: Optional[Callable[[str], None]] = None) -> DreamResult:
  """Dreaming for one sleep: ``config.rounds`` rounds of sample -> score -> select -> trials ->
  reward -> ReST-EM. ``context_prompts``: token lists (e.g. ``DreamTemplates.prompts``);
  ``task_batch``: tokens/valid/completion_mask for tau. ``enabled=False`` returns no dreams.
  Pass the returned ``generator`` back in to keep the ReST-EM generator across sleeps.
  ``candidates``: extra given dreams competing with the sampled ones (``Dreamer.round``);
  ``on_round``: called after each round with its scalar metrics (progress, training curves);
  ``on_stage(name)``: after each of a round's ``STAGES`` (progress within a long round);
  ``trial_view``: how scoring and the trials read the dreams; ``task_groups``: score each trial
  on its own passage's tau rows (``Dreamer``); ``copy``: entity copying (``sample_dreams``).
  """
  config = default_config() if config is None else config
  if not config.enabled:
    return _empty_result(generator)
  r_gen, r_run = jax.random.split(rng)
  d = Dreamer(params, cfg, config, slot_mask=slot_mask, generator=generator, rng=r_gen,
              task_score_fn=task_score_fn, stop_tokens=stop_tokens, pad_id=pad_id,
              trial_view=trial_view, task_groups=task_groups, copy=copy)
  return d.run(context_prompts, task_batch, r_run, candidates, on_round, on_stage)
