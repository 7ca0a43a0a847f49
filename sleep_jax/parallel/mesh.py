"""Device mesh, the logical-axis rules table, multi-host start and sharded initialisation.

The mesh has three axes, outermost first:

* ``data``   pure data parallelism (replicated parameters; across slices / hosts on DCN);
* ``fsdp``   data parallelism whose parameters and optimizer state are sharded (ZeRO-3 style);
* ``tensor`` Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A size of ``-1`` means "every device the other axes leave". The model never names mesh axes: it
names *logical* axes (``transformer._param_table`` and the ``constrain`` calls), and
``DEFAULT_RULES`` below maps them to mesh axes. Changing the parallelism layout is editing that
table, never the model.

The mesh axes are ``AxisType.Auto`` (GSPMD propagation), not jax 0.10's default ``Explicit``.
Why: the model is written in the "annotate a few activations with ``with_sharding_constraint``
and let the partitioner do the rest" style (maxtext, flax lm1b). With Explicit axes every einsum
whose contracting dimension is sharded (e.g. FSDP's ``embed``) must state its output sharding,
and the mixed-precision casts and ``lax.scan`` over stacked layers would need ``reshard`` calls:
the model would have to know the mesh, which is what the rules table exists to avoid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sleep_jax.parallel import logical

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. One table for parameters and activations: ``logical_to_spec`` uses a
# mesh axis at most once per array, so an activation (batch, length, embed) gets
# batch -> (data, fsdp) and leaves embed replicated, while a weight (embed, mlp) gets
# embed -> fsdp, mlp -> tensor. Axes mapped to None are replicated.
DEFAULT_RULES: logical.Rules = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # Parameters (and activations that carry these axes).
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),  # scanned over: sharding it would serialise the scan across devices
    ("experts", None),  # few experts per level; an "expert" mesh axis can map here later
    ("slots", None),  # slots are tiny (rank r) and unlocked one at a time
    ("rank", None),
)


# ----------------------------------------------------------------------------------------------
# Multi-host start.
# ----------------------------------------------------------------------------------------------
def _looks_multi_host() -> bool:
  """True when the environment describes a job spread over several processes."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  # Cloud TPU VMs list every worker of the slice (a single-host slice lists one).
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return False


_DISTRIBUTED_DONE = False


def initialize_distributed(mode: str = "auto") -> bool:
  """Calls ``jax.distributed.initialize()`` when the job runs on several hosts.

  Must run before anything touches a device (``jax.devices()``, the first array). ``mode`` is
  ``"auto"`` (initialise when the environment describes several processes: TPU pod workers,
  SLURM, Open MPI, or an explicit ``JAX_COORDINATOR_ADDRESS``), ``"on"`` or ``"off"``. Returns
  whether ``initialize`` was called. JAX then discovers coordinator, process count and index
  itself on TPU pods and SLURM clusters.
  """
  global _DISTRIBUTED_DONE
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r}; expected 'auto', 'on' or 'off'")
  if _DISTRIBUTED_DONE or mode == "off" or (mode == "auto" and not _looks_multi_host()):
    return False
  jax.distributed.initialize()
  _DISTRIBUTED_DONE = True
  logging.info("jax.distributed initialised: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


# ----------------------------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------------------------
def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict:
  """Replaces one ``-1`` by the devices left over; checks the product equals ``n_devices``."""
  sizes = {k: int(v) for k, v in sizes.items()}
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; at most one axis can take 'the rest'")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  if free:
    if n_devices % fixed:
      raise ValueError(f"mesh {sizes}: {n_devices} devices are not divisible by the fixed axes' "
                       f"product {fixed}")
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                     f"{n_devices} are in use")
  return sizes


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor) from ``{"data": -1, "fsdp": 2, ...}`` (missing = 1).

  ``devices`` defaults to every global device; pass a subset to build a smaller mesh (tests, or
  several models side by side). ``jax.make_mesh`` orders devices so that the innermost axes
  (tensor, fsdp) get the fastest interconnect.
  """
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_axis_sizes(sizes, len(devices))
  shape = tuple(resolved[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(config) -> Mesh:
  """``config.mesh`` is a ConfigDict/dict of axis sizes, e.g. ``{data: -1, fsdp: 1, tensor: 1}``;
  without a -1 the mesh takes the first devices it needs."""
  sizes = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
  if -1 not in sizes.values():  # fixed sizes: the first devices (e.g. 1 for a one-device run)
    n = math.prod(int(v) for v in sizes.values())
    if 0 < n <= jax.device_count():
      return make_mesh(sizes, jax.devices()[:n])
  return make_mesh(sizes)


def activate(mesh: Mesh, rules: logical.Rules = DEFAULT_RULES) -> Mesh:
  """Installs ``mesh`` (``jax.set_mesh``, thread-local) and the logical rules process-wide."""
  jax.set_mesh(mesh)
  logical.set_rules(rules)
  return mesh


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: logical.Rules = DEFAULT_RULES):
  """Context manager form of ``activate`` (tests, or a second model on another mesh)."""
  with jax.set_mesh(mesh), logical.rules_context(rules):
    yield mesh


# ----------------------------------------------------------------------------------------------
# Shardings from logical axes.
# ----------------------------------------------------------------------------------------------
def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Optional[logical.Rules] = None):
  """NamedShardings for a pytree given its logical axes (tuples of names) and shapes.

  ``shapes_tree`` holds anything with ``.shape`` (arrays, ShapeDtypeStructs). Mesh axes that do
  not divide a dimension are dropped for that array (it is replicated along that dimension).
  """
  rules = DEFAULT_RULES if rules is None else rules
  return jax.tree.map(lambda ax, s: logical.logical_to_sharding(ax, s.shape, mesh, rules),
                      axes_tree, shapes_tree, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Optional[logical.Rules] = None) -> NamedSharding:
  """Sharding of a batch's leading axis ("batch"); other axes replicated."""
  spec = logical.logical_to_spec(("batch",), DEFAULT_RULES if rules is None else rules)
  return NamedSharding(mesh, spec)


def shard_batch(batch, mesh: Mesh, rules: Optional[logical.Rules] = None):
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded over "batch".

  On one host this is a device_put; on several hosts every process passes its own rows (the
  per-host split of the input pipeline) and the global batch is their concatenation.
  """
  sh = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, x), batch)


# ----------------------------------------------------------------------------------------------
# Model parameters on the mesh.
# ----------------------------------------------------------------------------------------------
def param_shardings(model_cfg, mesh: Mesh, rules: Optional[logical.Rules] = None):
  """NamedShardings of the transformer's parameters under the rules table."""
  from sleep_jax.model import transformer  # local: the model imports parallel.logical
  return tree_shardings(transformer.param_axes(model_cfg), transformer.param_shapes(model_cfg),
                        mesh, rules)


def init_params(rng: jax.Array, model_cfg, mesh: Mesh, rules: Optional[logical.Rules] = None):
  """Random transformer parameters created directly in their shards.

  ``jit(init, out_shardings=...)`` makes every device compute only its own shard, so no device
  ever holds the full model (what ``init`` followed by ``device_put`` would do).
  """
  from sleep_jax.model import transformer
  shardings = param_shardings(model_cfg, mesh, rules)
  return jax.jit(lambda r: transformer.init(r, model_cfg), out_shardings=shardings)(rng)
