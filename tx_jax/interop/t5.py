"""T5 v1.0 and v1.1 (T5ForConditionalGeneration) <-> tx_jax `EncoderDecoder`.

Pre-RMSNorm blocks without biases, relative position bias (one table per
stack, in Hugging Face's first block), no 1/sqrt(head dim) in attention
(`attention_scale=1`). v1.0: ReLU MLP, readout tied to the shared embedding
with the hidden states scaled by d_model**-0.5 first (`scale_tied_readout`).
v1.1: gated tanh-GELU MLP (wi_0 -> wi, wi_1 -> wi_gate), no scaling, and an
untied `lm_head` when the checkpoint holds one that differs from `shared`
(transformers 5 saves v1.1 tied, without lm_head, and `scale_decoder_outputs`
false; older files have tie_word_embeddings false and an lm_head). Exports
without the scaling always write lm_head and tie_word_embeddings false, which
every transformers version reads the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tx_jax.errors import UserError
from tx_jax.interop import common
from tx_jax.interop.common import copy, linear, vec
from tx_jax.models import EncoderDecoder, TransformerConfig

ARCHITECTURES = ("T5ForConditionalGeneration",)


def _activation(hf: dict) -> tuple[str, bool]:
  proj = hf.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise UserError(f"T5: feed_forward_proj={proj!r} is not supported; use 'ACT' or "
                    "'gated-ACT'")
  # transformers reads "gated-gelu" as the tanh approximation.
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  return common.hf_activation(act, "T5"), gated


def model_config(hf: dict, untied_head: bool) -> dict:
  """tx_jax fields; `untied_head`: the checkpoint's lm_head differs from `shared`."""
  where = "T5"
  req = lambda key: common.require(hf, key, where)
  activation, gated = _activation(hf)
  scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  tied = not untied_head
  if scaled and not tied:
    raise UserError(f"{where}: a separate lm_head with scaled decoder outputs is not supported "
                    "(tx_jax scales only a tied readout)")
  num_layers = req("num_layers")
  return dict(vocab_size=req("vocab_size"), num_encoder_layers=num_layers,
              num_layers=hf.get("num_decoder_layers") or num_layers, d_model=req("d_model"),
              num_heads=req("num_heads"), head_dim=req("d_kv"), mlp_dim=req("d_ff"),
              max_len=hf.get("n_positions", 512), positions="relative",
              relative_buckets=hf.get("relative_attention_num_buckets", 32),
              relative_max_distance=hf.get("relative_attention_max_distance", 128),
              norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), pre_norm=True,
              activation=activation, gated_mlp=gated, use_bias=False, tie_embeddings=tied,
              share_embeddings=True, scale_tied_readout=scaled, attention_scale=1.0,
              dropout_rate=hf.get("dropout_rate", 0.1))


def hf_config(cfg: TransformerConfig) -> dict:
  common.check_exportable(cfg, "T5", free_head_dim=True, positions="relative", norm="rmsnorm",
                          pre_norm=True, use_bias=False, share_embeddings=True,
                          attention_scale=1.0, type_vocab_size=0)
  if cfg.scale_tied_readout and not cfg.tie_embeddings:
    raise UserError("T5 cannot express model.scale_tied_readout with an untied readout")
  act = common.tx_activation(cfg.activation)
  if cfg.gated_mlp:
    proj = "gated-gelu" if act == "gelu_new" else f"gated-{act}"
    if act == "gelu":
      raise UserError("T5 reads 'gated-gelu' as the tanh GELU; a gated erf GELU "
                      "(model.activation='gelu_exact') cannot be expressed")
  else:
    if act == "gelu_new":
      raise UserError("T5 has no plain tanh-GELU MLP; use model.activation='gelu_exact' or "
                      "a gated MLP")
    proj = act
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.dim_per_head,
          "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers or cfg.num_layers,
          "num_decoder_layers": cfg.num_layers, "num_heads": cfg.num_heads,
          "relative_attention_num_buckets": cfg.relative_buckets,
          "relative_attention_max_distance": cfg.relative_max_distance,
          "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": proj,
          "tie_word_embeddings": cfg.scale_tied_readout, "dropout_rate": cfg.dropout_rate,
          "n_positions": cfg.max_len, "is_encoder_decoder": True, "pad_token_id": 0,
          "eos_token_id": 1, "decoder_start_token_id": 0}


def _attention(hf: str, tx: str):
  return [linear(hf + "q.weight", tx + "query/kernel"), linear(hf + "k.weight", tx + "key/kernel"),
          linear(hf + "v.weight", tx + "value/kernel"),
          linear(hf + "o.weight", tx + "out/kernel", n_in=2)]


def _mlp(cfg: TransformerConfig, hf: str, tx: str):
  if cfg.gated_mlp:
    out = [linear(hf + "wi_0.weight", tx + "wi/kernel"),
           linear(hf + "wi_1.weight", tx + "wi_gate/kernel")]
  else:
    out = [linear(hf + "wi.weight", tx + "wi/kernel")]
  return out + [linear(hf + "wo.weight", tx + "wo/kernel")]


def rules(cfg: TransformerConfig):
  out = [copy("shared.weight", "embedder/tokens/embedding")]
  for stack, layers in (("encoder", cfg.num_encoder_layers or cfg.num_layers),
                        ("decoder", cfg.num_layers)):
    out += [copy(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 f"{stack}_relpos/rel_embedding"),
            vec(f"{stack}.final_layer_norm.weight", f"{stack}_norm/scale")]
    for i in range(layers):
      hf, tx = f"{stack}.block.{i}.layer.", f"{stack}/block_{i:02d}/"
      out += _attention(hf + "0.SelfAttention.", tx + "self_attn/")
      out.append(vec(hf + "0.layer_norm.weight", tx + "self_attn_norm/scale"))
      mlp = 1
      if stack == "decoder":
        out += _attention(hf + "1.EncDecAttention.", tx + "cross_attn/")
        out.append(vec(hf + "1.layer_norm.weight", tx + "cross_attn_norm/scale"))
        mlp = 2
      out += _mlp(cfg, f"{hf}{mlp}.DenseReluDense.", tx + "mlp/")
      out.append(vec(f"{hf}{mlp}.layer_norm.weight", tx + "mlp_norm/scale"))
  if not cfg.tie_embeddings:
    out.append(linear("lm_head.weight", "readout/unembed/kernel"))
  return out


def _untied_head(hf: dict, reader: common.TensorReader) -> bool:
  if "lm_head.weight" not in reader.names():
    return False
  if not hf.get("tie_word_embeddings", True):
    return True
  return not ("shared.weight" in reader.names() and
              np.array_equal(reader.read("lm_head.weight"), reader.read("shared.weight")))


def load(hf: dict, architecture: str, reader: common.TensorReader, source: str
         ) -> common.Imported:
  flat = model_config(hf, _untied_head(hf, reader))
  cfg = TransformerConfig(**flat).validate()
  tokens = jnp.zeros((1, 2), jnp.int32)
  shapes = common.abstract_shapes(EncoderDecoder(cfg), tokens, tokens)
  imp = common.Importer(reader, shapes, cfg.param_dtype, source)
  for rule in rules(cfg):
    imp.take(rule)
  for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    imp.tied(name, "embedder/tokens/embedding")
  if cfg.tie_embeddings:
    imp.tied("lm_head.weight", "embedder/tokens/embedding")
  params, ignored = imp.finish()
  return common.Imported("t5", architecture, "span_corruption", flat, {}, params,
                         ignored=ignored)


def save(model_config: dict, params: dict, out_dir: str) -> str:
  cfg = TransformerConfig(**model_config).validate()
  config = hf_config(cfg)
  tensors = common.export_tensors(rules(cfg), params)
  if not cfg.scale_tied_readout and cfg.tie_embeddings:
    tensors["lm_head.weight"] = tensors["shared.weight"]
  common.write_model_dir(out_dir, config, tensors)
  return "T5ForConditionalGeneration"


def build(model_config: dict):
  return EncoderDecoder(TransformerConfig(**model_config).validate())
