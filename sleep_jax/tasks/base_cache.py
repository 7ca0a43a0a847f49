"""The base model's cache: params (npz), tokenizer and recipe + model config + metrics (json) in a
directory, written atomically; ``pretrain_or_load`` trains once per recipe, and the base models
that ship with the package (``sleep_jax/assets``) are used when their recipe is the one asked for.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.errors import UserError
from sleep_jax.model.config import ModelConfig
from sleep_jax.tasks.pretrain import BaseModel, _print, corpus_for, pretrain
from sleep_jax.tasks.pretrain_recipe import PretrainConfig

_PARAMS, _TOK, _META = "params.npz", "tokenizer.json", "base_model.json"


def _flatten(params) -> Dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in flat}


def _unflatten(flat: Dict[str, np.ndarray]):
  out: Dict[str, Any] = {}
  for key, v in flat.items():
    d = out
    *head, last = key.split("/")
    for h in head:
      d = d.setdefault(h, {})
    d[last] = jnp.asarray(v)
  return out


def save(base: BaseModel, directory: str) -> None:
  """Writes params (npz), tokenizer (json) and recipe + model config + metrics (json)."""
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=directory, prefix=".tmp_")
  np.savez(os.path.join(tmp, _PARAMS), **_flatten(base.params))
  base.tokenizer.save(os.path.join(tmp, _TOK))
  meta = {"recipe": base.recipe.to_json(), "model_config": base.cfg.to_config().to_dict(),
          "metrics": base.metrics}
  with open(os.path.join(tmp, _META), "w") as f:
    json.dump(meta, f, indent=1)
  for name in (_PARAMS, _TOK, _META):  # meta last: its presence marks a complete cache
    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  os.rmdir(tmp)


def load(directory: str) -> BaseModel:
  with open(os.path.join(directory, _META)) as f:
    meta = json.load(f)
  recipe = PretrainConfig.from_json(meta["recipe"])
  cfg = ModelConfig.from_config(meta["model_config"])
  with np.load(os.path.join(directory, _PARAMS)) as z:
    params = _unflatten({k: z[k] for k in z.files})
  tok = WordTokenizer.load(os.path.join(directory, _TOK))
  return BaseModel(params, cfg, tok, corpus_for(recipe), recipe, meta["metrics"])


def _load_or_explain(directory: str, fix: str) -> BaseModel:
  """``load`` with a one-line error naming the unreadable file and how to rebuild it."""
  try:
    return load(directory)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    name = getattr(e, "filename", None) or directory
    raise UserError(f"base model in {directory} is unreadable ({name}: {type(e).__name__}: "
                    f"{e}); {fix}") from None


def is_cached(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, _META))


def pretrain_or_load(cache_dir: str, recipe: PretrainConfig = PretrainConfig(),
                     log: Callable[[str], None] = _print) -> BaseModel:
  """Loads the base model cached in ``cache_dir``, or trains it and caches it there.

  Raises if ``cache_dir`` holds a model of a different recipe (use another directory)."""
  if is_cached(cache_dir):
    base = _load_or_explain(cache_dir, f"delete {cache_dir} to rebuild it")
    if base.recipe != recipe:
      raise UserError(f"{cache_dir} caches a base model of another recipe:\n{base.recipe}\n"
                       f"requested:\n{recipe}\nuse another cache directory")
    if base.tokenizer.itos != base.world.tokenizer.itos:
      raise UserError(f"{cache_dir}: cached tokenizer differs from the world's tokenizer; delete "
                      f"{cache_dir} to rebuild it")
    log(f"loaded base model from {cache_dir}")
    return base
  packaged = packaged_base(recipe)
  if packaged is not None:
    base = _load_or_explain(packaged, "reinstall the package (pip install -e .) to restore it")
    save(base, cache_dir)
    log(f"using the packaged base model {packaged} (its recipe is the requested one); "
        f"copied to {cache_dir}")
    return base
  base = pretrain(recipe, log=log)
  save(base, cache_dir)
  log(f"cached base model in {cache_dir}")
  return base


# Base models that ship with the package (``sleep_jax/assets/<name>``, made with
# ``python -m sleep_jax.tasks.pretrain sleep_jax/assets/<name>``): the default world recipe takes
# ~10 CPU-minutes to pretrain, which would not leave the README's main job its 10 minutes.
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets")


def packaged_base(recipe: PretrainConfig) -> Optional[str]:
  """The directory of a shipped base model trained with exactly ``recipe``, or None."""
  if not os.path.isdir(ASSETS_DIR):
    return None
  for name in sorted(os.listdir(ASSETS_DIR)):
    d = os.path.join(ASSETS_DIR, name)
    if is_cached(d):
      with open(os.path.join(d, _META)) as f:
        same_recipe = PretrainConfig.from_json(json.load(f)["recipe"]) == recipe
      # The world's text can change without its config changing: the vocabulary tells.
      if same_recipe and (WordTokenizer.load(os.path.join(d, _TOK)).itos
                          == corpus_for(recipe).tokenizer.itos):
        return d
  return None
