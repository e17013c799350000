"""`tx-jax import` / `export` as a user runs them: an imported workdir works everywhere.

References are transformers' own models (torch, CPU) and sentence-transformers'
pooling written out with torch; never tx_jax itself.
"""

import csv
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tx_jax import cli  # pylint: disable=g-import-not-at-top

SENTENCES = ["A man is eating food.", "A man is riding a horse.",
             "The new movie is awesome.", "Python lists keep their order.",
             "Open the file before reading it, and close it afterwards.", "ok"]


def _randomize(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
  return model.eval()


def _posts_csv(path, texts):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "text"])
    for i, t in enumerate(texts):
      w.writerow([f"p{i}", t])
  return f"file:{path}"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  import all_minilm_l6_v2
  root = tmp_path_factory.mktemp("minilm")
  model_dir = str(all_minilm_l6_v2.extract_model(str(root / "hf")))
  workdir = str(root / "wd")
  assert cli.main(["import", "--from", model_dir, "--out", workdir]) == 0
  return model_dir, workdir


def test_minilm_import_then_embed_matches_sentence_transformers(minilm, tmp_path, capsys):
  model_dir, workdir = minilm
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["objective"] == "masked_lm" and config["embed"] == {"pooling": "mean",
                                                                    "normalize": True}
  data = _posts_csv(tmp_path / "posts.csv", SENTENCES)
  out = str(tmp_path / "emb.npz")
  assert cli.main(["embed", "--workdir", workdir, "--data", data, "--out", out]) == 0
  with np.load(out) as z:
    ours = z["embeddings"].astype(np.float64)
    meta = json.loads(str(z["meta"]))
  assert meta["pooling"] == "mean" and meta["normalized"] and meta["step"] == 0
  # sentence-transformers' recipe by hand: the model, mean over the mask, L2.
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  batch = tok(SENTENCES, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = transformers.AutoModel.from_pretrained(model_dir).eval()(**batch).last_hidden_state
  m = batch["attention_mask"][..., None].float()
  ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
  cosine = np.sum(ours * ref, axis=-1) / np.linalg.norm(ours, axis=-1)
  print(f"import + embed, all-MiniLM-L6-v2: cosine min {cosine.min():.7f}")
  assert np.all(cosine >= 0.9999), cosine


def test_import_refuses_bad_input_and_writes_nothing(minilm, tmp_path, capsys):
  model_dir, _ = minilm
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  assert cli.main(["import", "--from", model_dir, "--out", str(busy)]) == 2
  assert "not empty" in capsys.readouterr().err and os.listdir(busy) == ["keep.txt"]
  empty = tmp_path / "no_config"
  empty.mkdir()
  assert cli.main(["import", "--from", str(empty), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "config.json" in err
  assert not os.path.exists(tmp_path / "x")


def test_gpt2_import_continues_training_generates_and_exports(tmp_path, capsys):
  cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=0, eos_token_id=0)
  hf = _randomize(transformers.GPT2LMHeadModel(cfg))
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(str(hf_dir))
  import tokenizers  # a byte-level BPE trained on a few lines, as GPT-2's is built
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SENTENCES * 30, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(hf_dir / "tokenizer.json"))
  wd = str(tmp_path / "wd")
  assert cli.main(["import", "--from", str(hf_dir), "--out", wd]) == 0
  capsys.readouterr()
  # Continue pretraining with the workdir's own config (causal LM on the default text).
  assert cli.main(["train", "--workdir", wd, "--config.train.steps=2",
                   "--config.train.batch_size=8", "--config.data.seq_len=32",
                   "--config.train.log_every=1", "--config.train.eval_every=2",
                   "--config.train.checkpoint_every=2", "--config.data.eval_batches=1"]) == 0
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("eval/bits_per_byte" in l for l in lines)
  capsys.readouterr()
  assert cli.main(["generate", "--workdir", wd, "--prompt", "A man", "--max-new-tokens", "5",
                   "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("A man")
  out = str(tmp_path / "exported")
  assert cli.main(["export", "--workdir", wd, "--out", out]) == 0
  capsys.readouterr()
  # The exported step-2 model loads in transformers and differs from the imported one.
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = torch.tensor([[1, 2, 3, 4, 5]])
  with torch.no_grad():
    assert not torch.allclose(back(ids).logits, hf(ids).logits)


def test_masked_lm_on_a_hugging_face_vocabulary_replaces_with_regular_tokens_only(minilm):
  """BERT's specials sit inside the vocabulary ([PAD]=0, [CLS]=101, [MASK]=103): random
  replacements must come from the other ids (counted by hand here)."""
  from tx_jax.data import denoising
  from tx_jax.data.masking import bert_mask
  from tx_jax.data.tokenizers import load_tokenizer
  _, workdir = minilm
  tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
  specials = set(tok.special_ids.values())
  assert {0, 100, 101, 102, 103} <= specials
  regular = denoising.regular_ids(tok)
  assert len(regular) == tok.vocab_size - len(specials) == denoising.regular_vocab(tok)
  assert not set(regular.tolist()) & specials
  tokens = np.full((64, 64), 2000, np.int32)
  inputs, selected = bert_mask(tokens, np.ones_like(tokens, bool), np.random.default_rng(0),
                               mask_id=103, num_regular=len(regular), mask_rate=0.9,
                               mask_token_rate=0.0, random_token_rate=1.0, regular_ids=regular)
  replaced = inputs[selected]
  assert selected.sum() > 3000 and not set(replaced.tolist()) & specials
  assert len(set(replaced.tolist())) > 1000  # spread over the regular vocabulary


def test_topics_encoder_must_be_a_text_workdir(tmp_path, capsys):
  data = _posts_csv(tmp_path / "posts.csv", SENTENCES * 5)
  out = tmp_path / "topics"
  assert cli.main(["topics", "--data", data, "--out", str(out), "--encoder",
                   str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "not a tx-jax workdir" in err
  assert not out.exists()
  image = tmp_path / "image_wd"
  image.mkdir()
  (image / "config.json").write_text(json.dumps({"objective": "mae"}))
  assert cli.main(["topics", "--data", data, "--out", str(out), "--encoder", str(image)]) == 2
  assert "image model" in capsys.readouterr().err and not out.exists()
