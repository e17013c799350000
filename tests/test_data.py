"""Data layer: corpora, tokenizers, data specs, grain LM pipeline (CPU, fast)."""

import collections
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tx_jax.data import corpora
from tx_jax.data import pipeline
from tx_jax.data import sources
from tx_jax.data import tfds as tfds_lib
from tx_jax.data import tokenizers
from tx_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class IntTokenizer(tokenizers.Tokenizer):
  """Test tokenizer: "5 17 3" -> [5, 17, 3]. With globally unique ids every
  (input, target) pair names its document and position."""

  vocab_size = 1 << 20
  special_ids = {}

  def encode(self, text):
    return [int(t) for t in text.split()]

  def fingerprint(self):
    return "int"


def unique_token_docs(lengths, seed=0):
  """Documents of the given token counts; every token id is used once."""
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.arange(1, sum(lengths) + 1))
  docs, start = [], 0
  for n in lengths:
    docs.append([int(i) for i in ids[start:start + n]])
    start += n
  return docs


def int_source(docs):
  return sources.ListSource([" ".join(map(str, d)) for d in docs], name="ints")


def reference_pairs(docs):
  return collections.Counter(
      (d[i], d[i + 1]) for d in docs for i in range(len(d) - 1))


def check_rows_and_collect_pairs(batches, docs, seq_len):
  """Asserts the row invariants of every batch; returns (pairs, num_pieces)."""
  where = {tok: (d, i) for d, doc in enumerate(docs) for i, tok in enumerate(doc)}
  pairs, num_pieces = collections.Counter(), 0
  for batch in batches:
    assert set(batch) == set(pipeline.LM_KEYS)
    for key in pipeline.LM_KEYS:
      assert batch[key].shape == batch["inputs"].shape
      assert batch[key].dtype == (np.float32 if key == "weights" else np.int32)
    assert batch["inputs"].shape[1] == seq_len
    np.testing.assert_array_equal(batch["weights"], batch["segment_ids"] > 0)
    for row in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][row]
      inputs, targets = batch["inputs"][row], batch["targets"][row]
      positions = batch["positions"][row]
      pad = seg == 0
      assert not (inputs[pad].any() or targets[pad].any() or positions[pad].any())
      ids = [s for s in np.unique(seg) if s > 0]
      assert ids == list(range(1, len(ids) + 1))  # Segments 1, 2, 3, ...
      for s in ids:
        idx = np.flatnonzero(seg == s)
        # One contiguous run per piece: a piece is never split.
        np.testing.assert_array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
        np.testing.assert_array_equal(positions[idx], np.arange(len(idx)))
        doc, first = where[int(inputs[idx[0]])]
        # Piece k starts at token k * seq_len of its document.
        assert first % seq_len == 0
        for j, (x, y) in enumerate(zip(inputs[idx], targets[idx])):
          # Consecutive tokens of one document: no pair crosses documents.
          assert where[int(x)] == (doc, first + j)
          assert where[int(y)] == (doc, first + j + 1)
          pairs[int(x), int(y)] += 1
        num_pieces += 1
  return pairs, num_pieces


# Lengths around the chunk boundary (seq_len + 1 tokens) plus empty/1-token docs.
SEQ_LEN = 16
LENGTHS = [0, 1, 2, 5, 16, 17, 18, 33, 40, 3, 7, 64, 1, 11, 9, 2, 50, 4]


def expected_pieces(docs, seq_len):
  return sum(-(-(len(d) - 1) // seq_len) for d in docs if len(d) > 1)


# -------------------------------------------------------------------- corpora


def test_python_docs_splits_disjoint_and_cover_all():
  train, evals, everything = (corpora.python_docs(s)
                              for s in ("train", "eval", "all"))
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  assert everything == [topics[k] for k in sorted(topics)]
  assert not set(train) & set(evals)
  assert sorted(train + evals) == sorted(everything)
  assert 0.05 <= len(evals) / len(everything) <= 0.2
  assert sum(len(t) for t in everything) > 300_000
  assert corpora.python_docs("eval") == evals
  with pytest.raises(UserError, match="split"):
    corpora.python_docs("test")


def test_corpora_stable_across_processes_and_no_forbidden_imports():
  # A fresh interpreter with another hash seed must build the same corpora
  # (catches set/dict-order dependence) and import no TF/models/train.
  code = (
      "import hashlib, json, sys\n"
      "from tx_jax import data\n"
      "t, l = data.stdlib_docstrings()\n"
      "h = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()\n"
      "bad = [m for m in sys.modules if m.split('.')[0] == 'tensorflow'"
      " or m.startswith(('tx_jax.models', 'tx_jax.train'))]\n"
      "print(json.dumps([h(data.python_docs('eval')), h([t, l]), bad]))\n")
  # Two clean interpreters: this process may already hold modules (e.g. from
  # orbax's dependencies) that patch stdlib docstrings, so it is no reference.
  runs = []
  for seed in ("12345", "987"):
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=600)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  (eval_a, stdlib_a, bad), (eval_b, stdlib_b, _) = runs
  h = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()
  assert eval_a == eval_b == h(corpora.python_docs("eval"))
  assert stdlib_a == stdlib_b
  assert not bad


def test_stdlib_docstrings():
  texts, labels = corpora.stdlib_docstrings()
  assert len(texts) == len(labels) >= 1000
  counts = collections.Counter(labels)
  assert len(counts) >= 10 and min(counts.values()) >= 10
  assert set(counts) <= set(corpora.STDLIB_PACKAGES)
  assert len(set(texts)) == len(texts)
  assert min(len(t) for t in texts) >= 40
  # Independent spot checks: docstrings land under their own package.
  import json as json_module  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  for obj, package in [(json_module.dumps, "json"), (logging.Logger, "logging")]:
    assert labels[texts.index(inspect.cleandoc(obj.__doc__))] == package


def test_digits():
  images, labels = corpora.digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
  assert images.min() == 0.0 and images.max() == 1.0
  # Original pixels are integers 0..16.
  np.testing.assert_allclose(images * 16, np.round(images * 16), atol=1e-6)


# ----------------------------------------------------------------- tokenizers

UNICODE_TEXT = "héllo wörld — ✓ 日本語 😀\n\ttabs  and  spaces\n"


def test_byte_tokenizer_round_trip_and_specials():
  tok = tokenizers.ByteTokenizer(("<pad>", "<mask>", "<cls>", "<sep>"))
  ids = tok.encode(UNICODE_TEXT)
  assert ids == list(UNICODE_TEXT.encode("utf-8"))
  assert tok.decode(ids) == UNICODE_TEXT
  assert tok.vocab_size == 260
  assert tok.special_ids == {"<pad>": 256, "<mask>": 257, "<cls>": 258,
                             "<sep>": 259}
  assert tokenizers.ByteTokenizer().vocab_size == 256
  # Specials decode to nothing; bad bytes / ids to U+FFFD, never an exception.
  assert tok.decode([104, 257, 105]) == "hi"
  assert tok.decode([0xff, 104, 9999, -3]) == "\ufffdh\ufffd\ufffd"
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (260,) and lengths.dtype == np.int32
  assert lengths[ids].sum() == len(UNICODE_TEXT.encode("utf-8"))
  assert lengths[256:].sum() == 0
  assert tok.fingerprint() == tokenizers.ByteTokenizer(
      ("<pad>", "<mask>", "<cls>", "<sep>")).fingerprint()
  assert tok.fingerprint() != tokenizers.ByteTokenizer().fingerprint()
  with pytest.raises(UserError, match="duplicate"):
    tokenizers.ByteTokenizer(("<pad>", "<pad>"))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "docs")
  tok = tokenizers.train_sentencepiece(corpora.python_docs("train"), 500, prefix)
  assert os.path.isfile(prefix + ".model") and os.path.isfile(prefix + ".vocab")
  return tok, prefix


def test_sentencepiece_round_trip_and_byte_lengths(spm_tok):
  tok, _ = spm_tok
  assert tok.vocab_size == 500 and tok.special_ids == {}
  lengths = tok.token_byte_lengths()
  total_tokens = 0
  for text in corpora.python_docs("eval") + [UNICODE_TEXT]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Lossless normalisation: byte lengths add up to the exact UTF-8 length.
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert all(0 <= i < 500 for i in ids)
    total_tokens += len(ids)
  eval_bytes = sum(len(t.encode()) for t in corpora.python_docs("eval"))
  assert total_tokens < 0.8 * eval_bytes  # Real subwords, not just bytes.
  assert tok.decode([9999, -1]) == "\ufffd\ufffd"


def test_sentencepiece_specials_save_load(spm_tok, tmp_path):
  _, prefix = spm_tok
  tok = tokenizers.make_tokenizer(f"spm:{prefix}.model", ("<pad>", "<mask>"))
  assert tok.vocab_size == 502
  assert tok.special_ids == {"<pad>": 500, "<mask>": 501}
  assert tok.token_byte_lengths()[500:].sum() == 0
  assert tok.decode(tok.encode("a b") + [501]) == "a b"
  tok.save(str(tmp_path / "tok"))
  loaded = tokenizers.load_tokenizer(str(tmp_path / "tok"))
  assert loaded.fingerprint() == tok.fingerprint()
  assert loaded.special_ids == tok.special_ids
  assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
  assert tok.fingerprint() != spm_tok[0].fingerprint()
  byte = tokenizers.ByteTokenizer(("<pad>",))
  byte.save(str(tmp_path / "byte"))
  assert tokenizers.load_tokenizer(str(tmp_path / "byte")).special_ids == {"<pad>": 256}


def test_tokenizer_user_errors(tmp_path):
  docs = corpora.python_docs("eval")[:2]
  with pytest.raises(UserError, match=r"lower --vocab-size to at most \d+"):
    tokenizers.train_sentencepiece(docs, 100_000, str(tmp_path / "big"))
  with pytest.raises(UserError, match=r"raise --vocab-size to at least \d+"):
    tokenizers.train_sentencepiece(docs, 50, str(tmp_path / "small"))
  with pytest.raises(UserError, match="empty corpus"):
    tokenizers.train_sentencepiece(["", "\n"], 500, str(tmp_path / "empty"))
  with pytest.raises(UserError, match="not found"):
    tokenizers.make_tokenizer(f"spm:{tmp_path}/missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(UserError, match="not a valid SentencePiece model"):
    tokenizers.make_tokenizer(f"spm:{tmp_path}/junk.model")
  with pytest.raises(UserError, match="unknown tokenizer"):
    tokenizers.make_tokenizer("wordpiece")
  with pytest.raises(UserError, match="no tokenizer"):
    tokenizers.load_tokenizer(str(tmp_path))
  assert isinstance(tokenizers.make_tokenizer("byte"), tokenizers.ByteTokenizer)


# -------------------------------------------------------------------- sources


def test_embedded_sources():
  src = sources.open_source("embedded:python-docs")
  assert [src[i]["text"] for i in range(len(src))] == corpora.python_docs("train")
  assert not src.has_labels
  assert len(sources.open_source("embedded:python-docs:eval")) == len(
      corpora.python_docs("eval"))
  stdlib = sources.open_source("embedded:stdlib-docstrings")
  texts, labels = corpora.stdlib_docstrings()
  assert stdlib.has_labels and len(stdlib) == len(texts)
  assert stdlib.label_names == sorted(set(labels))
  for i in (0, 500, len(texts) - 1):
    assert stdlib[i]["text"] == texts[i]
    assert stdlib.label_names[stdlib[i]["label"]] == labels[i]
  with pytest.raises(UserError, match="image dataset"):
    sources.open_source("embedded:digits")
  with pytest.raises(UserError, match="unknown embedded"):
    sources.open_source("embedded:wikipedia")
  with pytest.raises(UserError, match="tfds:NAME"):
    sources.open_source("hf:wikitext")


def _texts(src):
  return [src[i]["text"] for i in range(len(src))]


def test_file_txt_lines_and_paragraphs(tmp_path):
  lines = tmp_path / "lines.txt"
  lines.write_text("first doc\r\nsecond doc é\nthird\n")
  assert _texts(sources.open_source(f"file:{lines}")) == [
      "first doc", "second doc é", "third"]
  paras = tmp_path / "paras.txt"
  paras.write_text("para one\nstill one\n\npara two\n  \t\nthree a\nthree b\n\n\n")
  src = sources.open_source(f"file:{paras}")
  assert _texts(src) == ["para one\nstill one", "para two", "three a\nthree b"]
  assert not src.has_labels and src.label_names is None


def test_file_jsonl_and_csv(tmp_path):
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text(
      '{"text": "alpha", "label": "pos"}\n\n{"text": "beta", "label": "neg"}\n'
      '{"text": "  ", "label": "neg"}\n{"text": "gamma\\nline", "label": "pos"}\n')
  src = sources.open_source(f"file:{jsonl}")
  assert _texts(src) == ["alpha", "beta", "gamma\nline"]
  assert src.label_names == ["neg", "pos"]
  assert [src.label_names[src[i]["label"]] for i in range(3)] == ["pos", "neg", "pos"]

  csv_path = tmp_path / "d.csv"
  csv_path.write_text(
      'id,text,label\n1,"multi\nline, with comma",10\n2,plain,2\n3,"say ""hi""",10\n',
      newline="")
  src = sources.open_source(f"file:{csv_path}")
  assert _texts(src) == ["multi\nline, with comma", "plain", 'say "hi"']
  assert src.label_names == ["2", "10"]  # Numeric labels sort numerically.
  assert [src[i]["label"] for i in range(3)] == [1, 0, 1]

  no_label = tmp_path / "n.csv"
  no_label.write_text("text\nsolo\n")
  src = sources.open_source(f"file:{no_label}")
  assert _texts(src) == ["solo"] and not src.has_labels


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"  \n\n \n", "empty"),
    ("latin1.txt", "ok line\ncaf\xe9\n".encode("latin-1"),
     r"not UTF-8 .*offset 11, line 2.*re-encode"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    ("nokey.jsonl", b'{"body": "a", "id": 1}\n', r"no 'text' key \(keys: body, id\)"),
    ("list.jsonl", b'["a"]\n', "line 1 is a JSON list"),
    ("mixed.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2 lacks a 'label'"),
    ("nocol.csv", b"body,label\nx,1\n", r"no 'text' column \(columns: body, label\)"),
    ("ragged.csv", b"text,label\nx,1,extra\n", "line 2 has 3 fields"),
    ("spaces.jsonl", b'{"text": "   "}\n', "no non-empty documents"),
    ("data.parquet", b"PAR1", "unsupported data file"),
])
def test_file_user_errors(tmp_path, name, content, match):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(UserError, match=match) as e:
    sources.open_source(f"file:{path}")
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_file_missing_and_directory(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    sources.open_source(f"file:{tmp_path}/nope.txt")
  (tmp_path / "dir.txt").mkdir()
  with pytest.raises(UserError, match="is a directory"):
    sources.open_source(f"file:{tmp_path}/dir.txt")


def test_holdout_split():
  src = sources.ListSource([f"doc {i}" for i in range(200)], list(range(200)),
                           name="n")
  train, held = sources.holdout_split(src, 0.05, seed=3)
  assert len(held) == 10 and len(train) == 190
  train_texts, held_texts = _texts(train), _texts(held)
  assert not set(train_texts) & set(held_texts)
  assert sorted(train_texts + held_texts) == sorted(_texts(src))
  assert held.has_labels and held[0]["label"] == int(held[0]["text"].split()[1])
  assert _texts(sources.holdout_split(src, 0.05, seed=3)[1]) == held_texts
  assert _texts(sources.holdout_split(src, 0.05, seed=4)[1]) != held_texts
  with pytest.raises(UserError, match="at least 2"):
    sources.holdout_split(sources.ListSource(["one"]), 0.05)
  with pytest.raises(IndexError):
    held[10]  # pylint: disable=pointless-statement


def test_train_eval_sources():
  train, held = sources.train_eval_sources("embedded:python-docs")
  assert _texts(held) == corpora.python_docs("eval")
  assert len(train) == len(corpora.python_docs("train"))
  train, held = sources.train_eval_sources("embedded:stdlib-docstrings")
  assert len(held) == round(0.05 * (len(train) + len(held)))
  assert held.label_names == train.label_names and held.has_labels
  # A lazily permuted view feeds the pipeline like any source.
  batch = next(pipeline.lm_eval_batches(held, tokenizers.ByteTokenizer(), 32, 2))
  assert batch["weights"].sum() == 64


# ----------------------------------------------------------------------- TFDS


def test_tfds_sources_with_mock_data(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=6):
    imdb = sources.open_source("tfds:imdb_reviews:train")
    assert len(imdb) == 6 and imdb.has_labels
    assert imdb.label_names == ["neg", "pos"]
    raw = imdb.data_source[2]
    assert imdb[2] == {"text": raw["text"], "label": int(raw["label"])}
    assert type(imdb[2]["label"]) is int

    reddit = sources.open_source("tfds:reddit:train")
    raw = reddit.data_source[0]
    assert reddit[0] == {"text": raw["content"], "label": raw["subreddit"]}
    assert reddit.label_names is None

    lm1b = sources.open_source("tfds:lm1b:train")
    assert not lm1b.has_labels and isinstance(lm1b[0]["text"], str)
    assert set(lm1b[0]) == {"text"}

    news = sources.open_source("tfds:ag_news_subset:test")
    assert news[1]["text"] == news.data_source[1]["description"]

    with pytest.raises(UserError, match="no text feature"):
      sources.open_source("tfds:cifar10:train")
    # The pipeline reads TFDS sources like any other.
    batch = next(pipeline.lm_eval_batches(imdb, tokenizers.ByteTokenizer(), 8, 2))
    assert batch["weights"].sum() > 0

  assert "tensorflow" not in sys.modules


def test_tfds_record_mapping_bytes_and_fallback():
  class Feature:  # Stand-ins for tfds feature classes, matched by class name.
    pass

  class Text(Feature):
    pass

  class ClassLabel(Feature):
    pass

  features = {"id": Feature(), "sentence": Text(), "label": ClassLabel()}
  text_key, label_key = tfds_lib.tfds_fields("some_new_set", features)
  assert (text_key, label_key) == ("sentence", "label")
  src = tfds_lib.TfdsSource(
      [{"sentence": b"caf\xc3\xa9 \xff", "label": np.array(3), "id": 1}],
      text_key, label_key, None, "fake")
  assert src[0] == {"text": "café \ufffd", "label": 3}
  with pytest.raises(UserError, match="no text feature"):
    tfds_lib.tfds_fields("images", {"image": Feature(), "label": ClassLabel()})


def test_tfds_user_errors(monkeypatch, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  start = time.time()
  with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_set'"):
    sources.open_source("tfds:no_such_set:train")
  with pytest.raises(UserError, match="tfds build imdb_reviews") as e:
    sources.open_source("tfds:imdb_reviews:train")
  assert str(tmp_path) in str(e.value)
  with pytest.raises(UserError, match="tfds:NAME"):
    sources.open_source("tfds:lm1b")
  assert time.time() - start < 30  # No network retries.


# ------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("batch_size,bins", [(2, None), (3, 8)])
def test_train_epoch_has_every_pair_once(batch_size, bins):
  docs = unique_token_docs(LENGTHS)
  it = pipeline.lm_train_iterator(int_source(docs), IntTokenizer(), SEQ_LEN,
                                  batch_size, seed=7, num_epochs=1,
                                  num_packing_bins=bins)
  batches = list(it)
  pairs, num_pieces = check_rows_and_collect_pairs(batches, docs, SEQ_LEN)
  assert pairs == reference_pairs(docs)
  assert num_pieces == expected_pieces(docs, SEQ_LEN)
  # Two epochs: every pair exactly twice, in a different document order.
  it = pipeline.lm_train_iterator(int_source(docs), IntTokenizer(), SEQ_LEN,
                                  batch_size, seed=7, num_epochs=2,
                                  num_packing_bins=bins)
  two = list(it)
  pairs2, _ = check_rows_and_collect_pairs(two, docs, SEQ_LEN)
  assert pairs2 == reference_pairs(docs) + reference_pairs(docs)


def test_train_shuffle_depends_on_seed_and_epoch():
  # 10-token documents: 9 pairs, so exactly one document per 16-token row and
  # one packing round (2 bins) per batch of 2; 15 batches per epoch.
  docs = unique_token_docs([10] * 30)
  src = int_source(docs)
  where = {tok: d for d, doc in enumerate(docs) for tok in doc}

  def doc_order(seed):
    it = pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, seed=seed)
    order = []
    for _ in range(30):
      b = next(it)
      assert b["segment_ids"].max() == 1
      order += sorted(where[int(x)] for x in b["inputs"][:, 0])
    return order[:30], order[30:]

  epoch1, epoch2 = doc_order(0)
  assert sorted(epoch1) == sorted(epoch2) == list(range(30))
  assert epoch1 != epoch2 and epoch1 != list(range(30))
  assert doc_order(0) == (epoch1, epoch2)
  assert doc_order(1)[0] != epoch1
  # Reading in grain threads changes nothing.
  a = pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, seed=0)
  b = pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, seed=0,
                                 num_threads=2)
  for _ in range(20):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])


def test_train_state_resumes_bit_identically():
  docs = unique_token_docs([3, 40, 17, 5, 2, 33, 9, 18, 1, 25])
  src = int_source(docs)

  def make():
    return pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, seed=11)

  reference = make()
  ref_batches = [next(reference) for _ in range(30)]  # ~3 epochs.
  it = make()
  for k in range(0, 26):
    state = json.loads(json.dumps(it.get_state()))  # Must survive JSON.
    resumed = make()
    resumed.set_state(state)
    for j in range(4):
      got = next(resumed)
      for key in pipeline.LM_KEYS:
        np.testing.assert_array_equal(got[key], ref_batches[k + j][key],
                                      err_msg=f"resume at {k}, batch {j}")
    got = next(it)
    np.testing.assert_array_equal(got["inputs"], ref_batches[k]["inputs"])

  other = pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 4, seed=11)
  with pytest.raises(UserError, match="batch_size: 2 -> 4"):
    other.set_state(it.get_state())


def test_train_shards_partition_documents():
  docs = unique_token_docs(LENGTHS)
  src = int_source(docs)
  seen = []
  for shard in range(3):
    it = pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, seed=0,
                                    shard_index=shard, shard_count=3,
                                    num_epochs=1)
    seen.append(check_rows_and_collect_pairs(list(it), docs, SEQ_LEN)[0])
  assert sum(seen, collections.Counter()) == reference_pairs(docs)
  assert all(not set(seen[i]) & set(seen[j])
             for i in range(3) for j in range(i + 1, 3))
  with pytest.raises(UserError, match="shard index"):
    pipeline.lm_train_iterator(src, IntTokenizer(), SEQ_LEN, 2, 0, 3, 3)


def test_eval_batches_cover_every_target_once():
  docs = unique_token_docs(LENGTHS, seed=5)
  src = int_source(docs)
  batches = list(pipeline.lm_eval_batches(src, IntTokenizer(), SEQ_LEN, 4))
  pairs, _ = check_rows_and_collect_pairs(batches, docs, SEQ_LEN)
  assert pairs == reference_pairs(docs)
  again = list(pipeline.lm_eval_batches(src, IntTokenizer(), SEQ_LEN, 4))
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again))
  # The last batch is padded with whole zero rows.
  last = batches[-1]
  empty_rows = ~last["weights"].any(axis=1)
  assert not last["inputs"][empty_rows].any()
  with pytest.raises(UserError, match="nothing to evaluate"):
    list(pipeline.lm_eval_batches(int_source([[1], [2]]), IntTokenizer(), 8, 2))


def test_eval_bytes_for_bits_per_byte(spm_tok):
  # Summing token byte lengths over weighted targets gives the held-out text's
  # bytes minus each document's first token (which is never a target).
  texts = corpora.python_docs("eval")
  src = sources.ListSource(texts)
  for tok in (tokenizers.ByteTokenizer(("<pad>",)), spm_tok[0]):
    lengths = tok.token_byte_lengths()
    total = sum(float((lengths[b["targets"]] * b["weights"]).sum())
                for b in pipeline.lm_eval_batches(src, tok, 128, 8))
    first = sum(lengths[tok.encode(t)[0]] for t in texts)
    assert total == sum(len(t.encode()) for t in texts) - first


def test_pipeline_argument_errors():
  src = int_source([[1, 2, 3]])
  with pytest.raises(UserError, match="seq_len"):
    pipeline.lm_eval_batches(src, IntTokenizer(), 0, 2)  # Eager, not lazy.
  with pytest.raises(UserError, match="batch size"):
    pipeline.lm_train_iterator(src, IntTokenizer(), 8, 0, seed=0)
  with pytest.raises(UserError, match="fewer than the 2 hosts"):
    pipeline.lm_train_iterator(src, IntTokenizer(), 8, 2, 0, 1, 2)


def test_train_with_nothing_to_predict_fails_cleanly():
  it = pipeline.lm_train_iterator(int_source([[1], [2], []]), IntTokenizer(),
                                  8, 2, seed=0)
  with pytest.raises(UserError, match="2 or more tokens"):
    next(it)


def test_pipeline_speed_on_python_docs(spm_tok):
  # One full pass over ~0.5 MB of text (tokenize, chunk, pack, batch).
  src = sources.open_source("embedded:python-docs:all")
  for tok in (tokenizers.ByteTokenizer(), spm_tok[0]):
    start = time.time()
    n = sum(float(b["weights"].sum())
            for b in pipeline.lm_train_iterator(src, tok, 256, 8, seed=0,
                                                num_epochs=1))
    elapsed = time.time() - start
    expected = sum(len(tok.encode(src[i]["text"])) - 1 for i in range(len(src)))
    assert n == expected
    assert elapsed < 3.0, f"{tok}: {elapsed:.2f}s"
