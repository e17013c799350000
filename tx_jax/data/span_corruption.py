"""Encoder-decoder (T5) batches: span corruption of documents, and supervised
(input, target) pairs, both packed into fixed-size rows.

Batches: `inputs`, `inputs_segment_ids`, `inputs_positions` [batch, seq_len];
`targets`, `decoder_inputs` (targets shifted right within each example,
starting with `start_id`), `targets_segment_ids`, `targets_positions`,
`weights` [batch, targets_len]. Segment k of the decoder row belongs to
segment k of the encoder row. Span corruption cuts documents into the raw
length whose corrupted inputs are exactly seq_len
(`masking.span_corruption_lengths`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from tx_jax.data import masking
from tx_jax.data.denoising import (EVAL_SEED, eval_iterable, iterate, map_seed, special_id,
                                   train_docs)
from tx_jax.data.pipeline import LMIterator, _check_sizes
from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError


def t5_specials(num_sentinels: int) -> tuple[str, ...]:
  """<pad> (also the decoder start), </s> (EOS) and sentinels <extra_id_0>, ..."""
  return ("<pad>", "</s>") + tuple(f"<extra_id_{i}>" for i in range(num_sentinels))


@dataclasses.dataclass(frozen=True)
class SpanSettings:
  eos_id: int
  start_id: int                  # first decoder input of every example
  sentinel_ids: tuple[int, ...]
  noise_density: float = 0.15
  mean_span_length: float = 3.0

  @classmethod
  def from_tokenizer(cls, tokenizer: Tokenizer, **kw) -> "SpanSettings":
    sentinels = []
    while f"<extra_id_{len(sentinels)}>" in tokenizer.special_ids:
      sentinels.append(tokenizer.special_ids[f"<extra_id_{len(sentinels)}>"])
    s = cls(special_id(tokenizer, "</s>", "end of sequence"),
            special_id(tokenizer, "<pad>", "decoder start"), tuple(sentinels), **kw)
    if not (0 < s.noise_density < 1 and s.mean_span_length >= 1):
      raise UserError(f"noise_density={s.noise_density} must be in (0, 1) and "
                      f"mean_noise_span_length={s.mean_span_length} >= 1")
    return s


class _SpanCorruptionPieces:
  """(document, rng) -> list of {"inputs", "targets"} T5 span-corrupted pieces."""

  def __init__(self, tokenizer: Tokenizer, raw_len: int, settings: SpanSettings):
    self.tokenizer, self.raw_len, self.s = tokenizer, raw_len, settings
    self.sentinels = np.asarray(settings.sentinel_ids, np.int32)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    tokens = np.asarray(self.tokenizer.encode(record["text"]), np.int32)
    pieces = []
    for i in range(0, len(tokens), self.raw_len):
      chunk = tokens[i:i + self.raw_len]
      if len(chunk) < 2:  # nothing to both keep and corrupt
        continue
      noise = masking.random_spans_noise_mask(1, len(chunk), rng, self.s.noise_density,
                                              self.s.mean_span_length)[0]
      inputs, targets = masking.corrupt_spans(chunk, noise, self.sentinels, self.s.eos_id)
      pieces.append({"inputs": inputs, "targets": targets})
    return pieces


class _PairPieces:
  """{"input", "target"} -> one example, each side truncated to fit, + EOS."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, targets_len: int, eos_id: int):
    self.tokenizer, self.eos = tokenizer, np.array([eos_id], np.int32)
    self.seq_len, self.targets_len = seq_len, targets_len

  def __call__(self, record: dict[str, Any]) -> list[dict]:
    enc = lambda text, n: np.concatenate([np.asarray(
        self.tokenizer.encode(text), np.int32)[:n - 1], self.eos])
    return [{"inputs": enc(record["input"], self.seq_len),
             "targets": enc(record["target"], self.targets_len)}]


class _EncoderDecoderCollate:
  def __init__(self, batch_size: int, seq_len: int, targets_len: int, start_id: int):
    self.batch_size, self.seq_len, self.targets_len = batch_size, seq_len, targets_len
    self.start_id = start_id

  def __call__(self, rows):
    enc, dec = (self.batch_size, self.seq_len), (self.batch_size, self.targets_len)
    b = {k: np.zeros(enc, np.int32) for k in ("inputs", "inputs_segment_ids",
                                              "inputs_positions")}
    b.update({k: np.zeros(dec, np.int32) for k in ("targets", "targets_segment_ids",
                                                   "targets_positions")})
    for i, row in enumerate(rows):
      for k in b:
        b[k][i] = row[k]
    # Teacher forcing: each example's decoder sees start_id, then its targets.
    shifted = np.concatenate([np.zeros((self.batch_size, 1), np.int32), b["targets"][:, :-1]], 1)
    first = (b["targets_positions"] == 0) & (b["targets_segment_ids"] > 0)
    b["decoder_inputs"] = np.where(first, self.start_id, shifted) * (b["targets_segment_ids"] > 0)
    b["weights"] = (b["targets_segment_ids"] > 0).astype(np.float32)
    return b


def span_lengths(seq_len: int, settings: SpanSettings) -> tuple[int, int, int]:
  """(raw tokens per piece, targets length, sentinels needed); checks the sentinels."""
  raw_len, targets_len = masking.span_corruption_lengths(seq_len, settings.noise_density,
                                                         settings.mean_span_length)
  # Spans grow with the piece length, so the longest piece needs the most.
  spans = masking.noise_counts(max(raw_len, 2), settings.noise_density,
                               settings.mean_span_length)[1]
  if spans > len(settings.sentinel_ids):
    raise UserError(f"pieces of {raw_len} tokens get up to {spans} noise spans but the tokenizer "
                    f"has {len(settings.sentinel_ids)} sentinels; add <extra_id_N> specials "
                    "(configs/t5.py: num_sentinels) or lower data.seq_len")
  return raw_len, targets_len, spans


def _encdec_dataset(docs, to_pieces, seq_len, targets_len, batch_size, start_id, seed, *,
                    shuffle_bins, pack_seed, max_empty_run):
  return iterate(docs, to_pieces, seed, {"inputs": seq_len, "targets": targets_len}, (),
                  _EncoderDecoderCollate(batch_size, seq_len, targets_len, start_id),
                  batch_size, shuffle_bins=shuffle_bins, pack_seed=pack_seed,
                  max_empty_run=max_empty_run)


def span_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                        batch_size: int, seed: int, settings: SpanSettings,
                        shard_index: int = 0, shard_count: int = 1, *,
                        num_epochs: int | None = None) -> LMIterator:
  """Shuffled, packed T5 span-corruption batches (inputs seq_len, targets computed)."""
  _check_sizes(source, seq_len, batch_size)
  raw_len, targets_len, _ = span_lengths(seq_len, settings)
  docs = train_docs(source, seed, shard_index, shard_count, num_epochs)
  ds = _encdec_dataset(docs, _SpanCorruptionPieces(tokenizer, raw_len, settings), seq_len,
                       targets_len, batch_size, settings.start_id, map_seed(seed, shard_index),
                       shuffle_bins=True, pack_seed=seed,
                       max_empty_run=len(docs) if num_epochs is None else None)
  config = {"objective": "span_corruption", "source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "targets_len": int(targets_len), "batch_size": int(batch_size), "seed": int(seed),
            "shard_index": int(shard_index), "shard_count": int(shard_count),
            **{k: list(v) if isinstance(v, tuple) else v
               for k, v in dataclasses.asdict(settings).items()}}
  return LMIterator(iter(ds), config)


def span_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      settings: SpanSettings):
  """One pass over `source` in order, corrupted the same way at every call."""
  _check_sizes(source, seq_len, batch_size)
  raw_len, targets_len, _ = span_lengths(seq_len, settings)
  ds = _encdec_dataset(grain.MapDataset.source(source),
                       _SpanCorruptionPieces(tokenizer, raw_len, settings), seq_len,
                       targets_len, batch_size, settings.start_id, EVAL_SEED,
                       shuffle_bins=False, pack_seed=0, max_empty_run=None)
  return eval_iterable(ds, source)


def pair_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                        targets_len: int, batch_size: int, seed: int, settings: SpanSettings,
                        shard_index: int = 0, shard_count: int = 1, *,
                        num_epochs: int | None = None) -> LMIterator:
  """Shuffled, packed supervised (input, target) batches; long sides are truncated."""
  _check_sizes(source, seq_len, batch_size)
  docs = train_docs(source, seed, shard_index, shard_count, num_epochs)
  ds = _encdec_dataset(docs, _PairPieces(tokenizer, seq_len, targets_len, settings.eos_id),
                       seq_len, targets_len, batch_size, settings.start_id, None,
                       shuffle_bins=True, pack_seed=seed, max_empty_run=None)
  config = {"objective": "seq2seq", "source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "targets_len": int(targets_len), "batch_size": int(batch_size), "seed": int(seed),
            "shard_index": int(shard_index), "shard_count": int(shard_count)}
  return LMIterator(iter(ds), config)


def pair_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, targets_len: int,
                      batch_size: int, settings: SpanSettings):
  """One pass over the pairs of `source`, in order."""
  _check_sizes(source, seq_len, batch_size)
  ds = _encdec_dataset(grain.MapDataset.source(source),
                       _PairPieces(tokenizer, seq_len, targets_len, settings.eos_id), seq_len,
                       targets_len, batch_size, settings.start_id, None, shuffle_bins=False,
                       pack_seed=0, max_empty_run=None)
  return eval_iterable(ds, source)
