"""GPT-2 (GPT2LMHeadModel) <-> tx_jax `DecoderLM`.

Pre-LN blocks, learned positions, tanh GELU ("gelu_new" = tx_jax "gelu"),
readout tied to the token embedding. GPT-2's Conv1D weights are stored
(in, out), so they copy without a transpose; the fused c_attn (D, 3·D) is cut
into the query, key and value kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from tx_jax.errors import UserError
from tx_jax.interop import common
from tx_jax.interop.common import copy, split, vec
from tx_jax.models import DecoderLM, TransformerConfig

ARCHITECTURES = ("GPT2LMHeadModel",)


def model_config(hf: dict) -> dict:
  where = "GPT-2"
  if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
    raise UserError(f"{where}: scale_attn_weights=false / scale_attn_by_inverse_layer_idx are "
                    "not supported")
  if hf.get("add_cross_attention"):
    raise UserError(f"{where}: add_cross_attention is not supported")
  if not hf.get("tie_word_embeddings", True):
    raise UserError(f"{where}: an untied lm_head (tie_word_embeddings=false) is not supported")
  req = lambda key: common.require(hf, key, where)
  d = req("n_embd")
  return dict(vocab_size=req("vocab_size"), num_layers=req("n_layer"), d_model=d,
              num_heads=req("n_head"), mlp_dim=hf.get("n_inner") or 4 * d,
              max_len=req("n_positions"), positions="learned", norm="layernorm",
              norm_eps=hf.get("layer_norm_epsilon", 1e-5), pre_norm=True,
              activation=common.hf_activation(hf.get("activation_function", "gelu_new"), where),
              use_bias=True, tie_embeddings=True, dropout_rate=hf.get("resid_pdrop", 0.1))


def hf_config(cfg: TransformerConfig) -> dict:
  common.check_exportable(cfg, "GPT-2", positions="learned", norm="layernorm", pre_norm=True,
                          use_bias=True, gated_mlp=False, tie_embeddings=True,
                          attention_scale=0.0, scale_tied_readout=False, type_vocab_size=0)
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
          "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len,
          "layer_norm_epsilon": cfg.norm_eps,
          "activation_function": common.tx_activation(cfg.activation),
          "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
          "attn_pdrop": cfg.dropout_rate, "tie_word_embeddings": True,
          "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1}


def rules(cfg: TransformerConfig, prefix: str):
  out = [copy(prefix + "wte.weight", "embedder/tokens/embedding"),
         copy(prefix + "wpe.weight", "embedder/pos/embedding"),
         vec(prefix + "ln_f.weight", "final_norm/scale"),
         vec(prefix + "ln_f.bias", "final_norm/bias")]
  for i in range(cfg.num_layers):
    hf, tx = f"{prefix}h.{i}.", f"decoder/block_{i:02d}/"
    qkv = lambda leaf: tuple(f"{tx}self_attn/{n}/{leaf}" for n in ("query", "key", "value"))
    out += [vec(hf + "ln_1.weight", tx + "self_attn_norm/scale"),
            vec(hf + "ln_1.bias", tx + "self_attn_norm/bias"),
            split(hf + "attn.c_attn.weight", qkv("kernel")),
            split(hf + "attn.c_attn.bias", qkv("bias"), n_in=0),
            copy(hf + "attn.c_proj.weight", tx + "self_attn/out/kernel", n_in=2),
            vec(hf + "attn.c_proj.bias", tx + "self_attn/out/bias"),
            vec(hf + "ln_2.weight", tx + "mlp_norm/scale"),
            vec(hf + "ln_2.bias", tx + "mlp_norm/bias"),
            copy(hf + "mlp.c_fc.weight", tx + "mlp/wi/kernel"),
            vec(hf + "mlp.c_fc.bias", tx + "mlp/wi/bias"),
            copy(hf + "mlp.c_proj.weight", tx + "mlp/wo/kernel"),
            vec(hf + "mlp.c_proj.bias", tx + "mlp/wo/bias")]
  return out


def _is_buffer(name: str) -> bool:
  # Causal-mask buffers that older transformers versions saved with the weights.
  return name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")


def load(hf: dict, architecture: str, reader: common.TensorReader, source: str
         ) -> common.Imported:
  flat = model_config(hf)
  cfg = TransformerConfig(**flat).validate()
  prefix = "transformer." if any(n.startswith("transformer.") for n in reader.names()) else ""
  shapes = common.abstract_shapes(DecoderLM(cfg), jnp.zeros((1, 2), jnp.int32))
  imp = common.Importer(reader, shapes, cfg.param_dtype, source)
  for rule in rules(cfg, prefix):
    imp.take(rule)
  imp.tied("lm_head.weight", "embedder/tokens/embedding")
  params, ignored = imp.finish(_is_buffer)
  return common.Imported("gpt2", architecture, "causal_lm", flat, {}, params, ignored=ignored)


def save(model_config: dict, params: dict, out_dir: str) -> str:
  cfg = TransformerConfig(**model_config).validate()
  config = hf_config(cfg)
  common.write_model_dir(out_dir, config, common.export_tensors(rules(cfg, "transformer."), params))
  return "GPT2LMHeadModel"


def build(model_config: dict):
  return DecoderLM(TransformerConfig(**model_config).validate())
