"""Dreaming (REM sleep, DESIGN.md 1.3), built on SEAL: the model writes, tests and keeps its own data.

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
unlocked slots learn. Everything but the ``Dreamer`` loop and the host-side prompt helpers is a
pure function; the heavy ones are jitted with the model config static.

Layout of a dream batch (exactly the sampler's): ``tokens``/``valid``/``completion_mask`` of shape
(n, P + N), left-padded prompt then completion; ``tokens[:, t]`` is scored by ``logits[:, t - 1]``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sleep_jax.model import lora as lora_lib
from sleep_jax.model import sampler
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig

SCORE_RULES = ("grad_norm", "grad_align", "random")

# ``lora.init`` jitted: one compilation per (cfg, rank, targets), not one eager RNG kernel per leaf.
init_adapter = jax.jit(lora_lib.init, static_argnums=(1, 2, 3))
SFT_CONTEXTS = ("prompt", "none")
OPTIMIZERS = ("sgd", "adam")


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------
DEFAULT_TEMPLATES = {
    "implications": "{context}\nImplications of this passage:\n",
    "qa": "{context}\nQuestions and answers about this passage:\n",
    "rewrite": "{context}\nThe same passage in other words:\n",
    "variant": "{context}\nA new task like this one:\n",
}


def default_config() -> ml_collections.ConfigDict:
  """Every dreaming knob. Ablations are values: ``score="random"`` (no gradient selection),
  ``random_expert=False`` (no random expert), ``enabled=False`` (no dreaming)."""
  c = ml_collections.ConfigDict()
  c.enabled = True  # False: "Sleep without dreaming"
  c.rounds = 2  # sample -> score -> select -> trials -> reward -> ReST-EM rounds per sleep
  # Sampling (step 1).
  c.m = 16  # dreams sampled per round (prompts are tiled over the m rows)
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.top_k = 0
  c.top_p = 1.0
  c.random_expert = True  # every router also activates one random extra expert while dreaming
  c.templates = dict(DEFAULT_TEMPLATES)  # name -> "...{context}..." (used by DreamTemplates)
  # Scoring and selection (steps 2-3).
  c.score = "grad_norm"  # grad_norm | grad_align | random
  c.k = 4  # top-k by score
  c.b = 2  # plus b distinct random others
  # SFT context of a dream in scoring and trials: "prompt" = completion given its prompt;
  # "none" = the completion alone as standalone text (SEAL-style closed-book self-edit).
  c.sft_context = "prompt"
  # Isolated trials (step 4): one fresh LoRA per round, copied per kept dream.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = tuple(lora_lib.ALL_TARGETS)
  c.inner_steps = 4
  c.inner_lr = 1e-3
  c.inner_optimizer = "adam"  # sgd | adam
  # Dreams whose gradient scores / trials run in one vmap (0 = all): bounds memory on real models.
  c.parallel_dreams = 0
  # Reward (step 5).
  c.margin = 0.0  # r_i = 1[tau(adapted_i) > tau(base) + margin]
  # tau's targets in the cycle driver: "self" = the in-context model's own answers to the wake
  # (train) questions (label-free); "gold" = their known answers (ARC's leave-one-out
  # demonstrations, whose outputs are part of the context C, not the held-out test).
  c.tau_target = "self"
  # ReST-EM on the dream generator (step 6): a generator LoRA that persists across rounds.
  c.rest_em = ml_collections.ConfigDict()
  c.rest_em.steps = 4
  c.rest_em.lr = 1e-3
  c.rest_em.optimizer = "adam"  # sgd | adam
  c.rest_em.rank = 8
  c.rest_em.alpha = 16.0
  c.rest_em.targets = ("q", "v")
  return c


def ablation(name: str, base: Optional[ml_collections.ConfigDict] = None
             ) -> ml_collections.ConfigDict:
  """``default_config()`` (or a copy of ``base``) with one DESIGN.md 1.4 dreaming ablation."""
  c = ml_collections.ConfigDict(base.to_dict()) if base is not None else default_config()
  if name == "no_gradient_selection":
    c.score = "random"
  elif name == "no_random_expert":
    c.random_expert = False
  elif name == "no_dreaming":
    c.enabled = False
  elif name != "full":
    raise ValueError(f"unknown dreaming ablation {name!r}; valid: full, no_gradient_selection, "
                     "no_random_expert, no_dreaming")
  return c


@dataclasses.dataclass(frozen=True)
class DreamTemplates:
  """Prompt templates applied to a context C: ``text_j = templates[j].format(context=C)``.

  >>> t = DreamTemplates({"qa": "{context} Q:"})
  >>> t.format("Ann was born in Oslo.")
  [('qa', 'Ann was born in Oslo. Q:')]
  """

  templates: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TEMPLATES))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DreamTemplates":
    t = config.templates
    return cls(dict(t.to_dict() if isinstance(t, ml_collections.ConfigDict) else t))

  def format(self, context: str) -> List[Tuple[str, str]]:
    """[(template name, formatted text)] in template order."""
    return [(name, tpl.format(context=context)) for name, tpl in self.templates.items()]

  def prompts(self, tokenizer, contexts: Sequence[str], add_bos: bool = True
              ) -> Tuple[List[List[int]], List[Tuple[int, str]]]:
    """Token lists for every (context, template) pair and their ``(context index, name)`` tags.

    ``tokenizer`` needs ``encode(text, add_bos=...) -> list[int]``.
    """
    ids, tags = [], []
    for ci, ctx in enumerate(contexts):
      for name, text in self.format(ctx):
        ids.append(list(tokenizer.encode(text, add_bos=add_bos)))
        tags.append((ci, name))
    return ids, tags


# ----------------------------------------------------------------------------------------------
# Dream batches and the two likelihoods (SFT loss on a dream, default task score tau).
# ----------------------------------------------------------------------------------------------
class Dreams(NamedTuple):
  """A batch of dreams in the sampler's layout (n, P + N)."""
  tokens: jax.Array
  valid: jax.Array
  completion_mask: jax.Array


def as_dreams(x) -> Dreams:
  """``SampleOutput`` / ``Dreams`` / mapping with tokens, valid, completion_mask -> ``Dreams``."""
  if isinstance(x, Mapping):
    return Dreams(x["tokens"], x["valid"], x["completion_mask"])
  return Dreams(x.tokens, x.valid, x.completion_mask)


def fixed_dreams(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                 pad_id: int = 0) -> Dreams:
  """Host helper: given (not sampled) dreams in the sampler's layout, prompt ``i`` left-padded to
  the longest prompt, then completion ``i`` (right-padded). Used for candidate dreams that come
  from elsewhere than the generator, e.g. ARC task variants (``dream(candidates=...)``)."""
  P = max(len(p) for p in prompts)
  N = max(len(c) for c in completions)
  toks = np.full((len(prompts), P + N), pad_id, np.int32)
  valid = np.zeros(toks.shape, bool)
  cm = np.zeros(toks.shape, bool)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    toks[i, P - len(p):P], valid[i, P - len(p):P] = p, True
    toks[i, P:P + len(c)], valid[i, P:P + len(c)], cm[i, P:P + len(c)] = c, True, True
  return Dreams(jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(cm))


def concat_dreams(a: Dreams, b: Dreams, pad_id: int = 0) -> Dreams:
  """Rows of ``a`` then ``b``, right-padded to a common width (positions are
  ``cumsum(valid) - 1``, so right padding changes no likelihood)."""
  w = max(a.tokens.shape[1], b.tokens.shape[1])
  pad = lambda x, v: jnp.pad(x, ((0, 0), (0, w - x.shape[1])), constant_values=v)
  return Dreams(jnp.concatenate([pad(a.tokens, pad_id), pad(b.tokens, pad_id)]),
                jnp.concatenate([pad(a.valid, False), pad(b.valid, False)]),
                jnp.concatenate([pad(a.completion_mask, False), pad(b.completion_mask, False)]))


def _masked_mean(values, mask):
  m = mask.astype(jnp.float32)
  v = jnp.where(mask.astype(bool), values, 0.0)
  return jnp.sum(v * m) / jnp.maximum(jnp.sum(m), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sequence_logprobs(params, lora, cfg: ModelConfig, slot_mask, tokens, valid, *,
                      lora_scale=1.0, route_rng=None):
  """Token-aligned ``log p(tokens[:, t] | tokens[:, :t])`` under ``params (+ lora)`` (B, T)."""
  logits, _ = transformer.apply(params, tokens, cfg, slot_mask=slot_mask, valid=valid, lora=lora,
                                lora_scale=lora_scale, route_rng=route_rng)
  return transformer.logits_to_logprobs(logits, tokens)


def sft_loss(params, lora, cfg: ModelConfig, slot_mask, tokens, valid, completion_mask, *,
             lora_scale=1.0, sft_context: str = "prompt"):
  """L_SFT = -(1/|c|) sum_{t in c} log p(y_t | y_<t): mean NLL of the completion tokens c.

  ``sft_context="prompt"``: the completion is conditioned on its prompt. ``"none"``: the prompt is
  hidden (``valid = completion_mask``) and the first completion token, which then has no
  predecessor, is not scored, i.e. the dream is standalone text. Tokens are (B, T); the mean is
  over every scored token of the batch.
  """
  cm = completion_mask.astype(bool)
  if sft_context == "prompt":
    valid_in, scored = valid, cm
  elif sft_context == "none":
    valid_in = cm
    scored = cm & jnp.pad(cm[:, :-1], ((0, 0), (1, 0)))
  else:
    raise ValueError(f"sft_context={sft_context!r}; valid: {SFT_CONTEXTS}")
  lp = sequence_logprobs(params, lora, cfg, slot_mask, tokens, valid_in, lora_scale=lora_scale)
  return -_masked_mean(lp, scored)


def task_log_likelihood(params, lora, cfg: ModelConfig, slot_mask, task_batch, *,
                        lora_scale=1.0):
  """Default task score tau (higher is better): mean log-likelihood of the target completions.

  ``tau = (1/|c|) sum_{b, t in c} log p(tokens[b, t] | tokens[b, :t])`` over the completion tokens
  ``c`` of ``task_batch`` (mapping with tokens/valid/completion_mask, e.g. the in-context
  teacher's answers to the wake prompts, asked closed-book). Any replacement must keep this
  signature: ``f(params, lora, cfg, slot_mask, task_batch, *, lora_scale) -> scalar``.
  """
  lp = sequence_logprobs(params, lora, cfg, slot_mask, task_batch["tokens"], task_batch["valid"],
                         lora_scale=lora_scale)
  return _masked_mean(lp, task_batch["completion_mask"])


# ----------------------------------------------------------------------------------------------
# 1. Sampling.
# ----------------------------------------------------------------------------------------------
def prompt_batch(context_prompts, m: int, pad_id: int = 0):
  """Host helper: ``m`` rows of left-padded prompts, row i = prompt ``i mod P``.

  ``context_prompts`` is a list of token lists or a ``(tokens, valid)`` pair of (P, L) arrays.
  Returns ``(tokens, valid, prompt_index)``.
  """
  if isinstance(context_prompts, tuple) and len(context_prompts) == 2 and hasattr(
      context_prompts[0], "shape"):
    toks, valid = (np.asarray(a) for a in context_prompts)
  else:
    toks, valid = sampler.left_pad(context_prompts, pad_id=pad_id)
  idx = np.arange(m) % toks.shape[0]
  return jnp.asarray(toks[idx]), jnp.asarray(valid[idx]), idx


def sample_dreams(params, cfg: ModelConfig, slot_mask, context_prompts, rng, m: int,
                  max_new_tokens: int, temperature: float = 1.0, random_expert: bool = True,
                  gen_lora=None, *, gen_lora_scale: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0
                  ) -> sampler.SampleOutput:
  """``m`` dreams ``d_i ~ LM_gen(. | prompt_{i mod P})`` with the one sampler.

  ``LM_gen`` is ``params`` plus ``gen_lora`` (scaled by ``gen_lora_scale``) when given. With
  ``random_expert`` every CMS router also turns on one uniformly random live, unselected expert
  (and slot) per token (``sampler.sample(random_expert=True)`` -> ``transformer.apply(route_rng)``).
  Returns the sampler's ``SampleOutput`` (m, P + N).
  """
  toks, valid, _ = prompt_batch(context_prompts, m, pad_id)
  return sampler.sample(params, toks, valid, rng, cfg=cfg, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_tokens=tuple(stop_tokens), pad_id=pad_id, slot_mask=slot_mask,
                        lora=gen_lora, lora_scale=gen_lora_scale, random_expert=random_expert)


# ----------------------------------------------------------------------------------------------
# 2. Gradient importance scores.
# ----------------------------------------------------------------------------------------------
def _tree_sq_norm_rows(g):
  """sum over leaves of ||g[i]||^2 for a pytree with a leading batch axis -> (n,)."""
  return sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(g))


def _tree_dot_rows(g, h):
  """<g[i], h> for a batched pytree g and an unbatched h -> (n,)."""
  return sum(jnp.sum((x * y[None]).reshape(x.shape[0], -1), axis=1)
             for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(h)))


def _per_dream(fn: Callable, dreams: Dreams, parallel: int):
  """``fn(tokens, valid, cmask)`` for every dream: one ``jax.vmap`` (``parallel`` 0), or
  ``lax.map`` over groups of ``parallel`` vmapped dreams. Each dream in flight holds a backward
  pass of the model, so on a real model ``parallel`` bounds memory; shared work (``g_tau``,
  ``tau(base)``) stays outside, computed once."""
  xs = (dreams.tokens, dreams.valid, dreams.completion_mask)
  if parallel <= 0:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda x: fn(*x), xs, batch_size=parallel)


@functools.partial(jax.jit, static_argnames=("cfg", "rule", "task_score_fn", "sft_context",
                                             "parallel"))
def gradient_scores(params, cfg: ModelConfig, slot_mask, lora0, dreams: Dreams, task_batch, *,
                    rule: str = "grad_norm", lora_scale=1.0,
                    task_score_fn: Callable = task_log_likelihood,
                    sft_context: str = "prompt", parallel: int = 0) -> jax.Array:
  """One gradient score per dream, (n,) (``parallel``: dreams per vmap, ``_per_dream``).

  ``g_i = grad_phi L_SFT(d_i; base + phi)|_{phi = lora0}`` for every dream as one
  ``jax.vmap(jax.grad(L_SFT))`` (base weights broadcast); ``grad_norm``: ``||g_i||_2``;
  ``grad_align``: ``<g_i, g_tau> / (||g_i|| ||g_tau||)`` with ``g_tau = grad_phi (-tau)|_{lora0}``
  on ``task_batch``. Norms over every adapter leaf (only the B leaves are non-zero: B = 0).
  ``rule`` is static: ``grad_norm`` never runs the backward pass over the task batch (with
  in-context task rows of a real model, the largest buffer of the round).
  """
  def grad_one(tokens, valid, cmask):
    return jax.grad(sft_loss, argnums=1)(params, lora0, cfg, slot_mask, tokens[None], valid[None],
                                         cmask[None], lora_scale=lora_scale,
                                         sft_context=sft_context)

  g = _per_dream(grad_one, dreams, parallel)
  sq = _tree_sq_norm_rows(g)
  if rule == "grad_norm":
    return jnp.sqrt(sq)
  g_tau = jax.grad(lambda l: -task_score_fn(params, l, cfg, slot_mask, task_batch,
                                            lora_scale=lora_scale))(lora0)
  tau_sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g_tau))
  return _tree_dot_rows(g, g_tau) / jnp.maximum(jnp.sqrt(sq * tau_sq), 1e-20)


def score_dreams(params, cfg: ModelConfig, slot_mask, lora0, dreams: Dreams, task_batch, rng, *,
                 rule: str = "grad_norm", lora_scale=1.0,
                 task_score_fn: Callable = task_log_likelihood, sft_context: str = "prompt",
                 parallel: int = 0):
  """Importance score per dream (n,), higher = keep (jittable with ``rule`` static).

  * ``grad_norm``:  ``s_i = ||g_i||_2`` with ``g_i = grad_phi L_SFT(d_i)`` at the fresh adapter;
  * ``grad_align``: ``s_i = cos(g_i, g_tau)``, ``g_tau = grad_phi (-tau)`` on ``task_batch`` (a
    dream whose descent direction also descends the task loss scores 1);
  * ``random``: ``s_i ~ U(0, 1)`` from ``rng``, no gradient computed ("no gradient selection").
  """
  if rule == "random":
    return jax.random.uniform(rng, (dreams.tokens.shape[0],))
  if rule not in SCORE_RULES:
    raise ValueError(f"score rule {rule!r}; valid: {SCORE_RULES}")
  return gradient_scores(params, cfg, slot_mask, lora0, dreams, task_batch, rule=rule,
                         lora_scale=lora_scale, task_score_fn=task_score_fn,
                         sft_context=sft_context, parallel=parallel)


# ----------------------------------------------------------------------------------------------
# 3. Selection.
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "b"))
def select(scores: jax.Array, k: int, b: int, rng: jax.Array) -> jax.Array:
  """Indices ``top_k(scores) ++ b distinct uniformly random indices outside the top-k``.

  With n scores the result has ``min(k, n) + min(b, n - min(k, n))`` entries (fewer random ones
  when there are not enough). Ties in the top-k go to the lower index; NaN scores rank last.
  "No gradient selection" is random scores (``score_dreams(rule="random")``), which makes the
  whole selection a uniformly random subset of size k + b.
  """
  n = scores.shape[0]
  k = min(max(k, 0), n)
  b = min(max(b, 0), n - k)
  s = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  top = jax.lax.top_k(s, k)[1] if k > 0 else jnp.zeros((0,), jnp.int32)
  if b == 0:
    return top.astype(jnp.int32)
  is_top = jnp.zeros((n,), bool).at[top].set(True)
  u = jnp.where(is_top, -1.0, jax.random.uniform(rng, (n,)))
  rest = jax.lax.top_k(u, b)[1]
  return jnp.concatenate([top, rest]).astype(jnp.int32)


def take(dreams: Dreams, idx) -> Dreams:
  """Rows ``idx`` of a dream batch."""
  return Dreams(*(jnp.asarray(x)[idx] for x in dreams))


# ----------------------------------------------------------------------------------------------
# 4-5. Isolated LoRA trials and rewards.
# ----------------------------------------------------------------------------------------------
class TrialOutput(NamedTuple):
  lora: Any  # adapted adapters, leaves (n, ...)
  scores: jax.Array  # (n,) tau(base + phi_i)
  base_score: jax.Array  # () tau(base)
  rewards: jax.Array  # (n,) float32 in {0, 1}


def make_optimizer(name: str, lr) -> optax.GradientTransformation:
  """``sgd``: phi <- phi - lr g; ``adam``: optax.adam(lr) (lr may be a traced scalar)."""
  if name == "sgd":
    return optax.sgd(lr)
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"optimizer {name!r}; valid: {OPTIMIZERS}")


def rewards_from_scores(scores, base_score, margin=0.0):
  """r_i = 1[tau_i > tau_base + margin] as float32."""
  return (scores > base_score + margin).astype(jnp.float32)


def _trial(params, cfg, slot_mask, lora0, tokens, valid, cmask, task_batch, inner_lr, lora_scale,
           *, inner_steps, optimizer, task_score_fn, sft_context):
  """One trial: phi <- phi_0; inner_steps x (phi <- opt(phi, grad L_SFT(d; phi))); tau(phi)."""
  opt = make_optimizer(optimizer, inner_lr)

  def loss(l):
    return sft_loss(params, l, cfg, slot_mask, tokens[None], valid[None], cmask[None],
                    lora_scale=lora_scale, sft_context=sft_context)

  def step(_, carry):
    l, s = carry
    g = jax.grad(loss)(l)
    upd, s = opt.update(g, s, l)
    return optax.apply_updates(l, upd), s

  l, _ = jax.lax.fori_loop(0, inner_steps, step, (lora0, opt.init(lora0)))
  return l, task_score_fn(params, l, cfg, slot_mask, task_batch, lora_scale=lora_scale)


_TRIAL_STATIC = ("cfg", "inner_steps", "optimizer", "task_score_fn", "sft_context")


@functools.partial(jax.jit, static_argnames=_TRIAL_STATIC + ("parallel",))
def run_trials(params, cfg: ModelConfig, slot_mask, lora0, dreams: Dreams, task_batch, *,
               inner_steps: int, inner_lr, optimizer: str = "adam", lora_scale=1.0, margin=0.0,
               task_score_fn: Callable = task_log_likelihood,
               sft_context: str = "prompt", parallel: int = 0) -> TrialOutput:
  """All isolated trials at once: ``phi_i = SFT^{inner_steps}(phi_0; d_i)``, ``tau_i = tau(phi_i)``.

  One ``jax.vmap`` over dreams of the trial (a ``lax.fori_loop`` of optax steps) inside this one
  jitted function; ``params``, ``lora0`` and ``task_batch`` are unbatched (``in_axes=None``), so
  the frozen base is shared, not copied per dream (``parallel``: dreams per vmap). Rewards:
  ``r_i = 1[tau_i > tau(base) + margin]`` with ``tau(base)`` the model without adapter.
  """
  fn = functools.partial(_trial, inner_steps=inner_steps, optimizer=optimizer,
                         task_score_fn=task_score_fn, sft_context=sft_context)
  one = lambda t, v, c: fn(params, cfg, slot_mask, lora0, t, v, c, task_batch, inner_lr, lora_scale)
  adapted, scores = _per_dream(one, dreams, parallel)
  base = task_score_fn(params, None, cfg, slot_mask, task_batch, lora_scale=lora_scale)
  return TrialOutput(adapted, scores, base, rewards_from_scores(scores, base, margin))


@functools.partial(jax.jit, static_argnames=_TRIAL_STATIC)
def _trial_jit(params, cfg, slot_mask, lora0, tokens, valid, cmask, task_batch, inner_lr,
               lora_scale, *, inner_steps, optimizer, task_score_fn, sft_context):
  return _trial(params, cfg, slot_mask, lora0, tokens, valid, cmask, task_batch, inner_lr,
                lora_scale, inner_steps=inner_steps, optimizer=optimizer,
                task_score_fn=task_score_fn, sft_context=sft_context)


@functools.partial(jax.jit, static_argnames=("cfg", "task_score_fn"))
def task_score(params, lora, cfg: ModelConfig, slot_mask, task_batch, *, lora_scale=1.0,
               task_score_fn: Callable = task_log_likelihood):
  """Jitted ``tau(params + lora)``."""
  return task_score_fn(params, lora, cfg, slot_mask, task_batch, lora_scale=lora_scale)


def run_trials_sequential(params, cfg: ModelConfig, slot_mask, lora0, dreams: Dreams, task_batch,
                          *, inner_steps: int, inner_lr, optimizer: str = "adam", lora_scale=1.0,
                          margin=0.0, task_score_fn: Callable = task_log_likelihood,
                          sft_context: str = "prompt") -> TrialOutput:
  """The same trial function as ``run_trials``, jitted once and run one dream at a time."""
  loras, scores = [], []
  for i in range(dreams.tokens.shape[0]):
    l, s = _trial_jit(params, cfg, slot_mask, lora0, dreams.tokens[i], dreams.valid[i],
                      dreams.completion_mask[i], task_batch, inner_lr, lora_scale,
                      inner_steps=inner_steps, optimizer=optimizer, task_score_fn=task_score_fn,
                      sft_context=sft_context)
    loras.append(l)
    scores.append(s)
  scores = jnp.stack(scores)
  base = task_score(params, None, cfg, slot_mask, task_batch, lora_scale=lora_scale,
                    task_score_fn=task_score_fn)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *loras)
  return TrialOutput(stacked, scores, base, rewards_from_scores(scores, base, margin))


# ----------------------------------------------------------------------------------------------
# 6. ReST-EM on the dream generator.
# ----------------------------------------------------------------------------------------------
class Generator(NamedTuple):
  """The dream generator's trainable part: base params (frozen, not stored) + this LoRA."""
  lora: Any
  opt_state: Any
  scale: float  # alpha / rank


def init_generator(rng, cfg: ModelConfig, rank: int, alpha: float, targets: Sequence[str],
                   optimizer: str = "adam") -> Generator:
  """Fresh generator LoRA (B = 0: the generator starts as the base model) and optimizer state."""
  l = init_adapter(rng, cfg, rank, tuple(targets))
  return Generator(l, make_optimizer(optimizer, 0.0).init(l), lora_lib.scale(alpha, rank))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "optimizer"))
def rest_em_round(params, cfg: ModelConfig, slot_mask, gen_lora, opt_state, dreams: Dreams,
                  rewards, *, steps: int, lr, lora_scale=1.0, optimizer: str = "adam"):
  """ReST-EM M-step on the generator LoRA psi (base frozen), ``steps`` full-batch optax steps on

      L(psi) = -(1 / sum_i r_i |c_i|) sum_i r_i sum_{t in c_i} log p_{base+psi}(d_i,t | d_i,<t)

  i.e. SFT on (prompt -> dream) pairs with reward 1 only. With ``sum_i r_i = 0`` the function
  returns ``gen_lora`` and ``opt_state`` unchanged (bit-identical: a ``lax.cond`` skips the
  update, so stale Adam moments cannot move psi either).

  Returns ``(gen_lora, opt_state, metrics)``; metrics: ``rest_em_loss_before/after`` (the loss
  above; 0 when nothing is rewarded) and ``rest_em_n`` (rewarded dreams).
  """
  opt = make_optimizer(optimizer, lr)
  keep = rewards.astype(bool)[:, None] & dreams.completion_mask.astype(bool)

  def loss(l):
    return sft_loss(params, l, cfg, slot_mask, dreams.tokens, dreams.valid, keep,
                    lora_scale=lora_scale, sft_context="prompt")

  def train(carry):
    l, s = carry

    def step(_, c):
      l, s = c
      g = jax.grad(loss)(l)
      upd, s = opt.update(g, s, l)
      return optax.apply_updates(l, upd), s

    return jax.lax.fori_loop(0, steps, step, (l, s))

  any_reward = jnp.any(rewards > 0)
  before = loss(gen_lora)
  new_lora, new_state = jax.lax.cond(any_reward, train, lambda c: c, (gen_lora, opt_state))
  after = jnp.where(any_reward, loss(new_lora), 0.0)
  metrics = {"rest_em_loss_before": before, "rest_em_loss_after": after,
             "rest_em_n": jnp.sum(rewards > 0)}
  return new_lora, new_state, metrics


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

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def dreams(self) -> Dreams:
    return Dreams(self.tokens, self.valid, self.completion_mask)


class Dreamer:
  """Runs dreaming rounds; holds only the loop state (generator LoRA + optimizer, config)."""

  def __init__(self, params, cfg: ModelConfig, config: ml_collections.ConfigDict, *,
               slot_mask=None, generator: Optional[Generator] = None, rng=None,
               task_score_fn: Callable = task_log_likelihood, stop_tokens: Sequence[int] = (),
               pad_id: int = 0):
    if config.score not in SCORE_RULES:
      raise ValueError(f"dreaming score {config.score!r}; valid: {SCORE_RULES}")
    self.params, self.cfg, self.config = params, cfg, config
    self.slot_mask = transformer.slot_mask_none(cfg) if slot_mask is None else slot_mask
    self.task_score_fn, self.stop_tokens, self.pad_id = task_score_fn, tuple(stop_tokens), pad_id
    if generator is None:
      r = config.rest_em
      generator = init_generator(jax.random.key(0) if rng is None else rng, cfg, r.rank, r.alpha,
                                 r.targets, r.optimizer)
    self.generator = generator

  def round(self, context_prompts, task_batch, rng, candidates: Optional[Dreams] = None
            ) -> Tuple[Dreams, np.ndarray, np.ndarray, Dict[str, Any]]:
    """One round. Returns (kept dreams, their row indices in the m samples (then the
    ``candidates``: index ``m + j``), their rewards, metrics) and updates the generator.

    ``candidates``: extra dreams (``fixed_dreams`` layout) scored, selected and trialled with the
    m sampled ones; the generator's ReST-EM step learns only from its own sampled dreams."""
    c, cfg = self.config, self.cfg
    r_sample, r_lora, r_score, r_select = jax.random.split(rng, 4)
    out = sample_dreams(self.params, cfg, self.slot_mask, context_prompts, r_sample, c.m,
                        c.max_new_tokens, c.temperature, c.random_expert, self.generator.lora,
                        gen_lora_scale=self.generator.scale, top_k=c.top_k, top_p=c.top_p,
                        stop_tokens=self.stop_tokens, pad_id=self.pad_id)
    dreams = as_dreams(out)
    if candidates is not None:
      dreams = concat_dreams(dreams, candidates, self.pad_id)
    lora0 = init_adapter(r_lora, cfg, c.lora.rank, tuple(c.lora.targets))
    lscale = lora_lib.scale(c.lora.alpha, c.lora.rank)
    parallel = int(c.get("parallel_dreams", 0))
    scores = score_dreams(self.params, cfg, self.slot_mask, lora0, dreams, task_batch, r_score,
                          rule=c.score, lora_scale=lscale, task_score_fn=self.task_score_fn,
                          sft_context=c.sft_context, parallel=parallel)
    idx = select(scores, c.k, c.b, r_select)
    kept = take(dreams, idx)
    trials = run_trials(self.params, cfg, self.slot_mask, lora0, kept, task_batch,
                        inner_steps=c.inner_steps, inner_lr=c.inner_lr,
                        optimizer=c.inner_optimizer, lora_scale=lscale, margin=c.margin,
                        task_score_fn=self.task_score_fn, sft_context=c.sft_context,
                        parallel=parallel)
    g = self.generator
    sampled = jnp.asarray(np.asarray(idx) < c.m)  # candidates are not the generator's own words
    new_lora, new_state, rm = rest_em_round(
        self.params, cfg, self.slot_mask, g.lora, g.opt_state, kept, trials.rewards * sampled,
        steps=c.rest_em.steps, lr=c.rest_em.lr, lora_scale=g.scale, optimizer=c.rest_em.optimizer)
    self.generator = Generator(new_lora, new_state, g.scale)
    rewards = np.asarray(trials.rewards)
    metrics = {
        "scores": np.asarray(scores).tolist(),
        "selected": np.asarray(idx).tolist(),
        "trial_scores": np.asarray(trials.scores).tolist(),
        "base_score": float(trials.base_score),
        "rewards": rewards.tolist(),
        "acceptance_rate": float(rewards.mean()) if rewards.size else 0.0,
        "n_accepted": int(rewards.sum()),
        "mean_completion_tokens": float(np.asarray(kept.completion_mask).sum(1).mean()),
        **{k: float(v) for k, v in rm.items()},
    }
    return kept, np.asarray(idx), rewards, metrics

  def run(self, context_prompts, task_batch, rng, candidates: Optional[Dreams] = None
          ) -> DreamResult:
    """``config.rounds`` rounds; accepted = every kept dream with reward 1, over all rounds
    (``prompt_index`` -1 for an accepted candidate)."""
    _, _, prompt_idx = prompt_batch(context_prompts, self.config.m, self.pad_id)
    if candidates is not None:
      prompt_idx = np.concatenate([prompt_idx, np.full(candidates.tokens.shape[0], -1)])
    acc: Dict[str, list] = {k: [] for k in ("tokens", "valid", "completion_mask", "prompt_index",
                                            "round")}
    metrics = []
    for rnd, key in enumerate(jax.random.split(rng, self.config.rounds)):
      t0 = time.perf_counter()
      kept, idx, rewards, m = self.round(context_prompts, task_batch, key, candidates)
      ok = rewards > 0
      acc["tokens"].append(np.asarray(kept.tokens)[ok])
      acc["valid"].append(np.asarray(kept.valid)[ok])
      acc["completion_mask"].append(np.asarray(kept.completion_mask)[ok])
      acc["prompt_index"].append(prompt_idx[idx][ok])
      acc["round"].append(np.full(int(ok.sum()), rnd, np.int32))
      m["round"], m["seconds"] = rnd, time.perf_counter() - t0
      metrics.append(m)
    return DreamResult(**{k: np.concatenate(v) for k, v in acc.items()}, metrics=metrics,
                       generator=self.generator)


def _empty_result(generator) -> DreamResult:
  z = np.zeros((0, 0))
  return DreamResult(z.astype(np.int32), z.astype(bool), z.astype(bool), np.zeros(0, np.int64),
                     np.zeros(0, np.int32), [], generator)


def dream(params, cfg: ModelConfig, slot_mask, context_prompts, task_batch, rng,
          config: Optional[ml_collections.ConfigDict] = None, *,
          generator: Optional[Generator] = None, task_score_fn: Callable = task_log_likelihood,
          stop_tokens: Sequence[int] = (), pad_id: int = 0,
          candidates: Optional[Dreams] = None) -> DreamResult:
  """Dreaming for one sleep: ``config.rounds`` rounds of sample -> score -> select -> trials ->
  reward -> ReST-EM. ``context_prompts``: token lists (e.g. ``DreamTemplates.prompts``);
  ``task_batch``: tokens/valid/completion_mask for tau. ``enabled=False`` returns no dreams.
  Pass the returned ``generator`` back in to keep the ReST-EM generator across sleeps.
  ``candidates``: extra given dreams competing with the sampled ones (``Dreamer.round``).
  """
  config = default_config() if config is None else config
  if not config.enabled:
    return _empty_result(generator)
  r_gen, r_run = jax.random.split(rng)
  d = Dreamer(params, cfg, config, slot_mask=slot_mask, generator=generator, rng=r_gen,
              task_score_fn=task_score_fn, stop_tokens=stop_tokens, pad_id=pad_id)
  return d.run(context_prompts, task_batch, r_run, candidates)


# ----------------------------------------------------------------------------------------------
# Benchmark: vmapped vs sequential trials.
# ----------------------------------------------------------------------------------------------
def benchmark_trials(m: int = 16, d_model: int = 128, n_layers: int = 4, prompt_len: int = 16,
                     dream_len: int = 32, inner_steps: int = 4, task_batch: int = 8,
                     task_len: int = 32, rank: int = 8, optimizer: str = "adam",
                     repeats: int = 5, seed: int = 0) -> Dict[str, Any]:
  """Wall time of ``run_trials`` (one vmap) vs ``run_trials_sequential`` for ``m`` dreams.

  Model: ``config.tiny(d_model, n_layers)`` (4 heads, 2 KV heads, vocab 259); dreams of
  ``prompt_len`` prompt + ``dream_len`` completion tokens; tau on ``task_batch`` x ``task_len``.
  Both paths are compiled and run once before timing (``*_first_call_s`` include compilation);
  then ``repeats`` interleaved timed calls of each. Returns a dict with the best (``*_s``) and
  median seconds of each path, ``speedup = sequential / vmapped`` (best) and ``speedup_median``,
  and the max absolute difference of their task scores.
  """
  from sleep_jax.model import config as model_config
  cfg = model_config.tiny(d_model=d_model, n_layers=n_layers, d_ff=(0, 4 * d_model))
  rng = np.random.default_rng(seed)
  params = jax.jit(transformer.init, static_argnums=1)(jax.random.key(seed), cfg)
  slot_mask = transformer.slot_mask_none(cfg)
  T = prompt_len + dream_len
  cm = np.zeros((m, T), bool)
  cm[:, prompt_len:] = True
  dreams = Dreams(jnp.asarray(rng.integers(3, cfg.vocab_size, (m, T)), jnp.int32),
                  jnp.ones((m, T), bool), jnp.asarray(cm))
  tcm = np.zeros((task_batch, task_len), bool)
  tcm[:, task_len // 2:] = True
  tb = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (task_batch, task_len)), jnp.int32),
        "valid": jnp.ones((task_batch, task_len), bool), "completion_mask": jnp.asarray(tcm)}
  lora0 = init_adapter(jax.random.key(seed + 1), cfg, rank, lora_lib.ALL_TARGETS)
  kw = dict(inner_steps=inner_steps, inner_lr=1e-3, optimizer=optimizer,
            lora_scale=lora_lib.scale(2 * rank, rank))

  def vmapped():
    return jax.block_until_ready(run_trials(params, cfg, slot_mask, lora0, dreams, tb, **kw))

  def sequential():
    return jax.block_until_ready(
        run_trials_sequential(params, cfg, slot_mask, lora0, dreams, tb, **kw))

  # Compile (and run) both once, then interleave the timed calls so load changes on a shared
  # machine hit both paths alike; report the best and the median of each.
  t0 = time.perf_counter()
  out_v = vmapped()
  first_v = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_s = sequential()
  first_s = time.perf_counter() - t0
  tv, ts = [], []
  for _ in range(repeats):
    for f, acc in ((vmapped, tv), (sequential, ts)):
      t0 = time.perf_counter()
      f()
      acc.append(time.perf_counter() - t0)
  t_v, t_s = min(tv), min(ts)
  return {
      "m": m, "d_model": d_model, "n_layers": n_layers, "prompt_len": prompt_len,
      "dream_len": dream_len, "inner_steps": inner_steps, "optimizer": optimizer,
      "task_batch": task_batch, "task_len": task_len, "lora_rank": rank,
      "devices": str(jax.devices()), "vmapped_s": t_v, "sequential_s": t_s,
      "speedup": t_s / t_v, "vmapped_median_s": float(np.median(tv)),
      "sequential_median_s": float(np.median(ts)),
      "speedup_median": float(np.median(ts) / np.median(tv)),
      "vmapped_first_call_s": first_v, "sequential_first_call_s": first_s,
      "max_abs_score_diff": float(jnp.max(jnp.abs(out_v.scores - out_s.scores))),
  }


if __name__ == "__main__":
  import json
  print(json.dumps(benchmark_trials(), indent=2))
