"""Real BPE tokenizers of pretrained checkpoints, and their chat templates.

``HFTokenizer`` wraps a ``tokenizers.Tokenizer`` built either from a GGUF file's metadata
(``tokenizer.ggml.*``: vocabulary, merges, token types, special ids, pre-tokenizer name) or from a
Hugging Face ``tokenizer.json``. It has the same small surface as ``data/tokenizer.py``
(``encode`` / ``decode`` / ``vocab_size`` / ``pad_id`` / ``bos_id`` / ``eos_id``) plus the chat
template, so prompts are built exactly as the model was trained:

    tok = HFTokenizer.from_gguf(path)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])  # template + generation prompt

The template is rendered with jinja2 when it is installed (sandboxed, with the same settings as
``transformers``: ``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``); without
jinja2 a built-in ChatML renderer covers ``<|im_start|>role\\ncontent<|im_end|>\\n`` templates
(SmolLM2, Qwen), including a default system message the template inserts.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

# GGUF token types (llama.cpp ``llama_token_type``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of llama.cpp's ``tokenizer.ggml.pre`` names (same as the
# patterns in the corresponding Hugging Face tokenizer.json files).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Stop tokens used by common chat models besides the declared eos.
_CHAT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def _require_tokenizers():
  try:
    import tokenizers  # noqa: F401
  except ImportError as e:  # pragma: no cover - the package is a declared dependency
    raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from e
  return tokenizers


def _pre_tokenizer(pre: Optional[str]):
  """tokenizers pre-tokenizer for a llama.cpp pre-tokenizer name."""
  from tokenizers import Regex, pre_tokenizers as pt
  pre = (pre or "default").lower()
  if pre in ("default", "gpt2", "gpt-2"):
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":  # SmolLM/SmolLM2: single digits, then the GPT-2 byte-level split.
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ("llama-bpe", "llama3", "qwen2"):
    pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
    return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise NotImplementedError(
      f"GGUF pre-tokenizer {pre!r} is not supported (known: default/gpt2, smollm, llama-bpe, "
      "qwen2). Load the tokenizer from the model's tokenizer.json instead "
      "(HFTokenizer.from_file).")


class HFTokenizer:
  """A byte-level BPE tokenizer with special ids and an optional chat template."""

  def __init__(self, tokenizer, *, bos_id: Optional[int], eos_id: Optional[int],
               pad_id: Optional[int] = None, unk_id: Optional[int] = None,
               chat_template: Optional[str] = None, add_bos_token: bool = False,
               source: str = ""):
    self.tokenizer = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.unk_id = unk_id
    self.chat_template = chat_template
    self.add_bos_token = add_bos_token  # what the model's own tokenizer does for plain text
    self.source = source

  # --- the common tokenizer surface ------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
    """Token ids of ``text``; special-token strings in the text (``<|im_start|>``) map to their
    ids, and nothing is added unless asked (``add_bos`` / ``add_eos``)."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, i: int) -> Optional[str]:
    return self.tokenizer.id_to_token(int(i))

  @property
  def stop_ids(self) -> List[int]:
    """Token ids that end a chat turn: eos plus the usual end-of-turn tokens that exist."""
    out = [] if self.eos_id is None else [self.eos_id]
    for s in _CHAT_STOP_STRINGS:
      i = self.tokenizer.token_to_id(s)
      if i is not None and i not in out:
        out.append(i)
    return out

  # --- chat template ---------------------------------------------------------------------------
  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                          add_generation_prompt: bool = True, renderer: str = "auto",
                          **kwargs) -> str:
    """The prompt string for ``messages`` ([{"role", "content"}, ...]).

    renderer: "auto" (jinja2 if installed, else the built-in ChatML one), "jinja" or "chatml".
    """
    if renderer not in ("auto", "jinja", "chatml"):
      raise ValueError(f"renderer={renderer!r}; expected 'auto', 'jinja' or 'chatml'")
    template = self.chat_template
    if renderer == "auto":
      try:
        import jinja2  # noqa: F401
        renderer = "jinja" if template else "chatml"
      except ImportError:
        renderer = "chatml"
    if renderer == "jinja":
      if not template:
        raise ValueError(f"tokenizer from {self.source or '?'} has no chat template")
      return render_jinja(template, messages, add_generation_prompt=add_generation_prompt,
                          bos_token=self._tok_str(self.bos_id),
                          eos_token=self._tok_str(self.eos_id), **kwargs)
    if template and "<|im_start|>" not in template:
      raise ImportError(
          "this chat template is not ChatML, so rendering it needs jinja2: pip install jinja2")
    return render_chatml(messages, add_generation_prompt=add_generation_prompt,
                         default_system=chatml_default_system(template))

  def encode_chat(self, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = True, renderer: str = "auto") -> List[int]:
    """Token ids of the rendered chat prompt (the template adds any bos itself)."""
    return self.encode(self.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, renderer=renderer))

  def _tok_str(self, i):
    return "" if i is None else (self.tokenizer.id_to_token(i) or "")

  # --- constructors ----------------------------------------------------------------------------
  @classmethod
  def from_gguf(cls, path_or_reader) -> "HFTokenizer":
    """Builds the tokenizer stored in a GGUF file's metadata (``tokenizer.ggml.model == gpt2``,
    i.e. byte-level BPE: GPT-2, SmolLM, Llama 3, Qwen)."""
    _require_tokenizers()
    from tokenizers import AddedToken, Tokenizer, decoders, models
    if isinstance(path_or_reader, (str, os.PathLike)):
      from sleep_jax.model import checkpoint_readers  # the GGUF opener with clear file errors
      reader = checkpoint_readers.open_gguf(path_or_reader)
      source = os.fspath(path_or_reader)
    else:
      reader, source = path_or_reader, "<GGUFReader>"

    def field(key, default=None):
      f = reader.fields.get(key)
      return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model is None:
      raise ValueError(f"{source}: GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    if model != "gpt2":
      raise NotImplementedError(
          f"{source}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, "
          "'gpt2'); load the tokenizer from the model's tokenizer.json instead.")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges") or []
    types = field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    pre = field("tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
      a, sep, b = m.partition(" ")
      if not sep:
        raise ValueError(f"{source}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
      pairs.append((a, b))
    tk = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre in ("llama-bpe", "llama3")))
    tk.pre_tokenizer = _pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    if specials:
      tk.add_special_tokens([t for t in specials if t.special])
      tk.add_tokens([t for t in specials if not t.special])
    return cls(tk, bos_id=field("tokenizer.ggml.bos_token_id"),
               eos_id=field("tokenizer.ggml.eos_token_id"),
               pad_id=field("tokenizer.ggml.padding_token_id"),
               unk_id=field("tokenizer.ggml.unknown_token_id"),
               chat_template=field("tokenizer.chat_template"),
               add_bos_token=bool(field("tokenizer.ggml.add_bos_token", False)), source=source)

  @classmethod
  def from_file(cls, tokenizer_json: str, tokenizer_config: Optional[str] = None,
                model_config: Optional[str] = None) -> "HFTokenizer":
    """From a Hugging Face ``tokenizer.json`` (+ optional ``tokenizer_config.json`` for the
    special tokens and chat template, and ``config.json`` as a fallback for the special ids)."""
    _require_tokenizers()
    from tokenizers import Tokenizer
    if not os.path.exists(tokenizer_json):
      raise FileNotFoundError(f"tokenizer file {tokenizer_json} not found")
    try:
      tk = Tokenizer.from_file(os.fspath(tokenizer_json))
    except Exception as e:
      raise ValueError(f"{tokenizer_json}: not a readable tokenizer.json ({e})") from e
    tc = _read_json(tokenizer_config) if tokenizer_config else {}
    mc = _read_json(model_config) if model_config else {}

    def special(name):
      v = tc.get(name)
      if isinstance(v, dict):
        v = v.get("content")
      i = tk.token_to_id(v) if isinstance(v, str) else None
      if i is None:
        i = mc.get(f"{name}_id")
        i = i[0] if isinstance(i, list) else i
      return i

    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(os.path.dirname(os.fspath(tokenizer_json)), "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    return cls(tk, bos_id=special("bos_token"), eos_id=special("eos_token"),
               pad_id=special("pad_token"), unk_id=special("unk_token"), chat_template=template,
               add_bos_token=bool(tc.get("add_bos_token", False)),
               source=os.fspath(tokenizer_json))

  @classmethod
  def from_dir(cls, directory: str) -> "HFTokenizer":
    """From a Hugging Face model directory (tokenizer.json, tokenizer_config.json, config.json)."""
    path = lambda n: os.path.join(directory, n)
    opt = lambda n: path(n) if os.path.exists(path(n)) else None
    return cls.from_file(path("tokenizer.json"), opt("tokenizer_config.json"), opt("config.json"))


def _read_json(path: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from e


# ----------------------------------------------------------------------------------------------
# Chat template renderers.
# ----------------------------------------------------------------------------------------------
def render_jinja(template: str, messages, *, add_generation_prompt: bool = True, **context) -> str:
  """Renders a Hugging Face chat template the way ``transformers`` does (sandboxed jinja2)."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
      **context)


_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def chatml_default_system(template: Optional[str]) -> Optional[str]:
  """The system message a ChatML template inserts when the conversation has none (SmolLM2's
  "You are a helpful AI assistant named SmolLM, ..."), or None."""
  if not template or "!= 'system'" not in template.replace('"', "'"):
    return None
  m = _DEFAULT_SYSTEM.search(template)
  return m.group(1) if m else None


def render_chatml(messages, *, add_generation_prompt: bool = True,
                  default_system: Optional[str] = None) -> str:
  """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message (+ ``<|im_start|>assistant\\n``)."""
  parts = []
  if default_system is not None and messages and messages[0]["role"] != "system":
    parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
  for m in messages:
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)
