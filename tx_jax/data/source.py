"""The one base class of every data source, text or image, and held-out splits.

A source is random access: `len(src)` and `src[i] -> record dict` ("text" or
"image", plus "label" when `src.has_labels`, optional "id"); grain reads it
through `__len__` / `__getitem__`. When `src.label_names` is a list, labels
are ints indexing it; otherwise they are the raw values (int or str).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tx_jax.errors import UserError


class Source:
  """Random-access records; grain reads it through `__len__`/`__getitem__`."""

  name: str = "source"
  unit: str = "records"  # what __repr__ counts: docs, images
  has_labels: bool = False
  label_names: list[str] | None = None

  @property
  def stats(self) -> dict[str, int]:
    """Counts of what the DocPolicy did while reading (empty if nothing was counted)."""
    return getattr(self, "_stats", {})

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r}, {len(self)} {self.unit})"


class SubsetSource(Source):
  """Documents `perm(offset + i)` of `parent`, i < length, for a seeded
  permutation `perm` of the parent's indices (grain's index_shuffle: nothing
  computed up front, and picklable for grain worker processes)."""

  def __init__(self, parent: Source, offset: int, length: int, seed: int,
               name: str):
    self.parent, self.offset, self.length, self.seed = (
        parent, offset, length, seed)
    self.has_labels = parent.has_labels
    self.label_names = parent.label_names
    self.name = name
    self._known = None

  def __len__(self):
    return self.length

  def parent_index(self, index: int) -> int:
    from grain import experimental as grain_exp  # pylint: disable=g-import-not-at-top
    if not 0 <= index < self.length:
      raise IndexError(index)
    # Remembered once computed: one index_shuffle call costs tens of microseconds,
    # more than reading an in-memory record, and training visits every index each
    # epoch (8 bytes per record, filled as records are first read).
    if self._known is None:
      self._known = np.full(self.length, -1, np.int64)
    known = int(self._known[index])
    if known < 0:
      known = grain_exp.index_shuffle(self.offset + index, max_index=len(self.parent) - 1,
                                      seed=self.seed, rounds=4)
      self._known[index] = known
    return known

  def __getitem__(self, index):
    return self.parent[self.parent_index(index)]

  @property
  def stats(self):
    return self.parent.stats


def holdout_split(source: Source, eval_fraction: float = 0.05,
                  seed: int = 0) -> tuple[Source, Source]:
  """(train, eval): a deterministic random `eval_fraction` of docs held out.

  Lazy: a seeded permutation of the indices (grain's index_shuffle), computed
  for a document when it is first read and then remembered (8 bytes each), so
  opening a TFDS set of tens of millions of documents costs nothing up front.
  """
  n = len(source)
  if not 0 < eval_fraction < 1:
    raise UserError(f"eval fraction must be in (0, 1), got {eval_fraction}")
  if n < 2:
    raise UserError(
        f"{source.name} has {n} document(s); holding some out for eval needs "
        "at least 2 (or give a separate eval source)")
  n_eval = min(n - 1, max(1, int(round(n * eval_fraction))))
  # Positions [0, n_eval) of the permutation are eval, the rest train.
  eval_src = SubsetSource(source, 0, n_eval, seed, f"{source.name}[eval]")
  train_src = SubsetSource(source, n_eval, n - n_eval, seed,
                           f"{source.name}[train]")
  return train_src, eval_src
