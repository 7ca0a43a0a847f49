"""Import pretrained Llama-family checkpoints (GGUF or Hugging Face safetensors).

The imported model is this codebase's transformer (``ModelConfig`` + params pytree) with the
Continuum Memory System added *empty*, so the function is unchanged (docs/method.md section 1):

* the pretrained MLP (and its ``post_attention_layernorm``) becomes the single always-on dense
  expert of the slowest CMS level;
* the faster levels have ``d_ff = 0`` and only masked low-rank slots (zero ``B``), so each adds
  an exact 0 to the residual stream until a sleep unlocks a slot.

Sources:

* **GGUF** (llama.cpp) through the ``gguf`` package: tensors are dequantized with
  ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, K-quants), and llama.cpp's
  row permutation of the Q and K projections (``convert_hf_to_gguf.py`` ``LlamaModel.permute``,
  which turns Hugging Face's half-split RoPE layout into GGML's interleaved one) is undone, since
  ``transformer.rope`` uses the half-split convention. A missing ``output.weight`` means tied
  embeddings.
* **Hugging Face** directory: ``config.json`` and ``model.safetensors`` or sharded files with
  ``model.safetensors.index.json``; Llama / Mistral / Qwen2 / Qwen3 tensor names. Safetensors are
  read through a memory map (BF16 via ``ml_dtypes``).

Parameters are converted one (layer-stacked) tensor at a time and placed with
``jax.device_put`` on their sharding before the next one is read, so host memory peaks at one
tensor, never the whole model. Pass ``shardings`` (a pytree like the params of ``Sharding`` or,
with ``mesh``, ``PartitionSpec`` leaves; or a callable ``cfg -> pytree``), or ``mesh`` alone to
shard by the logical axis rules (``parallel/logical.py``).

Qwen2's q/k/v projection biases (``ModelConfig.qkv_bias``), Qwen3's per-head q/k RMSNorms
(``qk_norm``) and Llama-3.1's "llama3" RoPE scaling (``rope_scaling``, Hugging Face only) are
imported. Anything in a checkpoint this transformer cannot represent (an o_proj bias, other RoPE
scaling rules, partial rotary, ...) raises ``NotImplementedError`` instead of silently changing
the function.

Command line (parity checks and a quick look at a checkpoint)::

  python -m sleep_jax.model.convert --gguf PATH --text "..." --out logits.npy
  python -m sleep_jax.model.convert --gguf PATH --text "What is 2+2?" --generate 64
"""


from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig

from sleep_jax.model.checkpoint_readers import (_BIAS_KEYS, _QK_NORM_KEYS, ModelFileError,
                                               _GGUFSource, _HFSource, _Meta)

Params = Dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Config: the checkpoint's architecture plus empty CMS levels.
# ----------------------------------------------------------------------------------------------
def _config(meta: _Meta, *, cms_levels: int = 3, n_slots: int = 4, slot_rank: int = 64,
            chunk_sizes=None, **overrides) -> ModelConfig:
  if cms_levels < 1:
    raise ValueError(f"cms_levels={cms_levels}; needs at least the level holding the MLP")
  chunk_sizes = tuple(chunk_sizes or (4 ** j for j in range(cms_levels)))
  cfg = ModelConfig(
      vocab_size=meta.vocab_size, d_model=meta.d_model, n_layers=meta.n_layers,
      n_heads=meta.n_heads, n_kv_heads=meta.n_kv_heads, head_dim=meta.head_dim,
      rope_base=meta.rope_base, norm_eps=meta.norm_eps, tie_embeddings=meta.tie_embeddings,
      max_seq_len=meta.max_seq_len, d_ff=(0,) * (cms_levels - 1) + (meta.d_ff,),
      n_experts=(1,) * cms_levels, n_slots=n_slots, slot_rank=slot_rank, chunk_sizes=chunk_sizes,
      qkv_bias=meta.qkv_bias, qk_norm=meta.qk_norm, rope_scaling=meta.rope_scaling)
  return dataclasses.replace(cfg, **overrides)


def _check_function_preserving(cfg: ModelConfig, meta: _Meta, path: str):
  problems = []
  if cfg.d_ff[-1] != meta.d_ff or cfg.n_experts[-1] != 1:
    problems.append(f"the slowest level must hold the pretrained MLP as its single dense expert "
                    f"(d_ff[-1]={meta.d_ff}, n_experts[-1]=1); got d_ff={cfg.d_ff}, "
                    f"n_experts={cfg.n_experts}")
  if any(cfg.d_ff[:-1]):
    problems.append(f"faster CMS levels must start empty (d_ff=0); got d_ff={cfg.d_ff}")
  arch = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
          cfg.tie_embeddings, cfg.qkv_bias, cfg.qk_norm, cfg.rope_scaling)
  want = (meta.vocab_size, meta.d_model, meta.n_layers, meta.n_heads, meta.n_kv_heads,
          meta.head_dim, meta.tie_embeddings, meta.qkv_bias, meta.qk_norm, meta.rope_scaling)
  if arch != want:
    problems.append(f"config overrides change the architecture: {arch} vs checkpoint {want}")
  if problems:
    raise ValueError(f"cannot import {path}: " + "; ".join(problems))


def gguf_config(path, **cms) -> ModelConfig:
  """The ``ModelConfig`` an import of ``path`` produces (reads metadata only). ``cms``: the CMS
  layout (``cms_levels``, ``n_slots``, ``slot_rank``, ``chunk_sizes``) and other config
  overrides (``param_dtype``, ``dtype``, ``remat``, ...)."""
  return _config(_GGUFSource(path).meta, **cms)


def hf_config(directory, **cms) -> ModelConfig:
  """Like ``gguf_config`` for a Hugging Face model directory."""
  return _config(_HFSource(directory).meta, **cms)


# ----------------------------------------------------------------------------------------------
# Building the params pytree, one tensor at a time, straight onto its sharding.
# ----------------------------------------------------------------------------------------------
def _to_ours(key: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """One layer's HF-layout tensor -> this transformer's per-layer layout."""
  d, hd = cfg.d_model, cfg.hd
  if key == "q":
    return w.reshape(cfg.n_heads, hd, d).transpose(2, 0, 1)  # (d, H, hd)
  if key in ("k", "v"):
    return w.reshape(cfg.n_kv_heads, hd, d).transpose(2, 0, 1)  # (d, K, hd)
  if key == "o":
    return w.T.reshape(cfg.n_heads, hd, d)  # (H, hd, d)
  if key == "q_bias":
    return w.reshape(cfg.n_heads, hd)
  if key in ("k_bias", "v_bias"):
    return w.reshape(cfg.n_kv_heads, hd)
  if key in ("gate", "up", "down"):
    return w.T[None]  # (1, d, F) / (1, F, d): the single dense expert
  return w  # norms (q_norm/k_norm: (hd,))


def _imported_tensor(src, cfg: ModelConfig, keys: Tuple[str, ...], dtype) -> Optional[np.ndarray]:
  """The params leaf at ``keys`` from the checkpoint, or None for a new (empty CMS) leaf."""
  if keys == ("embed",):
    return src.get("embed").astype(dtype)
  if keys == ("final_norm",):
    return src.get("final_norm").astype(dtype)
  if keys == ("unembed",):
    return src.get("lm_head").T.astype(dtype)
  last = transformer.level_name(cfg.n_levels - 1)
  layer_key = None
  if keys[0] == "layers" and len(keys) == 2 and keys[1] in (
      ("attn_norm", "q", "k", "v", "o") + _BIAS_KEYS + _QK_NORM_KEYS):
    layer_key = keys[1]
  elif keys[:2] == ("layers", last) and len(keys) == 3:
    layer_key = {"norm": "mlp_norm", "wi_gate": "gate", "wi_up": "up", "wo": "down"}.get(keys[2])
  if layer_key is None:
    return None
  out = None
  for i in range(cfg.n_layers):
    w = _to_ours(layer_key, src.get(layer_key, i), cfg)
    if out is None:
      out = np.empty((cfg.n_layers,) + w.shape, dtype)
    out[i] = w
  return out


def _fresh_tensor(entry, rng: np.random.Generator, dtype) -> np.ndarray:
  shape, _, (kind, *args) = entry
  if kind == "normal":
    return (args[0] * rng.standard_normal(shape, np.float32)).astype(dtype)
  return (np.ones if kind == "ones" else np.zeros)(shape, dtype)


def param_shardings(cfg: ModelConfig, mesh, rules=None):
  """NamedSharding per param from the logical axis rules (default: the installed rules; none
  installed: replicated)."""
  from sleep_jax.parallel import logical, mesh as mesh_lib
  return mesh_lib.param_shardings(cfg, mesh, (logical.get_rules() or ()) if rules is None
                                  else rules)


def _sharding_leaves(cfg, shardings, mesh, rules, n) -> List[Any]:
  from jax.sharding import NamedSharding, PartitionSpec, Sharding
  if callable(shardings):
    shardings = shardings(cfg)
  if shardings is None:
    return [None] * n if mesh is None else jax.tree.leaves(param_shardings(cfg, mesh, rules))
  is_leaf = lambda x: x is None or isinstance(x, (Sharding, PartitionSpec))
  leaves, treedef = jax.tree.flatten(shardings, is_leaf=is_leaf)
  want = jax.tree.structure(transformer.param_shapes(cfg))
  if treedef != want:
    raise ValueError(f"shardings pytree does not match the params structure:\n{treedef}\nvs\n"
                     f"{want}")
  out = []
  for s in leaves:
    if isinstance(s, PartitionSpec):
      if mesh is None:
        raise ValueError("PartitionSpec shardings need `mesh`")
      s = NamedSharding(mesh, s)
    out.append(s)
  return out


def _build_params(src, cfg: ModelConfig, *, shardings=None, mesh=None, rules=None,
                  seed: int = 0) -> Params:
  _check_function_preserving(cfg, src.meta, src.path)
  table = transformer._param_table(cfg)  # pylint: disable=protected-access
  flat, treedef = jax.tree_util.tree_flatten_with_path(table, is_leaf=transformer._is_leaf)  # pylint: disable=protected-access
  placements = _sharding_leaves(cfg, shardings, mesh, rules, len(flat))
  dtype = jnp.dtype(cfg.param_dtype)
  leaves = []
  for idx, ((path, entry), sharding) in enumerate(zip(flat, placements)):
    keys = tuple(p.key for p in path)
    arr = _imported_tensor(src, cfg, keys, dtype)
    if arr is None:
      arr = _fresh_tensor(entry, np.random.default_rng([seed, idx]), dtype)
    if arr.shape != entry[0]:
      raise ValueError(f"{src.path}: {'/'.join(keys)} has shape {arr.shape}, expected {entry[0]}")
    leaves.append(jax.device_put(arr) if sharding is None else jax.device_put(arr, sharding))
    del arr  # host memory: one tensor at a time
  return jax.tree.unflatten(treedef, leaves)


def load_gguf(path, *, shardings=None, mesh=None, rules=None, seed: int = 0,
              **cms) -> Tuple[ModelConfig, Params]:
  """Imports a llama/qwen2/qwen3-architecture GGUF file -> ``(cfg, params)``.

  Args:
    path: the .gguf file.
    shardings: optional pytree (params structure) of ``Sharding`` (or ``PartitionSpec`` with
      ``mesh``), or a callable ``cfg -> pytree``; each leaf is placed there as it is converted.
    mesh, rules: without ``shardings``, shard by logical axis ``rules`` (default: installed
      rules; none installed = replicated) on ``mesh``.
    seed: seed of the new slots' random ``A`` matrices (their ``B`` is zero and they are masked).
    **cms: CMS layout and config overrides (see ``gguf_config``).
  """
  src = _GGUFSource(path)
  cfg = _config(src.meta, **cms)
  return cfg, _build_params(src, cfg, shardings=shardings, mesh=mesh, rules=rules, seed=seed)


def load_hf(directory, *, shardings=None, mesh=None, rules=None, seed: int = 0,
            **cms) -> Tuple[ModelConfig, Params]:
  """Imports a Hugging Face Llama/Mistral/Qwen2/Qwen3 directory (config.json + safetensors) ->
  ``(cfg, params)``. Arguments as in ``load_gguf``."""
  src = _HFSource(directory)
  cfg = _config(src.meta, **cms)
  return cfg, _build_params(src, cfg, shardings=shardings, mesh=mesh, rules=rules, seed=seed)


def load(path, **kw) -> Tuple[ModelConfig, Params]:
  """``load_hf`` for a directory, ``load_gguf`` for a file."""
  return load_hf(path, **kw) if os.path.isdir(os.fspath(path)) else load_gguf(path, **kw)


def load_tokenizer(path):
  """The checkpoint's tokenizer: GGUF metadata for a file, tokenizer.json for a directory."""
  from sleep_jax.data.hf_tokenizer import HFTokenizer
  if os.path.isdir(os.fspath(path)):
    return HFTokenizer.from_dir(path)
  return HFTokenizer.from_gguf(path)


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------
def next_token_logits(params, cfg: ModelConfig, ids) -> np.ndarray:
  """(T, V) float32 logits for every position of one token sequence (slots masked)."""
  fwd = jax.jit(transformer.apply, static_argnames=("cfg",))
  logits, _ = fwd(params, jnp.asarray([list(ids)], jnp.int32), cfg=cfg)
  return np.asarray(logits[0], np.float32)


def greedy_chat(params, cfg: ModelConfig, tok, user_text: str, max_new_tokens: int,
                system: Optional[str] = None) -> Tuple[List[int], str]:
  """Greedy completion of one user turn rendered with the chat template."""
  from sleep_jax.model import sampler
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user_text}]
  prompt = tok.encode_chat(messages)
  toks, valid = sampler.left_pad([prompt], pad_id=tok.pad_id)
  out = sampler.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.PRNGKey(0),
                       cfg=cfg, max_new_tokens=max_new_tokens, greedy=True,
                       stop_tokens=tuple(tok.stop_ids), pad_id=tok.pad_id)
  mask = np.asarray(out.completion_mask[0])
  ids = [int(t) for t in np.asarray(out.tokens[0])[mask]]
  return ids, tok.decode(ids)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m sleep_jax.model.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--gguf", help="GGUF file (default: the SmolLM2 file in the fetch cache)")
  src.add_argument("--hf", help="Hugging Face model directory (config.json + safetensors)")
  ap.add_argument("--cache", default=None, help="fetch cache to look in when no path is given")
  ap.add_argument("--text", default=None, help="text to score (no special tokens added), or the "
                  "user message with --generate")
  ap.add_argument("--out", default=None, help="write the (T, V) next-token logits of --text here")
  ap.add_argument("--generate", type=int, default=0, metavar="N",
                  help="print a greedy chat completion of --text (N new tokens at most)")
  ap.add_argument("--system", default=None, help="system message for --generate")
  ap.add_argument("--cms-levels", type=int, default=3)
  ap.add_argument("--n-slots", type=int, default=4)
  ap.add_argument("--slot-rank", type=int, default=64)
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  path = args.hf or args.gguf
  if path is None:
    from sleep_jax.model import fetch
    path = fetch.smollm2_path(args.cache)
  t0 = time.perf_counter()
  try:
    cfg, params = load(path, cms_levels=args.cms_levels, n_slots=args.n_slots,
                       slot_rank=args.slot_rank)
    jax.block_until_ready(params)
    tok = load_tokenizer(path)
  except (FileNotFoundError, ModelFileError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dt = time.perf_counter() - t0
  print(f"loaded {path} in {dt:.1f}s: {transformer.count_params(params) / 1e6:.1f}M params, "
        f"{cfg.n_layers} layers, d={cfg.d_model}, vocab={cfg.vocab_size}, CMS d_ff={cfg.d_ff}, "
        f"{cfg.n_slots} masked slots/level")
  if args.text is not None and (args.out or not args.generate):
    ids = tok.encode(args.text)
    print(f"tokens ({len(ids)}): {ids}")
    logits = next_token_logits(params, cfg, ids)
    print(f"greedy next tokens: {tok.decode(logits.argmax(-1).tolist(), False)!r}")
    if args.out:
      np.save(args.out, logits)
      print(f"wrote logits {logits.shape} to {args.out}")
  if args.generate:
    if args.text is None:
      ap.error("--generate needs --text (the user message)")
    ids, text = greedy_chat(params, cfg, tok, args.text, args.generate, system=args.system)
    print(f"completion token ids: {ids}")
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
