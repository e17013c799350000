"""grain input pipelines: tokenize, chunk, pack, batch, per-host shard.

Causal LM batches are dicts of numpy arrays, each [batch, seq_len]:
  inputs      int32  tokens fed to the model
  targets     int32  the next token of the same document
  segment_ids int32  1, 2, 3, ... per packed piece within a row; 0 = padding
  positions   int32  position within the piece (0-based)
  weights     float32 1.0 where the target is real, 0.0 on padding

A document of n tokens gives n - 1 (input, target) pairs. Longer documents are
cut into pieces of seq_len + 1 tokens that overlap by one token, so every pair
lands in exactly one piece; pieces are first-fit packed into rows and never
split. Positions restart at 0 in every piece: a piece only attends to itself
(segment mask), and positions stay < seq_len <= the model's max_len.

Train iterators are grain `DatasetIterator`s: `get_state()` is a JSON-able dict
and `set_state(state)` resumes bit-identically, so they work with
`grain.checkpoint.CheckpointSave/CheckpointRestore` in orbax.
"""

from collections.abc import Iterator
from typing import Any

import grain
from grain import experimental as grain_exp
import numpy as np

from tx_jax.data.sources import TextSource
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.errors import UserError

LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


class _Tokenize(grain.transforms.Map):
  """{"text": str, ...} -> int32 [n] token ids."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, element):
    return np.asarray(self.tokenizer.encode(element["text"]), np.int32)


class _ChunkDocument(grain_exp.FlatMapTransform):
  """int32 [n] -> pieces {"inputs", "targets": int32 [<= seq_len]}.

  Piece k covers tokens [k * seq_len, (k + 1) * seq_len + 1): consecutive
  pieces share one token, so the n - 1 pairs are split without loss.
  """

  def __init__(self, seq_len: int, max_empty_run: int | None = None):
    self.seq_len = seq_len
    self.max_fan_out = 1 << 30  # Only used by MapDataset flat maps.
    # Training repeats forever: if no document has 2+ tokens the packer would
    # spin without ever emitting. Counting a run of empty documents longer
    # than one epoch catches that (single-threaded, so a plain counter).
    self.max_empty_run = max_empty_run
    self._empty_run = 0

  def flat_map(self, tokens):
    n = len(tokens)
    pieces = [
        {"inputs": tokens[s:min(s + self.seq_len, n - 1)],
         "targets": tokens[s + 1:s + self.seq_len + 1]}
        for s in range(0, n - 1, self.seq_len)
    ]
    if self.max_empty_run is not None:
      self._empty_run = 0 if pieces else self._empty_run + 1
      if self._empty_run > self.max_empty_run:
        raise UserError(
            "no document of the training data has 2 or more tokens, so there "
            "is nothing to predict; check data.source")
    return pieces


class _Collate:
  """Packed rows -> one batch [batch_size, seq_len], zero rows padding a short
  last batch (weights 0 there)."""

  def __init__(self, batch_size: int, seq_len: int):
    self.batch_size, self.seq_len = batch_size, seq_len

  def __call__(self, rows):
    shape = (self.batch_size, self.seq_len)
    batch = {k: np.zeros(shape, np.int32) for k in LM_KEYS[:-1]}
    for i, row in enumerate(rows):
      batch["inputs"][i] = row["inputs"]
      batch["targets"][i] = row["targets"]
      batch["segment_ids"][i] = row["inputs_segment_ids"]
      batch["positions"][i] = row["inputs_positions"]
    batch["weights"] = (batch["segment_ids"] > 0).astype(np.float32)
    return batch


def _check_sizes(source: TextSource, seq_len: int, batch_size: int):
  if int(seq_len) < 1:
    raise UserError(f"data.seq_len must be >= 1, got {seq_len}")
  if int(batch_size) < 1:
    raise UserError(f"batch size per host must be >= 1, got {batch_size}")
  if len(source) == 0:
    raise UserError(f"data source {source.name} has no documents")


def _packed_batches(ds: grain.MapDataset, tokenizer: Tokenizer, seq_len: int,
                    batch_size: int, *, seed: int, shuffle_bins: bool,
                    num_packing_bins: int, num_threads: int,
                    max_empty_run: int | None) -> grain.IterDataset:
  """Documents (MapDataset of records) -> IterDataset of LM batches."""
  ds = ds.map(_Tokenize(tokenizer))
  # num_threads=0 reads in the calling thread: deterministic either way (grain
  # keeps order), and cheapest on small hosts where tokenizing is the work.
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=64 if num_threads else 0))
  ds = grain_exp.FlatMapIterDataset(ds, _ChunkDocument(seq_len, max_empty_run))
  ds = grain_exp.FirstFitPackIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle_bins)
  return ds.batch(batch_size, batch_fn=_Collate(batch_size, seq_len))


class SettingsIterator(grain.DatasetIterator):
  """A grain iterator over batches whose state also records the pipeline
  settings, so resuming with different data settings fails loudly."""
  pipeline = "a"  # names the pipeline in the error for a foreign state

  def __init__(self, parent: grain.DatasetIterator, config: dict[str, Any]):
    super().__init__(parent)
    self.config = config

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"config": dict(self.config), "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "grain" not in state:
      raise UserError(
          f"the saved data iterator state is not from tx_jax's {self.pipeline} pipeline; "
          "start from a fresh workdir")
    saved = state.get("config", {})
    changed = sorted(k for k in set(saved) | set(self.config)
                     if saved.get(k) != self.config.get(k))
    if changed:
      diffs = ", ".join(
          f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in changed)
      raise UserError(
          f"data settings changed since the checkpoint ({diffs}); restore them "
          "or train in a fresh workdir")
    self._parent.set_state(state["grain"])

  def __str__(self):
    return f"{type(self).__name__}({self.config})"


class LMIterator(SettingsIterator):
  pipeline = "LM"


def lm_train_iterator(
    source: TextSource,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    *,
    num_epochs: int | None = None,
    num_packing_bins: int | None = None,
    num_threads: int = 0,
) -> LMIterator:
  """Shuffled, packed causal-LM batches [batch_size, seq_len], forever.

  batch_size is per host; this host reads documents shard_index::shard_count.
  Each epoch is reshuffled (deterministically from seed). num_epochs=None
  repeats forever; an int stops after that many epochs (last batch padded).
  num_packing_bins (default batch_size) rows are filled at once: more bins,
  less padding. num_threads > 0 reads/tokenizes documents in that many grain
  threads (same batches, only faster when reading is I/O bound).
  """
  _check_sizes(source, seq_len, batch_size)
  if not 0 <= shard_index < shard_count:
    raise UserError(
        f"shard index {shard_index} is outside 0..{shard_count - 1}")
  if not 0 <= seed < 2**32:
    raise UserError(f"train.seed must be in [0, 2**32), got {seed}")
  if len(source) < shard_count:
    raise UserError(
        f"{source.name} has {len(source)} documents, fewer than the "
        f"{shard_count} hosts reading it; use more data or fewer hosts")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  docs_per_epoch = len(ds)
  # Shuffle before repeat: grain folds the epoch into the seed, so each epoch
  # has its own order and elements of different epochs are not mixed.
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = _packed_batches(
      ds, tokenizer, seq_len, batch_size, seed=seed, shuffle_bins=True,
      num_packing_bins=num_packing_bins or batch_size, num_threads=num_threads,
      max_empty_run=docs_per_epoch if num_epochs is None else None)
  config = {
      "source": source.name, "num_docs": len(source),
      "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
      "batch_size": int(batch_size), "seed": int(seed),
      "shard_index": int(shard_index), "shard_count": int(shard_count),
      "num_packing_bins": int(num_packing_bins or batch_size),
  }
  return LMIterator(iter(ds), config)


class ConcatRows(grain.DatasetIterator):
  """Train iterators side by side: each batch stacks their batches' rows in order.

  A process that reads data shards k..k+m-1 of S yields exactly the rows those
  shards contribute to the global batch, so the global batch does not depend
  on how many processes share the S shards.
  """

  def __init__(self, iterators: list[grain.DatasetIterator]):
    super().__init__(list(iterators))

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._parents]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or len(state.get("shards", ())) != len(self._parents):
      raise UserError(
          "the saved data iterator state was written with a different number of data "
          "shards per process; restore data.shards and the process count, or start "
          "from a fresh workdir")
    for it, shard_state in zip(self._parents, state["shards"]):
      it.set_state(shard_state)


def lm_eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int,
                    batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over every document of `source`, in order.

  Same packing and keys as training; every target token appears exactly once
  with weight 1; the last batch is padded with all-zero rows.
  """
  _check_sizes(source, seq_len, batch_size)  # Now, not at the first next().
  ds = _packed_batches(
      grain.MapDataset.source(source), tokenizer, seq_len, batch_size, seed=0,
      shuffle_bins=False, num_packing_bins=batch_size, num_threads=0,
      max_empty_run=None)

  return nonempty_batches(ds, f"eval data {source.name} has no document with 2 or more tokens; "
                              "there is nothing to evaluate")


def nonempty_batches(batches, empty_message: str) -> Iterator[dict[str, np.ndarray]]:
  """Yields `batches`; a pass that yields none is a user error (`empty_message`)."""
  count = 0
  for batch in batches:
    count += 1
    yield batch
  if not count:
    raise UserError(empty_message)
