"""Loading ``FILE[:VARIANT]`` configs and checking ``--config.key=value`` overrides.

``ml_collections.config_flags`` (used by ``sleep_jax.main``) applies overrides to the locked
config; this module checks their *keys* first, so that a mistyped key fails with a message that
names the key and the nearest valid ones (difflib), e.g.

    unknown config key 'train.stpes': 'stpes' is not a field of 'train'.
    Did you mean: train.steps? Fields of 'train': log_every, steps
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import ml_collections

from sleep_jax.errors import UserError


class ConfigKeyError(UserError):
  """An override names a config key that does not exist."""


def pick(table, name: str, what: str):
  """``table[name]``, or a UserError (a ValueError) naming the nearest valid name and all."""
  if name not in table:
    near = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise UserError(f"unknown {what} {name!r}.{hint} Valid: {sorted(table)}")
  return table[name]


def import_ref(ref: str):
  """The attribute ``ref`` = "module:attribute" names, its module imported now: the registries
  of jobs and tasks name what they run this way, so that choosing one imports no other."""
  module, _, attr = ref.partition(":")
  return getattr(importlib.import_module(module), attr)


def load_module(path: str):
  """The config file at ``path`` as a module (its ``get_config``, ``HELP``, docstring)."""
  module_spec = importlib.util.spec_from_file_location(
      "_sleep_jax_config_" + os.path.basename(path).replace(".", "_"), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``path/to/file.py[:variant]`` -> the file's ``get_config(variant)``."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found (from --config={spec})")
  module = load_module(path)
  return module.get_config(arg) if arg else module.get_config()


def all_keys(config, prefix: str = "") -> List[str]:
  """Every dotted key of the config, inner nodes included."""
  out = []
  for k in config.keys():
    full = f"{prefix}{k}"
    out.append(full)
    v = config[k]
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.extend(all_keys(v, full + "."))
  return out


def check_key(config, dotted: str) -> None:
  """Raises ConfigKeyError naming the nearest valid keys if ``dotted`` is not in ``config``."""
  node, walked = config, []
  for part in dotted.split("."):
    is_node = isinstance(node, (ml_collections.ConfigDict, dict))
    if not is_node or part not in node:
      where = ".".join(walked) or "<root>"
      siblings = sorted(node.keys()) if is_node else []
      same_depth = [k for k in all_keys(config) if k.count(".") == dotted.count(".")]
      near_full = difflib.get_close_matches(dotted, same_depth, n=3, cutoff=0.6)
      near_local = [".".join(walked + [s]) for s in
                    difflib.get_close_matches(part, siblings, n=3, cutoff=0.5)]
      near = list(dict.fromkeys(near_local + near_full))[:3]
      if not is_node:
        msg = (f"unknown config key {dotted!r}: {where!r} is a value "
               f"({type(node).__name__}), not a group of fields.")
      else:
        msg = f"unknown config key {dotted!r}: {part!r} is not a field of {where!r}."
      if near:
        msg += f" Did you mean: {', '.join(near)}?"
      if siblings:
        msg += f" Fields of {where!r}: {', '.join(siblings)}"
      raise ConfigKeyError(msg)
    node = node[part]
    walked.append(part)


def overrides_from_argv(argv: Sequence[str], flag: str = "config"
                        ) -> Tuple[Optional[str], List[Tuple[str, Optional[str]]]]:
  """(config spec, [(dotted key, value or None)]) from ``--config=...`` / ``--config.k=v`` args."""
  spec, overrides = None, []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    if a == "--":
      break
    for prefix in (f"--{flag}", f"-{flag}"):
      if a == prefix and i + 1 < len(args):
        spec = args[i + 1]
        i += 1
      elif a.startswith(prefix + "="):
        spec = a[len(prefix) + 1:]
      elif a.startswith(prefix + ".") or a.startswith(f"--no{flag}."):
        body = a[len(prefix) + 1:] if a.startswith(prefix + ".") else a[len(f"--no{flag}."):]
        key, eq, value = body.partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
          value = args[i + 1]
          i += 1
        overrides.append((key, value if (eq or value) else None))
      else:
        continue
      break
    i += 1
  return spec, overrides


def validate_argv(argv: Sequence[str], flag: str = "config") -> None:
  """Loads the config named on the command line and checks every override key."""
  spec, overrides = overrides_from_argv(argv, flag)
  if spec is None:
    return
  config = load_config(spec)
  for key, value in overrides:
    check_key(config, key)
    if value is not None:
      node = config
      for part in key.split("."):
        node = node[part]
      try:
        apply_overrides(config, [f"{key}={value}"])
      except (ValueError, TypeError, SyntaxError):
        want = type(node).__name__
        example = {"tuple": "('a','b')", "int": "10", "float": "0.001", "bool": "True"}.get(want)
        article = "an" if want[0] in "aeiou" else "a"
        raise ConfigKeyError(f"cannot set --config.{key}={value}: expected {article} {want}"
                             + (f", e.g. --config.{key}={example}" if example else "")) from None


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"cannot parse {text!r} as a bool")
  if isinstance(current, str):
    return text
  value = ast.literal_eval(text)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  return value


def apply_overrides(config, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies ``["train.steps=10", ...]`` (checked keys, values parsed by the field's type)."""
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"override {item!r} needs the form key=value")
    check_key(config, key)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = _parse_value(text, node[leaf])
  return config
