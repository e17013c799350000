"""Masked language modelling (BERT): predict the selected tokens of a corrupted row.

The corruption (which tokens, [MASK] / random / unchanged) happens in the data
pipeline (`tx_jax.data.denoising`); the batch's `weights` mark the selected
positions, so the loss and accuracy are over exactly those. With
sentence_order=True a 2-way head at each [CLS] also predicts whether the
piece's two halves were swapped (ALBERT's sentence-order prediction).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.models import Encoder, TransformerConfig, count_params


def weighted_cross_entropy(logits, targets, weights):
  """Summed weighted cross-entropy (nats) and weighted correct count."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)    # (B, T)
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return jnp.sum(nll * weights), jnp.sum(correct)


class MaskedLM:
  """BERT pretraining on an Encoder; reports masked-token loss and accuracy."""
  data_kind = "masked_lm"
  unit = "tokens"

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray, *,
               mlm_head: bool = True, sentence_order: bool = False):
    del token_bytes  # bits per byte is not meaningful for masked positions
    self.cfg = model_cfg
    self.sentence_order = sentence_order
    self.model = Encoder(model_cfg, mlm_head=mlm_head, sentence_head=sentence_order)

  def init_params(self, rng, seq_len: int):
    return self.model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  def loss_fn(self, params, batch, rng, train: bool):
    logits, out = self.model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], token_types=batch.get("token_types"),
        deterministic=not train, rngs={"dropout": rng} if train else None)   # (B, T, V)
    nll, correct = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    weight = jnp.sum(batch["weights"])
    sums = {"nll": nll, "correct": correct, "weight": weight}
    loss = nll / jnp.maximum(weight, 1.0)
    if self.sentence_order:
      sw = batch["sentence_weights"]
      s_nll, s_correct = weighted_cross_entropy(out["sentence_logits"], batch["sentence_labels"],
                                                sw)
      sums.update(sentence_nll=s_nll, sentence_correct=s_correct, sentence_weight=jnp.sum(sw))
      loss = loss + s_nll / jnp.maximum(jnp.sum(sw), 1.0)
    return loss, sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    metrics = {"loss": float(sums["nll"]) / w, "accuracy": float(sums["correct"]) / w}
    if "sentence_weight" in sums:
      sw = max(float(sums["sentence_weight"]), 1.0)
      metrics.update(sentence_order_loss=float(sums["sentence_nll"]) / sw,
                     sentence_order_accuracy=float(sums["sentence_correct"]) / sw)
    return metrics

  def flops_per_token(self, params, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (every position is computed)."""
    return 6 * count_params(params) + 12 * self.cfg.num_layers * self.cfg.d_model * seq_len
