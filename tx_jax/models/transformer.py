"""Transformer models: DecoderLM (GPT) and Encoder (BERT-style), plus size tables.

Models return `(logits, out)` where `out` holds named intermediates
("embedded", "block_00", ..., "pre_logits") so evaluators choose a
representation by name instead of re-implementing the model. Losses live in
`tx_jax.objectives`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tx_jax.models.layers import (Embedder, Readout, RelativePositionBias, Stack,
                                  TransformerConfig, attention_mask, default_positions,
                                  make_norm)

Array = jax.Array

# Decoder sizes. `tiny` (with a 1024-piece SentencePiece) trains on 2 CPU cores in minutes; `bench` is the
# benchmark shape; `124m` is GPT-2 small (124,439,808 parameters, tied).
DECODER_SIZES: dict[str, dict] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=128,
                 vocab_size=1024, positions="rope"),
    "bench": dict(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024, max_len=256,
                  vocab_size=256),
    "124m": dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=1024,
                 vocab_size=50257),
}


def make_config(sizes: dict[str, dict], size: str, **overrides) -> TransformerConfig:
  """A TransformerConfig from a size table entry plus field overrides."""
  if size not in sizes:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(sizes)}")
  return TransformerConfig(**{**sizes[size], **overrides}).validate()


class DecoderLM(nn.Module):
  """Causal language model (GPT): tokens (B, T) -> next-token logits (B, T, V)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, decode: bool = False,
               deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    cfg = self.cfg
    positions = default_positions(tokens) if positions is None else positions
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    # In decode mode each attention layer builds its mask from the KV cache.
    mask = None if decode else attention_mask(segment_ids, segment_ids, causal=True)
    embedder = Embedder(cfg, name="embedder")
    x = embedder(tokens, positions)                                          # (B, T, D)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    inputs = {"mask": mask, "positions": positions}
    if cfg.positions == "relative":
      inputs["bias"] = self._relative_bias(tokens, positions, decode)
    h, out = Stack(cfg, cfg.num_layers, causal=True, decode=decode,
                   deterministic=deterministic, name="decoder")(x, inputs)
    h = make_norm(cfg, "final_norm")(h)
    logits = embedder.attend(h) if cfg.tie_embeddings else Readout(cfg, name="readout")(h)
    out.update(embedded=x, pre_logits=h)
    return logits.astype(jnp.float32), out

  def _relative_bias(self, tokens, positions, decode):
    rel = RelativePositionBias(self.cfg, bidirectional=False, name="relpos")
    if not decode:
      return rel(positions, positions)
    # Decoding: the KV cache holds max_len keys (generate sizes it so).
    return rel(positions, jnp.arange(self.cfg.max_len)[None])


class Encoder(nn.Module):
  """Bidirectional encoder (BERT): tokens (B, T) -> per-token logits (B, T, V).

  `segment_ids` marks padding with 0 (and packed documents with 1, 2, ...);
  padded positions never influence real ones. `out["pre_logits"]` is the
  final hidden state (B, T, D) used for embeddings and classification.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, token_types: Array | None = None,
               deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    cfg = self.cfg
    positions = default_positions(tokens) if positions is None else positions
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    embedder = Embedder(cfg, name="embedder")
    x = embedder(tokens, positions, token_types)
    if not cfg.pre_norm:  # BERT normalises the embeddings
      x = make_norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    inputs = {"mask": attention_mask(segment_ids, segment_ids, causal=False)}
    if cfg.positions == "relative":
      inputs["bias"] = RelativePositionBias(cfg, bidirectional=True, name="relpos")(
          positions, positions)
    inputs["positions"] = positions
    h, out = Stack(cfg, cfg.num_layers, deterministic=deterministic, name="encoder")(x, inputs)
    if cfg.pre_norm:
      h = make_norm(cfg, "final_norm")(h)
    logits = embedder.attend(h) if cfg.tie_embeddings else Readout(cfg, name="readout")(h)
    out.update(embedded=x, pre_logits=h)
    return logits.astype(jnp.float32), out


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def param_shapes(model: nn.Module, seq_len: int, **kwargs):
  """Abstract parameters (no memory) for a model, via jax.eval_shape."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, **kwargs), tokens)
  return variables["params"]


def config_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(TransformerConfig)]
