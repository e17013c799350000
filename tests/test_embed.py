"""Embeddings and the analyst's CLI path: pooling against naive numpy over the model's
own intermediates, padding/batching invariance, .npz contents, bad inputs exit 2."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax import cli
from tx_jax.analysis import embed
from tx_jax.data import sources, tokenizers
from tx_jax.data import tfds as tfds_lib
from tx_jax.errors import UserError
from tx_jax.objectives import text as text_obj

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = {
    "space": "rocket orbit launch satellite astronaut moon crew",
    "food": "pasta sauce recipe oven garlic bread cheese",
    "sport": "match goal striker referee stadium league coach",
}
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
        "model.max_len=32", "data.seq_len=32", "train.batch_size=8", "train.steps=4",
        "train.log_every=2", "train.eval_every=4", "train.checkpoint_every=4",
        "train.async_checkpoints=false", "data.eval_batches=1", "optim.warmup_steps=1",
        "data.tokenizer=byte", "model.vocab_size=256"]


def _posts(n, seed=0):
  """Short labelled posts; a few are longer than the 32-byte context."""
  rng = np.random.default_rng(seed)
  names = sorted(TOPICS)
  rows = []
  for i in range(n):
    label = names[i % len(names)]
    words = rng.choice(TOPICS[label].split(), size=int(rng.integers(2, 9))).tolist()
    rows.append({"text": " ".join(words), "label": label})
  return rows


def _write_csv(path, rows, fields=("text", "label")):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields))
    w.writeheader()
    for r in rows:
      w.writerow({k: r[k] for k in fields})
  return str(path)


def run_cli(args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-layer GPT trained 4 steps on labelled posts (byte tokens), loaded back."""
  from tx_jax.train.trained import load_trained
  d = tmp_path_factory.mktemp("embed")
  data = _write_csv(d / "posts.csv", _posts(90))
  wd = str(d / "wd")
  assert cli.main(["train", "--config", "configs/gpt.py", "--workdir", wd,
                   *[f"--config.{o}" for o in TINY + ["model.vocab_size=256",
                                                      "data.tokenizer=byte"]],
                   f"--config.data.source=file:{data}", "--config.data.eval_source="]) == 0
  return load_trained(wd), wd, data


def _naive(trained, texts, layer, pooling, seq_len=32):
  """Each document alone, unpadded (1, n): the model's out[layer] pooled in numpy."""
  apply = jax.jit(lambda p, t: trained.objective.model.apply({"params": p}, t)[1][layer])
  rows = []
  for text in texts:
    ids = trained.tokenizer.encode(text)[:seq_len]
    h = np.asarray(apply(trained.params, jnp.asarray([ids], jnp.int32))[0], np.float64)  # (n, D)
    rows.append({"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling])
  return np.stack(rows)


@pytest.mark.parametrize("layer,pooling", [("pre_logits", "mean"), ("block_00", "last"),
                                           ("embedded", "cls")])
def test_pooling_equals_naive_per_document(trained, layer, pooling):
  tr, _, data = trained
  src = sources.open_source(f"file:{data}")
  texts = [src[i]["text"] for i in range(10)]
  got = embed.embed_source(tr, src, layer=layer, pooling=pooling, batch_size=8,
                          indices=np.arange(10), progress=False)
  # Batches of 8 over 8 devices, last one padded; documents of different lengths.
  np.testing.assert_allclose(got.embeddings, _naive(tr, texts, layer, pooling),
                             rtol=1e-4, atol=1e-5)
  assert got.embeddings.dtype == np.float32 and got.embeddings.shape == (10, 32)


def test_padding_and_batch_size_do_not_change_embeddings(trained):
  tr, _, data = trained
  src = sources.open_source(f"file:{data}")
  short = [i for i in range(len(src)) if len(src[i]["text"]) < 16][:12]
  assert len(short) >= 8
  a = embed.embed_source(tr, src, indices=short, seq_len=16, batch_size=64, progress=False)
  b = embed.embed_source(tr, src, indices=short, seq_len=32, batch_size=1, progress=False)
  # 8 devices: batch 1 rounds up to 8, so 2 batches vs 1 (streamed vs one big batch).
  np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
  c = embed.embed_source(tr, src, indices=short[:5], seq_len=16, batch_size=8, progress=False)
  np.testing.assert_allclose(c.embeddings, a.embeddings[:5], rtol=1e-5, atol=1e-6)


def test_pool_ignores_padding_even_if_not_finite():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  seg = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
  h[seg == 0] = np.nan  # What padded positions hold must not matter.
  mean = np.asarray(text_obj.pool(jnp.asarray(h), jnp.asarray(seg), "mean"))
  np.testing.assert_allclose(mean[0], h[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(mean[1], h[1, 0], rtol=1e-6)
  np.testing.assert_array_equal(mean[2], 0.0)  # A padding row pools to zeros.
  last = np.asarray(text_obj.pool(jnp.asarray(h), jnp.asarray(seg), "last"))
  np.testing.assert_allclose(last[:2], [h[0, 2], h[1, 0]])
  cls = np.asarray(text_obj.pool(jnp.asarray(h), jnp.asarray(seg), "cls"))
  np.testing.assert_allclose(cls[:2], h[:2, 0])
  assert np.isfinite(last).all() and np.isfinite(cls).all()


def test_text_inputs_truncate_and_wrap_bert_specials():
  tok = tokenizers.ByteTokenizer(specials=("<pad>", "<mask>", "<cls>", "<sep>"))
  inputs = text_obj.TextInputs(tok, seq_len=6)
  batch, cut = inputs.collate([{"text": "ab"}, {"text": "abcdefgh"}, {"text": "abcd"}])
  cls, sep = tok.special_ids["<cls>"], tok.special_ids["<sep>"]
  np.testing.assert_array_equal(batch["tokens"], [[cls, 97, 98, sep, 0, 0],
                                                  [cls, 97, 98, 99, 100, sep],
                                                  [cls, 97, 98, 99, 100, sep]])
  np.testing.assert_array_equal(batch["segment_ids"].sum(1), [4, 6, 6])
  assert cut == 1  # "abcd" fits exactly; only the 8-byte text is cut.
  plain, cut = text_obj.TextInputs(tokenizers.ByteTokenizer(), 3).collate([{"text": "abcd"}])
  np.testing.assert_array_equal(plain["tokens"], [[97, 98, 99]])
  assert cut == 1
  # Batches are padded to the shortest power-of-two bucket (>= 16) that fits.
  wide = text_obj.TextInputs(tokenizers.ByteTokenizer(), 128)
  for text, width in [("a", 16), ("a" * 16, 16), ("a" * 17, 32), ("a" * 100, 128),
                      ("a" * 300, 128)]:
    batch, _ = wide.collate([{"text": "b"}, {"text": text}])
    assert batch["tokens"].shape == (2, width), text
    assert batch["segment_ids"][1].sum() == min(len(text), 128)


class _ToyImageObjective:
  """An image 'model' through the objective hook: mean pixel rows times a matrix."""

  def open_embed_source(self, spec):
    images = np.random.default_rng(0).random((13, 4, 4)).astype(np.float32)
    return [{"image": im, "label": i % 2, "id": f"img{i}"} for i, im in enumerate(images)]

  def embed_collate(self, records):
    return {"image": np.stack([r["image"] for r in records])}

  def embed_batch(self, params, batch, layer, pooling):
    if layer != "pre_logits":
      raise ValueError(f"unknown layer {layer!r}; use pre_logits")
    return jnp.mean(batch["image"], axis=1) @ params["w"]                    # (B, 3)


def test_objective_hook_embeds_non_text(tmp_path):
  obj = _ToyImageObjective()
  params = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}
  source = obj.open_embed_source("embedded:toy")
  trained = type("T", (), {"objective": obj, "params": params})()
  got = embed.embed_with_objective(trained, source, layer="pre_logits", pooling="mean",
                                   batch_size=5, progress=False)
  want = np.stack([r["image"].mean(0) @ params["w"] for r in source])
  np.testing.assert_allclose(got.embeddings, want, rtol=1e-5)
  arrays = embed.write_npz(str(tmp_path / "img.npz"), got, source, {"layer": "pre_logits"})
  assert list(arrays["ids"]) == [f"img{i}" for i in range(13)]
  assert "texts" not in arrays and list(arrays["labels"]) == [i % 2 for i in range(13)]
  with pytest.raises(UserError, match="unknown layer 'block_00'"):
    embed.embed_with_objective(trained, source, layer="block_00", pooling="mean",
                               progress=False)


def test_embed_cli_writes_ids_texts_labels(trained, tmp_path):
  tr, wd, data = trained
  out = tmp_path / "emb.npz"
  code = cli.main(["embed", "--workdir", wd, "--data", f"file:{data}", "--out", str(out),
                   "--batch-size", "16", "--sample", "50"])
  assert code == 0
  src = sources.open_source(f"file:{data}")
  with np.load(out, allow_pickle=False) as z:
    assert z["embeddings"].shape == (50, 32) and z["embeddings"].dtype == np.float32
    ids = z["ids"]
    assert len(set(ids.tolist())) == 50 and list(ids) == sorted(ids)
    assert list(z["texts"]) == [src[int(i)]["text"] for i in ids]
    assert list(z["label_names"]) == sorted(TOPICS)
    assert [z["label_names"][l] for l in z["labels"]] == [_posts(90)[int(i)]["label"] for i in ids]
    meta = json.loads(str(z["meta"]))
    longer = sum(len(src[int(i)]["text"].encode()) > 32 for i in ids)
    assert meta["truncated"] == longer > 0 and meta["step"] == 4
    rows = z["embeddings"][:8]
  want = _naive(tr, [src[int(i)]["text"] for i in ids[:8]], "pre_logits", "mean")
  np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-5)
  # And the file feeds analyze, whose report knows the labels.
  code = cli.main(["analyze", "--embeddings", str(out), "--out", str(tmp_path / "rep"),
                   "--k", "3", "--reduce", "pca"])
  assert code == 0
  report = json.loads((tmp_path / "rep" / "report.json").read_text())
  assert {"nmi", "ari", "purity"} <= set(report["metrics"]) and report["k"] == 3


# The model families besides the GPT of `trained` (the span-contrastive Encoder is
# embedded by the topics test): config, overrides beyond TINY (byte tokens).
FAMILIES = {
    "bert": ("configs/bert.py", ["model.vocab_size=260", "data.tokenizer=byte"]),
    "t5": ("configs/t5.py", ["model.vocab_size=358", "data.tokenizer=byte",
                             "model.num_encoder_layers=1"]),
}


@pytest.fixture(scope="module")
def families(trained, tmp_path_factory):
  """name -> (Trained, workdir, data): each family trained 1 step in-process on the posts."""
  from tx_jax.train.trained import load_trained
  d = tmp_path_factory.mktemp("families")
  data = trained[2]
  out = {}
  for name, (config, extra) in FAMILIES.items():
    wd = str(d / name)
    overrides = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=1"]
    assert cli.main(["train", "--config", config, "--workdir", wd,
                     *[f"--config.{o}" for o in overrides + extra],
                     f"--config.data.source=file:{data}", "--config.data.eval_source="]) == 0
    out[name] = (load_trained(wd), wd, data)
  return out


def _naive_family(tr, texts, name, pooling):
  """Each document alone through the model's own forward pass, pooled in numpy."""
  model, ids = tr.objective.model, tr.tokenizer.special_ids
  rows = []
  for text in texts:
    tokens = list(tr.tokenizer.encode(text))
    if name == "bert":  # BERT rows: <cls> text <sep>
      tokens = [ids["<cls>"]] + tokens[:30] + [ids["<sep>"]]
    tokens = jnp.asarray([tokens[:32]], jnp.int32)
    if name == "t5":  # The encoder alone.
      h = model.apply({"params": tr.params}, tokens, method="encode")
    else:
      h = model.apply({"params": tr.params}, tokens)[1]["pre_logits"]
    h = np.asarray(h[0], np.float64)                                           # (n, D)
    rows.append({"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling])
  return np.stack(rows)


@pytest.mark.parametrize("name,pooling", [("bert", "cls"), ("t5", "mean")])
def test_every_model_family_embeds_its_final_hidden_states(families, name, pooling):
  tr, _, data = families[name]
  src = sources.open_source(f"file:{data}")
  texts = [src[i]["text"] for i in range(5)]
  got = embed.embed_source(tr, src, pooling=pooling, batch_size=8, indices=np.arange(5),
                          progress=False)
  assert got.layer == ("encoded" if name == "t5" else "pre_logits")
  np.testing.assert_allclose(got.embeddings, _naive_family(tr, texts, name, pooling),
                             rtol=1e-4, atol=1e-5)


def test_embed_cli_on_encoder_decoder_records_encoder_layers(families, tmp_path, capsys):
  _, wd, data = families["t5"]
  data = f"file:{data}"
  out = str(tmp_path / "t5.npz")
  assert cli.main(["embed", "--workdir", wd, "--data", data, "--out", out, "--sample", "9",
                   "--layer", "encoder/block_00"]) == 0
  with np.load(out) as z:
    assert z["embeddings"].shape == (9, 32)
    assert json.loads(str(z["meta"]))["layer"] == "encoder/block_00"
  capsys.readouterr()
  assert cli.main(["embed", "--workdir", wd, "--data", data, "--out", out,
                   "--layer", "pre_logits"]) == 2
  err = capsys.readouterr().err
  assert "unknown layer 'pre_logits'" in err and "encoded" in err


def test_embed_social_media_from_tfds(trained, tmp_path, monkeypatch):
  """tfds:sentiment140 (tweets) and tfds:reddit (posts by subreddit), via data_source."""
  tfds = pytest.importorskip("tensorflow_datasets")
  _, wd, _ = trained
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=12):
    for spec, key in [("tfds:sentiment140:train", "polarity"), ("tfds:reddit:train", "subreddit")]:
      out = str(tmp_path / "s.npz")
      summary = embed.embed_workdir(wd, spec, out, batch_size=8, progress=False)
      raw = sources.open_source(spec).data_source
      with np.load(out, allow_pickle=False) as z:
        assert summary["n"] == 12 and z["embeddings"].shape == (12, 32)
        assert np.isfinite(z["embeddings"]).all()
        assert list(z["texts"]) == [tfds_lib._as_python(raw[i]["text" if key == "polarity"
                                                           else "content"])[:2000]
                                    for i in range(12)]
        assert list(z["labels"]) == [tfds_lib._as_python(raw[i][key]) for i in range(12)]
  assert "tensorflow" not in sys.modules


def _bad_cases(tmp_path, wd, data):
  (tmp_path / "empty.csv").write_text("")
  _write_csv(tmp_path / "notext.csv", [{"body": "hello", "label": "a"}], ("body", "label"))
  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  np.savez(tmp_path / "ok.npz", embeddings=x)
  x[3, 2] = np.nan
  np.savez(tmp_path / "nan.npz", embeddings=x)
  emb = ["embed", "--workdir", wd, "--out", str(tmp_path / "e.npz")]
  ana = ["analyze", "--out", str(tmp_path / "r"), "--reduce", "pca"]
  top = ["topics", "--out", str(tmp_path / "t")]
  return {
      "embed_empty": (emb + ["--data", f"file:{tmp_path}/empty.csv"], "is empty"),
      "embed_no_text": (emb + ["--data", f"file:{tmp_path}/notext.csv"], "no 'text' column"),
      "embed_no_workdir": (["embed", "--workdir", str(tmp_path / "nope"), "--data",
                            f"file:{data}", "--out", str(tmp_path / "e.npz")], "does not exist"),
      "embed_layer": (emb + ["--data", f"file:{data}", "--layer", "block_07"],
                      "unknown layer 'block_07'.*pre_logits"),
      "embed_pooling": (emb + ["--data", f"file:{data}", "--pooling", "max"],
                        "unknown pooling 'max'"),
      "embed_out": (["embed", "--workdir", wd, "--data", f"file:{data}", "--out",
                     str(tmp_path / "e.csv")], "must end in .npz"),
      "analyze_k": (ana + ["--embeddings", str(tmp_path / "ok.npz"), "--k", "11"],
                    "k=11 exceeds the 10 points"),
      "analyze_nan": (ana + ["--embeddings", str(tmp_path / "nan.npz")], "NaN/inf.*row 3"),
      "topics_empty": (top + ["--data", f"file:{tmp_path}/empty.csv"], "is empty"),
      "topics_no_text": (top + ["--data", f"file:{tmp_path}/notext.csv"], "no 'text' column"),
  }


@pytest.mark.parametrize("case", ["embed_empty", "embed_no_text", "embed_no_workdir",
                                  "embed_layer", "embed_pooling", "embed_out", "analyze_k",
                                  "analyze_nan", "topics_empty", "topics_no_text"])
def test_cli_bad_inputs_exit_2_with_one_line(case, trained, tmp_path, capsys):
  _, wd, data = trained
  argv, message = _bad_cases(tmp_path, wd, data)[case]
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("tx-jax: error: "), err
  assert __import__("re").search(message, err), err
  assert not (tmp_path / "e.npz").exists() and not (tmp_path / "r").exists()
  assert not (tmp_path / "t").exists()  # Bad data is caught before DIR is created.


def test_cli_bad_input_exit_2_in_a_subprocess(tmp_path):
  (tmp_path / "posts.csv").write_text("title,body\nhello,world\n")
  out = run_cli(["topics", "--data", f"file:{tmp_path}/posts.csv", "--out", str(tmp_path / "t")])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"tx-jax: error: '{tmp_path}/posts.csv' has no 'text' column (columns: title, body); "
      "name the document column 'text'"]


@pytest.mark.slow
def test_topics_end_to_end_and_rerun_from_any_step(tmp_path, capsys):
  data = _write_csv(tmp_path / "posts.csv", _posts(240))
  out = tmp_path / "topics"
  common = ["topics", "--data", f"file:{data}", "--out", str(out), "--steps", "4",
            "--vocab-size", "300", "--reduce", "pca"]

  def topics(*extra):
    capsys.readouterr()
    code = cli.main([*common, *extra])
    r = capsys.readouterr()
    assert code == 0, r.err[-3000:]
    topics.stderr = r.err
    return dict(l.split(": ", 2)[1:] for l in r.out.splitlines()
                if l.startswith("topics: ") and not l.startswith("topics: open"))

  assert set(topics("--k", "3").values()) == {"running (no output yet)",
                                               "running (an earlier step ran)"}
  assert "embed: 100%" in topics.stderr  # The progress bar.
  assert (out / "tokenizer" / "spm.model").is_file()
  # The topic pipeline's report: analyze's files plus the topic table.
  assert {"clusters.csv", "map.png", "report.html", "report.json", "topics.csv"} <= set(
      os.listdir(out / "report"))
  report = json.loads((out / "report" / "report.json").read_text())
  assert report["k"] == 3 and report["n"] == 240 and "nmi" in report["metrics"]
  assert report["features"] == "both"  # A model pretrained here is joined by TF-IDF.
  with np.load(out / "embeddings.npz") as z:
    assert z["embeddings"].shape == (240, 128) and len(z["texts"]) == 240
  mtime = (out / "embeddings.npz").stat().st_mtime
  # Same flags: nothing runs. A new --k: only the report. A deleted npz: embed + report.
  assert set(topics("--k", "3").values()) == {"done, skipped"}
  assert topics("--k", "2") == {"tokenizer": "done, skipped", "model": "done, skipped",
                                "embeddings": "done, skipped",
                                "report": "running (settings changed)"}
  assert json.loads((out / "report" / "report.json").read_text())["k"] == 2
  assert (out / "embeddings.npz").stat().st_mtime == mtime
  os.remove(out / "embeddings.npz")
  assert topics("--k", "2") == {"tokenizer": "done, skipped", "model": "done, skipped",
                                "embeddings": "running (no output yet)",
                                "report": "running (an earlier step ran)"}
