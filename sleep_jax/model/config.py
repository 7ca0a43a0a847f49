"""Model hyper-parameters: one frozen dataclass shared by tiny CPU models and imported checkpoints.

The Continuum Memory System (CMS, docs/method.md section 1) is described per *CMS level*. CMS level ``j``
(0-based, ``j = 0`` fastest) is memory level ``j + 1``; memory level 0 is the attention context.
Every per-level field is a tuple with one entry per CMS level. The slowest level (the last) holds
the "base" MLP of a pretrained dense model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import ml_collections


# The projections a LoRA adapter can target (``lora.py``): attention and the slowest level's MLP.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder-only Llama-style transformer with a CMS MLP chain."""

  vocab_size: int = 259
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: Optional[int] = None  # defaults to d_model // n_heads
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_seq_len: int = 512
  init_std: float = 0.02
  # --- Attention variants of imported checkpoints (all off = plain Llama). ---
  qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections (params q_bias, k_bias, v_bias)
  qk_norm: bool = False  # Qwen3: per-head RMSNorm over head_dim of q and k before RoPE
  # Llama-3.1 "llama3" RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings), or None for plain RoPE. A tuple: the config stays hashable.
  rope_scaling: Optional[Tuple[float, float, float, int]] = None

  # --- Continuum Memory System: one entry per CMS level, fastest first. ---
  d_ff: Tuple[int, ...] = (0, 512)  # width of each dense expert; 0 = level has no dense expert
  n_experts: Tuple[int, ...] = (1, 1)  # dense experts per level (1 = a plain always-on MLP)
  expert_top_k: int = 1  # dense experts routed per token when n_experts > 1
  n_slots: int = 4  # pre-allocated low-rank expert slots per level (same for every level)
  slot_rank: int = 16  # r of each slot (A: d x r, B: r x d)
  slot_top_k: int = 0  # live slots routed per token; 0 = every live slot is on
  # Hidden units of each slot's gate: 0 = the linear gate sigmoid(w . x); h > 0 adds
  # v . silu(U^T x) (U: d x h, v zero at unlock), a gate that can tell apart inputs no
  # hyperplane separates (the new people from the known ones at the answering position).
  slot_gate_hidden: int = 0
  # Sticky slot gates (``cms.slot_scores``): a gate at token t is the largest it has been on
  # tokens <= t, so a slot that opens on a name stays open for the rest of the input. Decode
  # carries the running maximum in the KV cache.
  slot_gate_sticky: bool = False
  # Entity-keyed slots (``slot_keys.py``): each slot holds up to ``slot_keys`` keys of
  # ``slot_key_len`` tokens (the names a sleep consolidated); a slot with keys is on only from
  # the token where one of them ends. 0 = no keys (every slot routed by its gate alone).
  slot_keys: int = 0
  slot_key_len: int = 0
  chunk_sizes: Tuple[int, ...] = (1, 1)  # C_l: level l's parameters change every C_l steps

  dtype: str = "float32"  # activation/compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # "none" | "full" | "dots" (jax.checkpoint policy per layer)

  def __post_init__(self):
    k = len(self.d_ff)
    for name in ("n_experts", "chunk_sizes"):
      if len(getattr(self, name)) != k:
        raise ValueError(
            f"ModelConfig.{name} has {len(getattr(self, name))} entries but d_ff has {k}: "
            "every per-level field needs one entry per CMS level.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.rope_scaling is not None:
      rs = self.rope_scaling
      if not isinstance(rs, tuple) or len(rs) != 4:
        raise ValueError(f"rope_scaling={rs!r}; expected None or a 4-tuple (factor, "
                         "low_freq_factor, high_freq_factor, original_max_position_embeddings)")
      if not (rs[0] >= 1 and 0 < rs[1] < rs[2] and rs[3] > 0):
        raise ValueError(f"rope_scaling={rs!r}; needs factor >= 1, 0 < low_freq_factor < "
                         "high_freq_factor and original_max_position_embeddings > 0")
    if bool(self.slot_keys) != bool(self.slot_key_len):
      raise ValueError(f"slot_keys={self.slot_keys}, slot_key_len={self.slot_key_len}: set both "
                       "(keys per slot, tokens per key) or neither")
    if self.slot_keys and self.param_dtype != "float32":
      raise ValueError(f"slot keys are token ids kept in the parameters; param_dtype="
                       f"{self.param_dtype!r} cannot hold them exactly (use float32)")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected one of 'none', 'full', 'dots'")

  @property
  def n_levels(self) -> int:
    return len(self.d_ff)

  @property
  def hd(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @classmethod
  def from_config(cls, c) -> "ModelConfig":
    """Builds from an ``ml_collections.ConfigDict`` (or dict); lists become tuples."""
    d = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)

  def to_config(self) -> ml_collections.ConfigDict:
    d = dataclasses.asdict(self)
    return ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})


def tiny(**overrides) -> ModelConfig:
  """The built-in tiny CPU model (2 CMS levels; unit tests and the default experiment)."""
  return dataclasses.replace(ModelConfig(), **overrides)


def smollm2_135m(**overrides) -> ModelConfig:
  """SmolLM2-135M shape (Llama architecture) with two empty fast CMS levels before its MLP."""
  base = ModelConfig(
      vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
      rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=2048,
      d_ff=(0, 0, 1536), n_experts=(1, 1, 1), n_slots=4, slot_rank=64, chunk_sizes=(1, 4, 16))
  return dataclasses.replace(base, **overrides)
