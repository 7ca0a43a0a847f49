"""Checkpoint readers: a uniform view of a GGUF file or a Hugging Face directory (config.json +
safetensors) as Hugging Face-layout float32 tensors and architecture metadata (``_Meta``), with
clear errors for missing or corrupt files. ``convert.py`` builds the params pytree from them.

GGUF tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_x,
Q8_0, K-quants), and llama.cpp's row permutation of the Q and K projections (which turns Hugging
Face's half-split RoPE layout into GGML's interleaved one) is undone, since ``transformer.rope``
uses the half-split convention. Safetensors are read through a memory map (BF16 via
``ml_dtypes``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np



log = logging.getLogger(__name__)

FETCH_COMMAND = "python -m sleep_jax.model.fetch --cache DIR"
_LAYER_KEYS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
_BIAS_KEYS = ("q_bias", "k_bias", "v_bias")  # ModelConfig.qkv_bias
_QK_NORM_KEYS = ("q_norm", "k_norm")  # ModelConfig.qk_norm


def _layer_keys(meta) -> Tuple[str, ...]:
  return (_LAYER_KEYS + (_BIAS_KEYS if meta.qkv_bias else ())
          + (_QK_NORM_KEYS if meta.qk_norm else ()))


class ModelFileError(ValueError):
  """A model file exists but cannot be read (corrupt, truncated, or not the expected format)."""


def _fetch_hint(path) -> str:
  name = os.path.basename(os.fspath(path))
  if name.lower().endswith(".gguf"):
    return (f"Fetch the SmolLM2 GGUF with `{FETCH_COMMAND}` (default cache: $SLEEP_JAX_CACHE or "
            "~/.cache/sleep_jax), or pass the path of another Llama-architecture .gguf file.")
  return (f"A Hugging Face model directory needs config.json and *.safetensors files; for the "
          f"built-in SmolLM2 GGUF run `{FETCH_COMMAND}`.")


def _missing(path, what="model file") -> FileNotFoundError:
  return FileNotFoundError(f"{what} {os.fspath(path)} not found. {_fetch_hint(path)}")


def _corrupt(path, why) -> ModelFileError:
  return ModelFileError(f"{os.fspath(path)} is not a readable model file ({why}). It may be "
                        f"truncated or corrupt: delete it and fetch it again. {_fetch_hint(path)}")


# Sources: a uniform view of a checkpoint as Hugging Face-layout float32 tensors.
#   keys: "embed" (V, d), "final_norm" (d,), "lm_head" (V, d), and per layer "attn_norm",
#   "q" (H*hd, d), "k"/"v" (K*hd, d), "o" (d, H*hd), "mlp_norm", "gate"/"up" (F, d), "down" (d, F),
#   optionally "q_bias" (H*hd,), "k_bias"/"v_bias" (K*hd,), "q_norm"/"k_norm" (hd,)
@dataclasses.dataclass
class _Meta:
  """Architecture facts read from a checkpoint (what ``ModelConfig`` needs)."""
  arch: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  norm_eps: float
  rope_base: float
  max_seq_len: int
  tie_embeddings: bool
  qkv_bias: bool = False
  qk_norm: bool = False
  rope_scaling: Optional[Tuple[float, float, float, int]] = None


def open_gguf(path):
  """``gguf.GGUFReader`` for ``path``, with errors that name the file and how to fetch it."""
  try:
    pass
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise _missing(path)
  st = os.stat(path)
  return _open_gguf_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(realpath, size, mtime_ns, path):
  """Parsing the metadata of a 49k-token vocabulary takes seconds in ``GGUFReader``; the model
  and the tokenizer share one reader (keyed by size and mtime, so a rewritten file is re-read)."""
  import gguf
  del realpath, mtime_ns  # cache key only
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # bad magic, truncated data, short header, empty file, ...
    raise _corrupt(path, f"{type(e).__name__}: {e}") from e
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise _corrupt(path, f"tensor {t.name} ends past the end of the file")
  return reader


class _GGUFSource:
  NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
           "lm_head": "output.weight", "attn_norm": "blk.{i}.attn_norm.weight",
           "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
           "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight",
           "mlp_norm": "blk.{i}.ffn_norm.weight", "gate": "blk.{i}.ffn_gate.weight",
           "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
           "q_bias": "blk.{i}.attn_q.bias", "k_bias": "blk.{i}.attn_k.bias",
           "v_bias": "blk.{i}.attn_v.bias", "q_norm": "blk.{i}.attn_q_norm.weight",
           "k_norm": "blk.{i}.attn_k_norm.weight"}
  ARCHS = ("llama", "qwen2", "qwen3")
  PERMUTED_ARCHS = ("llama",)  # llama.cpp permutes Q/K rows only for these

  def __init__(self, path):
    self.path = os.fspath(path)
    self.reader = open_gguf(self.path)
    self.tensors = {t.name: t for t in self.reader.tensors}
    self.meta = self._read_meta()
    self._check_supported()

  def field(self, key, default=None):
    f = self.reader.fields.get(key)
    if f is None:
      return default
    v = f.contents()
    return v[0] if isinstance(v, list) and len(v) == 1 else v

  def _read_meta(self) -> _Meta:
    arch = self.field("general.architecture")
    if arch is None:
      raise _corrupt(self.path, "no general.architecture key")
    if arch not in self.ARCHS:
      raise NotImplementedError(f"{self.path}: GGUF architecture {arch!r} is not supported "
                                "(supported: 'llama' -- Llama, Mistral, SmolLM/SmolLM2; 'qwen2'; "
                                "'qwen3').")
    a = lambda k, d=None: self.field(f"{arch}.{k}", d)
    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length",
                           "attention.head_count") if a(k) is None]
    if missing:
      raise _corrupt(self.path, f"missing metadata keys {[arch + '.' + k for k in missing]}")
    if "token_embd.weight" not in self.tensors:
      raise _corrupt(self.path, "no token_embd.weight tensor")
    d, H = int(a("embedding_length")), int(a("attention.head_count"))
    hd = int(a("attention.key_length", d // H))
    rot = int(a("rope.dimension_count", hd))
    if rot != hd:
      raise NotImplementedError(f"{self.path}: partial rotary embedding (rope dims {rot} < head "
                                f"dim {hd}) is not supported by transformer.rope")
    scaling = a("rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in self.tensors:
      raise NotImplementedError(
          f"{self.path}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported by "
          "transformer.rope; the imported model would not match the original.")
    emb = self.tensors["token_embd.weight"]
    return _Meta(arch=arch, vocab_size=int(emb.shape[1]), d_model=d,
                 n_layers=int(a("block_count")), n_heads=H,
                 n_kv_heads=int(a("attention.head_count_kv", H)), head_dim=hd,
                 d_ff=int(a("feed_forward_length")),
                 norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
                 rope_base=float(a("rope.freq_base", 10000.0)),
                 max_seq_len=int(a("context_length", 2048)),
                 tie_embeddings="output.weight" not in self.tensors,
                 qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in self.tensors,
                 qk_norm=arch == "qwen3" or "blk.0.attn_q_norm.weight" in self.tensors)

  def _check_supported(self):
    expected = {self.NAMES[k] for k in ("embed", "final_norm", "lm_head")}
    expected |= {self.NAMES[k].format(i=i) for k in _layer_keys(self.meta)
                 for i in range(self.meta.n_layers)}
    extra = sorted(set(self.tensors) - expected)
    if extra:
      raise NotImplementedError(
          f"{self.path}: tensors {extra[:6]}{' ...' if len(extra) > 6 else ''} have no place in "
          "this transformer (biases, extra norms, ...); importing without them would change the "
          "function.")
    absent = sorted(n for n in expected - set(self.tensors) if n != "output.weight")
    if absent:
      raise _corrupt(self.path, f"missing tensors {absent[:6]}")

  def get(self, key: str, layer: Optional[int] = None) -> np.ndarray:
    from gguf.quants import dequantize
    name = self.NAMES[key].format(i=layer)
    t = self.tensors[name]
    try:
      w = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise NotImplementedError(f"{self.path}: tensor {name} has GGML type {t.tensor_type.name}, "
                                f"which gguf {getattr(__import__('gguf'), '__version__', '')} "
                                "cannot dequantize") from e
    w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    if self.meta.arch in self.PERMUTED_ARCHS and key in ("q", "k", "q_bias", "k_bias"):
      # llama.cpp permutes the rows of q/k weights and their biases alike.
      w = unpermute_qk(w, self.meta.n_heads if key.startswith("q") else self.meta.n_kv_heads)
    return w


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation of a Q/K projection's rows (HF half-split RoPE -> GGML
  interleaved): ``convert_hf_to_gguf.py`` ``LlamaModel.permute``."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of ``permute_qk``."""
  return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
  """Memory-mapped safetensors file (BF16 through ml_dtypes; nothing read until asked)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise _missing(path, "safetensors file")
    size = os.path.getsize(path)
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError(f"header length {n} exceeds file size {size}")
        header = json.loads(f.read(n))
    except Exception as e:
      raise _corrupt(path, f"bad safetensors header: {e}") from e
    header.pop("__metadata__", None)
    self.entries = header
    self.start = 8 + n
    for name, e in header.items():
      if e["data_offsets"][1] > size - self.start:
        raise _corrupt(path, f"tensor {name} ends past the end of the file")
    self._mm = None

  def get(self, name: str) -> np.ndarray:
    e = self.entries[name]
    if e["dtype"] == "BF16":
      import ml_dtypes
      dt = ml_dtypes.bfloat16
    elif e["dtype"] in _ST_DTYPES:
      dt = _ST_DTYPES[e["dtype"]]
    else:
      raise NotImplementedError(f"{self.path}: tensor {name} has dtype {e['dtype']}")
    if self._mm is None:
      self._mm = np.memmap(self.path, np.uint8, "r")
    b, end = e["data_offsets"]
    return self._mm[self.start + b:self.start + end].view(dt).reshape(e["shape"])


class _HFSource:
  NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight", "attn_norm": "model.layers.{i}.input_layernorm.weight",
           "q": "model.layers.{i}.self_attn.q_proj.weight",
           "k": "model.layers.{i}.self_attn.k_proj.weight",
           "v": "model.layers.{i}.self_attn.v_proj.weight",
           "o": "model.layers.{i}.self_attn.o_proj.weight",
           "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
           "gate": "model.layers.{i}.mlp.gate_proj.weight",
           "up": "model.layers.{i}.mlp.up_proj.weight",
           "down": "model.layers.{i}.mlp.down_proj.weight",
           "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
           "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
           "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
           "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
           "k_norm": "model.layers.{i}.self_attn.k_norm.weight"}
  MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

  def __init__(self, directory):
    self.path = os.fspath(directory)
    if not os.path.isdir(self.path):
      raise _missing(self.path, "model directory")
    cfg_path = os.path.join(self.path, "config.json")
    if not os.path.isfile(cfg_path):
      raise _missing(cfg_path, "config file")
    try:
      with open(cfg_path) as f:
        self.config = json.load(f)
    except ValueError as e:
      raise _corrupt(cfg_path, f"bad JSON: {e}") from e
    self.files: Dict[str, _SafetensorsFile] = {}
    self.where: Dict[str, str] = {}
    index = os.path.join(self.path, "model.safetensors.index.json")
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError) as e:
        raise _corrupt(index, f"bad index: {e}") from e
      for fname in sorted(set(weight_map.values())):
        self.files[fname] = _SafetensorsFile(os.path.join(self.path, fname))
      for name, fname in weight_map.items():
        if name not in self.files[fname].entries:
          raise _corrupt(os.path.join(self.path, fname), f"tensor {name} listed in the index "
                         "is not in the file")
        self.where[name] = fname
    else:
      paths = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
      if not paths:
        raise _missing(os.path.join(self.path, "model.safetensors"), "safetensors file")
      for p in paths:
        fname = os.path.basename(p)
        self.files[fname] = _SafetensorsFile(p)
        for name in self.files[fname].entries:
          self.where[name] = fname
    self.meta = self._read_meta()
    self._check_supported()

  def _read_meta(self) -> _Meta:
    c = self.config
    mt = c.get("model_type", "llama")
    if mt not in self.MODEL_TYPES:
      raise NotImplementedError(f"{self.path}: model_type {mt!r} is not supported "
                                f"(supported: {', '.join(self.MODEL_TYPES)})")
    act = c.get("hidden_act", c.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
      raise NotImplementedError(f"{self.path}: MLP activation {act!r} is not supported (SwiGLU "
                                "with silu only)")
    if c.get("mlp_bias"):
      raise NotImplementedError(f"{self.path}: MLP biases are not supported by transformer.py")
    if c.get("attention_bias") and mt != "qwen2":
      # Llama/Mistral/Qwen3 `attention_bias` also puts a bias on o_proj (Qwen2: q/k/v only).
      raise NotImplementedError(f"{self.path}: attention_bias=True on a {mt!r} model includes "
                                "an o_proj bias, which transformer.py does not support (only "
                                "q/k/v biases, ModelConfig.qkv_bias)")
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind == "llama3":
        try:
          rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                          float(scaling["high_freq_factor"]),
                          int(scaling.get("original_max_position_embeddings")
                              or c["max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
          raise _corrupt(os.path.join(self.path, "config.json"),
                         f"llama3 rope scaling {scaling} lacks {e}") from e
      elif kind != "default":
        raise NotImplementedError(f"{self.path}: RoPE scaling {scaling} is not supported by "
                                  "transformer.rope (only 'llama3'); the imported model would "
                                  "not match.")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
      raise NotImplementedError(f"{self.path}: partial rotary embedding is not supported")
    if mt == "mistral" and c.get("sliding_window") and c["sliding_window"] < c.get(
        "max_position_embeddings", 0):
      log.warning("%s: sliding-window attention (%s) is not implemented; attention is full, which "
                  "matches the original only for sequences up to the window.", self.path,
                  c["sliding_window"])
    if mt in ("qwen2", "qwen3") and c.get("use_sliding_window"):
      log.warning("%s: sliding-window attention is not implemented; attention is full.", self.path)
    d, H = int(c["hidden_size"]), int(c["num_attention_heads"])
    tie = bool(c.get("tie_word_embeddings", False)) or self.NAMES["lm_head"] not in self.where
    return _Meta(arch=mt, vocab_size=int(c["vocab_size"]), d_model=d,
                 n_layers=int(c["num_hidden_layers"]), n_heads=H,
                 n_kv_heads=int(c.get("num_key_value_heads") or H),
                 head_dim=int(c.get("head_dim") or d // H), d_ff=int(c["intermediate_size"]),
                 norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                 rope_base=float(c.get("rope_theta") or rp.get("rope_theta") or 10000.0),
                 max_seq_len=int(c.get("max_position_embeddings", 2048)), tie_embeddings=tie,
                 qkv_bias=mt == "qwen2" or self.NAMES["q_bias"].format(i=0) in self.where,
                 qk_norm=mt == "qwen3" or self.NAMES["q_norm"].format(i=0) in self.where,
                 rope_scaling=rope_scaling)

  def _check_supported(self):
    names = set(self.where)
    expected = {self.NAMES[k] for k in ("embed", "final_norm", "lm_head")}
    expected |= {self.NAMES[k].format(i=i) for k in _layer_keys(self.meta)
                 for i in range(self.meta.n_layers)}
    extra = sorted(n for n in names - expected if not n.endswith("rotary_emb.inv_freq"))
    if extra:
      raise NotImplementedError(f"{self.path}: tensors {extra[:6]} have no place in this "
                                "transformer; importing without them would change the function.")
    absent = sorted(n for n in expected - names if n != "lm_head.weight")
    if absent:
      raise _corrupt(self.path, f"missing tensors {absent[:6]}")

  def get(self, key: str, layer: Optional[int] = None) -> np.ndarray:
    name = self.NAMES[key].format(i=layer)
    if key == "lm_head" and name not in self.where:
      name = self.NAMES["embed"]
    return self.files[self.where[name]].get(name).astype(np.float32)
