"""Pairs of random spans of one document, for span-contrastive training (grain).

Batches are dicts of numpy arrays:
  inputs_a, inputs_b            int32 [batch, seq_len]  two spans of document i
  segment_ids_a, segment_ids_b  int32 [batch, seq_len]  1 on the span, 0 = padding
  weights                       float32 [batch]         1 for a real pair, 0 on rows
                                                        that pad the last eval batch

Each span is a contiguous run of the document's tokens, of a length drawn
uniformly from [min(min_len, n), min(seq_len, n)] at a uniform start, so a
document longer than seq_len still contributes all its parts over the epochs.
The draws come from grain's per-element generators (seeded by position in the
stream), so `get_state()`/`set_state()` resume bit-identically.
"""

from collections.abc import Iterator

import grain
import numpy as np

from tx_jax.data.pipeline import LMIterator
from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

SPAN_KEYS = ("inputs_a", "segment_ids_a", "inputs_b", "segment_ids_b", "weights")


def random_span(tokens: np.ndarray, rng: np.random.Generator, seq_len: int,
                min_len: int) -> np.ndarray:
  """A contiguous span of tokens [n] with min(min_len, n) <= length <= min(seq_len, n)."""
  n = len(tokens)
  hi = min(seq_len, n)
  length = int(rng.integers(min(min_len, hi), hi + 1))
  start = int(rng.integers(0, n - length + 1))
  return tokens[start:start + length]


class _SpanPair(grain.transforms.RandomMap):
  """{"text": ...} -> {"a", "b": int32 spans} (empty for a document without tokens)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, min_len: int):
    self.tokenizer, self.seq_len, self.min_len = tokenizer, seq_len, min_len

  def random_map(self, element, rng):
    tokens = np.asarray(self.tokenizer.encode(element["text"]), np.int32)
    if not len(tokens):
      return {"a": tokens, "b": tokens}
    return {"a": random_span(tokens, rng, self.seq_len, self.min_len),
            "b": random_span(tokens, rng, self.seq_len, self.min_len)}


class _Collate:
  """Pairs -> one batch [batch_size, seq_len]; missing rows (a short last batch) and
  documents without tokens get weight 0."""

  def __init__(self, batch_size: int, seq_len: int):
    self.batch_size, self.seq_len = batch_size, seq_len

  def __call__(self, pairs):
    shape = (self.batch_size, self.seq_len)
    batch = {k: np.zeros(shape, np.int32) for k in SPAN_KEYS[:-1]}
    batch["weights"] = np.zeros(self.batch_size, np.float32)
    for i, pair in enumerate(pairs):
      for side in ("a", "b"):
        span = pair[side]
        batch[f"inputs_{side}"][i, :len(span)] = span
        batch[f"segment_ids_{side}"][i, :len(span)] = 1
      batch["weights"][i] = float(len(pair["a"]) > 0)
    return batch


def _check(source: TextSource, seq_len: int, batch_size: int, min_len: int):
  if seq_len < 1 or batch_size < 2:
    raise UserError(f"span pairs need data.seq_len >= 1 and a batch of >= 2 pairs (the other "
                    f"pairs are the negatives); got seq_len={seq_len}, batch={batch_size}")
  if not 1 <= min_len <= seq_len:
    raise UserError(f"data.min_span={min_len} must be in 1..data.seq_len={seq_len}")
  if len(source) == 0:
    raise UserError(f"data source {source.name} has no documents")


def span_train_iterator(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                        batch_size: int, seed: int, min_len: int = 8, shard_index: int = 0,
                        shard_count: int = 1) -> LMIterator:
  """Shuffled span-pair batches forever; batch_size is per host, which reads
  documents shard_index::shard_count. Each epoch is reshuffled from seed."""
  _check(source, seq_len, batch_size, min_len)
  if len(source) < shard_count * batch_size:
    raise UserError(f"{source.name} has {len(source)} documents; a batch of {batch_size} "
                    f"pairs per host needs at least {shard_count * batch_size} (a document "
                    "must not be its own negative); lower train.batch_size")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(_SpanPair(tokenizer, seq_len, min_len), seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_Collate(batch_size, seq_len))
  config = {"source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "min_span": int(min_len), "batch_size": int(batch_size), "seed": int(seed),
            "shard_index": int(shard_index), "shard_count": int(shard_count)}
  return LMIterator(iter(ds.to_iter_dataset()), config)


def span_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      min_len: int = 8, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass: a pair per document of `source`, in order; the last
  batch is padded with weight-0 rows."""
  _check(source, seq_len, batch_size, min_len)
  ds = grain.MapDataset.source(source).random_map(
      _SpanPair(tokenizer, seq_len, min_len), seed=seed)
  return iter(ds.batch(batch_size, batch_fn=_Collate(batch_size, seq_len)))
