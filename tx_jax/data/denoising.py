"""grain pipelines for encoder objectives: masked LM (BERT), span corruption (T5)
and supervised (input, target) pairs, all packed into fixed-size rows.

Masked LM batches, each [batch, seq_len]:
  inputs            int32   [CLS] piece [SEP] after BERT's 80/10/10 masking
  targets           int32   the uncorrupted tokens
  weights           float32 1.0 at the selected positions (the loss), else 0
  segment_ids       int32   1, 2, ... per packed piece; 0 = padding
  positions         int32   position within the piece
  token_types       int32   0 / 1 for the two halves in sentence-order mode
  sentence_labels   int32   1 if the piece's halves were swapped (at [CLS])
  sentence_weights  float32 1.0 at the [CLS] of each sentence-order piece

Encoder-decoder batches: `inputs`, `inputs_segment_ids`, `inputs_positions`
[batch, seq_len]; `targets`, `decoder_inputs` (targets shifted right within
each example, starting with `start_id`), `targets_segment_ids`,
`targets_positions`, `weights` [batch, targets_len]. Segment k of the
decoder row belongs to segment k of the encoder row.

Documents are split into pieces that fill a row (masked LM: seq_len - 2 tokens
plus [CLS], [SEP]; span corruption: the raw length whose corrupted inputs are
exactly seq_len, see `masking.span_corruption_lengths`); a document's short
last piece is packed beside others. Corruption is seeded per document
occurrence (run seed, host, index in the shuffled, repeated stream), so every
epoch is masked afresh and the iterator state (`get_state`/`set_state`)
resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
from grain import experimental as grain_exp
import numpy as np

from tx_jax.data import masking
from tx_jax.data.pipeline import LMIterator, _check_sizes, nonempty_batches
from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

MLM_SPECIALS = ("<pad>", "<mask>", "<cls>", "<sep>")
EVAL_SEED = 1234  # eval corruption is the same at every evaluation


def t5_specials(num_sentinels: int) -> tuple[str, ...]:
  """<pad> (also the decoder start), </s> (EOS) and sentinels <extra_id_0>, ..."""
  return ("<pad>", "</s>") + tuple(f"<extra_id_{i}>" for i in range(num_sentinels))


def _special(tokenizer: Tokenizer, name: str, purpose: str) -> int:
  if name not in tokenizer.special_ids:
    raise UserError(f"the tokenizer has no {name} token ({purpose}); add it to data.specials "
                    f"(now {list(tokenizer.special_ids)}) in a fresh workdir")
  return tokenizer.special_ids[name]


def _regular_vocab(tokenizer: Tokenizer) -> int:
  return min(tokenizer.special_ids.values(), default=tokenizer.vocab_size)


@dataclasses.dataclass(frozen=True)
class MaskedLMSettings:
  mask_id: int
  cls_id: int
  sep_id: int
  num_regular: int          # ids below this are ordinary tokens (random replacements)
  mask_rate: float = 0.15
  mask_token_rate: float = 0.8
  random_token_rate: float = 0.1
  sentence_order: bool = False

  @classmethod
  def from_tokenizer(cls, tokenizer: Tokenizer, **kw) -> "MaskedLMSettings":
    s = cls(_special(tokenizer, "<mask>", "masking"), _special(tokenizer, "<cls>", "piece start"),
            _special(tokenizer, "<sep>", "piece end"), _regular_vocab(tokenizer), **kw)
    if not (0 < s.mask_rate < 1 and s.mask_token_rate >= 0 and s.random_token_rate >= 0
            and s.mask_token_rate + s.random_token_rate <= 1):
      raise UserError(f"masking rates mask_rate={s.mask_rate}, mask_token_rate="
                      f"{s.mask_token_rate}, random_token_rate={s.random_token_rate} are invalid: "
                      "need 0 < mask_rate < 1 and the two replacement rates summing to <= 1")
    return s


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
    s = cls(_special(tokenizer, "</s>", "end of sequence"),
            _special(tokenizer, "<pad>", "decoder start"), tuple(sentinels), **kw)
    if not (0 < s.noise_density < 1 and s.mean_span_length >= 1):
      raise UserError(f"noise_density={s.noise_density} must be in (0, 1) and "
                      f"mean_noise_span_length={s.mean_span_length} >= 1")
    return s


# ----------------------------------------------------------------- documents -> pieces


class _MaskedLMPieces:
  """(document, rng) -> list of masked pieces of <= seq_len tokens."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, settings: MaskedLMSettings):
    self.tokenizer, self.seq_len, self.s = tokenizer, seq_len, settings
    self.body = seq_len - (3 if settings.sentence_order else 2)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    tokens = np.asarray(self.tokenizer.encode(record["text"]), np.int32)
    return [self._piece(tokens[i:i + self.body], rng) for i in range(0, len(tokens), self.body)]

  def _piece(self, chunk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s, n = self.s, len(chunk)
    cls, sep = np.array([s.cls_id], np.int32), np.array([s.sep_id], np.int32)
    label, sentence_weight = 0, 0.0
    if s.sentence_order and n >= 2:
      # Sentence-order prediction (ALBERT): two halves, swapped half the time.
      cut = int(rng.integers(1, n))
      first, second = chunk[:cut], chunk[cut:]
      label, sentence_weight = int(rng.random() < 0.5), 1.0
      if label:
        first, second = second, first
      tokens = np.concatenate([cls, first, sep, second, sep])
      types = np.concatenate([np.zeros(len(first) + 2, np.int32),
                              np.ones(len(second) + 1, np.int32)])
    else:
      tokens = np.concatenate([cls, chunk, sep])
      types = np.zeros(len(tokens), np.int32)
    maskable = (tokens != s.cls_id) & (tokens != s.sep_id)
    maskable[0] = maskable[-1] = False
    if s.sentence_order and n >= 2:
      maskable[len(first) + 1] = False
    inputs, selected = masking.bert_mask(
        tokens, maskable, rng, mask_id=s.mask_id, num_regular=s.num_regular,
        mask_rate=s.mask_rate, mask_token_rate=s.mask_token_rate,
        random_token_rate=s.random_token_rate)
    labels = np.zeros(len(tokens), np.int32)
    labels[0] = label
    sentence_weights = np.zeros(len(tokens), np.float32)
    sentence_weights[0] = sentence_weight
    return {"inputs": inputs, "targets": tokens, "weights": selected.astype(np.float32),
            "token_types": types, "sentence_labels": labels,
            "sentence_weights": sentence_weights}


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


class _FlattenPieces(grain_exp.FlatMapTransform):
  """list of pieces -> pieces; fails (instead of spinning) if an epoch has none."""

  def __init__(self, max_empty_run: int | None):
    self.max_fan_out = 1 << 30
    self.max_empty_run, self._empty_run = max_empty_run, 0

  def flat_map(self, pieces):
    if self.max_empty_run is not None:
      self._empty_run = 0 if pieces else self._empty_run + 1
      if self._empty_run > self.max_empty_run:
        raise UserError("no document of the training data yields a training example (too "
                        "short or empty); check data.source")
    return pieces


# -------------------------------------------------------------------- pieces -> rows


class _MaskedLMCollate:
  def __init__(self, batch_size: int, seq_len: int):
    self.shape = (batch_size, seq_len)

  def __call__(self, rows):
    b = {k: np.zeros(self.shape, np.int32) for k in (
        "inputs", "targets", "segment_ids", "positions", "token_types", "sentence_labels")}
    b["weights"] = np.zeros(self.shape, np.float32)
    b["sentence_weights"] = np.zeros(self.shape, np.float32)
    for i, row in enumerate(rows):
      for k in ("inputs", "targets", "token_types", "sentence_labels", "weights",
                "sentence_weights"):
        b[k][i] = row[k]
      b["segment_ids"][i] = row["inputs_segment_ids"]
      b["positions"][i] = row["inputs_positions"]
    return b


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


# ----------------------------------------------------------------------- pipelines


def _map_seed(seed: int, shard_index: int) -> int:
  """Per-host corruption seed, so hosts reading different documents at the same
  stream index do not share random draws."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _iterate(docs: grain.MapDataset, to_pieces: Callable, seed: int | None,
             length_struct: dict[str, int], meta_features: tuple[str, ...], collate,
             batch_size: int, *, shuffle_bins: bool, pack_seed: int,
             max_empty_run: int | None) -> grain.IterDataset:
  """documents -> (random_)map to lists of pieces -> flatten -> pack -> batch."""
  docs = docs.map(to_pieces) if seed is None else docs.random_map(to_pieces, seed=seed)
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = grain_exp.FlatMapIterDataset(ds, _FlattenPieces(max_empty_run))
  ds = grain_exp.FirstFitPackIterDataset(
      ds, length_struct=length_struct, num_packing_bins=batch_size, seed=pack_seed,
      shuffle_bins=shuffle_bins, meta_features=meta_features)
  return ds.batch(batch_size, batch_fn=collate)


def _train_docs(source: TextSource, seed: int, shard_index: int, shard_count: int,
                num_epochs: int | None) -> grain.MapDataset:
  if not 0 <= shard_index < shard_count:
    raise UserError(f"shard index {shard_index} is outside 0..{shard_count - 1}")
  if not 0 <= seed < 2**32:
    raise UserError(f"train.seed must be in [0, 2**32), got {seed}")
  if len(source) < shard_count:
    raise UserError(f"{source.name} has {len(source)} documents, fewer than the "
                    f"{shard_count} hosts reading it; use more data or fewer hosts")
  return grain.MapDataset.source(source)[shard_index::shard_count].shuffle(seed=seed).repeat(
      num_epochs)


def _eval_iterable(ds: grain.IterDataset, source: TextSource):
  return nonempty_batches(
      ds, f"eval data {source.name} yields no example; there is nothing to evaluate")


MLM_FEATURES = ("targets", "weights", "token_types", "sentence_labels", "sentence_weights")


def _mlm_dataset(docs, tokenizer, seq_len, batch_size, settings, seed, *, shuffle_bins,
                 pack_seed, max_empty_run):
  if seq_len < (4 if settings.sentence_order else 3):
    raise UserError(f"data.seq_len={seq_len} leaves no room for a token between [CLS] and [SEP]")
  lengths = {k: seq_len for k in ("inputs",) + MLM_FEATURES}
  return _iterate(docs, _MaskedLMPieces(tokenizer, seq_len, settings), seed, lengths,
                  MLM_FEATURES, _MaskedLMCollate(batch_size, seq_len), batch_size,
                  shuffle_bins=shuffle_bins, pack_seed=pack_seed, max_empty_run=max_empty_run)


def mlm_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                       batch_size: int, seed: int, settings: MaskedLMSettings,
                       shard_index: int = 0, shard_count: int = 1, *,
                       num_epochs: int | None = None) -> LMIterator:
  """Shuffled, packed, freshly masked BERT batches [batch_size, seq_len] (per host)."""
  _check_sizes(source, seq_len, batch_size)
  docs = _train_docs(source, seed, shard_index, shard_count, num_epochs)
  ds = _mlm_dataset(docs, tokenizer, seq_len, batch_size, settings,
                    _map_seed(seed, shard_index), shuffle_bins=True, pack_seed=seed,
                    max_empty_run=len(docs) if num_epochs is None else None)
  config = {"objective": "masked_lm", "source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "batch_size": int(batch_size), "seed": int(seed), "shard_index": int(shard_index),
            "shard_count": int(shard_count), **dataclasses.asdict(settings)}
  return LMIterator(iter(ds), config)


def mlm_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                     settings: MaskedLMSettings):
  """One pass over `source` in order, masked the same way at every call."""
  _check_sizes(source, seq_len, batch_size)
  ds = _mlm_dataset(grain.MapDataset.source(source), tokenizer, seq_len, batch_size, settings,
                    EVAL_SEED, shuffle_bins=False, pack_seed=0, max_empty_run=None)
  return _eval_iterable(ds, source)


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
  return _iterate(docs, to_pieces, seed, {"inputs": seq_len, "targets": targets_len}, (),
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
  docs = _train_docs(source, seed, shard_index, shard_count, num_epochs)
  ds = _encdec_dataset(docs, _SpanCorruptionPieces(tokenizer, raw_len, settings), seq_len,
                       targets_len, batch_size, settings.start_id, _map_seed(seed, shard_index),
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
  return _eval_iterable(ds, source)


def pair_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                        targets_len: int, batch_size: int, seed: int, settings: SpanSettings,
                        shard_index: int = 0, shard_count: int = 1, *,
                        num_epochs: int | None = None) -> LMIterator:
  """Shuffled, packed supervised (input, target) batches; long sides are truncated."""
  _check_sizes(source, seq_len, batch_size)
  docs = _train_docs(source, seed, shard_index, shard_count, num_epochs)
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
  return _eval_iterable(ds, source)
