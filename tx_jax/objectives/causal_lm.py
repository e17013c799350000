"""Causal language modelling (GPT): predict each next token."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.models import DecoderLM, TransformerConfig, count_params


def token_cross_entropy(logits, targets, weights):
  """Summed weighted cross-entropy (nats) and correct-prediction count."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)   # (B, T)
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return jnp.sum(nll * weights), jnp.sum(correct)


class CausalLM:
  """Next-token prediction on packed rows; reports bits per UTF-8 byte.

  `token_bytes[v]` is how many UTF-8 bytes token v stands for, so bits per
  byte is comparable across tokenizers.
  """
  data_kind = "lm"
  unit = "tokens"

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray):
    self.cfg = model_cfg
    self.model = DecoderLM(model_cfg)
    self.token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def init_params(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens)["params"]

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

  def flops_per_token(self, params, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (nanoGPT / PaLM appendix B)."""
    n = count_params(params)
    return 6 * n + 12 * self.cfg.num_layers * self.cfg.d_model * seq_len
