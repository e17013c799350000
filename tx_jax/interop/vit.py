"""ViT (ViTModel) and ViT-MAE (ViTMAEForPreTraining) <-> tx_jax `ViT` / `MAE`.

Pre-LN blocks with biases, erf GELU, a CLS token. Hugging Face adds a position
embedding to the CLS token too; tx_jax's CLS has none, so the importer folds
it in (cls + pos[0]) and the exporter writes a zero CLS position: the sums
match exactly. The patch convolution (D, C, P, P) becomes the (P, P, C, D)
patch kernel (images are channels-last in tx_jax).

ViTModel -> `ViT` alone, for embeddings and probes (`out["pre_logits"]` is the
CLS state after the final norm, transformers' last_hidden_state[:, 0]); it
has no pretraining objective (objective None). Its pooler feeds no tx_jax head
and is dropped (`Imported.ignored`). ViTMAEForPreTraining -> `MAE`, objective
"mae"; its fixed 2-D sin-cos positions (both tables are stored in the file)
must equal tx_jax's "sincos2d" with a zero CLS row (checked): the original
MAE layout, columns first, that pretrained checkpoints hold.
transformers keeps int(N·(1 - mask_ratio)) patches, tx_jax round(...): equal
for the usual ratios (e.g. 0.75 of 196), and the noise path
(`MAE(..., noise=...)`) masks the same patches as transformers' `noise=`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tx_jax.errors import UserError
from tx_jax.interop import common
from tx_jax.interop.common import linear, vec
from tx_jax.models.vit import MAE, ViT, sincos_2d, vit_configs

ARCHITECTURES = ("ViTModel", "ViTMAEForPreTraining")
_SINCOS_ATOL = 1e-5


def _size(hf: dict, key: str, where: str) -> int:
  value = common.require(hf, key, where)
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise UserError(f"{where}: non-square {key}={value} is not supported")
    value = value[0]
  return int(value)


def model_config(hf: dict, mae: bool) -> dict:
  where = "ViT-MAE" if mae else "ViT"
  if not hf.get("qkv_bias", True):
    raise UserError(f"{where}: qkv_bias=false is not supported")
  req = lambda key: common.require(hf, key, where)
  flat = dict(image_size=_size(hf, "image_size", where), patch_size=_size(hf, "patch_size", where),
              channels=hf.get("num_channels", 3), pooling="cls",
              posemb="sincos2d" if mae else "learned", num_layers=req("num_hidden_layers"),
              d_model=req("hidden_size"), num_heads=req("num_attention_heads"),
              mlp_dim=req("intermediate_size"), norm_eps=hf.get("layer_norm_eps", 1e-12),
              activation=common.hf_activation(hf.get("hidden_act", "gelu"), where),
              norm="layernorm", pre_norm=True, use_bias=True,
              dropout_rate=hf.get("hidden_dropout_prob", 0.0))
  if mae:
    flat.update(decoder_num_layers=req("decoder_num_hidden_layers"),
                decoder_d_model=req("decoder_hidden_size"),
                decoder_num_heads=req("decoder_num_attention_heads"),
                decoder_mlp_dim=req("decoder_intermediate_size"))
  return flat


def hf_config(flat: dict, mae: bool, mask_ratio: float) -> dict:
  encoder, geo, decoder = vit_configs(flat)
  for cfg in (encoder, decoder) if mae else (encoder,):
    common.check_exportable(cfg, "ViT-MAE" if mae else "ViT", norm="layernorm", pre_norm=True,
                            use_bias=True, gated_mlp=False, attention_scale=0.0)
  want = "sincos2d" if mae else "learned"
  if geo.pooling != "cls" or geo.posemb != want or geo.num_classes:
    raise UserError(f"{'ViT-MAE' if mae else 'ViT'} export needs model.pooling='cls', "
                    f"model.posemb={want!r} and no classifier head")
  if mae and (decoder.norm_eps != encoder.norm_eps or decoder.activation != encoder.activation):
    raise UserError("ViT-MAE shares norm_eps and activation between encoder and decoder")
  out = {"architectures": ["ViTMAEForPreTraining" if mae else "ViTModel"],
         "model_type": "vit_mae" if mae else "vit", "image_size": geo.image_size,
         "patch_size": geo.patch_size, "num_channels": geo.channels,
         "hidden_size": encoder.d_model, "num_hidden_layers": encoder.num_layers,
         "num_attention_heads": encoder.num_heads, "intermediate_size": encoder.mlp_dim,
         "hidden_act": common.tx_activation(encoder.activation),
         "layer_norm_eps": encoder.norm_eps, "qkv_bias": True,
         "hidden_dropout_prob": encoder.dropout_rate,
         "attention_probs_dropout_prob": encoder.dropout_rate}
  if mae:
    out.update(decoder_hidden_size=decoder.d_model, decoder_num_hidden_layers=decoder.num_layers,
               decoder_num_attention_heads=decoder.num_heads,
               decoder_intermediate_size=decoder.mlp_dim, mask_ratio=mask_ratio,
               norm_pix_loss=False)
  return out


def _block_rules(hf: str, tx: str):
  a = hf + "attention."
  out = []
  for name in ("query", "key", "value"):
    out += [linear(f"{a}attention.{name}.weight", f"{tx}self_attn/{name}/kernel"),
            vec(f"{a}attention.{name}.bias", f"{tx}self_attn/{name}/bias")]
  return out + [linear(a + "output.dense.weight", tx + "self_attn/out/kernel", n_in=2),
                vec(a + "output.dense.bias", tx + "self_attn/out/bias"),
                vec(hf + "layernorm_before.weight", tx + "self_attn_norm/scale"),
                vec(hf + "layernorm_before.bias", tx + "self_attn_norm/bias"),
                linear(hf + "intermediate.dense.weight", tx + "mlp/wi/kernel"),
                vec(hf + "intermediate.dense.bias", tx + "mlp/wi/bias"),
                linear(hf + "output.dense.weight", tx + "mlp/wo/kernel"),
                vec(hf + "output.dense.bias", tx + "mlp/wo/bias"),
                vec(hf + "layernorm_after.weight", tx + "mlp_norm/scale"),
                vec(hf + "layernorm_after.bias", tx + "mlp_norm/bias")]


def rules(flat: dict, mae: bool, decoder_layers: str = "decoder.decoder_encoder.layer."):
  """Everything but the embeddings' cls/positions (see load / save)."""
  encoder, _, decoder = vit_configs(flat)
  hf, tx = ("vit.", "encoder/") if mae else ("", "")
  out = [vec(hf + "embeddings.patch_embeddings.projection.bias", tx + "patch_embed/bias"),
         vec(hf + "layernorm.weight", tx + "final_norm/scale"),
         vec(hf + "layernorm.bias", tx + "final_norm/bias")]
  for i in range(encoder.num_layers):
    out += _block_rules(f"{hf}encoder.layer.{i}.", f"{tx}encoder/block_{i:02d}/")
  if mae:
    d = "pixel_decoder/"
    out += [linear("decoder.decoder_embed.weight", d + "embed/kernel"),
            vec("decoder.decoder_embed.bias", d + "embed/bias"),
            vec("decoder.decoder_norm.weight", d + "final_norm/scale"),
            vec("decoder.decoder_norm.bias", d + "final_norm/bias"),
            linear("decoder.decoder_pred.weight", d + "pixels/kernel"),
            vec("decoder.decoder_pred.bias", d + "pixels/bias")]
    for i in range(decoder.num_layers):
      out += _block_rules(f"{decoder_layers}{i}.", f"{d}decoder/block_{i:02d}/")
  return out


def _model(flat: dict, mae: bool, mask_ratio: float = 0.75):
  encoder, geo, decoder = vit_configs(flat)
  if mae:
    return MAE(encoder, geo, decoder, mask_ratio)
  return ViT(encoder, dataclasses.replace(geo, num_classes=0))


def _sincos_table(grid: int, width: int) -> np.ndarray:
  """(1, 1 + grid², width): a zero CLS row, then the patches' sin-cos positions."""
  return np.concatenate([np.zeros((1, width), np.float32), sincos_2d(grid, width)])[None]


def _check_sincos(imp: common.Importer, name: str, grid: int, width: int) -> None:
  value = imp.read(name, (1, grid * grid + 1, width))
  err = float(np.max(np.abs(value - _sincos_table(grid, width))))
  if err > _SINCOS_ATOL:
    raise UserError(f"tensor '{name}' is not MAE's fixed 2-D sin-cos table (max difference "
                    f"{err:.2g}); learned MAE positions are not supported")


def load(hf: dict, architecture: str, reader: common.TensorReader, source: str
         ) -> common.Imported:
  mae = architecture == "ViTMAEForPreTraining"
  flat = model_config(hf, mae)
  hf_p, tx = ("vit.", "encoder/") if mae else ("", "")
  encoder, geo, decoder = vit_configs(flat)
  mask_ratio = float(hf.get("mask_ratio", 0.75))
  images = jnp.zeros((1, geo.image_size, geo.image_size, geo.channels), jnp.float32)
  shapes = common.abstract_shapes(_model(flat, mae, mask_ratio), images, rngs=("params", "mask"))
  imp = common.Importer(reader, shapes, encoder.param_dtype, source)
  names = reader.names()
  old_layers = any(n.startswith("decoder.decoder_layers.") for n in names)
  layers = "decoder.decoder_layers." if old_layers else "decoder.decoder_encoder.layer."
  for rule in rules(flat, mae, layers):
    imp.take(rule)
  d, p, c = encoder.d_model, geo.patch_size, geo.channels
  conv = imp.read(hf_p + "embeddings.patch_embeddings.projection.weight", (d, c, p, p))
  imp.put(tx + "patch_embed/kernel", np.ascontiguousarray(conv.transpose(2, 3, 1, 0)))
  cls = imp.read(hf_p + "embeddings.cls_token", (1, 1, d))[0, 0]
  pos_name = hf_p + "embeddings.position_embeddings"
  if mae:
    _check_sincos(imp, pos_name, geo.grid, d)
    _check_sincos(imp, "decoder.decoder_pos_embed", geo.grid, decoder.d_model)
    imp.put(tx + "cls", cls)  # the sin-cos CLS position is zero
    mask_token = imp.read("decoder.mask_token", (1, 1, decoder.d_model))
    imp.put("pixel_decoder/mask_token", mask_token.reshape(-1))
  else:
    pos = imp.read(pos_name, (1, geo.num_patches + 1, d))[0]
    imp.put(tx + "cls", cls + pos[0])
    imp.put(tx + "posemb/pos_embedding", np.ascontiguousarray(pos[1:]))
  params, ignored = imp.finish(lambda name: name.startswith("pooler."))
  if mae:
    return common.Imported("vit_mae", architecture, "mae", flat,
                           {"mask_ratio": mask_ratio,
                            "norm_pix_loss": bool(hf.get("norm_pix_loss", False))},
                           params, ignored=ignored)
  return common.Imported("vit", architecture, None, flat, {}, params, ignored=ignored)


def save(model_config: dict, params: dict, out_dir: str, mask_ratio: float = 0.75) -> str:
  """ViTMAEForPreTraining when the params have a pixel decoder, else ViTModel."""
  mae = "pixel_decoder" in params
  config = hf_config(model_config, mae, mask_ratio)
  encoder, geo, decoder = vit_configs(model_config)
  tensors = common.export_tensors(rules(model_config, mae), params)
  hf, tx = ("vit.", "encoder/") if mae else ("", "")
  kernel = np.asarray(common.get_path(params, tx + "patch_embed/kernel"), np.float32)
  tensors[hf + "embeddings.patch_embeddings.projection.weight"] = np.ascontiguousarray(
      kernel.transpose(3, 2, 0, 1))
  cls = np.asarray(common.get_path(params, tx + "cls"), np.float32)
  tensors[hf + "embeddings.cls_token"] = cls.reshape(1, 1, -1)
  zero = np.zeros((1, encoder.d_model), np.float32)
  if mae:
    mask_token = np.asarray(common.get_path(params, "pixel_decoder/mask_token"), np.float32)
    tensors["decoder.mask_token"] = mask_token.reshape(1, 1, -1)
    pos = sincos_2d(geo.grid, encoder.d_model)
    tensors["decoder.decoder_pos_embed"] = _sincos_table(geo.grid, decoder.d_model)
  else:
    pos = np.asarray(common.get_path(params, tx + "posemb/pos_embedding"), np.float32)
  tensors[hf + "embeddings.position_embeddings"] = np.concatenate([zero, pos])[None]
  common.write_model_dir(out_dir, config, tensors)
  return config["architectures"][0]


def build(model_config: dict, mask_ratio: float = 0.75, norm_pix_loss: bool = False):
  """MAE when the config has decoder fields (ViT-MAE), else the ViT encoder."""
  del norm_pix_loss  # a loss setting
  mae = any(key.startswith("decoder_") for key in model_config)
  return _model(model_config, mae, mask_ratio)
