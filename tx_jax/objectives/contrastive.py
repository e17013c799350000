"""Span-contrastive encoder: two spans of one document should embed alike.

Every row pair (a_i, b_i) of a batch holds two random spans of one document
(`tx_jax.data.spans`). The bidirectional Encoder embeds each span as the mean
of its final hidden states over real tokens (the pooling `tx-jax embed` uses
by default), l2-normalised, and the loss is the symmetric InfoNCE over the
batch at temperature tau (van den Oord et al. 2018; spans of a document as its
views, as in DeCLUTR, Giorgi et al. 2021): every other document of the batch
is a negative. Spans of one document share what it is about more than their
exact words, so matching them teaches the encoder topic-level similarity,
which is what clustering needs (benchmarks/stdlib_docstrings.py). Dropout
(SimCSE, Gao et al. 2021) also makes the two views differ when a document is
shorter than a span.

Negatives are the pairs of the same (micro-)batch: with gradient accumulation
each micro-batch is its own contrast set.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.data import spans
from tx_jax.models import Encoder, TransformerConfig
from tx_jax.objectives.base import register
from tx_jax.objectives.text import TextObjective, pool

NEG = -1e9  # Logit of a padding column: never the answer, no NaN in the softmax.


def pooled(hidden, segment_ids):
  """Mean of hidden (B, T, D) over real tokens, l2-normalised -> (B, D) float32."""
  mean = pool(hidden, segment_ids, "mean")
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)


@register("contrastive")
class SpanContrastive(TextObjective):
  """InfoNCE between two spans of each document, on an Encoder."""
  # 64-token spans, 64 pairs per batch: each pair has 63 negatives.
  topics_defaults = {"config": "contrastive.py", "seq_len": 64, "batch_size": 64}

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray | None = None, *,
               temperature: float = 0.05):
    del token_bytes  # No per-byte metric for a contrastive loss.
    self.cfg = model_cfg
    self.temperature = temperature
    self.model = Encoder(model_cfg)

  def units_per_batch(self, config) -> int:
    return 2 * config.train.batch_size * config.data.seq_len   # both spans of each pair

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    """Pairs of random spans of each document (`tx_jax.data.spans`)."""
    return spans.span_train_iterator(source, self.tokenizer, seq_len, batch_size, seed,
                                     self.min_span, shard_index=shard_index,
                                     shard_count=shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    """Span pairs of the held-out documents, the same at every call."""
    return spans.span_eval_batches(source, self.tokenizer, seq_len, batch_size, self.min_span)

  def train_iterator(self, config, data):
    self.min_span = config.data.get("min_span", 8)
    return super().train_iterator(config, data)

  def eval_batches(self, config, data):
    self.min_span = config.data.get("min_span", 8)
    return super().eval_batches(config, data)

  def loss_fn(self, params, batch, rng, train: bool):
    # Both sides in one call: (2B, T); each row draws its own dropout mask.
    tokens = jnp.concatenate([batch["inputs_a"], batch["inputs_b"]])
    segments = jnp.concatenate([batch["segment_ids_a"], batch["segment_ids_b"]])
    _, out = self.model.apply({"params": params}, tokens, segment_ids=segments,
                              deterministic=not train, rngs={"dropout": rng} if train else None)
    z = pooled(out["pre_logits"], segments)                                 # (2B, D)
    za, zb = jnp.split(z, 2)
    valid = batch["weights"]                                                # (B,)
    logits = za @ zb.T / self.temperature                                   # (B, B)
    logits = jnp.where((valid[:, None] > 0) & (valid[None, :] > 0), logits, NEG)
    labels = jnp.arange(logits.shape[0])
    nll = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) +
           optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)) / 2   # (B,)
    correct = ((jnp.argmax(logits, 1) == labels).astype(jnp.float32) +
               (jnp.argmax(logits, 0) == labels).astype(jnp.float32)) / 2
    weight = jnp.sum(valid)
    sums = {"nll": jnp.sum(nll * valid), "correct": jnp.sum(correct * valid), "weight": weight}
    return sums["nll"] / jnp.maximum(weight, 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    """loss (nats per pair) and accuracy (the partner span is the nearest, both ways)."""
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["nll"]) / w, "accuracy": float(sums["correct"]) / w}

  def flops_per_unit(self, params, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T, as for the LMs (an upper bound here:
    the vocabulary readout is never used, and XLA drops it)."""
    return super().flops_per_unit(params, seq_len)

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random full-length span pairs."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    return {"inputs_a": rng.integers(0, vocab, shape, dtype=np.int32),
            "inputs_b": rng.integers(0, vocab, shape, dtype=np.int32),
            "segment_ids_a": np.ones(shape, np.int32), "segment_ids_b": np.ones(shape, np.int32),
            "weights": np.ones(batch_size, np.float32)}
