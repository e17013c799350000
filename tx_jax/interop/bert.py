"""BERT (BertModel, BertForMaskedLM, BertForPreTraining) <-> tx_jax `Encoder`.

Post-LN blocks, learned positions, token types, erf GELU. BertForMaskedLM adds
the MLM transform + tied readout + output bias (`Encoder(mlm_head=True)`);
BertForPreTraining also the pooler and next-sentence classifier
(`sentence_head=True`, read at the [CLS] position: `out["sentence_logits"][:, 0]`,
label 0 = "B follows A", as in Hugging Face). A BertModel's pooler feeds no
tx_jax head, so it is dropped on import (listed in `Imported.ignored`) and
absent on export.
"""

from __future__ import annotations

import jax.numpy as jnp

from tx_jax.errors import UserError
from tx_jax.interop import common
from tx_jax.interop.common import copy, linear, vec
from tx_jax.models import Encoder, TransformerConfig

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
_HEADS = {"BertModel": (False, False), "BertForMaskedLM": (True, False),
          "BertForPreTraining": (True, True)}


def model_config(hf: dict) -> dict:
  where = "BERT"
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UserError(f"{where}: position_embedding_type={hf['position_embedding_type']!r} is not "
                    "supported (only 'absolute')")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise UserError(f"{where}: decoder BERTs (is_decoder / add_cross_attention) are not supported")
  req = lambda key: common.require(hf, key, where)
  return dict(vocab_size=req("vocab_size"), num_layers=req("num_hidden_layers"),
              d_model=req("hidden_size"), num_heads=req("num_attention_heads"),
              mlp_dim=req("intermediate_size"), max_len=req("max_position_embeddings"),
              type_vocab_size=hf.get("type_vocab_size", 2), positions="learned",
              norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), pre_norm=False,
              activation=common.hf_activation(hf.get("hidden_act", "gelu"), where),
              use_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
              dropout_rate=hf.get("hidden_dropout_prob", 0.1))


def hf_config(cfg: TransformerConfig, architecture: str) -> dict:
  common.check_exportable(cfg, "BERT", positions="learned", norm="layernorm", pre_norm=False,
                          use_bias=True, gated_mlp=False, attention_scale=0.0,
                          scale_tied_readout=False)
  return {"architectures": [architecture], "model_type": "bert",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len,
          "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
          "hidden_act": common.tx_activation(cfg.activation),
          "hidden_dropout_prob": cfg.dropout_rate,
          "attention_probs_dropout_prob": cfg.dropout_rate,
          "position_embedding_type": "absolute", "pad_token_id": 0,
          "tie_word_embeddings": cfg.tie_embeddings}


def rules(cfg: TransformerConfig, mlm_head: bool, sentence_head: bool, prefix: str):
  """The tensor rules of one BERT; `prefix` is "bert." inside the heads' models."""
  e = prefix + "embeddings."
  out = [copy(e + "word_embeddings.weight", "embedder/tokens/embedding"),
         copy(e + "position_embeddings.weight", "embedder/pos/embedding"),
         vec(e + "LayerNorm.weight", "embed_norm/scale"),
         vec(e + "LayerNorm.bias", "embed_norm/bias")]
  if cfg.type_vocab_size:
    out.append(copy(e + "token_type_embeddings.weight", "embedder/types/embedding"))
  for i in range(cfg.num_layers):
    hf, tx = f"{prefix}encoder.layer.{i}.", f"encoder/block_{i:02d}/"
    for name in ("query", "key", "value"):
      out += [linear(f"{hf}attention.self.{name}.weight", f"{tx}self_attn/{name}/kernel"),
              vec(f"{hf}attention.self.{name}.bias", f"{tx}self_attn/{name}/bias")]
    out += [linear(hf + "attention.output.dense.weight", tx + "self_attn/out/kernel", n_in=2),
            vec(hf + "attention.output.dense.bias", tx + "self_attn/out/bias"),
            vec(hf + "attention.output.LayerNorm.weight", tx + "self_attn_norm/scale"),
            vec(hf + "attention.output.LayerNorm.bias", tx + "self_attn_norm/bias"),
            linear(hf + "intermediate.dense.weight", tx + "mlp/wi/kernel"),
            vec(hf + "intermediate.dense.bias", tx + "mlp/wi/bias"),
            linear(hf + "output.dense.weight", tx + "mlp/wo/kernel"),
            vec(hf + "output.dense.bias", tx + "mlp/wo/bias"),
            vec(hf + "output.LayerNorm.weight", tx + "mlp_norm/scale"),
            vec(hf + "output.LayerNorm.bias", tx + "mlp_norm/bias")]
  if mlm_head:
    p = "cls.predictions."
    out += [linear(p + "transform.dense.weight", "mlm_dense/kernel"),
            vec(p + "transform.dense.bias", "mlm_dense/bias"),
            vec(p + "transform.LayerNorm.weight", "mlm_norm/scale"),
            vec(p + "transform.LayerNorm.bias", "mlm_norm/bias"),
            vec(p + "bias", "mlm_bias")]
    if not cfg.tie_embeddings:
      out.append(linear(p + "decoder.weight", "readout/unembed/kernel"))
  if sentence_head:
    out += [linear(prefix + "pooler.dense.weight", "pooler/kernel"),
            vec(prefix + "pooler.dense.bias", "pooler/bias"),
            linear("cls.seq_relationship.weight", "sentence_classifier/kernel"),
            vec("cls.seq_relationship.bias", "sentence_classifier/bias")]
  return out


def _model(cfg: TransformerConfig, mlm_head: bool, sentence_head: bool):
  return Encoder(cfg, mlm_head=mlm_head, sentence_head=sentence_head)


def load(hf: dict, architecture: str, reader: common.TensorReader, source: str
         ) -> common.Imported:
  flat = model_config(hf)
  cfg = TransformerConfig(**flat).validate()
  mlm_head, sentence_head = _HEADS[architecture]
  prefix = "bert." if any(n.startswith("bert.") for n in reader.names()) else ""
  shapes = common.abstract_shapes(_model(cfg, mlm_head, sentence_head),
                                  jnp.zeros((1, 2), jnp.int32))
  imp = common.Importer(reader, shapes, cfg.param_dtype, source)
  for rule in rules(cfg, mlm_head, sentence_head, prefix):
    imp.take(rule)
  if mlm_head and cfg.tie_embeddings:
    imp.tied("cls.predictions.decoder.weight", "embedder/tokens/embedding")
  if mlm_head:
    imp.tied("cls.predictions.decoder.bias", "mlm_bias")
  dropped = (prefix + "pooler.", prefix + "embeddings.position_ids")
  params, ignored = imp.finish(lambda name: name.startswith(dropped))
  objective = "masked_lm"
  options = {"mlm_head": mlm_head, "sentence_order": sentence_head}
  return common.Imported("bert", architecture, objective, flat, options, params,
                         ignored=ignored)


def save(model_config: dict, params: dict, out_dir: str) -> str:
  """Writes the BERT class the params' heads make; returns its name."""
  cfg = TransformerConfig(**model_config).validate()
  mlm_head, sentence_head = "mlm_bias" in params, "sentence_classifier" in params
  if sentence_head and not mlm_head:
    raise UserError("a BERT with a sentence head but no MLM head has no Hugging Face class "
                    "here; export it with both heads or neither")
  architecture = {v: k for k, v in _HEADS.items()}[(mlm_head, sentence_head)]
  prefix = "" if architecture == "BertModel" else "bert."
  config = hf_config(cfg, architecture)
  tensors = common.export_tensors(rules(cfg, mlm_head, sentence_head, prefix), params)
  if mlm_head:  # transformers ties decoder.bias to predictions.bias
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
  common.write_model_dir(out_dir, config, tensors)
  return architecture


def build(model_config: dict, mlm_head: bool = False, sentence_order: bool = False):
  return _model(TransformerConfig(**model_config).validate(), mlm_head, sentence_order)
