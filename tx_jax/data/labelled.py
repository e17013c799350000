"""Labelled batches for classification: one truncated, padded row per document.

Text batches, from a source of {"text", "label"} records:
  tokens       int32   (B, T) [<cls>] tokens [<sep>] (specials when the tokenizer has
                       them), left-aligned, zero-padded
  segment_ids  int32   (B, T) 1 on real tokens, 0 on padding
  label        int32   (B,)   class index into the run's label vocabulary
  valid        float32 (B,)   0 on rows that only pad the last eval batch
Image batches are `tx_jax.data.images`' ("image", "valid", "label").

The label vocabulary is the sorted set of the training labels' names; an eval
set is mapped onto it by name. `stratified_split` holds out the same fraction
of every class (seeded), so small classes are represented in the held-out set.
"""

from __future__ import annotations

from collections.abc import Iterator
import re
from typing import Any

import grain
import numpy as np

from tx_jax.data import images
from tx_jax.data.pipeline import SettingsIterator
from tx_jax.data.source import Source, holdout_split
from tx_jax.errors import UserError

# Above this many records a held-out split is random, not stratified: stratifying
# reads every label once.
STRATIFY_LIMIT = 200_000


class IndexSource(Source):
  """Records `indices[i]` of `parent` (a fixed, explicit subset)."""

  def __init__(self, parent: Source, indices, name: str):
    self.parent, self.indices = parent, np.asarray(indices, np.int64)
    self.has_labels, self.label_names = parent.has_labels, parent.label_names
    self.unit = parent.unit
    self.name = name

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.parent[int(self.indices[index])]

  def parent_index(self, index: int) -> int:
    return int(self.indices[index])

  @property
  def stats(self):
    return self.parent.stats


def label_name(source: Source, label) -> str:
  """The name of a record's label: label_names[label] when the source has them."""
  names = source.label_names
  if names is not None and isinstance(label, (int, np.integer)) and 0 <= label < len(names):
    return str(names[int(label)])
  return str(label)


def all_labels(source: Source) -> list[str]:
  """Every record's label name, in order (reads the labels only when it can)."""
  if not source.has_labels:
    raise UserError(f"{source.name} has no labels; classification needs a 'label' column "
                    "(csv / jsonl) or a labelled dataset")
  raw = getattr(source, "labels", None)
  if raw is not None:
    return [label_name(source, v) for v in raw]
  if isinstance(source, IndexSource):
    parent = all_labels(source.parent)
    return [parent[i] for i in source.indices]
  if hasattr(source, "parent_index") and hasattr(source, "parent"):
    parent = all_labels(source.parent)
    return [parent[source.parent_index(i)] for i in range(len(source))]
  return [label_name(source, source[i]["label"]) for i in range(len(source))]


def stratified_split(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
  """(train, eval): round(fraction * n_c) records of every class c held out (at least
  one of each class with 2+ records), chosen by a seeded permutation."""
  if not 0 < fraction < 1:
    raise UserError(f"data.eval_fraction must be in (0, 1), got {fraction}")
  if len(source) > STRATIFY_LIMIT:
    return holdout_split(source, fraction, seed)
  names = np.asarray(all_labels(source))
  rng = np.random.default_rng(seed)
  held = []
  for name in sorted(set(names)):
    members = np.flatnonzero(names == name)
    if len(members) < 2:
      continue
    count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
    held.extend(rng.permutation(members)[:count].tolist())
  held = np.sort(np.asarray(held, np.int64))
  train = np.setdiff1d(np.arange(len(source)), held)
  return (IndexSource(source, train, f"{source.name}[train]"),
          IndexSource(source, held, f"{source.name}[eval]"))


def label_vocabulary(train: Source, min_classes: int = 2) -> list[str]:
  """The label names of a training source: its dataset's own class list when it has one
  (TFDS ClassLabel, image folders, a file's distinct labels), else the sorted distinct
  labels it holds (numbers in numeric order)."""
  if not train.has_labels:
    raise UserError(f"{train.name} has no labels; classification needs a 'label' column "
                    "(csv / jsonl) or a labelled dataset")
  if isinstance(train.label_names, list):
    vocab = [str(v) for v in train.label_names]
  else:
    distinct = set(all_labels(train))
    numeric = all(re.fullmatch(r"-?\d+", v) for v in distinct)
    vocab = sorted(distinct, key=int) if numeric else sorted(distinct)
  if len(vocab) < min_classes:
    raise UserError(f"{train.name} has a single class ({vocab[0]!r}); a classifier needs "
                    f"at least {min_classes} labels")
  return vocab


def label_counts(source: Source, vocab: list[str]) -> list[int]:
  """How many records of `source` carry each label of `vocab` (reads every label)."""
  counts = dict.fromkeys(vocab, 0)
  for name in all_labels(source):
    if name in counts:
      counts[name] += 1
  return [counts[v] for v in vocab]


def check_labels(source: Source, vocab: list[str]):
  """UserError naming a label of `source` that is not in the training vocabulary."""
  known = set(vocab)
  for name in dict.fromkeys(all_labels(source)):
    if name not in known:
      raise UserError(f"eval label {name!r} of {source.name} never occurs in the training data "
                      f"(labels: {', '.join(vocab[:20])}{' ...' if len(vocab) > 20 else ''}); "
                      "drop those records or train on data that has them")


class _EncodeText(grain.transforms.Map):
  """Record -> {"tokens", "segment_ids": int32 (T,), "label": int32, "valid": float32}."""

  def __init__(self, tokenizer, seq_len: int, vocab: list[str] | None, names):
    self.tokenizer, self.seq_len = tokenizer, seq_len
    self.index = {v: i for i, v in enumerate(vocab or [])}
    self.names = names
    ids = getattr(tokenizer, "special_ids", {})
    self.prefix = [ids["<cls>"]] if "<cls>" in ids else []
    self.suffix = [ids["<sep>"]] if "<sep>" in ids else []
    if seq_len - len(self.prefix) - len(self.suffix) < 1:
      raise UserError(f"data.seq_len={seq_len} leaves no room for text")

  def map(self, record):
    room = self.seq_len - len(self.prefix) - len(self.suffix)
    row = self.prefix + list(self.tokenizer.encode(record["text"]))[:room] + self.suffix
    tokens = np.zeros(self.seq_len, np.int32)
    tokens[:len(row)] = row
    label = -1
    if "label" in record and self.index:
      name = label_name(self.names, record["label"])
      label = self.index.get(name, -1)
    return {"tokens": tokens, "segment_ids": (np.arange(self.seq_len) < len(row)).astype(
        np.int32), "label": np.int32(label), "valid": np.float32(1.0)}


class LabelledIterator(SettingsIterator):
  pipeline = "labelled text"


def text_train_iterator(source: Source, tokenizer, seq_len: int, batch_size: int, seed: int,
                        vocab: list[str], shard_index: int = 0,
                        shard_count: int = 1) -> LabelledIterator:
  """Shuffled labelled rows, `batch_size` per batch (this shard's), every epoch reshuffled."""
  if not 0 <= seed < 2**32:
    raise UserError(f"train.seed must be in [0, 2**32), got {seed}")
  if len(source) < max(shard_count, 1):
    raise UserError(f"{source.name} has {len(source)} documents, fewer than the "
                    f"{shard_count} data shards reading it")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None).map(_EncodeText(tokenizer, seq_len, vocab, source))
  ds = ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
  config = {"source": source.name, "num_docs": len(source),
            "tokenizer": tokenizer.fingerprint(), "seq_len": int(seq_len),
            "batch_size": int(batch_size), "seed": int(seed), "labels": list(vocab),
            "shard_index": int(shard_index), "shard_count": int(shard_count)}
  return LabelledIterator(iter(ds), config)


def text_eval_batches(source: Source, tokenizer, seq_len: int, batch_size: int,
                      vocab: list[str] | None) -> Iterator[dict[str, np.ndarray]]:
  """Every document of `source` once, in order; the last batch padded with valid = 0."""
  if len(source) == 0:
    raise UserError(f"eval data {source.name} has no documents")
  ds = grain.MapDataset.source(source).map(_EncodeText(tokenizer, seq_len, vocab, source))
  for batch in ds.to_iter_dataset().batch(batch_size, drop_remainder=False):
    yield pad_batch(batch, batch_size)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads every array to batch_size rows with zeros (label -1, valid 0)."""
  rows = len(batch["valid"])
  if rows == batch_size:
    return batch
  out = {k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
         for k, v in batch.items()}
  if "label" in out:
    out["label"][rows:] = -1
  return out


def remap_labels(source: Source, vocab: list[str]) -> Source:
  """`source` with integer labels indexing `vocab` (by name); see check_labels."""
  return _Remapped(source, vocab)


class _Remapped(Source):
  """Labels of `parent` re-indexed onto a training vocabulary by name."""

  def __init__(self, parent: Source, vocab: list[str]):
    self.parent, self.vocab = parent, list(vocab)
    self.index = {v: i for i, v in enumerate(vocab)}
    self.has_labels, self.label_names = parent.has_labels, list(vocab)
    self.unit, self.name = parent.unit, parent.name

  def __len__(self):
    return len(self.parent)

  def __getitem__(self, index) -> dict[str, Any]:
    record = dict(self.parent[index])
    if "label" in record:
      record["label"] = self.index.get(label_name(self.parent, record["label"]), -1)
    return record

  @property
  def stats(self):
    return self.parent.stats


# ------------------------------------------------------------------ images


class LabelledImageIterator(SettingsIterator):
  pipeline = "labelled image"


def image_train_iterator(source: Source, prep, batch_size: int, seed: int,
                         shard_index: int = 0, shard_count: int = 1,
                         num_threads: int = 0) -> LabelledImageIterator:
  """Shuffled, augmented {"image" (B, S, S, C), "label" (B,), "valid" (B,)}, forever
  (`tx_jax.data.images.image_train_iterator` with the labels)."""
  return images.image_train_iterator(source, prep, batch_size, seed, shard_index,
                                     shard_count, num_threads, labels=True,
                                     iterator_cls=LabelledImageIterator)
