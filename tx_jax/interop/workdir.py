"""`tx-jax import` / `tx-jax export`: a Hugging Face model directory <-> a tx_jax workdir.

An imported workdir is a regular one: `config.json` (the matching objective's
config from configs/ with the model's architecture), `tokenizer/` (the model's
own tokenizer.json) and a sealed checkpoint at step 0 that holds the weights
and a fresh optimizer state but no data position. `tx-jax train --workdir W`
continues pretraining from it (MLM for BERT, causal LM for GPT-2, span
corruption for T5, MAE for ViT-MAE); `eval`, `embed`, `generate`, `topics
--encoder` and fine-tuning read it like any other workdir, on any mesh.

Sentence-transformers directories record their pooling and normalisation;
they become the workdir's embedding defaults (`config.embed`).
"""

from __future__ import annotations

import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from tx_jax import parallel
from tx_jax.errors import UserError
from tx_jax.interop import load_hf, save_hf
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train.experiment import (build_objective, checkpoint_meta, make_tx, tokenizer_dir)
from tx_jax.train.state import init_state
from tx_jax.train.trained import load_trained, single_device_mesh

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
# The config each imported objective's run starts from.
BASE_CONFIGS = {"masked_lm": "bert.py", "causal_lm": "gpt.py", "span_corruption": "t5.py",
                "mae": "mae.py"}
FAMILIES = {"masked_lm": "bert", "causal_lm": "gpt2", "span_corruption": "t5"}


def _check_out(out: str):
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out {out!r} exists and is not empty; import into a new directory")


def _run_config(imported, model_dir: str) -> ml_collections.ConfigDict:
  """The base config of the imported objective with the model's architecture."""
  objective = imported.objective or "mae"     # a ViT encoder gets a fresh MAE decoder
  config = config_lib.load_config_file(os.path.join(CONFIG_DIR, BASE_CONFIGS[objective]))
  with config.unlocked():
    model = dict(imported.model_config)
    if imported.objective is None:   # ViTModel: a decoder half as wide as the encoder
      d = max(32, (model["d_model"] // 2) // 32 * 32)
      model.update(decoder_num_layers=min(8, model["num_layers"]), decoder_d_model=d,
                   decoder_num_heads=max(1, d // 64), decoder_mlp_dim=4 * d)
    for key, value in model.items():
      config.model[key] = value
    options = {k: v for k, v in imported.objective_options.items()
               if objective != "mae" or k in ("mask_ratio", "norm_pix_loss")}
    if imported.architecture == "BertForPreTraining":  # its 2-way head learned BERT's task
      options.pop("sentence_order", None)
      options["sentence_task"] = "nsp"
    config.objective_options = ml_collections.ConfigDict(options)
    if imported.tokenizer is not None:
      config.data.tokenizer = "hf:" + os.path.join(os.path.abspath(model_dir), "tokenizer.json")
      config.data.specials = ()
    if "seq_len" in config.data:
      max_len = int(config.model.max_len)
      config.data.seq_len = int(imported.embedding_defaults.get(
          "max_len", min(config.data.seq_len, max_len)))
      config.data.seq_len = min(config.data.seq_len, max_len)
    config.embed = ml_collections.ConfigDict({
        "pooling": imported.embedding_defaults.get("pooling", "mean"),
        "normalize": bool(imported.embedding_defaults.get("normalize", False))})
    config.imported_from = ml_collections.ConfigDict({
        "directory": os.path.abspath(model_dir), "architecture": imported.architecture,
        "family": imported.family})
  return config


def _params_into(fresh, imported_params, is_encoder_only: bool):
  """The imported arrays in the tree (and dtypes) of freshly initialised params."""
  if is_encoder_only:  # ViTModel -> the MAE's encoder; the decoder stays as initialised
    fresh = dict(fresh)
    fresh["encoder"] = _params_into(fresh["encoder"], imported_params, False)
    return fresh
  flat_fresh = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
  flat_new = dict(jax.tree_util.tree_flatten_with_path(imported_params)[0])
  missing = sorted(set(map(jax.tree_util.keystr, flat_fresh)) -
                   set(map(jax.tree_util.keystr, flat_new)))
  if missing:
    raise UserError(f"the imported weights lack {missing[0]} of the tx_jax model")
  leaves = []
  for path, leaf in flat_fresh.items():
    value = np.asarray(flat_new[path])
    if value.shape != leaf.shape:
      raise UserError(f"imported tensor {jax.tree_util.keystr(path)} has shape {value.shape}, "
                      f"the model needs {leaf.shape}")
    leaves.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), leaves)


def import_hf(model_dir: str, out: str) -> dict:
  """`tx-jax import --from DIR --out WORKDIR`; returns a summary. Writes nothing on error."""
  _check_out(out)
  imported = load_hf(model_dir)
  config = _run_config(imported, model_dir)
  tok = imported.tokenizer
  objective = build_objective(config, tok)
  tx = make_tx(objective, config)
  init_len = objective.init_len(config)
  # The shapes of a fresh state; its params are replaced by the imported arrays.
  shapes = jax.eval_shape(lambda: init_state(objective, tx, init_len, config.train.seed))
  params = _params_into(shapes.params, imported.params, imported.objective is None)
  if imported.objective is None:  # the fresh decoder
    fresh = nn.unbox(objective.init_params(jax.random.key(config.train.seed), init_len))
    params["pixel_decoder"] = fresh["pixel_decoder"]
    for key in fresh:
      params.setdefault(key, fresh[key])
  mesh = single_device_mesh()
  params = jax.device_put(params, parallel.replicated(mesh))
  state = shapes.replace(step=np.zeros((), np.int32), params=params,
                         opt_state=tx.init(params), rng=jax.random.key_data(
                             jax.random.key(config.train.seed)),
                         skipped=np.zeros((), np.int32), skip_run=np.zeros((), np.int32))
  tmp = out.rstrip("/") + ".importing"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  try:
    os.makedirs(tmp)
    config_lib.save_json(config, os.path.join(tmp, "config.json"))
    if tok is not None:
      tok.save(tokenizer_dir(tmp))
    with ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False) as ckpt:
      ckpt.save(0, state, None, checkpoint_meta(config, tok), force=True)
      ckpt.wait()
    if os.path.isdir(out):
      os.rmdir(out)  # empty, checked above
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  return {"out": out, "family": imported.family, "architecture": imported.architecture,
          "objective": config.objective, "parameters": n,
          "tokenizer": type(tok).__name__ if tok is not None else None,
          "ignored": list(imported.ignored), "embedding_defaults": dict(config.embed)}


def export_hf(workdir: str, out: str) -> dict:
  """`tx-jax export --workdir W --out DIR`: the newest checkpoint as a Hugging Face dir."""
  _check_out(out)
  trained = load_trained(workdir)
  config = trained.config
  name = config.objective
  if name == "mae":
    family = "vit_mae"
  elif name in FAMILIES:
    family = FAMILIES[name]
  else:
    raise UserError(f"{workdir!r} holds a {name} model; export supports "
                    f"{sorted(FAMILIES) + ['mae']} workdirs")
  options = dict(config.get("objective_options") or {})
  architecture = save_hf(family, config.model.to_dict(), jax.device_get(trained.params), out,
                         objective_options=options,
                         tokenizer=trained.tokenizer if hasattr(trained.tokenizer, "save_hf")
                         else None)
  return {"out": out, "family": family, "architecture": architecture, "step": trained.step}
