"""Hugging Face <-> tx_jax conversion, checked against transformers itself.

Each test builds a small random model with transformers (torch, CPU), saves it,
imports it with tx_jax.interop (safetensors + numpy only) and compares outputs
on random inputs with the transformers forward pass.
"""

import json
import os
import re

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
  """Random values in every trainable tensor (biases and norms too, which a fresh
  model sets to 0 / 1 and which would hide a mapping mistake); norm scales near 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if re.search(r"(norm|ln_[12f])[a-z_]*\.weight$", name.lower()):
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
  # export -> transformers -> the same logits; import again -> the same params
  assert interop.save_hf("bert", imported.model_config, imported.params,
                         str(tmp_path / "out")) == arch
  back = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    ref2 = back(torch.tensor(tokens), token_type_ids=torch.tensor(types))
  for name in ("logits", "prediction_logits", "seq_relationship_logits"):
    if hasattr(ref, name) and getattr(ref, name) is not None:
      assert _max_abs(getattr(ref2, name), getattr(ref, name)) < ATOL
  again = interop.load_hf(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, imported.params)
  assert again.model_config == imported.model_config


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


# ------------------------------------------------------------------ GPT-2

GPT2 = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=96,
            eos_token_id=96)


def _gpt2(tmp_path):
  hf = _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)))
  hf.save_pretrained(str(tmp_path))
  return hf, interop.load_hf(str(tmp_path))


def test_gpt2_parity_and_greedy(tmp_path):
  from tx_jax import generate
  hf, imported = _gpt2(tmp_path / "hf")
  assert (imported.family, imported.objective) == ("gpt2", "causal_lm")
  model = interop.build_model("gpt2", imported.model_config)
  assert _tree_shapes(imported.params) == _init_shapes(model, jnp.zeros((1, 4), jnp.int32))
  tokens = np.random.default_rng(3).integers(0, GPT2["vocab_size"], (2, 16))
  logits, out = model.apply({"params": imported.params}, jnp.asarray(tokens, jnp.int32))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens), output_hidden_states=True)
  hidden_err, logits_err = (_max_abs(out["pre_logits"], ref.hidden_states[-1]),
                            _max_abs(logits, ref.logits))
  print(f"GPT-2: hidden {hidden_err:.2e} logits {logits_err:.2e}")
  assert hidden_err < ATOL and logits_err < ATOL
  # Greedy continuation: tx_jax's KV-cache sampler against transformers' generate.
  prompt = tokens[:, :5]
  ours = generate.sample(model, imported.params, jnp.asarray(prompt, jnp.int32),
                         jax.random.key(0), max_new_tokens=12, temperature=0.0)
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones_like(
        torch.tensor(prompt)), do_sample=False, max_new_tokens=12, min_new_tokens=12,
        pad_token_id=GPT2["eos_token_id"])
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_gpt2_export_roundtrip(tmp_path):
  hf, imported = _gpt2(tmp_path / "hf")
  interop.save_hf("gpt2", imported.model_config, imported.params, str(tmp_path / "out"))
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
  tokens = torch.tensor(np.random.default_rng(4).integers(0, GPT2["vocab_size"], (2, 10)))
  with torch.no_grad():
    assert _max_abs(back(tokens).logits, hf(tokens).logits) < ATOL
  again = interop.load_hf(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, imported.params)
  assert again.model_config == imported.model_config


# ------------------------------------------------------------------ T5

T5 = dict(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
          decoder_start_token_id=0)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_parity_and_export(tmp_path, version):
  extra = (dict(feed_forward_proj="relu", tie_word_embeddings=True) if version == "v1.0" else
           dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
  hf = _randomize(transformers.T5ForConditionalGeneration(transformers.T5Config(**T5, **extra)))
  if version == "v1.1":  # transformers 5 ties lm_head; a v1.1 checkpoint holds its own
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf.lm_head.weight.shape) * 0.1)
  hf.save_pretrained(str(tmp_path / "hf"))
  hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
  imported = interop.load_hf(str(tmp_path / "hf"))
  assert (imported.family, imported.objective) == ("t5", "span_corruption")
  assert imported.model_config["tie_embeddings"] == (version == "v1.0")
  model = interop.build_model("t5", imported.model_config)
  t = jnp.zeros((1, 4), jnp.int32)
  assert _tree_shapes(imported.params) == _init_shapes(model, t, t)
  rng = np.random.default_rng(5)
  # 40 > max_distance: the far, log-spaced buckets are exercised too.
  inputs, targets = rng.integers(0, T5["vocab_size"], (2, 40)), rng.integers(0, 101, (2, 30))
  logits, out = model.apply({"params": imported.params}, jnp.asarray(inputs, jnp.int32),
                            jnp.asarray(targets, jnp.int32))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(targets),
             output_hidden_states=True)
  enc_err = _max_abs(out["encoded"], ref.encoder_last_hidden_state)
  dec_err = _max_abs(out["pre_logits"], ref.decoder_hidden_states[-1])
  logits_err = _max_abs(logits, ref.logits)
  print(f"T5 {version}: encoder {enc_err:.2e} decoder {dec_err:.2e} logits {logits_err:.2e}")
  assert enc_err < ATOL and dec_err < ATOL and logits_err < ATOL
  interop.save_hf("t5", imported.model_config, imported.params, str(tmp_path / "out"))
  back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    back_logits = back(input_ids=torch.tensor(inputs),
                       decoder_input_ids=torch.tensor(targets)).logits
  assert _max_abs(back_logits, ref.logits) < ATOL
  again = interop.load_hf(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, imported.params)


# ------------------------------------------------------------------ ViT, ViT-MAE

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=16, patch_size=4, num_channels=3)


def test_vit_parity_and_export(tmp_path):
  hf = _randomize(transformers.ViTModel(transformers.ViTConfig(**VIT)))
  hf.save_pretrained(str(tmp_path / "hf"))
  imported = interop.load_hf(str(tmp_path / "hf"))
  assert (imported.family, imported.objective) == ("vit", None)
  model = interop.build_model("vit", imported.model_config)
  images = np.random.default_rng(6).normal(size=(2, 3, 16, 16)).astype(np.float32)
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  assert _tree_shapes(imported.params) == _init_shapes(model, nhwc)
  _, out = model.apply({"params": imported.params}, nhwc)
  with torch.no_grad():
    ref = hf(torch.tensor(images)).last_hidden_state.numpy()
  err = _max_abs(out["encoded"], ref)
  print(f"ViT: hidden {err:.2e}")
  assert err < ATOL and _max_abs(out["pre_logits"], ref[:, 0]) < ATOL
  interop.save_hf("vit", imported.model_config, imported.params, str(tmp_path / "out"))
  back = transformers.ViTModel.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    assert _max_abs(back(torch.tensor(images)).last_hidden_state, ref) < ATOL
  again = interop.load_hf(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, imported.params)


def _mae_sincos(hf):
  """The fixed tables pretrained MAE checkpoints hold, by transformers' own code (a fresh
  transformers 5 model can leave them zero): its canonical table with the halves swapped."""
  from transformers.models.vit_mae import modeling_vit_mae as m
  for param in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
    table = m.build_2d_sinusoidal_position_embedding(height=4, width=4,
                                                     embed_dim=param.shape[-1], cls_token=True)
    half = table.shape[-1] // 2
    with torch.no_grad():
      param.copy_(torch.cat([table[..., half:], table[..., :half]], -1)[None])


def test_vit_mae_parity_and_export(tmp_path):
  config = transformers.ViTMAEConfig(**VIT, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                                     decoder_num_attention_heads=2, decoder_intermediate_size=32,
                                     mask_ratio=0.75)
  hf = _randomize(transformers.ViTMAEForPreTraining(config))
  _mae_sincos(hf)
  hf.save_pretrained(str(tmp_path / "hf"))
  imported = interop.load_hf(str(tmp_path / "hf"))
  assert (imported.family, imported.objective) == ("vit_mae", "mae")
  model = interop.build_model("vit_mae", imported.model_config, imported.objective_options)
  rng = np.random.default_rng(7)
  images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  assert _tree_shapes(imported.params) == _init_shapes(model, nhwc, rngs=("params", "mask"))
  pred, out = model.apply({"params": imported.params}, nhwc, noise=jnp.asarray(noise))
  with torch.no_grad():
    ref = hf(torch.tensor(images), noise=torch.tensor(noise), output_hidden_states=True)
  mask_equal = np.array_equal(np.asarray(out["mask"]), ref.mask.numpy())
  enc_err = _max_abs(out["encoded"], hf.vit(torch.tensor(images), noise=torch.tensor(noise)
                                            ).last_hidden_state.detach())
  pred_err = _max_abs(pred, ref.logits)
  print(f"ViT-MAE: encoder {enc_err:.2e} pixels {pred_err:.2e}")
  assert mask_equal and enc_err < ATOL and pred_err < ATOL
  interop.save_hf("vit_mae", imported.model_config, imported.params, str(tmp_path / "out"),
                  objective_options=imported.objective_options)
  back = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    back_logits = back(torch.tensor(images), noise=torch.tensor(noise)).logits
  assert _max_abs(back_logits, ref.logits) < ATOL
  again = interop.load_hf(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, imported.params)


# ------------------------------------------------------------------ sharded checkpoints, bad input


def _bert_dir(path, **kw):
  hf = _randomize(transformers.BertForMaskedLM(transformers.BertConfig(**BERT)))
  hf.save_pretrained(str(path), **kw)
  return hf


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_import_as_float32(tmp_path, dtype):
  hf = _bert_dir(tmp_path / "fp32")
  hf.to(getattr(torch, dtype)).save_pretrained(str(tmp_path / "half"))
  half = interop.load_hf(str(tmp_path / "half"))
  want = interop.load_hf(str(tmp_path / "fp32")).params
  leaves = jax.tree_util.tree_leaves(half.params)
  assert {str(x.dtype) for x in leaves} == {"float32"}
  # each value is the fp32 one rounded to the half type
  got = half.params["encoder"]["block_00"]["mlp"]["wi"]["kernel"]
  ref = want["encoder"]["block_00"]["mlp"]["wi"]["kernel"]
  rounded = torch.tensor(ref).to(getattr(torch, dtype)).float().numpy()
  np.testing.assert_array_equal(got, rounded)


def test_sharded_index_matches_single_file(tmp_path):
  _bert_dir(tmp_path / "one")
  _bert_dir(tmp_path / "many", max_shard_size="40KB")
  assert os.path.isfile(tmp_path / "many" / "model.safetensors.index.json")
  assert not os.path.isfile(tmp_path / "many" / "model.safetensors")
  one, many = interop.load_hf(str(tmp_path / "one")), interop.load_hf(str(tmp_path / "many"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, one.params, many.params)


def _rewrite(path, change):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / "model.safetensors"))
  change(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_inputs_raise_one_clear_line(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    interop.load_hf(str(tmp_path))
  _bert_dir(tmp_path / "bert")
  config = json.loads((tmp_path / "bert" / "config.json").read_text())
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text(json.dumps(
      {**config, "model_type": "roberta", "architectures": ["RobertaModel"]}))
  with pytest.raises(UserError, match="RobertaModel.*supported architectures: BertForMaskedLM"):
    interop.load_hf(str(tmp_path / "other"))
  name = "bert.encoder.layer.1.intermediate.dense.weight"
  _rewrite(tmp_path / "bert", lambda t: t.pop(name))
  with pytest.raises(UserError, match=f"tensor '{name}' is missing"):
    interop.load_hf(str(tmp_path / "bert"))
  _rewrite(tmp_path / "bert", lambda t: t.update({name: np.zeros((64, 31), np.float32)}))
  with pytest.raises(UserError, match=rf"tensor '{name}' .* shape \[64, 31\], expected \[64, 32\]"):
    interop.load_hf(str(tmp_path / "bert"))
  _rewrite(tmp_path / "bert", lambda t: t.update({name: np.zeros((64, 32), np.float32),
                                                  "bert.encoder.layer.2.extra": np.zeros(3)}))
  with pytest.raises(UserError, match="unexpected tensor 'bert.encoder.layer.2.extra'"):
    interop.load_hf(str(tmp_path / "bert"))
  with pytest.raises(UserError) as info:
    interop.load_hf(str(tmp_path / "bert"))
  assert "\n" not in str(info.value)


def test_tokenizer_that_does_not_fit_the_model(tmp_path):
  import all_minilm_l6_v2
  minilm = all_minilm_l6_v2.extract_model(str(tmp_path / "minilm"))
  _bert_dir(tmp_path / "bert")  # vocab 99 < the tokenizer's 30522
  (tmp_path / "bert" / "tokenizer.json").write_text((minilm / "tokenizer.json").read_text())
  with pytest.raises(UserError, match="30522 tokens but the model's vocab_size is 99"):
    interop.load_hf(str(tmp_path / "bert"))


# ------------------------------------------------------------------ a real model: all-MiniLM-L6-v2

SENTENCES = ["A man is eating food.", "The new movie is awesome!",
             "Clustering short posts by topic works better with sentence embeddings.",
             "naïve café owners öffnen früh", "Hi"]


def test_all_minilm_l6_v2_embeddings(tmp_path):
  import all_minilm_l6_v2
  model_dir = str(all_minilm_l6_v2.extract_model(str(tmp_path)))
  imported = interop.load_hf(model_dir)
  assert imported.embedding_defaults == {"pooling": "mean", "normalize": True, "max_len": 256}
  assert imported.architecture == "BertModel" and imported.tokenizer is not None
  tok = imported.tokenizer
  cls, sep, pad = tok.special_ids["<cls>"], tok.special_ids["<sep>"], tok.special_ids["<pad>"]
  rows = [[cls] + tok.encode(s) + [sep] for s in SENTENCES]
  width = max(map(len, rows))
  tokens = np.array([r + [pad] * (width - len(r)) for r in rows])
  mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
  # Reference: transformers' own tokenizer and model, sentence-transformers' mean pooling.
  ref_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  batch = ref_tok(SENTENCES, padding=True, return_tensors="pt")
  np.testing.assert_array_equal(tokens, batch["input_ids"].numpy())
  with torch.no_grad():
    hidden = transformers.AutoModel.from_pretrained(model_dir).eval()(**batch).last_hidden_state
  m = batch["attention_mask"][..., None].float()
  ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()

  model = interop.build_model("bert", imported.model_config, imported.objective_options)
  _, out = model.apply({"params": imported.params}, jnp.asarray(tokens, jnp.int32),
                       segment_ids=jnp.asarray(mask, jnp.int32))
  h = np.asarray(out["pre_logits"], np.float64)
  pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  cosine = np.sum(ours * ref, axis=-1)
  print(f"all-MiniLM-L6-v2 cosine min {cosine.min():.7f}")
  assert np.all(cosine >= 0.9999)


# ------------------------------------------------------------------ HFTokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, naïve café — ünïcode ✓",
         "tabs\tand\nnewlines  double  spaces", "numbers 12345 and symbols #$%&"]


def _trained(kind):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  if kind == "bpe":
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  else:
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
  tok.train_from_iterator(TEXTS * 20, trainer)
  return tok.to_str()


def test_hf_tokenizer_byte_level_bpe_is_exact(tmp_path):
  from tx_jax.data.hf_tokenizer import HFTokenizer
  from tx_jax.data.tokenizers import load_tokenizer
  tok = HFTokenizer(_trained("bpe"))
  lengths = tok.token_byte_lengths()
  assert tok.special_ids["</s>"] == tok.special_ids["<|endoftext|>"]
  assert lengths[tok.special_ids["</s>"]] == 0
  for text in TEXTS + ["unseen: 日本語 🙂 <|endoftext|>"]:
    ids = tok.encode(text)
    assert tok.special_ids["</s>"] not in ids  # the special's spelling is text
    assert tok.decode(ids) == text
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
  tok.save(str(tmp_path))
  back = load_tokenizer(str(tmp_path))
  assert back.fingerprint() == tok.fingerprint() and back.encode(TEXTS[1]) == tok.encode(TEXTS[1])
  assert tok.decode([tok.special_ids["</s>"], tok.vocab_size + 5]) == "\ufffd"


def test_hf_tokenizer_unigram_counts_spaces():
  import pickle
  from tx_jax.data.hf_tokenizer import HFTokenizer
  tok = pickle.loads(pickle.dumps(HFTokenizer(_trained("unigram"), specials=["<pad>", "</s>"])))
  lengths = tok.token_byte_lengths()
  for text in TEXTS[:2] + ["lazy fox, quick dog"]:
    ids = tok.encode(text)
    # Metaspace prepends "▁" to the text: one byte more than the text (spaces inside are "▁").
    assert int(lengths[ids].sum()) == len(text.encode("utf-8")) + 1
    assert tok.decode(ids) == text
  assert lengths[tok.special_ids["<unk>"]] == 0  # unknown characters' bytes are not counted
  with pytest.raises(UserError, match="no special token <mask>"):
    HFTokenizer(_trained("unigram"), specials=["<mask>"])


def test_hf_tokenizer_wordpiece(tmp_path):
  import all_minilm_l6_v2
  from tx_jax.data.tokenizers import load_tokenizer
  model_dir = all_minilm_l6_v2.extract_model(str(tmp_path))
  tok = load_tokenizer(str(model_dir))  # a Hugging Face dir's tokenizer.json
  assert {k: tok.special_ids[k] for k in ("<pad>", "<unk>", "<cls>", "<sep>", "<mask>")} == {
      "<pad>": 0, "<unk>": 100, "<cls>": 101, "<sep>": 102, "<mask>": 103}
  text = "tokenization of unbelievably long words, and punctuation."
  ids = tok.encode(text)
  assert any(tok._tok.id_to_token(i).startswith("##") for i in ids)
  assert tok.special_ids["<mask>"] not in tok.encode("a [MASK] here")
  assert int(tok.token_byte_lengths()[ids].sum()) == len(text) + 1
  assert tok.decode(ids) == text


# ------------------------------------------------------------------ export of tx_jax-made params


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_export_of_tx_jax_initialised_gpt(tmp_path, scan):
  from tx_jax.models import DecoderLM, TransformerConfig
  cfg = TransformerConfig(vocab_size=61, num_layers=3, d_model=32, num_heads=4, mlp_dim=64,
                          max_len=16, norm_eps=1e-5, scan_layers=scan)
  model = DecoderLM(cfg)
  tokens = np.random.default_rng(8).integers(0, 61, (2, 16))
  boxed = model.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))["params"]  # as trained
  ours, _ = model.apply({"params": boxed}, jnp.asarray(tokens, jnp.int32))
  config = {f: getattr(cfg, f) for f in ("vocab_size", "num_layers", "d_model", "num_heads",
                                         "mlp_dim", "max_len", "norm_eps", "scan_layers")}
  interop.save_hf("gpt2", config, boxed, str(tmp_path))
  hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    assert _max_abs(hf(torch.tensor(tokens)).logits, ours) < ATOL
  with pytest.raises(UserError, match="GPT-2 cannot express model.positions='rope'"):
    interop.save_hf("gpt2", {**config, "positions": "rope"}, boxed, str(tmp_path / "rope"))
