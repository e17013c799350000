"""Causal language modelling (GPT): predict each next token of packed rows."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from tx_jax.data import pipeline
from tx_jax.models import DecoderLM, TransformerConfig
from tx_jax.objectives.base import register
from tx_jax.objectives.text import TextObjective, token_cross_entropy


@register("causal_lm")
class CausalLM(TextObjective):
  """Next-token prediction on packed rows; reports bits per UTF-8 byte.

  `token_bytes[v]` is how many UTF-8 bytes token v stands for, so bits per
  byte is comparable across tokenizers.
  """
  topics_defaults = {"config": "gpt.py", "seq_len": 128, "batch_size": 16}

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray):
    self.cfg = model_cfg
    self.model = DecoderLM(model_cfg)
    self.token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    """Packed LM rows of documents (`tx_jax.data.pipeline`)."""
    return pipeline.lm_train_iterator(source, self.tokenizer, seq_len, batch_size, seed,
                                      shard_index=shard_index, shard_count=shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    """Every held-out document once, packed in order."""
    return pipeline.lm_eval_batches(source, self.tokenizer, seq_len, batch_size)

  def loss_fn(self, params, batch, rng, train: bool):
    logits, _ = self.model.apply(
        {"params": params}, batch["inputs"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], deterministic=not train,
        rngs={"dropout": rng} if train else None)                           # (B, T, V)
    weights = batch["weights"]
    nll, correct = token_cross_entropy(logits, batch["targets"], weights)
    weight = jnp.sum(weights)
    sums = {"nll": nll, "weight": weight, "correct": correct,
            "bytes": jnp.sum(jnp.take(self.token_bytes, batch["targets"]) * weights)}
    return nll / jnp.maximum(weight, 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["nll"]) / w, "accuracy": float(sums["correct"]) / w,
            "bits_per_byte": float(sums["nll"]) / math.log(2) / max(float(sums["bytes"]), 1.0)}

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random packed rows of one document each."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ones.shape).copy(),
            "weights": ones.astype(np.float32)}

  def generate(self, trained, request: dict) -> list[str]:
    """Samples continuations of the prompt with the KV cache."""
    from tx_jax.generate import generate_text  # pylint: disable=g-import-not-at-top
    from tx_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    if request.get("prompt") is None:
      raise UserError("a decoder continues a prompt; pass --prompt TEXT")
    if request.get("beam_size", 1) != 1:
      raise UserError("--beam-size is for encoder-decoder workdirs; decoders sample")
    lines = []
    for text in generate_text(trained, request["prompt"],
                              max_new_tokens=request.get("max_new_tokens"),
                              temperature=request.get("temperature", 0.8),
                              top_k=request.get("top_k", 0), top_p=request.get("top_p", 0.95),
                              seed=request.get("seed", 0),
                              num_samples=request.get("num_samples", 1)):
      lines += [request["prompt"] + text, "-" * 40]
    return lines
