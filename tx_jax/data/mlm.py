"""Masked LM (BERT) batches: documents -> masked pieces -> packed rows.

Batches, each [batch, seq_len]:
  inputs            int32   [CLS] piece [SEP] after BERT's 80/10/10 masking
  targets           int32   the uncorrupted tokens
  weights           float32 1.0 at the selected positions (the loss), else 0
  segment_ids       int32   1, 2, ... per packed piece; 0 = padding
  positions         int32   position within the piece
  token_types       int32   0 / 1 for the two halves in sentence-order mode
  sentence_labels   int32   1 if the piece's halves were swapped (at [CLS])
  sentence_weights  float32 1.0 at the [CLS] of each sentence-order piece

Documents are split into pieces of seq_len - 2 tokens plus [CLS], [SEP]; a
document's short last piece is packed beside others (`tx_jax.data.denoising`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from tx_jax.data import masking
from tx_jax.data.denoising import (EVAL_SEED, eval_iterable, iterate, map_seed, regular_ids,
                                   regular_vocab, special_id, train_docs)
from tx_jax.data.pipeline import LMIterator, _check_sizes
from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

MLM_SPECIALS = ("<pad>", "<mask>", "<cls>", "<sep>")


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
  # With sentence_order: BERT's next-sentence prediction instead of ALBERT's order task.
  next_sentence: bool = False

  def as_config(self) -> dict:
    """The settings as the iterator records them (next_sentence only when on, so the
    records of runs before it existed still match)."""
    config = dataclasses.asdict(self)
    if not self.next_sentence:
      del config["next_sentence"]
    return config

  @classmethod
  def from_tokenizer(cls, tokenizer: Tokenizer, **kw) -> "MaskedLMSettings":
    s = cls(special_id(tokenizer, "<mask>", "masking"), special_id(tokenizer, "<cls>", "piece start"),
            special_id(tokenizer, "<sep>", "piece end"), regular_vocab(tokenizer), **kw)
    if not (0 < s.mask_rate < 1 and s.mask_token_rate >= 0 and s.random_token_rate >= 0
            and s.mask_token_rate + s.random_token_rate <= 1):
      raise UserError(f"masking rates mask_rate={s.mask_rate}, mask_token_rate="
                      f"{s.mask_token_rate}, random_token_rate={s.random_token_rate} are invalid: "
                      "need 0 < mask_rate < 1 and the two replacement rates summing to <= 1")
    return s


class _MaskedLMPieces:
  """(document, rng) -> list of masked pieces of <= seq_len tokens."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, settings: MaskedLMSettings):
    self.tokenizer, self.seq_len, self.s = tokenizer, seq_len, settings
    self.body = seq_len - (3 if settings.sentence_order or settings.next_sentence else 2)
    self.regular_ids = regular_ids(tokenizer)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    tokens = np.asarray(self.tokenizer.encode(record["text"]), np.int32)
    other = None
    if self.s.next_sentence:  # another document's tokens: the "random next" segments
      other = np.asarray(self.tokenizer.encode(record["other_text"]), np.int32)
    return [self._piece(tokens[i:i + self.body], rng, other)
            for i in range(0, len(tokens), self.body)]

  def _piece(self, chunk: np.ndarray, rng: np.random.Generator,
             other: np.ndarray | None = None) -> dict[str, np.ndarray]:
    s, n = self.s, len(chunk)
    cls, sep = np.array([s.cls_id], np.int32), np.array([s.sep_id], np.int32)
    label, sentence_weight = 0, 0.0
    if s.next_sentence and n >= 2:
      # Next-sentence prediction (BERT): B follows A (label 0), or half the time B is
      # as long a segment of another document (label 1), as in BertForPreTraining.
      cut = int(rng.integers(1, n))
      first, second = chunk[:cut], chunk[cut:]
      sentence_weight = 1.0
      if rng.random() < 0.5 and other is not None and len(other):
        start = int(rng.integers(0, max(len(other) - len(second), 0) + 1))
        second, label = other[start:start + len(second)], 1
      tokens = np.concatenate([cls, first, sep, second, sep])
      types = np.concatenate([np.zeros(len(first) + 2, np.int32),
                              np.ones(len(second) + 1, np.int32)])
    elif s.sentence_order and n >= 2:
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
    if (s.sentence_order or s.next_sentence) and n >= 2:
      maskable[len(first) + 1] = False
    inputs, selected = masking.bert_mask(
        tokens, maskable, rng, mask_id=s.mask_id, num_regular=s.num_regular,
        regular_ids=self.regular_ids,
        mask_rate=s.mask_rate, mask_token_rate=s.mask_token_rate,
        random_token_rate=s.random_token_rate)
    labels = np.zeros(len(tokens), np.int32)
    labels[0] = label
    sentence_weights = np.zeros(len(tokens), np.float32)
    sentence_weights[0] = sentence_weight
    return {"inputs": inputs, "targets": tokens, "weights": selected.astype(np.float32),
            "token_types": types, "sentence_labels": labels,
            "sentence_weights": sentence_weights}


class _WithOther:
  """Records of `source`, each with the text of another document ("other_text") at a
  seeded random position (grain's index_shuffle: O(1) memory, picklable)."""

  def __init__(self, source, seed: int):
    self.source, self.seed = source, seed
    self.name, self.has_labels = source.name, source.has_labels

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    from grain import experimental as grain_exp  # pylint: disable=g-import-not-at-top
    n = len(self.source)
    j = int(grain_exp.index_shuffle(index, max_index=n - 1, seed=self.seed, rounds=4))
    if j == index:
      j = (index + 1) % n
    return {**self.source[index], "other_text": self.source[j]["text"]}


def _with_other(source, settings: MaskedLMSettings, seed: int):
  return _WithOther(source, seed) if settings.next_sentence else source


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


MLM_FEATURES = ("targets", "weights", "token_types", "sentence_labels", "sentence_weights")


def _mlm_dataset(docs, tokenizer, seq_len, batch_size, settings, seed, *, shuffle_bins,
                 pack_seed, max_empty_run):
  if seq_len < (4 if settings.sentence_order or settings.next_sentence else 3):
    raise UserError(f"data.seq_len={seq_len} leaves no room for a token between [CLS] and [SEP]")
  lengths = {k: seq_len for k in ("inputs",) + MLM_FEATURES}
  return iterate(docs, _MaskedLMPieces(tokenizer, seq_len, settings), seed, lengths,
                  MLM_FEATURES, _MaskedLMCollate(batch_size, seq_len), batch_size,
                  shuffle_bins=shuffle_bins, pack_seed=pack_seed, max_empty_run=max_empty_run)


def mlm_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                       batch_size: int, seed: int, settings: MaskedLMSettings,
                       shard_index: int = 0, shard_count: int = 1, *,
                       num_epochs: int | None = None) -> LMIterator:
  """Shuffled, packed, freshly masked BERT batches [batch_size, seq_len] (per host)."""
  _check_sizes(source, seq_len, batch_size)
  docs = train_docs(_with_other(source, settings, seed), seed, shard_index, shard_count,
                    num_epochs)
  ds = _mlm_dataset(docs, tokenizer, seq_len, batch_size, settings,
                    map_seed(seed, shard_index), shuffle_bins=True, pack_seed=seed,
                    max_empty_run=len(docs) if num_epochs is None else None)
  config = {"objective": "masked_lm", "source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "batch_size": int(batch_size), "seed": int(seed), "shard_index": int(shard_index),
            "shard_count": int(shard_count), **settings.as_config()}
  return LMIterator(iter(ds), config)


def mlm_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                     settings: MaskedLMSettings):
  """One pass over `source` in order, masked the same way at every call."""
  _check_sizes(source, seq_len, batch_size)
  ds = _mlm_dataset(grain.MapDataset.source(_with_other(source, settings, EVAL_SEED)), tokenizer,
                    seq_len, batch_size, settings, EVAL_SEED, shuffle_bins=False, pack_seed=0,
                    max_empty_run=None)
  return eval_iterable(ds, source)
