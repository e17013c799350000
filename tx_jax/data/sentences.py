"""One sentence (or short document) per row, padded: batches for sentence-level models.

Batches are dicts of numpy arrays:
  inputs      int32 [batch, seq_len]  <s> + the sentence's tokens (shifted right)
  targets     int32 [batch, seq_len]  the sentence's tokens + </s>
  segment_ids int32 [batch, seq_len]  1 on the sentence, 0 = padding
  weights     float32 [batch, seq_len] 1.0 where the target is real
  step        int32 [batch]           index of the batch in the train stream (train
                                      only): the train step that consumes it, so a
                                      loss can follow a schedule over steps

A row is [<s>] + tokens + [</s>] cut to seq_len + 1 tokens (a sentence longer
than seq_len - 1 tokens loses its end, and its </s>). Rows are never packed:
a sentence-level model (a VAE's encoder) reads each row as one whole input.

`split_units(text, "sentences")` cuts a document into paragraphs (at blank
lines), collapses whitespace, and cuts paragraphs after ". ", "! " or "? "
followed by a capital letter; "documents" keeps each document whole (for data
that already is one sentence per record, e.g. tfds:lm1b). `unit_source`
splits a source eagerly, which suits the embedded corpora and local files.
"""

from collections.abc import Iterator
import re

import grain
import numpy as np

from tx_jax.data.pipeline import SettingsIterator, nonempty_batches
from tx_jax.data.sources import ListSource, TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

SENTENCE_KEYS = ("inputs", "targets", "segment_ids", "weights")
UNITS = ("sentences", "documents")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")


def split_units(text: str, unit: str) -> list[str]:
  """The sentences (or the one document, whitespace kept) of `text`; no empty ones."""
  if unit not in UNITS:
    raise UserError(f"data.units={unit!r} is not one of {UNITS}")
  if unit == "documents":
    return [text] if text.strip() else []
  out = []
  for paragraph in re.split(r"\n\s*\n", text):
    paragraph = " ".join(paragraph.split())
    out += [s for s in _SENTENCE_END.split(paragraph) if s]
  return out


def unit_source(source: TextSource, unit: str) -> TextSource:
  """`source` with each document replaced by its units, in order (labels carried)."""
  if unit == "documents":
    return source
  texts, labels = [], []
  for i in range(len(source)):
    record = source[i]
    pieces = split_units(record["text"], unit)
    texts += pieces
    labels += [record.get("label")] * len(pieces)
  has_labels = any(label is not None for label in labels)
  return ListSource(texts, labels if has_labels else None, name=f"{source.name}[{unit}]")


class _Row(grain.transforms.Map):
  """{"text": str} -> int32 [<= seq_len + 1]: <s> tokens </s>, cut."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, bos_id: int, eos_id: int):
    self.tokenizer, self.seq_len, self.bos_id, self.eos_id = tokenizer, seq_len, bos_id, eos_id

  def map(self, element):
    ids = [self.bos_id] + self.tokenizer.encode(element["text"]) + [self.eos_id]
    return np.asarray(ids[:self.seq_len + 1], np.int32)


class _Collate:
  """Rows -> one batch [batch_size, seq_len]; missing rows (a short last batch) are
  all zero (weights 0)."""

  def __init__(self, batch_size: int, seq_len: int):
    self.batch_size, self.seq_len = batch_size, seq_len

  def __call__(self, rows):
    shape = (self.batch_size, self.seq_len)
    batch = {k: np.zeros(shape, np.int32) for k in SENTENCE_KEYS[:-1]}
    for i, row in enumerate(rows):
      n = len(row) - 1
      batch["inputs"][i, :n] = row[:-1]
      batch["targets"][i, :n] = row[1:]
      batch["segment_ids"][i, :n] = 1
    batch["weights"] = batch["segment_ids"].astype(np.float32)
    return batch


def _with_step(index: int, batch: dict) -> dict:
  return {**batch, "step": np.full(len(batch["inputs"]), index, np.int32)}


def _check(source: TextSource, seq_len: int, batch_size: int):
  if seq_len < 1 or batch_size < 1:
    raise UserError(f"sentence batches need data.seq_len >= 1 and a batch >= 1; got "
                    f"seq_len={seq_len}, batch={batch_size}")
  if len(source) == 0:
    raise UserError(f"data source {source.name} has no sentences")


class SentenceIterator(SettingsIterator):
  pipeline = "sentence"


def sentence_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                            batch_size: int, seed: int, bos_id: int, eos_id: int,
                            shard_index: int = 0, shard_count: int = 1) -> SentenceIterator:
  """Shuffled sentence batches forever (reshuffled every epoch from seed); batch_size
  is per host, which reads sentences shard_index::shard_count. Batch k carries
  step = k (resumes with the iterator's state)."""
  _check(source, seq_len, batch_size)
  if len(source) < shard_count * batch_size:
    raise UserError(f"{source.name} has {len(source)} sentences, fewer than one global batch "
                    f"({shard_count} x {batch_size}); lower train.batch_size")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_Row(tokenizer, seq_len, bos_id, eos_id))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_Collate(batch_size, seq_len))
  ds = ds.map_with_index(_with_step)
  config = {"source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "batch_size": int(batch_size), "seed": int(seed), "bos": int(bos_id),
            "eos": int(eos_id), "shard_index": int(shard_index),
            "shard_count": int(shard_count)}
  return SentenceIterator(iter(ds.to_iter_dataset()), config)


def sentence_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                          batch_size: int, bos_id: int, eos_id: int
                          ) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass, every sentence once in order; the last batch is padded
  with all-zero rows."""
  _check(source, seq_len, batch_size)
  ds = grain.MapDataset.source(source).map(_Row(tokenizer, seq_len, bos_id, eos_id))
  return nonempty_batches(iter(ds.batch(batch_size, batch_fn=_Collate(batch_size, seq_len))),
                          f"eval data {source.name} has no sentences")
