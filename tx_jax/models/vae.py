"""Transformer-VAE for text (Bowman et al. 2016, with Transformers as in Li et al. 2020).

encoder(tokens) -> mean over real tokens -> (mu, log sigma) of a diagonal
Gaussian q(z|x) with `latent_dim` dims -> z = mu + sigma * eps -> a causal
decoder p(x|z).

How the decoder sees z: a projection of z is *added to the input embedding at
every position*. Three reasons over cross-attention memory: the signal enters
the residual stream at every step from the first layer, so the decoder cannot
learn to attend away from it (the failure behind posterior collapse); the
decoder stays a plain causal stack, so KV-cache decoding adds the same vector
at each new token and needs no memory cache; and with z = 0 the same network
is an unconditional LM of exactly the same size, the baseline it is compared
with.

Optionally (`vae.memory_slots` K > 0) z is also projected to K memory vectors
that every decoder layer cross-attends to, as Optimus (Li et al. 2020) does
beside the embedding: each layer can then read z directly instead of only
through what the residual stream kept of it.

Shapes: B batch, T length, D model width, L latent dims.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tx_jax.models.layers import (P, Embedder, Projection, Readout, Stack, TransformerConfig,
                                  attention_mask, default_positions, make_norm)

Array = jax.Array

# Sizes: `tiny` trains on 2 CPU cores in minutes (sentences of python-docs, a
# 1024-piece SentencePiece); `base` is a 6 + 6 layer, 512-wide model for an
# accelerator (cf. Optimus's 32-dim latent at far larger scale).
VAE_SIZES: dict[str, dict] = {
    "tiny": dict(model=dict(num_layers=2, num_encoder_layers=2, d_model=128, num_heads=4,
                            mlp_dim=512, max_len=64, vocab_size=1024, positions="rope",
                            dropout_rate=0.1),
                 vae=dict(latent_dim=32)),
    "base": dict(model=dict(num_layers=6, num_encoder_layers=6, d_model=512, num_heads=8,
                            mlp_dim=2048, max_len=128, vocab_size=8192, positions="rope",
                            dropout_rate=0.1),
                 vae=dict(latent_dim=64)),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The latent of a Transformer-VAE (the stacks come from a TransformerConfig)."""
  latent_dim: int = 32
  bag_of_words: bool = False   # a head predicting the sentence's tokens from z alone
  init_log_sigma: float = 0.0   # log sigma of q(z|x) at initialisation (its head's bias)
  memory_slots: int = 0   # K > 0: z also as K vectors every decoder layer cross-attends to

  def validate(self, cfg: TransformerConfig) -> "VAEConfig":
    """Raises ValueError naming the first bad field."""
    if int(self.latent_dim) < 1:
      raise ValueError(f"vae.latent_dim={self.latent_dim} must be >= 1")
    if int(self.memory_slots) < 0:
      raise ValueError(f"vae.memory_slots={self.memory_slots} must be >= 0")
    if cfg.positions == "relative":
      raise ValueError("model.positions='relative' is not supported by the VAE; use rope, "
                       "learned or none")
    return self


def pooled_mean(hidden: Array, segment_ids: Array) -> Array:
  """Mean of hidden (B, T, D) over real tokens (segment > 0) -> (B, D) float32."""
  real = (segment_ids > 0)[..., None]
  total = jnp.sum(jnp.where(real, hidden.astype(jnp.float32), 0.0), axis=1)
  return total / jnp.maximum(jnp.sum(real, axis=1), 1)


class LatentToEmbed(nn.Module):
  """z (B, L) -> (B, D), zero-initialised: training starts from the unconditional LM.

  With the usual 0.02-scale init, z ~ N(0, 1) would add a vector several times
  the token embeddings' size to every position, so the first steps would see
  mostly noise. From zero, the kernel's gradient (z times the decoder's input
  gradient) grows it only as far as z predicts the sentence.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """z (B, L) -> W z + b (B, D)."""
    cfg = self.cfg
    kernel = self.param("kernel", P(nn.initializers.zeros, ("latent", "embed")),
                        (z.shape[-1], cfg.d_model), cfg.params_dtype)
    y = jnp.einsum("bl,ld->bd", z.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype))
    if cfg.use_bias:
      bias = self.param("bias", P(nn.initializers.zeros, ("embed",)), (cfg.d_model,),
                        cfg.params_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


class BagOfWords(nn.Module):
  """z (B, L) -> logits (B, V) of the sentence's tokens as an unordered bag.

  The auxiliary head of Zhao et al. 2017: trained to predict every target
  token from z with no decoder in the way, it makes z carry the sentence's
  content, which the autoregressive decoder could otherwise learn to do
  without (posterior collapse). Not part of p(x|z) or the ELBO.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """z (B, L) -> (B, V) float32 logits."""
    cfg = self.cfg
    h = Projection(cfg, (cfg.d_model,), ("latent", "mlp"), name="hidden")(z)
    h = nn.gelu(h)
    return Projection(cfg, (cfg.vocab_size,), ("mlp", "vocab"),
                      name="logits")(h).astype(jnp.float32)


class TransformerVAE(nn.Module):
  """tokens (B, S), decoder inputs (B, T) -> decoder logits (B, T, V), named outputs.

  `segment_ids` (B, S): 1 on the sentence, 0 on padding (the encoder input);
  decoder inputs are the sentence shifted right behind a start token.
  z: given -> the encoder is skipped (sampling from the prior, interpolation);
  else z = mu + exp(log_sigma) * eps with eps (B, L) given, or z = mu.
  With decoder_inputs None only the encoder runs. decode=True keeps a KV cache
  of cfg.max_len positions in the "cache" collection (generation).

  out: "mu", "log_sigma", "z" (B, L) float32, "pooled" (B, D), "encoder/block_i",
  "embedded" (B, T, D, with z added), "memory" (B, K, D) with vae.memory_slots K,
  "decoder/block_i", "pre_logits" (B, T, D),
  and with vae.bag_of_words "bag_of_words" (B, V), the head's logits from z.
  """
  cfg: TransformerConfig
  vae: VAEConfig

  @nn.compact
  def __call__(self, tokens: Array | None, decoder_inputs: Array | None, *,
               segment_ids: Array | None = None, decoder_positions: Array | None = None,
               decoder_segment_ids: Array | None = None, eps: Array | None = None,
               z: Array | None = None, decode: bool = False,
               deterministic: bool = True) -> tuple[Array | None, dict[str, Array]]:
    """(logits (B, T, V) or None without decoder inputs, named outputs); see the class."""
    cfg, latent = self.cfg, self.vae.latent_dim
    drop = lambda x: nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    embedder = Embedder(cfg, name="embedder")   # one table for encoder, decoder, readout
    out = {}

    if z is None:  # --- encoder -> q(z|x)
      if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
      positions = default_positions(tokens)
      x = embedder(tokens, positions)                                        # (B, S, D)
      if not cfg.pre_norm:
        x = make_norm(cfg, "encoder_embed_norm")(x)
      enc = {"mask": attention_mask(segment_ids, segment_ids, causal=False),
             "positions": positions}
      h, blocks = Stack(cfg, cfg.num_encoder_layers or cfg.num_layers,
                        deterministic=deterministic, name="encoder")(drop(x), enc)
      if cfg.pre_norm:
        h = make_norm(cfg, "encoder_norm")(h)
      pooled = pooled_mean(h, segment_ids)                                   # (B, D)
      mu = Projection(cfg, (latent,), ("embed", "latent"),
                      name="posterior_mu")(pooled).astype(jnp.float32)       # (B, L)
      # The bias (always present) starts at vae.init_log_sigma: below 0 the
      # decoder first sees z as less noisy than the prior's N(0, 1) draws.
      log_sigma = Projection(
          dataclasses.replace(cfg, use_bias=True), (latent,), ("embed", "latent"),
          bias_init=nn.initializers.constant(self.vae.init_log_sigma),
          name="posterior_log_sigma")(pooled).astype(jnp.float32)           # (B, L)
      z = mu if eps is None else mu + jnp.exp(log_sigma) * eps
      out.update({f"encoder/{k}": v for k, v in blocks.items()})
      out.update(pooled=pooled, mu=mu, log_sigma=log_sigma)
    out["z"] = z
    if self.vae.bag_of_words and not decode:
      out["bag_of_words"] = BagOfWords(cfg, name="bag_of_words")(z)
    if decoder_inputs is None:
      return None, out

    # --- decoder p(x|z): causal, z added at every input position
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones_like(decoder_inputs)
    positions = (default_positions(decoder_inputs) if decoder_positions is None
                 else decoder_positions)
    cond = LatentToEmbed(cfg, name="latent_to_embed")(z)                   # (B, D)
    y = embedder(decoder_inputs, positions) + cond[:, None, :]               # (B, T, D)
    if not cfg.pre_norm:
      y = make_norm(cfg, "decoder_embed_norm")(y)
    # In decode mode each self-attention builds its mask from the KV cache.
    dec = {"mask": None if decode else attention_mask(decoder_segment_ids,
                                                      decoder_segment_ids, causal=True),
           "positions": positions}
    slots = int(self.vae.memory_slots)
    if slots:  # every key of the cross-attention is visible to every query
      out["memory"] = Projection(cfg, (slots, cfg.d_model), ("latent", "positions", "embed"),
                                 name="latent_to_memory")(z)               # (B, K, D)
      dec.update(encoded=out["memory"], cross_mask=None)
    h, blocks = Stack(cfg, cfg.num_layers, causal=True, cross=slots > 0, decode=decode,
                      deterministic=deterministic, name="decoder")(drop(y), dec)
    if cfg.pre_norm:
      h = make_norm(cfg, "decoder_norm")(h)
    logits = embedder.attend(h) if cfg.tie_embeddings else Readout(cfg, name="readout")(h)
    out.update({f"decoder/{k}": v for k, v in blocks.items()})
    out.update(embedded=y, pre_logits=h)
    return logits.astype(jnp.float32), out
