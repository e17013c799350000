"""Flax Linen models. Imports only jax, flax and numpy."""

from tx_jax.models.layers import (Attention, Block, Mlp, RelativePositionBias, Stack,
                                  TransformerConfig, attention_mask, rotary)
from tx_jax.models.transformer import (DECODER_SIZES, ENC_DEC_SIZES, ENCODER_SIZES, DecoderLM,
                                       Encoder, EncoderDecoder, count_params, make_config,
                                       param_shapes)

__all__ = ["Attention", "Block", "Mlp", "RelativePositionBias", "Stack", "TransformerConfig",
           "attention_mask", "rotary", "DECODER_SIZES", "ENC_DEC_SIZES", "ENCODER_SIZES",
           "DecoderLM", "Encoder", "EncoderDecoder",
           "count_params", "make_config", "param_shapes"]
