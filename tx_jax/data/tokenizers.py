"""Tokenizers: raw UTF-8 bytes, a SentencePiece model with byte fallback, or a
Hugging Face tokenizer.json (`tx_jax.data.hf_tokenizer.HFTokenizer`).

All share one interface (`Tokenizer`). Special tokens (`<pad>`, `<mask>`, ...)
get ids after the base vocabulary, in the order given, so a tokenizer with no
specials has exactly the base vocabulary (256 for bytes). Specials are never
produced by `encode` (text that spells "<mask>" is encoded as ordinary text);
objectives insert them by id.

A tokenizer is saved into a directory as `tokenizer.json` (+ `tokenizer.model`
for SentencePiece, + `hf_tokenizer.json` for Hugging Face) and read back with
`load_tokenizer`, which also reads a Hugging Face model directory's own
tokenizer.json.
"""

from collections.abc import Iterable, Sequence
import json
import io
import os
import re

import numpy as np

from tx_jax.data.tokenizer_base import Tokenizer, hash_parts
from tx_jax.errors import UserError, io_operation

_CONFIG_FILE = "tokenizer.json"
_SPM_FILE = "tokenizer.model"


def _check_specials(specials: Sequence[str]) -> tuple[str, ...]:
  specials = tuple(specials)
  if len(set(specials)) != len(specials):
    raise UserError(f"duplicate special tokens in {list(specials)}; list each once")
  return specials


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are UTF-8 bytes; specials get ids 256, 257, ... in order."""

  def __init__(self, specials: Sequence[str] = ()):
    self.specials = _check_specials(specials)
    self.vocab_size = 256 + len(self.specials)
    self.special_ids = {s: 256 + i for i, s in enumerate(self.specials)}

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    # Bytes outside 0..255 can't be encoded; U+FFFD's UTF-8 bytes stand in so
    # that a single decode pass replaces them like any other invalid byte.
    out = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        out.append(i)
      elif not 256 <= i < self.vocab_size:
        out += "\ufffd".encode("utf-8")
    return out.decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros([self.vocab_size], np.int32)
    lengths[:256] = 1
    return lengths

  def fingerprint(self) -> str:
    return hash_parts(b"byte", json.dumps(self.specials).encode())

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
      json.dump({"type": "byte", "specials": list(self.specials)}, f)

  def __repr__(self):
    return f"ByteTokenizer(specials={self.specials})"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; specials get ids after the model's pieces."""

  def __init__(self, model_path: str, specials: Sequence[str] = ()):
    if not os.path.isfile(model_path):
      raise UserError(
          f"SentencePiece model '{model_path}' not found; train one with "
          "`tx-jax tokenizer --data SPEC --vocab-size N --out PREFIX`")
    with open(model_path, "rb") as f:
      self._init(f.read(), specials, model_path)

  @classmethod
  def from_serialized(cls, model_proto: bytes, specials: Sequence[str] = ()):
    tok = cls.__new__(cls)
    tok._init(model_proto, specials, "<bytes>")  # pylint: disable=protected-access
    return tok

  def _init(self, model_proto: bytes, specials: Sequence[str], name: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
          f"'{name}' is not a valid SentencePiece model ({e}); retrain it with "
          "`tx-jax tokenizer`") from None
    self.specials = _check_specials(specials)
    self.num_pieces = self._sp.get_piece_size()
    self.vocab_size = self.num_pieces + len(self.specials)
    self.special_ids = {
        s: self.num_pieces + i for i, s in enumerate(self.specials)}

  # SentencePieceProcessor itself can't be pickled (grain worker processes).
  def __getstate__(self):
    return {"proto": self._proto, "specials": self.specials}

  def __setstate__(self, state):
    self._init(state["proto"], state["specials"], "<pickle>")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if 0 <= i < self.num_pieces:
        run.append(i)
        continue
      if run:
        pieces.append(self._sp.decode(run))
        run = []
      if not self.num_pieces <= i < self.vocab_size:
        pieces.append("\ufffd")
    if run:
      pieces.append(self._sp.decode(run))
    return "".join(pieces)

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros([self.vocab_size], np.int32)
    for i in range(self.num_pieces):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue  # <s>, </s>, <unk>: no bytes of the text.
      if self._sp.is_byte(i):
        lengths[i] = 1  # "<0xAB>" byte-fallback pieces.
      else:
        # "\u2581" is SentencePiece's stand-in for a space.
        lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
    return lengths

  def fingerprint(self) -> str:
    return hash_parts(b"spm", self._proto, json.dumps(self.specials).encode())

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _SPM_FILE), "wb") as f:
      f.write(self._proto)
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
      json.dump({"type": "spm", "model": _SPM_FILE,
                 "specials": list(self.specials)}, f)

  def __repr__(self):
    return (f"SentencePieceTokenizer(pieces={self.num_pieces}, "
            f"specials={self.specials})")


def _training_sentences(texts: Iterable[str], max_chars: int):
  """Yields texts cut at line boundaries into pieces of <= max_chars.

  SentencePiece silently drops "sentences" longer than max_sentence_length, and
  whole documents often are; lines keep their "\n" so newlines get pieces.
  """
  for text in texts:
    buf = ""
    for line in text.splitlines(keepends=True):
      while len(line) > max_chars:  # One huge line: hard cut.
        if buf:
          yield buf
          buf = ""
        yield line[:max_chars]
        line = line[max_chars:]
      if len(buf) + len(line) > max_chars and buf:
        yield buf
        buf = ""
      buf += line
    if buf.strip():
      yield buf


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_prefix: str,
    model_type: str = "unigram",
    specials: Sequence[str] = (),
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model in memory; writes PREFIX.model and PREFIX.vocab.

  Lossless by construction: identity normalisation, whitespace kept as is, no
  dummy prefix, and byte fallback so any text round-trips and
  `token_byte_lengths` sums to the exact UTF-8 length.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise UserError(
        f"unknown SentencePiece model_type '{model_type}'; use unigram, bpe, "
        "char or word")
  if isinstance(vocab_size, bool) or not 1 <= int(vocab_size) <= 2**31 - 1:
    raise UserError(f"vocab size {vocab_size} is out of range; give a positive --vocab-size "
                    "(a few thousand pieces suit most corpora)")
  max_chars = 4096
  sentences = [s for s in _training_sentences(texts, max_chars) if s]
  if not sentences:
    raise UserError(
        "cannot train a tokenizer on an empty corpus; point --data at a "
        "source with some text")
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  with io_operation("creating the tokenizer directory", out_dir):
    os.makedirs(out_dir, exist_ok=True)
  model = io.BytesIO()  # SentencePiece's own file writer ignores a full disk
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=int(vocab_size),
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        max_sentence_length=4 * max_chars,  # Bytes; UTF-8 is <= 4 per char.
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except (RuntimeError, ValueError) as e:
    raise UserError(_explain_spm_error(str(e), vocab_size)) from None
  proto = model.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=proto)
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
  _write_atomically(out_prefix + ".model", proto, "writing the SentencePiece model")
  _write_atomically(out_prefix + ".vocab", vocab.encode("utf-8"), "writing the SentencePiece vocab")
  return SentencePieceTokenizer(out_prefix + ".model", specials)


def _write_atomically(path: str, data: bytes, operation: str):
  """path's bytes replaced whole (tmp file + rename); an IOFailure leaves no partial file."""
  tmp = path + ".tmp"
  with io_operation(operation, path):
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    except OSError:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise


def _explain_spm_error(message: str, vocab_size: int) -> str:
  too_high = re.search(r"Vocabulary size too high.*<= (\d+)", message)
  if too_high:
    return (f"vocab size {vocab_size} is too large for this corpus; lower "
            f"--vocab-size to at most {too_high.group(1)} or use more text")
  too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
  if too_low:
    return (f"vocab size {vocab_size} is too small: byte fallback and the "
            f"corpus' characters need {too_low.group(1)} pieces; raise "
            f"--vocab-size to at least {too_low.group(1)}")
  return f"SentencePiece training failed: {message.splitlines()[0]}"


def train_on_spec(spec: str, vocab_size: int, prefix: str) -> dict:
  """`tx-jax tokenizer`: a SentencePiece on data spec `spec` -> PREFIX.model/.vocab."""
  from tx_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.open_source(spec)
  texts = (source[i]["text"] for i in range(len(source)))
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  tok = train_sentencepiece(texts, vocab_size, prefix)
  return {"model": prefix + ".model", "vocab_size": tok.vocab_size, "documents": len(source)}


def make_tokenizer(spec: str, specials: Sequence[str] = ()) -> Tokenizer:
  """`"byte"`, `"spm:/path/to/prefix.model"` or `"hf:/path/to/tokenizer.json"`."""
  if spec == "byte":
    return ByteTokenizer(specials)
  if spec.startswith("spm:"):
    return SentencePieceTokenizer(os.path.expanduser(spec[4:]), specials)
  if spec.startswith("hf:"):
    from tx_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    return HFTokenizer.from_file(os.path.expanduser(spec[3:]), specials)
  raise UserError(
      f"unknown tokenizer '{spec}'; use 'byte', 'spm:/path/to/PREFIX.model' or "
      "'hf:/path/to/tokenizer.json'")


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads a tokenizer written by `Tokenizer.save(directory)`, or a Hugging Face
  model directory's tokenizer.json."""
  path = os.path.join(directory, _CONFIG_FILE)
  try:
    with open(path) as f:
      config = json.load(f)
    if isinstance(config, dict) and "model" in config and "type" not in config:
      from tx_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
      return HFTokenizer.from_file(path)
    kind, specials = config["type"], config.get("specials", [])
  except FileNotFoundError:
    raise UserError(
        f"no tokenizer in '{directory}' ({_CONFIG_FILE} missing); is it a "
        "tx_jax workdir?") from None
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(
        f"corrupt tokenizer file '{path}' ({e}); delete it and re-run "
        "training") from None
  if kind == "byte":
    return ByteTokenizer(specials)
  if kind == "spm":
    return SentencePieceTokenizer(
        os.path.join(directory, config.get("model", _SPM_FILE)), specials)
  if kind == "hf":
    from tx_jax.data.hf_tokenizer import HF_FILE, HFTokenizer  # pylint: disable=g-import-not-at-top
    return HFTokenizer.from_file(os.path.join(directory, config.get("file", HF_FILE)), specials)
  raise UserError(
      f"unknown tokenizer type '{kind}' in '{path}'; expected byte, spm or hf")
