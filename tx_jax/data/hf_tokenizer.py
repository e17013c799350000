"""A Hugging Face `tokenizer.json` (WordPiece, byte-level BPE, Unigram) as a tx_jax Tokenizer.

Wraps the `tokenizers` library. `encode` adds no special tokens and reads text
that spells one ("[MASK]") as ordinary text, like the other tx_jax tokenizers;
objectives insert specials by id. `special_ids` holds each special token of
the file under its own name and, when it has one, under the tx_jax name the
objectives look up: [PAD] -> <pad>, [MASK] -> <mask>, [CLS] -> <cls>,
[SEP] -> <sep>, [UNK] -> <unk>, <|endoftext|> -> </s> (T5's <pad>, </s>,
<extra_id_N> already are).

Bytes per token (`token_byte_lengths`), the denominator of bits per byte:
- byte-level BPE (GPT-2): the bytes the token decodes to, so sums are exact;
- Unigram / metaspace BPE (T5, SentencePiece-style): the piece with "▁" read
  as a space, byte-fallback pieces <0xAB> as one byte (a leading "▁" the
  tokenizer prepends to a text counts one byte more than the text has);
- WordPiece (BERT): the piece without its "##" continuation prefix, plus one
  byte for the space before each word-initial piece that is not a lone
  punctuation mark. For lowercase text with single spaces between words and
  punctuation attached to the word before it, the sum is the normalised
  text's length plus one (the first word's space); the text is counted after
  the tokenizer's normalisation (lowercasing, accent stripping), as WordPiece
  cannot give back the original bytes.
Special tokens count 0 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import json
import os
import re
import unicodedata

import numpy as np

from tx_jax.data.tokenizer_base import Tokenizer, hash_parts
from tx_jax.errors import UserError

HF_FILE = "hf_tokenizer.json"
ALIASES = {"[PAD]": "<pad>", "[MASK]": "<mask>", "[CLS]": "<cls>", "[SEP]": "<sep>",
           "[UNK]": "<unk>", "<|endoftext|>": "</s>"}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_alphabet() -> dict[str, int]:
  """Byte-level BPE's printable stand-in character -> the byte it encodes.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
  space, ...) take the code points 256, 257, ... in byte order.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) +
               list(range(0xAE, 0x100)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[chr(b)] = b
    else:
      table[chr(256 + extra)] = b
      extra += 1
  return table


def _find(node, kind: str) -> dict | None:
  """The first component of `kind` in a (possibly Sequence) pre_tokenizer/decoder spec."""
  if not isinstance(node, dict):
    return None
  if node.get("type") == kind:
    return node
  for child in node.get("pretokenizers", []) + node.get("decoders", []):
    found = _find(child, kind)
    if found:
      return found
  return None


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` read from a tokenizer.json string."""

  def __init__(self, json_text: str, specials: Sequence[str] = (), name: str = "<string>"):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_str(json_text)
      self._spec = json.loads(json_text)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"'{name}' is not a valid Hugging Face tokenizer.json "
                      f"({str(e).splitlines()[0]})") from None
    self._json = json_text
    self._tok.encode_special_tokens = True  # text "[MASK]" is text
    self._tok.no_padding()  # pipelines pack and pad; one text in, its ids out
    self._tok.no_truncation()
    self.kind = self._spec["model"]["type"]  # WordPiece | BPE | Unigram | WordLevel
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    added = self._tok.get_added_tokens_decoder()
    self._special = {i for i, t in added.items() if t.special}
    self.special_ids = {}
    for i in sorted(self._special):
      content = added[i].content
      self.special_ids.setdefault(content, i)
      if content in ALIASES:
        self.special_ids.setdefault(ALIASES[content], i)
    self.specials = tuple(specials)
    missing = [s for s in self.specials if s not in self.special_ids]
    if missing:
      raise UserError(f"the tokenizer '{name}' has no special token {missing[0]}; it has "
                      f"{sorted(self.special_ids)}")

  @classmethod
  def from_file(cls, path: str, specials: Sequence[str] = ()) -> "HFTokenizer":
    try:
      with open(path, encoding="utf-8") as f:
        return cls(f.read(), specials, path)
    except FileNotFoundError:
      raise UserError(f"tokenizer file '{path}' not found") from None

  def __getstate__(self):
    return {"json": self._json, "specials": self.specials}

  def __setstate__(self, state):
    self.__init__(state["json"], state["specials"], "<pickle>")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if 0 <= i < self.vocab_size and self._tok.id_to_token(i) is not None:
        if i not in self._special:
          run.append(i)
        continue
      if run:
        pieces.append(self._tok.decode(run))
        run = []
      pieces.append("\ufffd")
    if run:
      pieces.append(self._tok.decode(run))
    return "".join(pieces)

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros([self.vocab_size], np.int32)
    byte_level = (_find(self._spec.get("pre_tokenizer"), "ByteLevel") or
                  _find(self._spec.get("decoder"), "ByteLevel"))
    metaspace = (_find(self._spec.get("pre_tokenizer"), "Metaspace") or
                 _find(self._spec.get("decoder"), "Metaspace"))
    space = (metaspace or {}).get("replacement", "\u2581")
    prefix = self._spec["model"].get("continuing_subword_prefix") or "##"
    alphabet = byte_level_alphabet() if byte_level else {}
    added = {i: t for i, t in self._tok.get_added_tokens_decoder().items()}
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if i in self._special:
        continue
      if i in added:  # non-special added tokens match their text literally
        lengths[i] = len(added[i].content.encode())
      elif byte_level:
        lengths[i] = sum(1 for ch in token if ch in alphabet) + sum(
            len(ch.encode()) for ch in token if ch not in alphabet)
      elif self.kind == "WordPiece":
        if token.startswith(prefix):
          lengths[i] = len(token[len(prefix):].encode())
        else:
          lone_punct = len(token) == 1 and unicodedata.category(token).startswith("P")
          lengths[i] = len(token.encode()) + (0 if lone_punct else 1)
      elif _BYTE_PIECE.match(token):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace(space, " ").encode())
    return lengths

  def fingerprint(self) -> str:
    return hash_parts(b"hf", self._json.encode(), json.dumps(list(self.specials)).encode())

  def save(self, directory: str) -> None:
    """tx_jax layout: the HF file as hf_tokenizer.json, tokenizer.json pointing at it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
      f.write(self._json)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      json.dump({"type": "hf", "file": HF_FILE, "specials": list(self.specials)}, f)

  def save_hf(self, directory: str) -> None:
    """Hugging Face layout: the file itself as tokenizer.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(self._json)

  def __repr__(self):
    return f"HFTokenizer({self.kind}, vocab_size={self.vocab_size})"
