"""Data files as they come: no or unknown extensions, .md/.rst, .gz, BOM, CRLF, long csv fields.

And the same files through train, eval, embed and topics (tiny settings).
"""

import csv
import gzip
import json
import os

import numpy as np
import pytest

from tx_jax import cli
from tx_jax.data import sources
from tx_jax.data.doc_policy import DocPolicy
from tx_jax.errors import UserError

from test_bad_inputs import GPT, TINY, run_main


def texts(spec, policy=None):
  src = sources.open_source(spec, policy)
  return [src[i]["text"] for i in range(len(src))]


def test_text_files_of_any_name(tmp_path):
  (tmp_path / "LICENSE").write_text("Permission is granted.\n\nTHE SOFTWARE IS PROVIDED AS IS.\n")
  (tmp_path / "notes.md").write_text("# Title\nline one\n")
  (tmp_path / "guide.rst").write_text("Guide\n=====\n")
  (tmp_path / "run.log").write_text("first\nsecond\n")
  assert texts(f"file:{tmp_path}/LICENSE") == ["Permission is granted.",
                                               "THE SOFTWARE IS PROVIDED AS IS."]
  assert texts(f"file:{tmp_path}/notes.md") == ["# Title", "line one"]
  assert texts(f"file:{tmp_path}/guide.rst") == ["Guide", "====="]
  assert texts(f"file:{tmp_path}/run.log") == ["first", "second"]


def test_unknown_extension_that_is_not_utf8_follows_the_policy(tmp_path):
  (tmp_path / "blob.dat").write_bytes(b"ok line\n\xff\xfe\x00 binary\n")
  with pytest.raises(UserError, match=r"blob\.dat' is not UTF-8 \(byte 0xff at offset 8"):
    sources.open_source(f"file:{tmp_path}/blob.dat")
  assert texts(f"file:{tmp_path}/blob.dat", DocPolicy(invalid_utf8="skip")) == ["ok line"]
  (tmp_path / "data.parquet").write_bytes(b"PAR1\x00\x01")
  with pytest.raises(UserError, match=r"unsupported data file .*\.parquet is not text"):
    sources.open_source(f"file:{tmp_path}/data.parquet")


def test_gzip_files_are_read_by_their_inner_extension(tmp_path):
  with gzip.open(tmp_path / "posts.jsonl.gz", "wt") as f:
    f.write('{"text": "a post", "label": "x"}\n{"text": "another", "label": "y"}\n')
  with gzip.open(tmp_path / "docs.txt.gz", "wt") as f:
    f.write("one\ntwo\n")
  with gzip.open(tmp_path / "rows.csv.gz", "wt", newline="") as f:
    f.write("text,label\nhello,a\nworld,b\n")
  src = sources.open_source(f"file:{tmp_path}/posts.jsonl.gz")
  assert [src[i] for i in range(2)] == [{"text": "a post", "label": 0},
                                        {"text": "another", "label": 1}]
  assert texts(f"file:{tmp_path}/docs.txt.gz") == ["one", "two"]
  assert texts(f"file:{tmp_path}/rows.csv.gz") == ["hello", "world"]
  data = (tmp_path / "docs.txt.gz").read_bytes()
  (tmp_path / "cut.txt.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match=r"cut\.txt\.gz' is not a complete gzip file"):
    sources.open_source(f"file:{tmp_path}/cut.txt.gz")
  (tmp_path / "fake.txt.gz").write_bytes(b"plain text, not gzip")
  with pytest.raises(UserError, match=r"fake\.txt\.gz' is not a complete gzip file"):
    sources.open_source(f"file:{tmp_path}/fake.txt.gz")
  (tmp_path / "docs.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
  with pytest.raises(UserError, match="zstandard"):
    sources.open_source(f"file:{tmp_path}/docs.txt.zst")


def test_bom_and_crlf_in_every_format(tmp_path):
  bom = b"\xef\xbb\xbf"
  (tmp_path / "a.txt").write_bytes(bom + b"first\r\nsecond\r\n")
  (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "one"}\r\n{"text": "two"}\r\n')
  (tmp_path / "a.csv").write_bytes(bom + b'text,label\r\n"multi\r\nline",1\r\nplain,2\r\n')
  (tmp_path / "old_mac.txt").write_bytes(b"one\rtwo\r")
  assert texts(f"file:{tmp_path}/a.txt") == ["first", "second"]
  assert texts(f"file:{tmp_path}/a.jsonl") == ["one", "two"]
  assert texts(f"file:{tmp_path}/a.csv") == ["multi\r\nline", "plain"]
  assert texts(f"file:{tmp_path}/old_mac.txt") == ["one", "two"]
  # The BOM is dropped under the lenient policies too.
  assert texts(f"file:{tmp_path}/a.jsonl", DocPolicy(invalid_utf8="replace")) == ["one", "two"]


def test_csv_fields_longer_than_the_csv_default_limit(tmp_path):
  long_text = "word " * 60000  # 300,000 characters > csv's 131,072 default
  with open(tmp_path / "long.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text"])
    w.writerow([long_text])
  assert texts(f"file:{tmp_path}/long.csv", DocPolicy(max_doc_len=0)) == [long_text]
  assert csv.field_size_limit() == 131072  # restored


def test_symlink_loop_and_non_files_are_one_line_errors(tmp_path):
  os.symlink(tmp_path / "b.txt", tmp_path / "a.txt")
  os.symlink(tmp_path / "a.txt", tmp_path / "b.txt")
  with pytest.raises(UserError, match="broken symlink or a symlink loop"):
    sources.open_source(f"file:{tmp_path}/a.txt")
  os.mkfifo(tmp_path / "pipe.txt")
  with pytest.raises(UserError, match="not a regular file"):
    sources.open_source(f"file:{tmp_path}/pipe.txt")


def test_symlink_loop_in_train_is_one_line_and_leaves_nothing(tmp_path, capsys):
  os.symlink(tmp_path / "b", tmp_path / "a")
  os.symlink(tmp_path / "a", tmp_path / "b")
  workdir = tmp_path / "wd"
  capsys.readouterr()
  code = run_main(["train", "--config", GPT, "--workdir", str(workdir), *TINY,
                   f"--config.data.source=file:{tmp_path}/a"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "symlink loop" in err[0], err
  assert not workdir.exists()


# --- The same files end to end -------------------------------------------------------------

POSTS = [f"post {i}: the {['cat', 'dog', 'bird'][i % 3]} sat on the mat and looked around"
         for i in range(60)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("as_they_come")
  (d / "LICENSE").write_text("\n".join(POSTS) + "\n")
  (d / "notes.md").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(POSTS).encode() + b"\r\n")
  with gzip.open(d / "posts.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": p}) + "\n" for p in POSTS)
  return d


@pytest.mark.parametrize("name", ["LICENSE", "notes.md", "posts.jsonl.gz"])
def test_train_eval_embed_on_files_as_they_come(name, files, tmp_path, capsys):
  spec = f"file:{files}/{name}"
  workdir = str(tmp_path / "wd")
  assert run_main(["train", "--config", GPT, "--workdir", workdir, *TINY,
                   f"--config.data.source={spec}", "--config.data.eval_source="]) == 0
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  capsys.readouterr()
  assert run_main(["eval", "--workdir", workdir, "--data", spec]) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert metrics["step"] == 2 and np.isfinite(metrics["eval/loss"])
  out = tmp_path / "e.npz"
  assert run_main(["embed", "--workdir", workdir, "--data", spec, "--out", str(out)]) == 0
  with np.load(out) as z:
    assert z["embeddings"].shape[0] == len(POSTS) and list(z["texts"][:2]) == POSTS[:2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["LICENSE", "notes.md", "posts.jsonl.gz"])
def test_topics_on_files_as_they_come(name, files, tmp_path):
  out = tmp_path / "t"
  assert run_main(["topics", "--data", f"file:{files}/{name}", "--out", str(out),
                   "--steps", "1", "--vocab-size", "0", "--objective", "causal_lm",
                   "--k", "2", "--reduce", "pca", "--seq-len", "32"]) == 0
  report = json.loads((out / "report" / "report.json").read_text())
  assert report["k"] == 2 and sum(c["size"] for c in report["clusters"]) == len(POSTS)


def test_embed_out_that_cannot_be_created_is_one_line(files, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code = run_main(["embed", "--workdir", str(tmp_path / "nowhere"), "--data",
                   f"file:{files}/LICENSE", "--out", str(tmp_path / "a_file" / "sub" / "e.npz")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "is not a directory" in err[0], err
