"""How the transformer's layers are laid out in memory, and the loop that runs them.

Parameters are stored stacked along a leading "layers" axis (``params["layers"][name]`` is
``(L, ...)``) and ``transformer.apply`` runs them with ``lax.scan``: one compiled layer body
for any depth. Inside a scan each layer's weights are a ``dynamic-slice`` of the stacked array,
and XLA's CPU dot takes its operands as buffers of their own, so every layer's weights are
copied before they are multiplied. Over a long sequence that copy is paid once per layer and
shared by every token; in a decode step, which multiplies a handful of rows, it is the largest
cost (SmolLM2 at batch 4: the copies took more time than the matmuls, `experiments/bench`).

The *per-layer* layout holds each layer's weights (and each layer's KV cache) as a buffer of
its own, in a tuple over layers, and runs the same layer function in a Python loop. The
sampler moves to it once per call, before its decode loop (``sampler.sample``; models whose
layers hold at least ``PER_LAYER_MIN_BYTES``): one copy of the weights per call instead of one
per generated token. The layer function and the values it reads are the same, so the logits
are bit-identical (``tests/test_model.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp

# Cache entries that hold one slice per layer (``transformer.init_cache``).
PER_LAYER_CACHE = ("k", "v", "gate_max")
# Stacked layer weights below this size keep the scan in the decode loop: their per-layer
# copies come out of the CPU's cache and cost little, while a loop over the layers lengthens
# every sampler compilation (the tiny models of the tests and of the world experiments; 2-4 MB).
# SmolLM2's are 430 MB.
PER_LAYER_MIN_BYTES = 64 << 20


def squeeze_single_experts(layers: Dict[str, Any]) -> Dict[str, Any]:
  """The stacked layers with a single dense expert's (L, 1, ...) weights as (L, ...) (a bitcast).

  Indexing the expert inside the layer scan made a new array per layer that the backward pass
  then stored, stacked, next to the weights themselves (3 x 106 MB per SmolLM2 train step)."""
  def squeeze(lvl):
    if "wi_gate" not in lvl or lvl["wi_gate"].shape[1] != 1:
      return lvl
    return {**lvl, **{k: lvl[k][:, 0] for k in ("wi_gate", "wi_up", "wo")}}
  return {k: squeeze(v) if k.startswith("cms_") else v for k, v in layers.items()}


def is_per_layer(params) -> bool:
  return isinstance(params["layers"], (tuple, list))


def per_layer(params):
  """``params`` with ``params["layers"]`` as a tuple of per-layer dicts (single experts
  squeezed, as the scan sees them). Each layer's arrays are copies of their slices."""
  if is_per_layer(params):
    return params
  layers = squeeze_single_experts(params["layers"])
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], layers) for i in range(n))}


def for_decode(params, cache: Dict[str, Any]):
  """``(params, cache)`` in the layout a decode loop should run: per-layer when the stacked
  layer weights hold at least ``PER_LAYER_MIN_BYTES``, as they are below."""
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params["layers"]))
  if nbytes < PER_LAYER_MIN_BYTES:
    return params, cache
  return per_layer(params), per_layer_cache(cache)


def per_layer_cache(cache: Dict[str, Any]) -> Dict[str, Any]:
  """A stacked KV cache (``transformer.init_cache``) with its per-layer entries as tuples."""
  return {k: tuple(v) if k in PER_LAYER_CACHE and not isinstance(v, tuple) else v
          for k, v in cache.items()}


def run_layers(layer: Callable, x, xs: Dict[str, Any]):
  """``lax.scan(layer, x, xs)`` for the per-layer layout: ``xs["p"]`` and the leaves of
  ``xs["kv"]`` are tuples over layers, the other entries (route keys, LoRA) stacked. Returns
  ``(h, ys)`` as the scan would, except that the new cache entries are tuples over layers."""
  h, ys = x, []
  for i, p in enumerate(xs["p"]):
    xi = {k: p if k == "p" else {n: c[i] for n, c in v.items()} if k == "kv"
          else jax.tree.map(lambda a: a[i], v) for k, v in xs.items()}
    h, y = layer(h, xi)
    ys.append(y)
  with_gates = isinstance(ys[0], tuple)  # the layer returns (new_kv, gates) or new_kv
  kvs = [y[0] for y in ys] if with_gates else ys
  new_kv = None if kvs[0] is None else {n: tuple(k[n] for k in kvs) for n in kvs[0]}
  if not with_gates:
    return h, new_kv
  return h, (new_kv, jax.tree.map(lambda *a: jnp.stack(a), *[y[1] for y in ys]))
