"""The pure, jitted pieces of a dreaming round (docs/method.md section 4 steps 2-6): the SFT loss on a dream
and the default task score tau, gradient importance scores, selection, the isolated LoRA trials
(one ``vmap`` over dreams) with their rewards, and the ReST-EM step of the dream generator."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from sleep_jax.losses import rl
from sleep_jax.losses.common import token_mean
from sleep_jax.model import lora as lora_lib
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig

from sleep_jax.sleep.dream_batches import Dreams

# ``lora.init`` jitted: one compilation per (cfg, rank, targets), not one eager RNG kernel per leaf.
init_adapter = jax.jit(lora_lib.init, static_argnums=(1, 2, 3))
SCORE_RULES = ("grad_norm", "grad_align", "random")
SFT_CONTEXTS = ("prompt", "none")
LOGITS_BUDGET = 2 ** 28  # bytes of (B, T, V) float32 logits one log-prob pass may hold
# Bytes of the residual stream (L, B, T, d) float32 past which a whole-batch backward (g_tau;
# ReST-EM's M-step) rematerialises each layer: without it the backward keeps every layer's
# activations of the whole batch (SmolLM2, 226 tau rows: one 40 GB buffer; 48 kept dreams of
# 380 tokens: 26 GB); with it, each layer's input, and one layer's activations at a time.
BACKWARD_BUDGET = 2 ** 28
OPTIMIZERS = ("sgd", "adam")


@functools.partial(jax.jit, static_argnames=("cfg",))
def sequence_logprobs(params, lora, cfg: ModelConfig, slot_mask, tokens, valid, *,
                      lora_scale=1.0, route_rng=None):
  """Token-aligned ``log p(tokens[:, t] | tokens[:, :t])`` under ``params (+ lora)`` (B, T).

  Past ``LOGITS_BUDGET`` bytes of (B, T, V) logits the output head runs over groups of rows
  (``lax.map``, each group rematerialised in the backward): tau over a chunk's 226 questions on
  SmolLM2's 49k vocabulary is 4 GB of logits per trial, and the trials run several at once."""
  B, T = tokens.shape
  rows = max(1, LOGITS_BUDGET // (4 * T * cfg.vocab_size))
  if rows >= B:
    logits, _ = transformer.apply(params, tokens, cfg, slot_mask=slot_mask, valid=valid,
                                  lora=lora, lora_scale=lora_scale, route_rng=route_rng)
    return transformer.logits_to_logprobs(logits, tokens)
  h, _ = transformer.apply(params, tokens, cfg, slot_mask=slot_mask, valid=valid, lora=lora,
                           lora_scale=lora_scale, route_rng=route_rng, return_hidden=True)
  n = -(-B // rows)
  pad = lambda x: jnp.pad(x, ((0, n * rows - B),) + ((0, 0),) * (x.ndim - 1))
  group = jax.checkpoint(lambda hx: transformer.logits_to_logprobs(
      transformer.unembed(params, hx[0], cfg), hx[1]))
  lp = jax.lax.map(group, (pad(h).reshape(n, rows, T, -1), pad(tokens).reshape(n, rows, T)))
  return lp.reshape(n * rows, T)[:B]


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
  return rl.sft_loss(lp, scored)[0]  # the registered SFT loss on the scored tokens


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
  return token_mean(lp, task_batch["completion_mask"])



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


def _per_dream(fn: Callable, dreams: Dreams, parallel: int, *extra):
  """``fn(tokens, valid, cmask, *extra)`` for every dream (``extra``: more per-dream arrays):
  one ``jax.vmap`` (``parallel`` 0), or ``lax.map`` over groups of ``parallel`` vmapped dreams.
  Each dream in flight holds a backward pass of the model, so on a real model ``parallel``
  bounds memory; shared work (``g_tau``, ``tau(base)``) stays outside, computed once."""
  xs = (dreams.tokens, dreams.valid, dreams.completion_mask) + tuple(extra)
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
  in-context task rows of a real model, the largest buffer of the round); past
  ``BACKWARD_BUDGET`` that backward rematerialises each layer.
  """
  def grad_one(tokens, valid, cmask):
    return jax.grad(sft_loss, argnums=1)(params, lora0, cfg, slot_mask, tokens[None], valid[None],
                                         cmask[None], lora_scale=lora_scale,
                                         sft_context=sft_context)

  g = _per_dream(grad_one, dreams, parallel)
  sq = _tree_sq_norm_rows(g)
  if rule == "grad_norm":
    return jnp.sqrt(sq)
  tau_cfg = _backward_cfg(cfg, *task_batch["tokens"].shape)
  g_tau = jax.grad(lambda l: -task_score_fn(params, l, tau_cfg, slot_mask, task_batch,
                                            lora_scale=lora_scale))(lora0)
  tau_sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g_tau))
  return _tree_dot_rows(g, g_tau) / jnp.maximum(jnp.sqrt(sq * tau_sq), 1e-20)


def past_backward_budget(cfg: ModelConfig, B: int, T: int) -> bool:
  """Whether a backward over a (B, T) batch keeps more than ``BACKWARD_BUDGET`` bytes of
  residual stream, (L, B, T, d) float32."""
  return 4 * cfg.n_layers * B * T * cfg.d_model > BACKWARD_BUDGET


def _backward_cfg(cfg: ModelConfig, B: int, T: int) -> ModelConfig:
  """``cfg`` with every layer rematerialised past the budget (the same function, less
  memory)."""
  if cfg.remat == "none" and past_backward_budget(cfg, B, T):
    return dataclasses.replace(cfg, remat="full")
  return cfg


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
               sft_context: str = "prompt", parallel: int = 0, task_rows=None, task_masks=None,
               groups=None) -> TrialOutput:
  """All isolated trials at once: ``phi_i = SFT^{inner_steps}(phi_0; d_i)``, ``tau_i = tau(phi_i)``.

  One ``jax.vmap`` over dreams of the trial (a ``lax.fori_loop`` of optax steps) inside this one
  jitted function; ``params``, ``lora0`` and ``task_batch`` are unbatched (``in_axes=None``), so
  the frozen base is shared, not copied per dream (``parallel``: dreams per vmap). Rewards:
  ``r_i = 1[tau_i > tau(base) + margin]`` with ``tau(base)`` the model without adapter.

  ``task_rows`` (G, R), ``task_masks`` (G, R, T) and ``groups`` (n,): dream i is scored on the
  rows ``task_rows[g]`` of ``task_batch`` with completion tokens ``task_masks[g]``, g =
  ``groups[i]`` (e.g. the tau questions about its own passage: ``dreaming.passage_masks``),
  against the base's score on the same tokens; ``base_score`` is then per dream (n,). A trial
  reads its group's rows alone: with one group per passage, a passage's 12 questions instead of
  every passage's.
  """
  fn = functools.partial(_trial, inner_steps=inner_steps, optimizer=optimizer,
                         task_score_fn=task_score_fn, sft_context=sft_context)
  if task_masks is None:
    one = lambda t, v, c: fn(params, cfg, slot_mask, lora0, t, v, c, task_batch, inner_lr,
                             lora_scale)
    adapted, scores = _per_dream(one, dreams, parallel)
    base = task_score_fn(params, None, cfg, slot_mask, task_batch, lora_scale=lora_scale)
    return TrialOutput(adapted, scores, base, rewards_from_scores(scores, base, margin))
  def group_batch(g):
    return {**jax.tree.map(lambda x: x[task_rows[g]], task_batch),
            "completion_mask": task_masks[g]}

  one = lambda t, v, c, g: fn(params, cfg, slot_mask, lora0, t, v, c, group_batch(g), inner_lr,
                              lora_scale)
  adapted, scores = _per_dream(one, dreams, parallel, groups)
  base = jax.vmap(lambda g: task_score_fn(params, None, cfg, slot_mask, group_batch(g),
                                          lora_scale=lora_scale))(
                                              jnp.arange(task_rows.shape[0]))[groups]
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
  update, so stale Adam moments cannot move psi either). Past ``BACKWARD_BUDGET`` the backward
  rematerialises each layer.

  Returns ``(gen_lora, opt_state, metrics)``; metrics: ``rest_em_loss_before/after`` (the loss
  above; 0 when nothing is rewarded) and ``rest_em_n`` (rewarded dreams).
  """
  opt = make_optimizer(optimizer, lr)
  cfg = _backward_cfg(cfg, *dreams.tokens.shape)

  def loss(l):
    lp = sequence_logprobs(params, l, cfg, slot_mask, dreams.tokens, dreams.valid,
                           lora_scale=lora_scale)
    return rl.rest_em_loss(lp, dreams.completion_mask, rewards)[0]  # the registered M-step

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


