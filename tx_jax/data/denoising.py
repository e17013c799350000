"""Shared machinery of the corrupted-text batch formats (`mlm.py`, `span_corruption.py`):
documents -> pieces -> first-fit packing into rows -> batches.

Corruption is seeded per document occurrence (run seed, host, index in the
shuffled, repeated stream), so every epoch is corrupted afresh and the
iterator state (`get_state`/`set_state`) resumes bit-identically.
"""

from __future__ import annotations

from typing import Callable

import grain
from grain import experimental as grain_exp
import numpy as np

from tx_jax.data.pipeline import nonempty_batches
from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

EVAL_SEED = 1234  # eval corruption is the same at every evaluation


def special_id(tokenizer: Tokenizer, name: str, purpose: str) -> int:
  if name not in tokenizer.special_ids:
    raise UserError(f"the tokenizer has no {name} token ({purpose}); add it to data.specials "
                    f"(now {list(tokenizer.special_ids)}) in a fresh workdir")
  return tokenizer.special_ids[name]


def regular_vocab(tokenizer: Tokenizer) -> int:
  """How many regular (non-special) token ids the tokenizer has."""
  return tokenizer.vocab_size - len(set(tokenizer.special_ids.values()))


def regular_ids(tokenizer: Tokenizer) -> np.ndarray | None:
  """The regular token ids when the specials are not the last ids (Hugging Face
  vocabularies: BERT's [PAD] is 0, [MASK] 103), else None (ids < regular_vocab)."""
  specials = set(tokenizer.special_ids.values())
  if specials == set(range(tokenizer.vocab_size - len(specials), tokenizer.vocab_size)):
    return None
  return np.asarray([i for i in range(tokenizer.vocab_size) if i not in specials], np.int32)


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


def map_seed(seed: int, shard_index: int) -> int:
  """Per-host corruption seed, so hosts reading different documents at the same
  stream index do not share random draws."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def iterate(docs: grain.MapDataset, to_pieces: Callable, seed: int | None,
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


def train_docs(source: TextSource, seed: int, shard_index: int, shard_count: int,
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


def eval_iterable(ds: grain.IterDataset, source: TextSource):
  return nonempty_batches(
      ds, f"eval data {source.name} yields no example; there is nothing to evaluate")
