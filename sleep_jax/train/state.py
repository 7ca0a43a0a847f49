"""The train state: one pytree (step, params, optimizer state, rng, trainable mask, extras) that is
checkpointed, sharded and donated as a whole; trainable masks; the state's shardings and creation.

Trainable masks are pytrees like ``params`` whose leaves are bool arrays broadcastable to the
parameter (shape ``()`` for a whole array, the full shape or e.g. ``(1, S, 1, 1)`` for single
elements or slices). Frozen elements get a zero gradient into the optimizer and the parameter
update goes through ``jnp.where(mask, p + u, p)``, so frozen values keep their exact bits under
any optimizer (weight decay, Adam moments left from earlier training, ...). The mask lives in the
state as *data*: unlocking a different slot for the next sleep changes no shape and does not
recompile. Parameters whose mask is all False when the optimizer is built are frozen structurally
(``optax.set_to_zero``: no optimizer state at all, which matters for 8B models).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def slot_trainable(params, param_axes, level: int, slot) -> Any:
  """Only slot ``slot`` (an index, or several) of CMS level ``level`` trains (consolidation,
  docs/method.md section 3 step 5).

  Every array of ``layers/cms_{level}`` with a "slots" logical axis (slot_a, slot_b,
  slot_router) gets a mask that is True on those indices of that axis only (shape 1 on every
  other axis); everything else is frozen.
  """
  slots = [int(s) for s in np.atleast_1d(slot)]

  def mask(path, leaf, axes):
    p = path_str(path)
    if _level_of(p) != level or "slots" not in axes:
      return np.bool_(False)
    ax = axes.index("slots")
    shape = [1] * len(leaf.shape)
    shape[ax] = leaf.shape[ax]
    m = np.zeros(shape, bool)
    for s in slots:
      idx = [0] * len(shape)
      idx[ax] = s
      m[tuple(idx)] = True
    return m

  return jax.tree_util.tree_map_with_path(mask, params, param_axes,
                                          is_leaf=lambda x: hasattr(x, "shape"))


def idle_slots_frozen(params, slot_mask) -> Any:
  """Every array trains except the slot arrays (``slot_*``) of the CMS levels with no live slot
  in ``slot_mask`` (n_levels, n_slots): the mask of a job that trains the model around capacity
  it keeps for later (the LM job, the base recipe).

  A masked slot's gradient is exactly zero, so under a decay-free optimizer this changes no
  trained value (``tests/test_parallel_state.py``). It changes the work: frozen arrays are not
  differentiated (``trainable_arrays`` as ``make_train_step``'s ``differentiate``) and have no
  optimizer state, where the scan's backward pass wrote every layer's zero slot gradients and
  AdamW updated them (SmolLM2 with every slot masked: 1.09x the step of the model built without
  slots, 1.02x frozen). Weight decay no longer shrinks capacity that is not in use."""
  idle = ~np.any(np.asarray(slot_mask, bool), axis=-1)

  def mask(path, _):
    p = path_str(path)
    level = _level_of(p)
    return np.bool_(level is None or "/slot_" not in p or not idle[level])

  return jax.tree_util.tree_map_with_path(mask, params)


def trainable_arrays(trainable):
  """Host pytree of bools: which parameter arrays have any trainable element."""
  return jax.tree.map(lambda m: bool(np.any(np.asarray(m))), trainable)


def _any(mask) -> bool:
  return bool(np.any(np.asarray(mask)))


# ----------------------------------------------------------------------------------------------
# Optimizer.



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
