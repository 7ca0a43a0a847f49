"""Tiny tokenizers for the built-in synthetic tasks (real BPE tokenizers come with checkpoints).

Every tokenizer here has the same small surface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size``, and the special ids ``pad_id`` / ``bos_id`` / ``eos_id``.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, List, Sequence


class ByteTokenizer:
  """UTF-8 bytes shifted by 3; ids 0/1/2 are pad/bos/eos. Vocabulary 259, nothing to train."""

  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
    ids = [b + 3 for b in text.encode("utf-8")]
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) - 3 for i in ids if int(i) >= 3)
    return data.decode("utf-8", errors="replace")


_WORD = re.compile(r"\w+|[^\w\s]")
_WORD_DIGITS = re.compile(r"\d|[^\W\d]+|[^\w\s]")  # every digit its own token


class WordTokenizer:
  """Whitespace/punctuation word vocabulary built from a corpus; unknown words map to <unk>.

  Keeps the synthetic world's sequences short so a tiny model learns fast on CPU. Decoding joins
  words with spaces and glues punctuation to the previous word. ``split_digits``: numbers are
  spelt digit by digit (arithmetic: ten digit tokens instead of one token per number, so sums
  can be learnt column by column); decoding glues a digit to the digit before it.
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

  def __init__(self, words: Sequence[str], split_digits: bool = False):
    seen = dict.fromkeys(list(self.SPECIALS) + list(words))
    self.itos = list(seen)
    self.stoi = {w: i for i, w in enumerate(self.itos)}
    self.split_digits = bool(split_digits)
    self._re = _WORD_DIGITS if self.split_digits else _WORD

  @classmethod
  def from_corpus(cls, texts: Iterable[str], extra: Sequence[str] = (),
                  split_digits: bool = False) -> "WordTokenizer":
    words = set(extra)
    pattern = _WORD_DIGITS if split_digits else _WORD
    for t in texts:
      words.update(pattern.findall(t))
    return cls(sorted(words), split_digits)

  @property
  def vocab_size(self) -> int:
    return len(self.itos)

  def token_id(self, word: str) -> int:
    return self.stoi.get(word, self.unk_id)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
    ids = [self.stoi.get(w, self.unk_id) for w in self._re.findall(text)]
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < len(self.SPECIALS):
        continue
      w = self.itos[i] if i < len(self.itos) else "<unk>"
      glue = re.fullmatch(r"[^\w\s]", w) or (
          self.split_digits and out and w.isdigit() and out[-1][-1:].isdigit())
      if out and glue:
        out[-1] += w
      else:
        out.append(w)
    return " ".join(out)

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump({"itos": self.itos, **({"split_digits": True} if self.split_digits else {})}, f)

  @classmethod
  def load(cls, path: str) -> "WordTokenizer":
    with open(path) as f:
      d = json.load(f)
    tok = cls([], d.get("split_digits", False))
    tok.itos, tok.stoi = d["itos"], {w: i for i, w in enumerate(d["itos"])}
    return tok
