"""The model a task runs on (``config.model_source``): the tiny world base model (pretrained once from
``config.base`` and cached, or the packaged asset) or an imported GGUF checkpoint (SmolLM2)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

from sleep_jax.data import documents
from sleep_jax.data import world as world_lib
from sleep_jax.model import growth, slot_keys
from sleep_jax.tasks import base_cache, pretrain_recipe


@dataclasses.dataclass
class Model:
  params: Any
  cfg: Any  # ModelConfig
  tok: Any
  fmt: Any  # documents.WorldFormat | documents.ChatFormat
  base_metrics: Dict[str, Any]
  corpus: Any  # the world base's pretraining corpus (None for an imported model)


def base_recipe(config) -> pretrain_recipe.PretrainConfig:
  """``config.base`` as the recipe dataclass."""
  b = config.base.to_dict()
  world = world_lib.WorldConfig(**b.pop("world"))
  for k in ("d_ff", "n_experts", "chunk_sizes"):
    b[k] = tuple(b[k])
  if "mixture" in b:
    b["mixture"] = tuple((str(x), float(y)) for x, y in b["mixture"])
  return pretrain_recipe.PretrainConfig(world=world, **b)


def _with_slots(config, params, cfg):
  """``config.model_slots`` > 0: that many pre-allocated (masked) slots per CMS level, so sleeps
  that unlock several slots each fit in the stream; ``config.model_gate_hidden`` > 0: gates with
  a hidden layer; ``config.model_levels``: more (slots-only) CMS levels; ``model_slot_keys``:
  entity-keyed slots. The base's function is unchanged."""
  n = int(config.get("model_slots", 0))
  params, cfg = growth.allocate_slots(params, cfg, n) if n else (params, cfg)
  # ``model_gate_hidden`` > 0: every slot's gate gets a hidden layer (silent until trained).
  params, cfg = growth.add_slot_gates(params, cfg, int(config.get("model_gate_hidden", 0)))
  # ``model_levels`` > the model's own: slots-only fast levels before the slowest (Sleep with
  # more memory levels, ``sleep_every``); empty, so the function is unchanged.
  n_levels = int(config.get("model_levels", 0))
  params, cfg = growth.add_levels(params, cfg, n_levels) if n_levels else (params, cfg)
  if config.get("model_gate_sticky", False):  # a gate that opened on a name stays open
    cfg = dataclasses.replace(cfg, slot_gate_sticky=True)
  # ``model_slot_keys`` > 0: each slot holds that many entity names (``model_slot_key_len``
  # tokens each) and is on only for inputs that name one (``slot_keys.py``).
  return slot_keys.add(params, cfg, int(config.get("model_slot_keys", 0)),
                       int(config.get("model_slot_key_len", 0)))


def load(config, workdir: str, log=print) -> Model:
  model = _load(config, workdir, log)
  if config.get("model_remat"):  # what a train step recomputes instead of storing (memory)
    model.cfg = dataclasses.replace(model.cfg, remat=str(config.model_remat))
  return model


def _load(config, workdir: str, log=print) -> Model:
  c = config
  if c.model_source == "world":
    cache = c.base_cache or os.path.join(workdir, "base")
    base = base_cache.pretrain_or_load(cache, base_recipe(c), log=log)
    params, cfg = _with_slots(c, base.params, base.cfg)
    return Model(params, cfg, base.tokenizer, documents.WorldFormat(base.tokenizer),
                 base.metrics, base.world)
  if c.model_source == "gguf":
    from sleep_jax.data.hf_tokenizer import HFTokenizer
    from sleep_jax.model import convert, fetch
    path = c.gguf or str(fetch.smollm2_path())
    cfg, params = convert.load_gguf(path)
    params, cfg = _with_slots(c, params, cfg)
    tok = HFTokenizer.from_gguf(path)
    return Model(params, cfg, tok, documents.ChatFormat(tok), {}, None)
  raise ValueError(f"model_source={c.model_source!r}; valid: 'world', 'gguf'")
