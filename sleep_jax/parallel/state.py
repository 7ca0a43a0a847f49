"""Train state, trainable masks, CMS update frequencies and the generic jitted train step.

* ``TrainState``: one pytree (step, params, optimizer state, rng, trainable mask, extras) that is
  checkpointed, sharded and donated as a whole.
* Trainable masks: a pytree like ``params`` whose leaves are bool arrays broadcastable to the
  parameter (shape ``()`` for a whole array, the full shape or e.g. ``(1, S, 1, 1)`` for single
  elements or slices). Frozen elements get a zero gradient into the optimizer and the parameter
  update goes through ``jnp.where(mask, p + u, p)``, so frozen values keep their exact bits under
  any optimizer (weight decay, Adam moments left from earlier training, ...). The mask lives in
  the state as *data*: unlocking a different slot for the next sleep changes no shape and does
  not recompile. Parameters whose mask is all False when the optimizer is built are frozen
  structurally (``optax.set_to_zero``: no optimizer state at all, which matters for 8B models).
* CMS update frequencies (DESIGN.md 1.1): parameters of CMS level ``j``
  (``params["layers"]["cms_j"]``) change only every ``C_j = chunk_sizes[j]`` steps, by the
  optimizer's update for the *mean* gradient accumulated over that chunk (``optax.MultiSteps``
  per level, so each level keeps its own Adam statistics and step count).
* ``make_train_step``: ``step(state, batch, rng=None) -> (state, metrics)`` under ``jax.jit``
  with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
  """Everything an optimisation run changes, as one pytree.

  Attributes:
    step: int32 scalar, optimizer steps taken so far.
    params: model parameters.
    opt_state: optax state of the optimizer the step was built with.
    rng: uint32[2] raw key data (checkpointable); split once per step, so a resumed run draws
      exactly the keys an uninterrupted run would.
    trainable: pytree like ``params`` of bool arrays broadcastable to each parameter.
    extras: dict of non-trained arrays that belong to the model's state and must be checkpointed
      with it (e.g. the CMS ``slot_mask``); the train step passes them to the loss as extra
      batch entries, so changing them (a mask flip) does not recompile.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  trainable: Any
  extras: Dict[str, Any] = struct.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path) -> str:
  """'layers/cms_0/slot_a' for a jax key path."""
  return "/".join(_key_name(k) for k in path)


def _level_of(path: str) -> Optional[int]:
  m = re.match(r"^layers/cms_(\d+)/", path)
  return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# Trainable masks.
# ----------------------------------------------------------------------------------------------
def all_trainable(params) -> Any:
  """Every parameter trains (scalar True per array)."""
  return jax.tree.map(lambda _: np.bool_(True), params)


def trainable_where(params, predicate: Callable[[str], bool]) -> Any:
  """Whole arrays train where ``predicate('layers/cms_0/slot_a')`` is True."""
  return jax.tree_util.tree_map_with_path(lambda p, _: np.bool_(bool(predicate(path_str(p)))),
                                          params)


def slot_trainable(params, param_axes, level: int, slot: int) -> Any:
  """Only slot ``slot`` of CMS level ``level`` trains (consolidation, DESIGN.md 1.2 step 5).

  Every array of ``layers/cms_{level}`` with a "slots" logical axis (slot_a, slot_b,
  slot_router) gets a mask that is True on index ``slot`` of that axis only (shape 1 on every
  other axis); everything else is frozen.
  """
  def mask(path, leaf, axes):
    p = path_str(path)
    if _level_of(p) != level or "slots" not in axes:
      return np.bool_(False)
    ax = axes.index("slots")
    shape = [1] * len(leaf.shape)
    shape[ax] = leaf.shape[ax]
    m = np.zeros(shape, bool)
    idx = [0] * len(shape)
    idx[ax] = slot
    m[tuple(idx)] = True
    return m

  return jax.tree_util.tree_map_with_path(mask, params, param_axes,
                                          is_leaf=lambda x: hasattr(x, "shape"))


def trainable_arrays(trainable):
  """Host pytree of bools: which parameter arrays have any trainable element."""
  return jax.tree.map(lambda m: bool(np.any(np.asarray(m))), trainable)


def _any(mask) -> bool:
  return bool(np.any(np.asarray(mask)))


# ----------------------------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------------------------
def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """optax optimizer from ``config.optimizer``.

  Keys: name ("adamw" | "adam" | "sgd"), lr, warmup_steps (linear from 0), decay_steps (cosine
  to ``final_lr_fraction * lr`` at that step; 0 = constant after warmup), b1, b2, weight_decay,
  momentum (sgd), grad_clip (global norm; 0 = off). Schedules count this transform's own updates
  (for a CMS level with chunk C, its updates, not the train steps).
  """
  name = opt_cfg.name
  lr = float(opt_cfg.lr)
  warmup = int(opt_cfg.get("warmup_steps", 0) or 0)
  decay = int(opt_cfg.get("decay_steps", 0) or 0)
  if decay > warmup:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, decay, end_value=lr * opt_cfg.get("final_lr_fraction", 0.1))
  elif warmup > 0:
    sched = optax.linear_schedule(0.0, lr, warmup)  # then constant
  else:
    sched = lr
  if name == "adamw":
    tx = optax.adamw(sched, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95),
                     weight_decay=opt_cfg.get("weight_decay", 0.0))
  elif name == "adam":
    tx = optax.adam(sched, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95))
  elif name == "sgd":
    tx = optax.sgd(sched, momentum=opt_cfg.get("momentum", None) or None)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'adamw', 'adam' or 'sgd'")
  if opt_cfg.get("grad_clip", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
  return tx


def param_labels(params, *, chunk_sizes: Optional[Sequence[int]] = None, trainable=None):
  """Label per parameter: 'frozen' (mask all False), 'cms_j' (level j with C_j > 1), 'base'."""
  chunk_sizes = tuple(chunk_sizes or ())
  masks = trainable if trainable is not None else all_trainable(params)

  def label(path, _, m):
    p = path_str(path)
    if not _any(m):
      return "frozen"
    j = _level_of(p)
    if j is not None and j < len(chunk_sizes) and int(chunk_sizes[j]) > 1:
      return f"cms_{j}"
    return "base"

  return jax.tree_util.tree_map_with_path(label, params, masks)


def with_cms_frequencies(tx: optax.GradientTransformation, params, *,
                         chunk_sizes: Optional[Sequence[int]] = None,
                         trainable=None) -> optax.GradientTransformation:
  """Wraps ``tx`` so CMS level j updates every ``chunk_sizes[j]`` steps and frozen arrays get
  no optimizer state.

  Level j's arrays go through ``optax.MultiSteps(tx, C_j)``: for C_j - 1 steps the mean
  gradient accumulates and the update is exactly zero; on every C_j-th step (steps C_j, 2 C_j,
  ... counted from the optimizer's creation) ``tx`` is applied to the accumulated mean. Each
  partition has its own copy of ``tx``'s state. Global-norm clipping inside ``tx`` then acts per
  partition; clip before this wrapper if a global clip over all parameters is wanted.
  """
  labels = param_labels(params, chunk_sizes=chunk_sizes, trainable=trainable)
  used = sorted(set(jax.tree.leaves(labels)))
  if used == ["base"]:
    return tx
  transforms = {}
  for lab in used:
    if lab == "base":
      transforms[lab] = tx
    elif lab == "frozen":
      transforms[lab] = optax.set_to_zero()
    else:
      k = int(chunk_sizes[int(lab.split("_")[1])])
      transforms[lab] = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return optax.multi_transform(transforms, labels)


# ----------------------------------------------------------------------------------------------
# Shardings of the whole state.
# ----------------------------------------------------------------------------------------------
def _suffix_index(param_shardings, params_abstract):
  """{param path tuple: (shape, sharding)} for suffix matching of optimizer-state leaves."""
  out = {}
  flat_sh = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
  flat_p = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
  for (path, sh), (_, p) in zip(flat_sh, flat_p):
    out[tuple(_key_name(k) for k in path)] = (tuple(p.shape), sh)
  return out


def opt_state_shardings(opt_state_abstract, params_abstract, param_shardings, mesh: Mesh):
  """Optimizer state on the mesh: a leaf whose key path ends with a parameter's path and has
  that parameter's shape (Adam moments, accumulated gradients) takes the parameter's sharding;
  everything else (counts, schedules) is replicated. Works through any optax nesting
  (chain, multi_transform, MultiSteps)."""
  index = _suffix_index(param_shardings, params_abstract)
  max_len = max((len(k) for k in index), default=0)
  rep = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = tuple(_key_name(k) for k in path)
    for n in range(min(max_len, len(names)), 0, -1):
      hit = index.get(names[-n:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, opt_state_abstract)


def _mask_sharding(mask, param, param_sharding, mesh):
  if tuple(np.shape(mask)) == tuple(param.shape):
    return param_sharding
  return NamedSharding(mesh, P())


def state_shardings(state_abstract: TrainState, param_shardings, mesh: Mesh) -> TrainState:
  """A TrainState of NamedShardings for ``state_abstract`` (arrays or ShapeDtypeStructs)."""
  rep = NamedSharding(mesh, P())
  return TrainState(
      step=rep,
      params=param_shardings,
      opt_state=opt_state_shardings(state_abstract.opt_state, state_abstract.params,
                                    param_shardings, mesh),
      rng=rep,
      trainable=jax.tree.map(lambda m, p, s: _mask_sharding(m, p, s, mesh),
                             state_abstract.trainable, state_abstract.params, param_shardings),
      extras=jax.tree.map(lambda _: rep, state_abstract.extras))


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------------------------
# Creation.
# ----------------------------------------------------------------------------------------------
def rng_data(seed_or_key) -> jax.Array:
  """uint32[2] raw key data from an int seed or any PRNG key."""
  if isinstance(seed_or_key, (int, np.integer)):
    return jax.random.key_data(jax.random.key(int(seed_or_key)))
  key = seed_or_key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jnp.asarray(key, jnp.uint32)
  return jax.random.key_data(key)


def _split_rng(rng):
  key = jax.random.wrap_key_data(rng_data(rng))
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _init_fn(init_params, optimizer):
  def init_fn(k):
    params = init_params(k)
    return params, optimizer.init(params)
  return init_fn


def abstract_train_state(rng, init_params: Callable[[jax.Array], Any],
                         optimizer: optax.GradientTransformation, *, mesh: Optional[Mesh] = None,
                         param_shardings=None, trainable=None,
                         extras: Optional[Dict[str, Any]] = None):
  """(TrainState of ShapeDtypeStructs, TrainState of shardings or None), computing nothing.

  This is the restore target for a checkpoint (shapes via ``jax.eval_shape``). Arguments as in
  ``create_train_state``.
  """
  p_key, _ = _split_rng(rng)
  params_abs, opt_abs = jax.eval_shape(_init_fn(init_params, optimizer), p_key)
  if trainable is None:
    trainable = all_trainable(params_abs)
  trainable = jax.tree.map(lambda m: np.asarray(m, bool), trainable)
  for (path, m), p in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                          jax.tree.leaves(params_abs)):
    try:
      np.broadcast_shapes(m.shape, p.shape)
    except ValueError:
      raise ValueError(f"trainable mask for {path_str(path)} has shape {m.shape}, which does not "
                       f"broadcast to the parameter's shape {p.shape}") from None
  sds = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs,
                        opt_state=opt_abs, rng=sds(rng_data(rng)),
                        trainable=jax.tree.map(sds, trainable),
                        extras=jax.tree.map(sds, dict(extras or {})))
  if mesh is None:
    return abstract, None
  if param_shardings is None:
    raise ValueError("pass param_shardings together with mesh")
  shardings = state_shardings(abstract, param_shardings, mesh)
  return abstract_with_shardings(abstract, shardings), shardings


def create_train_state(rng, init_params: Callable[[jax.Array], Any],
                       optimizer: optax.GradientTransformation, *, mesh: Optional[Mesh] = None,
                       param_shardings=None, trainable=None,
                       extras: Optional[Dict[str, Any]] = None) -> Tuple[TrainState, Any]:
  """Initialises parameters and optimizer state directly in their shards.

  Shapes come from ``jax.eval_shape`` (nothing is computed), then one ``jit`` with
  ``out_shardings`` builds params and optimizer state so no device ever holds an unsharded copy.

  Args:
    rng: int seed or key. Parameters use ``fold_in(rng, 0)``, the state's own rng
      ``fold_in(rng, 1)``.
    init_params: ``rng -> params`` (e.g. ``lambda r: transformer.init(r, cfg)``).
    optimizer: built for these params (``with_cms_frequencies(make_optimizer(...), ...)``).
    mesh, param_shardings: where to put the state (``mesh.param_shardings(cfg, mesh)``); without
      a mesh everything stays on the default device and the returned shardings are None.
    trainable: mask pytree (default: everything trains).
    extras: extra model-state arrays (e.g. ``{"slot_mask": ...}``), replicated.

  Returns:
    (state, shardings): shardings is a TrainState of NamedShardings (or None without a mesh),
    to pass to ``make_train_step`` and, via ``abstract_train_state``, to checkpoint restore.
  """
  p_key, s_key = _split_rng(rng)
  extras = dict(extras or {})
  abstract, shardings = abstract_train_state(rng, init_params, optimizer, mesh=mesh,
                                             param_shardings=param_shardings,
                                             trainable=trainable, extras=extras)
  if trainable is None:
    trainable = all_trainable(abstract.params)
  trainable = jax.tree.map(lambda m: jnp.asarray(m, bool), trainable)
  extras = jax.tree.map(jnp.asarray, extras)
  init_fn = _init_fn(init_params, optimizer)
  if mesh is None:
    params, opt_state = jax.jit(init_fn)(p_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(s_key), trainable=trainable, extras=extras), None
  params, opt_state = jax.jit(init_fn, out_shardings=(shardings.params, shardings.opt_state))(
      p_key)
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
      params=params, opt_state=opt_state,
      rng=jax.device_put(jax.random.key_data(s_key), shardings.rng),
      trainable=jax.device_put(trainable, shardings.trainable),
      extras=jax.device_put(extras, shardings.extras))
  return state, shardings


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------
def mask_grads(grads, trainable):
  """Zero gradient wherever the mask is False (so optimizer statistics see no signal there)."""
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, trainable)


def apply_masked_updates(params, updates, trainable):
  """``p + u`` where trainable, the untouched ``p`` elsewhere (bit-exact, even for -0.0)."""
  return jax.tree.map(lambda p, u, m: jnp.where(m, p + u.astype(p.dtype), p),
                      params, updates, trainable)


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
      pass then skips every frozen weight's gradient matmul (bench: 2.9x faster steps).

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
    else:
      leaves, treedef = jax.tree.flatten(state.params)
      on = jax.tree.leaves(differentiate)
      if len(on) != len(leaves):
        raise ValueError(f"differentiate has {len(on)} leaves, params {len(leaves)}")

      def sub_loss(sub):
        it = iter(sub)
        full = [next(it) if d else x for x, d in zip(leaves, on)]
        return loss_fn(jax.tree.unflatten(treedef, full), inputs, step_key)

      (loss, metrics), g_sub = jax.value_and_grad(sub_loss, has_aux=True)(
          [x for x, d in zip(leaves, on) if d])
      it = iter(g_sub)
      grads = jax.tree.unflatten(treedef, [next(it) if d else jnp.zeros_like(x)
                                           for x, d in zip(leaves, on)])
    grads = mask_grads(grads, state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_masked_updates(state.params, updates, state.trainable)
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
    kwargs["in_shardings"] = (state_shardings, batch_shardings, rep)
    kwargs["out_shardings"] = (state_shardings, rep)
  jitted = jax.jit(step, **kwargs)

  def train_step(state, batch, rng=None):
    return jitted(state, batch, rng)

  train_step.jitted = jitted  # for .lower(...) / cost analysis
  return train_step


_STEP_CACHE: "collections.OrderedDict[Any, Tuple[optax.GradientTransformation, Callable]]" = (
    collections.OrderedDict())
_STEP_CACHE_SIZE = 32


def cached_train_step(loss_key, make_loss_fn: Callable[[], LossFn], opt_cfg, differentiate=None
                      ) -> Tuple[optax.GradientTransformation, Callable]:
  """``(optimizer, step)``: ``make_optimizer(opt_cfg)`` and ``make_train_step`` of
  ``make_loss_fn()`` with it, memoised under (``loss_key``, ``opt_cfg``, ``differentiate``).

  A phase run once per sleep (a consolidation, an SFT fit) that built its step inside the phase
  made a new closure each time, and ``jax.jit`` compiles per closure: every sleep of every
  method recompiled the same program. ``loss_key`` (hashable) must name everything the loss
  depends on (model config, loss hyper-parameters); batch shapes are jit's own cache key.
  Least recently used entries are evicted."""
  key = (loss_key, opt_cfg.to_json(sort_keys=True),
         None if differentiate is None else tree_key(differentiate))
  hit = _STEP_CACHE.get(key)
  if hit is None:
    tx = make_optimizer(opt_cfg)
    hit = _STEP_CACHE[key] = (tx, make_train_step(make_loss_fn(), tx, differentiate=differentiate))
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
