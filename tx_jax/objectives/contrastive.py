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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.models import Encoder, TransformerConfig, count_params

NEG = -1e9  # Logit of a padding column: never the answer, no NaN in the softmax.


def pooled(hidden, segment_ids):
  """Mean of hidden (B, T, D) over real tokens, l2-normalised -> (B, D) float32."""
  real = (segment_ids > 0)[..., None]
  mean = jnp.sum(jnp.where(real, hidden.astype(jnp.float32), 0.0), axis=1) / jnp.maximum(
      jnp.sum(real, axis=1), 1)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)


class SpanContrastive:
  """InfoNCE between two spans of each document, on an Encoder."""
  data_kind = "span_pairs"
  unit = "tokens"

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray | None = None, *,
               temperature: float = 0.05):
    del token_bytes  # No per-byte metric for a contrastive loss.
    self.cfg = model_cfg
    self.temperature = temperature
    self.model = Encoder(model_cfg)

  def init_params(self, rng, seq_len: int):
    return self.model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

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

  def flops_per_token(self, params, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T, as for the LMs (an upper bound here:
    the vocabulary readout is never used, and XLA drops it)."""
    return 6 * count_params(params) + 12 * self.cfg.num_layers * self.cfg.d_model * seq_len
