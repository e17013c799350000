"""Supervised seq2seq on (input, target) pairs, e.g. translation fine-tuning.

The model, loss and metrics are span corruption's (an EncoderDecoder with
teacher forcing); only the data differs: `file:` .jsonl / .csv with `input`
and `target` columns, packed by `tx_jax.data.span_corruption`.
"""

from __future__ import annotations

from tx_jax.data import pairs, sources
from tx_jax.data import span_corruption as span_data
from tx_jax.objectives.base import Data, register
from tx_jax.objectives.span_corruption import SpanCorruption
from tx_jax.objectives.text import EVAL_FRACTION


@register("seq2seq")
class Seq2Seq(SpanCorruption):
  """Supervised seq2seq on (input, target) pairs."""

  @classmethod
  def open_data(cls, config) -> Data:
    d = config.data
    train = pairs.open_pair_source(d.source)
    if d.eval_source:
      evaluation = pairs.open_pair_source(d.eval_source)
    else:
      train, evaluation = sources.holdout_split(train, EVAL_FRACTION, config.train.seed)
    return Data(train, evaluation)

  @classmethod
  def tokenizer_texts(cls, data: Data):
    """A tokenizer trained on both sides of the pairs."""
    return sources.ListSource([data.train[i][k] for i in range(len(data.train))
                               for k in ("input", "target")])

  @classmethod
  def targets_length(cls, config, tok) -> int:
    return config.data.targets_len or config.data.seq_len

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    """Packed (input, target) pairs, long sides truncated."""
    return span_data.pair_train_iterator(source, self.tokenizer, seq_len, self.targets_len,
                                         batch_size, seed, self._settings, shard_index,
                                         shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    """The held-out pairs, in order."""
    return span_data.pair_eval_batches(source, self.tokenizer, seq_len, self.targets_len,
                                       batch_size, self._settings)
