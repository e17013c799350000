"""Hugging Face <-> tx_jax conversion, checked against transformers itself.

Each test builds a small random model with transformers (torch, CPU), saves it,
imports it with tx_jax.interop (safetensors + numpy only) and compares outputs
on random inputs with the transformers forward pass.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tx_jax import interop  # pylint: disable=g-import-not-at-top
from tx_jax.errors import UserError  # pylint: disable=g-import-not-at-top

ATOL = 1e-4


def _randomize(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if name.endswith("LayerNorm.weight") or "layernorm" in name.lower() or \
           name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or \
           name.endswith("ln_f.weight") or "layer_norm" in name or name.endswith("norm.weight"):
          p.add_(1.0)
  return model.eval()


def _tree_shapes(tree):
  return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _init_shapes(model, *inputs, rngs=("params",)):
  import flax.linen as nn
  keys = {n: jax.random.key(0) for n in rngs}
  return _tree_shapes(nn.unbox(jax.eval_shape(lambda: model.init(keys, *inputs))["params"]))


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------ BERT

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=24, type_vocab_size=2)


def _bert_inputs(seed=1, batch=2, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, BERT["vocab_size"], (batch, length))
  types = (np.arange(length)[None] >= rng.integers(2, length, (batch, 1))).astype(np.int64)
  return tokens, types


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertForPreTraining"])
def test_bert_parity(tmp_path, arch):
  hf = _randomize(getattr(transformers, arch)(transformers.BertConfig(**BERT)))
  hf.save_pretrained(str(tmp_path))
  imported = interop.load_hf(str(tmp_path))
  assert (imported.family, imported.objective, imported.architecture) == ("bert", "masked_lm",
                                                                          arch)
  model = interop.build_model("bert", imported.model_config, imported.objective_options)
  tokens, types = _bert_inputs()
  assert _tree_shapes(imported.params) == _init_shapes(model, jnp.zeros((1, 4), jnp.int32))
  logits, out = model.apply({"params": imported.params}, jnp.asarray(tokens, jnp.int32),
                            token_types=jnp.asarray(types, jnp.int32))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens), token_type_ids=torch.tensor(types), output_hidden_states=True)
  hidden_err = _max_abs(out["pre_logits"], ref.hidden_states[-1])
  logits_err = _max_abs(logits, ref.logits if arch == "BertForMaskedLM"
                        else ref.prediction_logits)
  print(f"{arch}: hidden {hidden_err:.2e} logits {logits_err:.2e}")
  assert hidden_err < ATOL and logits_err < ATOL
  if arch == "BertForPreTraining":
    nsp_err = _max_abs(out["sentence_logits"][:, 0], ref.seq_relationship_logits)
    print(f"NSP logits {nsp_err:.2e}")
    assert nsp_err < ATOL


def test_bert_model_padding_and_export(tmp_path):
  hf = _randomize(transformers.BertModel(transformers.BertConfig(**BERT)))
  hf.save_pretrained(str(tmp_path / "hf"))
  imported = interop.load_hf(str(tmp_path / "hf"))
  assert imported.objective_options == {"mlm_head": False, "sentence_order": False}
  assert imported.ignored == ["pooler.dense.bias", "pooler.dense.weight"]
  model = interop.build_model("bert", imported.model_config, imported.objective_options)
  tokens, types = _bert_inputs(seed=2)
  mask = np.ones_like(tokens)
  mask[0, 7:] = 0  # padded tail: segment id 0 in tx_jax
  _, out = model.apply({"params": imported.params}, jnp.asarray(tokens, jnp.int32),
                       token_types=jnp.asarray(types, jnp.int32),
                       segment_ids=jnp.asarray(mask, jnp.int32))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  real = mask.astype(bool)
  err = _max_abs(np.asarray(out["pre_logits"])[real], ref[real])
  print(f"BertModel padded hidden {err:.2e}")
  assert err < ATOL
  # export -> transformers -> same hidden states
  arch = interop.save_hf("bert", imported.model_config, imported.params, str(tmp_path / "out"))
  assert arch == "BertModel"
  back = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    ref2 = back(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  assert _max_abs(ref2[real], ref[real]) < ATOL
