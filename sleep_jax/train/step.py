"""The generic jitted train step, ``step(state, batch, rng=None) -> (state, metrics)`` under
``jax.jit`` with explicit in/out shardings and the state donated, and its memo across sleeps."""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sleep_jax.train.optimizer import make_optimizer
from sleep_jax.train.state import TrainState

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


def mask_grads(grads, trainable):
  """Zero gradient wherever the mask is False (so optimizer statistics see no signal there)."""
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, trainable)


def apply_masked_updates(params, updates, trainable):
  """``p + u`` where trainable, the untouched ``p`` elsewhere (bit-exact, even for -0.0)."""
  return jax.tree.map(lambda p, u, m: jnp.where(m, p + u.astype(p.dtype), p),
                      params, updates, trainable)


def select(tree, on):
  """``tree`` with every leaf whose host bool in ``on`` is False replaced by None (an empty
  subtree: no gradient, no optimizer state)."""
  return jax.tree.map(lambda x, d: x if d else None, tree, on)


def merge(sub, full):
  """``full`` with the leaves ``sub`` holds (``select``'s None: ``full``'s own leaf)."""
  return jax.tree.map(lambda s, x: x if s is None else s, sub, full,
                      is_leaf=lambda v: v is None)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    state_shardings: Optional[TrainState] = None, batch_shardings=None,
                    donate: bool = True, jit: bool = True, differentiate=None):
  """Builds ``step(state, batch, rng=None) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar loss, metrics dict)``. It sees
      ``state.extras`` merged into ``batch``, and a typed PRNG key.
    optimizer: the optax transform ``state.opt_state`` was created with.
    state_shardings: TrainState of shardings (from ``create_train_state``); with
      ``batch_shardings`` (a sharding or pytree of them) these become jit's in/out shardings.
      Both None: single-device jit (shardings follow the inputs).
    donate: donate the incoming state's buffers (the step updates it in place).
    jit: False returns the plain Python function (to compose into a larger jitted program).
    differentiate: optional host pytree like params of Python bools: only these arrays are
      differentiated (the others get an exact zero gradient without computing it). Pass
      ``trainable_arrays(trainable)`` when few arrays train (one slot in a sleep): the backward
      pass then skips every frozen weight's gradient matmul (bench: 2.9x faster steps), and
      the optimizer state covers only these arrays (``select``; ``fit.new_state`` builds it so),
      so a frozen array costs no optimizer update either.

  The step's key is ``rng`` when given, else a fresh split of ``state.rng`` (which is advanced
  every step either way, so checkpoints resume the same stream). Metrics gain ``loss``,
  ``grad_norm`` (of the masked gradient) and ``update_norm``.
  """

  def step(state: TrainState, batch, rng=None):
    key = jax.random.wrap_key_data(state.rng)
    next_key, step_key = jax.random.split(key)
    if rng is not None:
      step_key = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else (
          jax.random.wrap_key_data(rng))
    inputs = {**batch, **state.extras} if state.extras else batch
    if differentiate is None:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, inputs, step_key)
      grads = mask_grads(grads, state.trainable)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = apply_masked_updates(state.params, updates, state.trainable)
    else:
      if len(jax.tree.leaves(differentiate)) != len(jax.tree.leaves(state.params)):
        raise ValueError(f"differentiate has {len(jax.tree.leaves(differentiate))} leaves, "
                         f"params {len(jax.tree.leaves(state.params))}")
      # Frozen arrays are neither differentiated nor seen by the optimizer (its state covers
      # the differentiated ones only, ``fit.new_state``): they pass through untouched.
      sub = select(state.params, differentiate)
      (loss, metrics), grads = jax.value_and_grad(
          lambda s: loss_fn(merge(s, state.params), inputs, step_key), has_aux=True)(sub)
      trainable = select(state.trainable, differentiate)
      grads = mask_grads(grads, trainable)
      updates, opt_state = optimizer.update(grads, state.opt_state, sub)
      params = merge(apply_masked_updates(sub, updates, trainable), state.params)
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads),
                   update_norm=optax.global_norm(updates))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(next_key))
    return new_state, metrics

  if not jit:
    return step
  kwargs = {"donate_argnums": (0,) if donate else ()}
  if state_shardings is not None:
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    rep = NamedSharding(mesh, P())
    if batch_shardings is not None:
      kwargs["in_shardings"] = (state_shardings, batch_shardings, rep)
    # Without batch shardings the inputs keep where they were put (a sleep's batches are placed
    # per batch, their row counts need not divide the data axes); the state stays pinned.
    kwargs["out_shardings"] = (state_shardings, rep)
  jitted = jax.jit(step, **kwargs)

  def train_step(state, batch, rng=None):
    return jitted(state, batch, rng)

  train_step.jitted = jitted  # for .lower(...) / cost analysis
  return train_step


_STEP_CACHE: "collections.OrderedDict[Any, Tuple[optax.GradientTransformation, Callable]]" = (
    collections.OrderedDict())
_STEP_CACHE_SIZE = 32


def cached_train_step(loss_key, make_loss_fn: Callable[[], LossFn], opt_cfg, differentiate=None,
                      shardings: Optional[TrainState] = None
                      ) -> Tuple[optax.GradientTransformation, Callable]:
  """``(optimizer, step)``: ``make_optimizer(opt_cfg)`` and ``make_train_step`` of
  ``make_loss_fn()`` with it, memoised under (``loss_key``, ``opt_cfg``, ``differentiate``).

  A phase run once per sleep (a consolidation, an SFT fit) that built its step inside the phase
  made a new closure each time, and ``jax.jit`` compiles per closure: every sleep of every
  method recompiled the same program. ``loss_key`` (hashable) must name everything the loss
  depends on (model config, loss hyper-parameters); batch shapes are jit's own cache key.
  ``shardings``: the state's (``fit.new_state``) on a mesh, part of the key. Least recently used
  entries are evicted."""
  key = (loss_key, opt_cfg.to_json(sort_keys=True),
         None if differentiate is None else tree_key(differentiate),
         None if shardings is None else tree_key(shardings))
  hit = _STEP_CACHE.get(key)
  if hit is None:
    tx = make_optimizer(opt_cfg)
    hit = _STEP_CACHE[key] = (tx, make_train_step(make_loss_fn(), tx, differentiate=differentiate,
                                                  state_shardings=shardings))
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
      _STEP_CACHE.popitem(last=False)
  else:
    _STEP_CACHE.move_to_end(key)
  return hit


def clear_step_cache() -> None:
  """Forgets every memoised step (``cached_train_step``): the next call of each key compiles."""
  _STEP_CACHE.clear()


def tree_key(tree) -> Tuple[Any, ...]:
  """A hashable key for a host pytree of Python scalars (e.g. ``trainable_arrays(...)``)."""
  leaves, treedef = jax.tree.flatten(tree)
  return (str(treedef), tuple(leaves))
