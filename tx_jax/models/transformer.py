"""Transformer models: DecoderLM (GPT), Encoder (BERT) and EncoderDecoder (T5), plus size tables.

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

from tx_jax.models.layers import (ACTIVATIONS, Embedder, Projection, Readout,
                                  RelativePositionBias, Stack, TransformerConfig, attention_mask,
                                  default_positions, make_norm)

Array = jax.Array

# Decoder sizes. `tiny` (with a 1024-piece SentencePiece) trains on 2 CPU cores in minutes; `bench` is the
# benchmark shape; `124m` is GPT-2 small (124,439,808 parameters, tied); `1b` is GPT-3 XL's
# depth and width (24 layers, d 2048) with 128-wide heads and a 2048 context: 1,315,723,264
# parameters, tied.
DECODER_SIZES: dict[str, dict] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=128,
                 vocab_size=1024, positions="rope"),
    "bench": dict(num_layers=4, d_model=256, num_heads=4, mlp_dim=1024, max_len=256,
                  vocab_size=256),
    "124m": dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=1024,
                 vocab_size=50257),
    "1b": dict(num_layers=24, d_model=2048, num_heads=16, mlp_dim=8192, max_len=2048,
               vocab_size=50257),
}


# Encoder sizes. `base` is BERT-base (Devlin et al. 2019): post-LN, token types,
# 512 learned positions, WordPiece-sized vocabulary; 110,106,428 parameters with
# the MLM and sentence heads (as HF BertForPreTraining), 108,891,648 without.
# `tiny` (bytes + 4 specials) uses rotary positions: with learned ones it needs
# several times the steps to find neighbouring bytes (0.25 vs 0.44 held-out
# masked-byte accuracy after 600 vs 300 steps on python-docs).
ENCODER_SIZES: dict[str, dict] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=128,
                 vocab_size=260, type_vocab_size=2, pre_norm=False, norm_eps=1e-12,
                 positions="rope"),
    "base": dict(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=512,
                 vocab_size=30522, type_vocab_size=2, pre_norm=False, norm_eps=1e-12),
}

# Encoder-decoder sizes. `base` is the original T5-base (Raffel et al. 2020):
# 12 + 12 pre-RMSNorm layers without biases, ReLU MLP, relative position bias
# (32 buckets, one table per stack), one embedding shared by encoder, decoder
# and the readout: 222,903,552 parameters (as HF t5-base).
_T5_STYLE = dict(positions="relative", norm="rmsnorm", activation="relu", use_bias=False,
                 relative_buckets=32, relative_max_distance=128)
ENC_DEC_SIZES: dict[str, dict] = {
    "tiny": dict(num_layers=2, num_encoder_layers=3, d_model=128, num_heads=4, mlp_dim=512,
                 max_len=128, vocab_size=358, **_T5_STYLE),
    "base": dict(num_layers=12, num_encoder_layers=12, d_model=768, num_heads=12,
                 mlp_dim=3072, max_len=512, vocab_size=32128, **_T5_STYLE),
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
    """tokens (B, T) -> (logits (B, T, V) float32, out).

    out: "embedded", "block_00", ... (B, T, D) (no per-block entries with
    scan_layers) and "pre_logits" (B, T, D), after the final norm.
    positions / segment_ids (B, T): packed documents (segment 0 = padding).
    decode=True reads and writes the "cache" collection (see generate.sample).
    """
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

  mlm_head: BERT's transform (dense, cfg.activation, norm) before the tied readout, plus
    an output bias. sentence_head: BERT's pooler (dense, tanh) and a 2-way
    classifier, applied at every position: `out["sentence_logits"]` (B, T, 2);
    losses read it at the [CLS] positions.
  """
  cfg: TransformerConfig
  mlm_head: bool = False
  sentence_head: bool = False

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, token_types: Array | None = None,
               deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """tokens (B, T) -> (logits (B, T, V) float32, out).

    out: "embedded", "block_00", ..., "pre_logits" (B, T, D), and
    "sentence_logits" (B, T, 2) with sentence_head. token_types (B, T): BERT's
    segment A/B ids when cfg.type_vocab_size > 0.
    """
    cfg = self.cfg
    positions = default_positions(tokens) if positions is None else positions
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if cfg.type_vocab_size and token_types is None:
      token_types = jnp.zeros_like(tokens)  # BERT's default: every token is type 0
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
    out.update(embedded=x, pre_logits=h)
    # D x D kernels name their output axis "embed_out": one mesh axis per dim.
    dense = lambda name: Projection(cfg, (cfg.d_model,), ("embed", "embed_out"), name=name)
    y = h
    if self.mlm_head:
      y = make_norm(cfg, "mlm_norm")(ACTIVATIONS[cfg.activation](dense("mlm_dense")(h)))
    logits = embedder.attend(y) if cfg.tie_embeddings else Readout(cfg, name="readout")(y)
    if self.mlm_head:
      logits = logits + self.param("mlm_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), cfg.params_dtype)
    if self.sentence_head:
      pooled = jnp.tanh(dense("pooler")(h))
      out["sentence_logits"] = Projection(cfg, (2,), ("embed", "classes"),
                                          name="sentence_classifier")(pooled).astype(jnp.float32)
    return logits.astype(jnp.float32), out


class EncoderDecoder(nn.Module):
  """Encoder-decoder (T5): inputs (B, S), decoder inputs (B, T) -> logits (B, T, V).

  Segment ids mark packed examples (0 = padding): encoder tokens attend within
  their example, decoder tokens causally within theirs and, across, to their
  own example's encoder tokens. `encode` and `decode` run the halves alone
  (`model.apply(..., method="encode")`); `decode(..., decode=True)` keeps a
  KV cache of the decoder's self-attention in the "cache" collection, of
  cfg.max_len positions (see generate.init_encdec_cache).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, inputs: Array | None, decoder_inputs: Array | None, *,
               inputs_positions: Array | None = None, inputs_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_segment_ids: Array | None = None, encoded: Array | None = None,
               decode: bool = False, deterministic: bool = True
               ) -> tuple[Array | None, dict[str, Array]]:
    """inputs (B, S), decoder_inputs (B, T) -> (logits (B, T, V) float32, out).

    out: "encoder/block_NN", "encoded" (B, S, D), "decoder/block_NN" and
    "pre_logits" (B, T, D). decoder_inputs=None runs the encoder only (logits
    None); `encoded` skips the encoder.
    """
    cfg = self.cfg
    drop = lambda x: nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    embedder = Embedder(cfg, name="embedder")
    source = inputs if encoded is None else encoded[..., 0]
    if inputs_segment_ids is None:
      inputs_segment_ids = jnp.ones(source.shape[:2], jnp.int32)
    out = {}

    if encoded is None:  # --- encoder
      positions = default_positions(inputs) if inputs_positions is None else inputs_positions
      x = embedder(inputs, positions)                                        # (B, S, D)
      if not cfg.pre_norm:
        x = make_norm(cfg, "encoder_embed_norm")(x)
      enc = {"mask": attention_mask(inputs_segment_ids, inputs_segment_ids, causal=False),
             "positions": positions}
      if cfg.positions == "relative":
        enc["bias"] = RelativePositionBias(cfg, bidirectional=True, name="encoder_relpos")(
            positions, positions)
      h, blocks = Stack(cfg, cfg.num_encoder_layers or cfg.num_layers,
                        deterministic=deterministic, name="encoder")(drop(x), enc)
      if cfg.pre_norm:
        h = make_norm(cfg, "encoder_norm")(h)
      encoded = drop(h)
      out.update({f"encoder/{k}": v for k, v in blocks.items()})
      out["encoded"] = encoded
    if decoder_inputs is None:
      return None, out

    # --- decoder
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones_like(decoder_inputs)
    positions = (default_positions(decoder_inputs) if decoder_positions is None
                 else decoder_positions)
    dec_embedder = embedder if cfg.share_embeddings else Embedder(cfg, name="decoder_embedder")
    y = dec_embedder(decoder_inputs, positions)                              # (B, T, D)
    if not cfg.pre_norm:
      y = make_norm(cfg, "decoder_embed_norm")(y)
    # In decode mode each self-attention builds its mask from the KV cache.
    dec = {"mask": None if decode else attention_mask(decoder_segment_ids,
                                                      decoder_segment_ids, causal=True),
           "positions": positions, "encoded": encoded,
           "cross_mask": attention_mask(decoder_segment_ids, inputs_segment_ids, causal=False)}
    if cfg.positions == "relative":
      keys = jnp.arange(cfg.max_len)[None] if decode else positions  # cache = max_len keys
      dec["bias"] = RelativePositionBias(cfg, bidirectional=False, name="decoder_relpos")(
          positions, keys)
    h, blocks = Stack(cfg, cfg.num_layers, causal=True, cross=True, decode=decode,
                      deterministic=deterministic, name="decoder")(drop(y), dec)
    if cfg.pre_norm:
      h = make_norm(cfg, "decoder_norm")(h)
    h = drop(h)
    logits = dec_embedder.attend(h) if cfg.tie_embeddings else Readout(cfg, name="readout")(h)
    out.update({f"decoder/{k}": v for k, v in blocks.items()})
    out["pre_logits"] = h
    return logits.astype(jnp.float32), out

  def encode(self, inputs: Array, *, positions: Array | None = None,
             segment_ids: Array | None = None, deterministic: bool = True) -> Array:
    """Encoder outputs (B, S, D)."""
    _, out = self(inputs, None, inputs_positions=positions, inputs_segment_ids=segment_ids,
                  deterministic=deterministic)
    return out["encoded"]

  def decode(self, encoded: Array, decoder_inputs: Array, *,
             encoder_segment_ids: Array | None = None, positions: Array | None = None,
             segment_ids: Array | None = None, decode: bool = False,
             deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """Decoder logits (B, T, V) given encoder outputs (B, S, D)."""
    return self(None, decoder_inputs, inputs_segment_ids=encoder_segment_ids,
                decoder_positions=positions, decoder_segment_ids=segment_ids, encoded=encoded,
                decode=decode, deterministic=deterministic)


def count_params(params) -> int:
  """Total number of entries of every array in a (parameter) pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def param_shapes(model: nn.Module, seq_len: int, **kwargs):
  """Abstract parameters (no memory) for a model, via jax.eval_shape."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  if isinstance(model, EncoderDecoder):  # decoder inputs of the same length
    variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t, **kwargs), tokens)
  else:
    variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, **kwargs), tokens)
  return variables["params"]


def config_fields() -> list[str]:
  """Names of the TransformerConfig fields (the `model.*` config keys)."""
  return [f.name for f in dataclasses.fields(TransformerConfig)]
