"""Hugging Face <-> tx_jax: safetensors checkpoints of BERT, GPT-2, T5, ViT and ViT-MAE.

    imported = load_hf("path/to/hf_dir")       # config.json + model.safetensors
    model = build_model(imported.family, imported.model_config, imported.objective_options)
    logits, out = model.apply({"params": imported.params}, tokens)
    save_hf(imported.family, imported.model_config, imported.params, "out_dir")

Reading needs only `safetensors` and numpy (no torch); the written directory
loads with transformers' `from_pretrained`.

  family   Hugging Face class                         tx_jax model                 objective
  bert     BertModel / BertForMaskedLM /             Encoder (mlm_head,           masked_lm
           BertForPreTraining                        sentence_head)
  gpt2     GPT2LMHeadModel                           DecoderLM                    causal_lm
  t5       T5ForConditionalGeneration (v1.0, v1.1)   EncoderDecoder               span_corruption
  vit      ViTModel                                  ViT (encoder alone)          None
  vit_mae  ViTMAEForPreTraining                      MAE                          mae

Tensors are checked by name and shape against the tree the tx_jax model's
`init` makes: a missing, extra or misshaped tensor is a UserError naming it.
Layers come out unscanned (model.scan_layers=False); a scanned model's stacks are
unstacked on export.
Half-precision checkpoints are widened to float32 (model.param_dtype).
"""

from __future__ import annotations

import os

from tx_jax.errors import UserError
from tx_jax.interop import bert, gpt2, t5, vit
from tx_jax.interop.common import Imported, TensorReader, read_config, read_json

FAMILIES = {"bert": bert, "gpt2": gpt2, "t5": t5, "vit": vit, "vit_mae": vit}
_BY_ARCHITECTURE = {arch: (family, module) for family, module in
                    (("bert", bert), ("gpt2", gpt2), ("t5", t5)) for arch in module.ARCHITECTURES}
_BY_ARCHITECTURE.update({"ViTModel": ("vit", vit), "ViTMAEForPreTraining": ("vit_mae", vit)})


def supported_architectures() -> list[str]:
  return sorted(_BY_ARCHITECTURE)


def load_hf(model_dir: str, *, with_tokenizer: bool = True) -> Imported:
  """Reads a Hugging Face model directory into tx_jax config + params (see `Imported`)."""
  hf = read_config(model_dir)
  architectures = hf.get("architectures") or []
  if len(architectures) != 1 or architectures[0] not in _BY_ARCHITECTURE:
    raise UserError(
        f"'{model_dir}': model_type={hf.get('model_type')!r}, architectures={architectures} "
        f"is not supported; supported architectures: {', '.join(supported_architectures())}")
  architecture = architectures[0]
  family, module = _BY_ARCHITECTURE[architecture]
  reader = TensorReader(model_dir)
  try:
    imported = module.load(hf, architecture, reader, f"'{model_dir}'")
  finally:
    reader.close()
  imported.embedding_defaults = sentence_transformers_defaults(model_dir)
  if with_tokenizer and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
    from tx_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    tok = HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    check_tokenizer_fits(tok, imported)
    imported.tokenizer = tok
  return imported


def check_tokenizer_fits(tokenizer, imported: Imported) -> None:
  """UserError when the tokenizer has ids the model's embedding table lacks."""
  vocab = imported.model_config.get("vocab_size")
  if vocab is not None and tokenizer.vocab_size > vocab:
    raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                    f"vocab_size is {vocab}; use the tokenizer the model was trained with")


def sentence_transformers_defaults(model_dir: str) -> dict:
  """pooling ("mean" | "cls"), normalize, max_len from a sentence-transformers dir, or {}."""
  modules_path = os.path.join(model_dir, "modules.json")
  if not os.path.isfile(modules_path):
    return {}
  modules = read_json(modules_path)
  out = {"pooling": "mean", "normalize": False}
  for module in modules:
    kind = module.get("type", "")
    if kind.endswith(".Pooling"):
      pooling = read_json(os.path.join(model_dir, module.get("path", ""), "config.json"))
      modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
               if pooling.get(f"pooling_mode_{m}")]
      if modes not in (["cls_token"], ["mean_tokens"]):
        raise UserError(f"'{model_dir}': sentence-transformers pooling {modes} is not "
                        "supported; only cls_token or mean_tokens")
      out["pooling"] = "cls" if modes == ["cls_token"] else "mean"
    elif kind.endswith(".Normalize"):
      out["normalize"] = True
    elif not kind.endswith(".Transformer"):
      raise UserError(f"'{model_dir}': sentence-transformers module {kind!r} is not supported "
                      "(only Transformer, Pooling, Normalize)")
  st_path = os.path.join(model_dir, "sentence_bert_config.json")
  if os.path.isfile(st_path) and "max_seq_length" in read_json(st_path):
    out["max_len"] = int(read_json(st_path)["max_seq_length"])
  return out


def build_model(family: str, model_config: dict, objective_options: dict | None = None):
  """The tx_jax Flax module that `load_hf` params fit."""
  if family not in FAMILIES:
    raise UserError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[family].build(model_config, **(objective_options or {}))


def save_hf(family: str, model_config: dict, params, out_dir: str, *,
            objective_options: dict | None = None, tokenizer=None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer.json) for transformers.

  Returns the Hugging Face architecture written. `params` may be jax or numpy
  arrays (unboxed), as `load_hf` returns or training saves.
  """
  if family not in FAMILIES:
    raise UserError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
  params = _plain(params)
  if model_config.get("scan_layers"):
    params, model_config = unscan(params), {**model_config, "scan_layers": False}
  architecture = FAMILIES[family].save(model_config, params, out_dir,
                                       **_save_options(family, objective_options))
  if tokenizer is not None:
    tokenizer.save_hf(out_dir)
  return architecture


def _save_options(family: str, options: dict | None) -> dict:
  options = dict(options or {})
  if family in ("vit", "vit_mae"):
    return {"mask_ratio": options["mask_ratio"]} if "mask_ratio" in options else {}
  return {}


def unscan(tree):
  """Params of scanned stacks (`layers`: every leaf has a leading layer axis) as the
  unscanned model names them (`block_00`, `block_01`, ...), as numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, dict):
      (depth,) = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(value)}  # one stack
      for i in range(depth):
        out[f"block_{i:02d}"] = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], value)
    else:
      out[key] = unscan(value)
  return out


def _plain(tree):
  """Nested dicts (FrozenDict / boxed leaves -> dict / arrays)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  tree = nn.unbox(tree)
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


__all__ = ["FAMILIES", "Imported", "build_model", "check_tokenizer_fits", "load_hf", "save_hf",
           "sentence_transformers_defaults", "supported_architectures"]
