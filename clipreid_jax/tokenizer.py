"""CLIP's byte-level BPE tokenizer (lower-cased, 49,408 tokens), giving the ids of OpenAI's tokenizer.

The vocabulary (OpenAI's `bpe_simple_vocab_16e6.txt.gz`, MIT) ships as package data, so nothing is
downloaded. Pure Python: it runs once per prompt template, never inside a training step.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from typing import Sequence

import ftfy
import numpy as np
import regex

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894 merges: 256 bytes, 256 word-final bytes, 2 specials

# Special tokens first so that their literal text maps to them (OpenAI's tokenizer does the same).
_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
  """A reversible map from the 256 byte values to printable unicode characters.

  Printable latin-1 bytes map to themselves; the rest are moved to code points 256 and up, so that a
  BPE vocabulary of strings never has to hold whitespace or control characters.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  # Insertion order matters: the vocabulary lists the printable bytes first, then the moved ones.
  table = {b: chr(b) for b in printable}
  moved = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + i) for i, b in enumerate(moved)})
  return table


def _clean(text: str) -> str:
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
  """Encodes text into CLIP token ids."""

  def __init__(self, vocab_path: str | None = None):
    if vocab_path is None:
      data = importlib.resources.files("clipreid_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
      lines = gzip.decompress(data).decode("utf-8").split("\n")
    else:
      with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
    symbols = list(_byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    if len(vocab) != VOCAB_SIZE:
      raise ValueError(f"{vocab_path or 'bpe_simple_vocab_16e6.txt.gz'}: expected {VOCAB_SIZE} tokens, got {len(vocab)}")
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.decoder = {i: tok for tok, i in self.encoder.items()}
    self.merge_rank = {m: i for i, m in enumerate(merges)}
    self._cache = {SOT: SOT, EOT: EOT}

  def _bpe(self, word: str) -> str:
    """Greedily applies the lowest-ranked merge until none applies; returns space-joined symbols."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
      best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
      if best not in self.merge_rank:
        break
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    out = " ".join(parts)
    self._cache[word] = out
    return out

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text`, without start and end tokens."""
    byte_map = _byte_to_unicode()
    ids = []
    for token in regex.findall(_TOKEN_PATTERN, _clean(text)):
      token = "".join(byte_map[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(token).split(" "))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    inverse = {v: k for k, v in _byte_to_unicode().items()}
    text = "".join(self.decoder[int(i)] for i in ids)
    return bytearray(inverse[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
  return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> np.ndarray:
  """Token ids (N, context_length) int32: start token, BPE ids, end token, zero padding.

  Too-long texts raise ValueError unless `truncate`, which keeps the first tokens and ends with EOT.
  """
  if isinstance(texts, str):
    texts = [texts]
  tok = default_tokenizer()
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    ids = [SOT_ID] + tok.encode(text) + [EOT_ID]
    if len(ids) > context_length:
      if not truncate:
        raise ValueError(f"Input {text} is too long for context length {context_length}")
      ids = ids[:context_length]
      ids[-1] = EOT_ID
    out[row, :len(ids)] = ids
  return out
