"""Flax Linen models. Imports only jax, flax and numpy."""

from tx_jax.models.gan import (GAN_SIZES, Discriminator, GANConfig, Generator, gan_configs,
                                latent_noise, make_gan_config)
from tx_jax.models.layers import (Attention, Block, Mlp, RelativePositionBias, Stack,
                                  TransformerConfig, attention_mask, rotary)
from tx_jax.models.transformer import (DECODER_SIZES, ENC_DEC_SIZES, ENCODER_SIZES, DecoderLM,
                                       Encoder, EncoderDecoder, count_params, make_config,
                                       param_shapes)
from tx_jax.models.vae import VAE_SIZES, TransformerVAE, VAEConfig, pooled_mean
from tx_jax.models.vit import MAE, VIT_SIZES, ViT, ViTConfig, make_vit_config, vit_configs

__all__ = ["GAN_SIZES", "Discriminator", "GANConfig", "Generator", "gan_configs", "latent_noise",
           "make_gan_config",
           "Attention", "Block", "Mlp", "RelativePositionBias", "Stack", "TransformerConfig",
           "attention_mask", "rotary", "DECODER_SIZES", "ENC_DEC_SIZES", "ENCODER_SIZES",
           "DecoderLM", "Encoder", "EncoderDecoder",
           "count_params", "make_config", "param_shapes",
           "VAE_SIZES", "TransformerVAE", "VAEConfig", "pooled_mean",
           "MAE", "VIT_SIZES", "ViT", "ViTConfig", "make_vit_config", "vit_configs"]
