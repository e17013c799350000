"""The tokenizer interface every tokenizer implements (byte, SentencePiece, Hugging Face)."""

from __future__ import annotations

from collections.abc import Iterable
import hashlib

import numpy as np


class Tokenizer:
  """Common interface; see `ByteTokenizer` and `SentencePieceTokenizer`."""

  vocab_size: int
  special_ids: dict[str, int]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text for `ids`; specials decode to "", invalid ids/bytes to U+FFFD."""
    raise NotImplementedError

  def token_byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each token stands for (0 for specials).

    Summing it over the target tokens gives the byte count that turns a loss
    in nats/token into bits per byte, whatever the tokenizer.
    """
    raise NotImplementedError

  def fingerprint(self) -> str:
    """Short stable hash of the vocabulary (checkpoint compatibility checks)."""
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError


def hash_parts(*parts: bytes) -> str:
  """Short stable sha256 of the parts (tokenizer fingerprints)."""
  h = hashlib.sha256()
  for part in parts:
    h.update(part)
    h.update(b"\0")
  return h.hexdigest()[:16]
