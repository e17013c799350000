"""Masked language modelling (BERT): predict the selected tokens of a corrupted row.

The corruption (which tokens, [MASK] / random / unchanged) happens in the data
pipeline (`tx_jax.data.mlm`); the batch's `weights` mark the selected
positions, so the loss and accuracy are over exactly those. With
sentence_order=True (or sentence_task="sop") a 2-way head at each [CLS] also
predicts whether the piece's two halves were swapped (ALBERT's sentence-order
prediction); with sentence_task="nsp" whether its second segment follows the
first or comes from another document (BERT's next-sentence prediction, the
task of an imported BertForPreTraining's head).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tx_jax.data import mlm
from tx_jax.errors import UserError
from tx_jax.models import Encoder, TransformerConfig
from tx_jax.objectives.base import register
from tx_jax.objectives.text import TextObjective, token_cross_entropy


@register("masked_lm")
class MaskedLM(TextObjective):
  """BERT pretraining on an Encoder; reports masked-token loss and accuracy."""
  topics_defaults = {"config": "bert.py", "seq_len": 128, "batch_size": 32}

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray, *,
               mlm_head: bool = True, sentence_order: bool = False, sentence_task: str = ""):
    """sentence_task: "sop" (ALBERT's sentence order; also `sentence_order=True`),
    "nsp" (BERT's next sentence, as BertForPreTraining's head was trained) or ""."""
    del token_bytes  # bits per byte is not meaningful for masked positions
    if sentence_task not in ("", "sop", "nsp"):
      raise UserError(f"objective_options.sentence_task={sentence_task!r} is not one of "
                      "'sop' (sentence order), 'nsp' (next sentence) or '' (none)")
    self.cfg = model_cfg
    self.sentence_task = sentence_task or ("sop" if sentence_order else "")
    self.sentence_order = bool(self.sentence_task)  # a sentence head and its loss
    self.model = Encoder(model_cfg, mlm_head=mlm_head, sentence_head=self.sentence_order)

  def settings(self, config) -> mlm.MaskedLMSettings:
    """The masking settings of a run config (rates from config.data, ids from the tokenizer)."""
    d = config.data
    return mlm.MaskedLMSettings.from_tokenizer(
        self.tokenizer, mask_rate=d.mask_rate, mask_token_rate=d.mask_token_rate,
        random_token_rate=d.random_token_rate, sentence_order=self.sentence_task == "sop",
        next_sentence=self.sentence_task == "nsp")

  def train_iterator(self, config, data):
    self._settings = self.settings(config)
    return super().train_iterator(config, data)

  def eval_batches(self, config, data):
    self._settings = self.settings(config)
    return super().eval_batches(config, data)

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    """Packed, freshly masked pieces (`tx_jax.data.mlm`)."""
    return mlm.mlm_train_iterator(source, self.tokenizer, seq_len, batch_size, seed,
                                        self._settings, shard_index, shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    """The held-out documents, masked the same way at every call."""
    return mlm.mlm_eval_batches(source, self.tokenizer, seq_len, batch_size,
                                      self._settings)

  def loss_fn(self, params, batch, rng, train: bool):
    logits, out = self.model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], token_types=batch.get("token_types"),
        deterministic=not train, rngs={"dropout": rng} if train else None)   # (B, T, V)
    nll, correct = token_cross_entropy(logits, batch["targets"], batch["weights"])
    weight = jnp.sum(batch["weights"])
    sums = {"nll": nll, "correct": correct, "weight": weight}
    loss = nll / jnp.maximum(weight, 1.0)
    if self.sentence_order:
      sw = batch["sentence_weights"]
      s_nll, s_correct = token_cross_entropy(out["sentence_logits"], batch["sentence_labels"],
                                                sw)
      prefix = "next_sentence" if self.sentence_task == "nsp" else "sentence"
      sums.update({f"{prefix}_nll": s_nll, f"{prefix}_correct": s_correct,
                   f"{prefix}_weight": jnp.sum(sw)})
      loss = loss + s_nll / jnp.maximum(jnp.sum(sw), 1.0)
    return loss, sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    metrics = {"loss": float(sums["nll"]) / w, "accuracy": float(sums["correct"]) / w}
    for prefix, name in (("sentence", "sentence_order"), ("next_sentence", "next_sentence")):
      if f"{prefix}_weight" in sums:
        sw = max(float(sums[f"{prefix}_weight"]), 1.0)
        metrics.update({f"{name}_loss": float(sums[f"{prefix}_nll"]) / sw,
                        f"{name}_accuracy": float(sums[f"{prefix}_correct"]) / sw})
    return metrics

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random rows, every position predicted (the FLOPs of a full row)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    batch = {"inputs": rng.integers(0, vocab, shape, dtype=np.int32),
             "targets": rng.integers(0, vocab, shape, dtype=np.int32),
             "weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()}
    if self.sentence_order:
      batch.update(token_types=np.zeros(shape, np.int32),
                   sentence_labels=rng.integers(0, 2, shape, dtype=np.int32),
                   sentence_weights=np.zeros(shape, np.float32))
    return batch
