"""Data specs -> random-access text sources.

Specs:
  embedded:python-docs[:train|:eval|:all]   CPython doc topics (default: train)
  embedded:stdlib-docstrings                stdlib docstrings, labelled by package
  file:PATH                                 .jsonl, .csv or text (.txt, .md, .rst,
                                            LICENSE, any other UTF-8 file), each also .gz
  tfds:NAME[/CONFIG]:SPLIT                  `tfds.data_source` (no TensorFlow)

A `TextSource` has `len(src)` and `src[i] -> {"text": str}` plus `"label"` when
`src.has_labels`; .jsonl/.csv records also keep the post columns `id`,
`created_at` / `date` / `timestamp` and `author` (`POST_FIELDS`) when the file
has them. When `src.label_names` is a list, labels are ints indexing it;
otherwise (some TFDS sets) they are the raw values (int or str).

A `DocPolicy` (from the `data.max_doc_len`, `data.over_length` and
`data.invalid_utf8` config keys) decides what happens to over-long documents
and invalid UTF-8; file and embedded sources apply it when they are read and
count what they did in `src.stats`.
"""

from collections.abc import Sequence
import csv
import io
import json
import os
import re
import sys
from typing import Any


from tx_jax.data import corpora
from tx_jax.data import tfds as tfds_lib
from tx_jax.data.doc_policy import DocPolicy, apply_policy
from tx_jax.data.source import Source, holdout_split
from tx_jax.errors import UserError

# Optional per-post columns of .jsonl/.csv files, kept in each record as read.
POST_FIELDS = ("id", "created_at", "date", "timestamp", "author")
SPEC_FORMS = (
    "embedded:python-docs[:train|:eval], embedded:stdlib-docstrings, "
    "file:PATH (.jsonl, .csv or text, also .gz), tfds:NAME[/CONFIG]:SPLIT")


class TextSource(Source):
  """Random-access documents: `src[i] -> {"text": str}` (+ "label")."""
  unit = "docs"


class ListSource(TextSource):
  """In-memory documents with optional labels."""

  def __init__(self, texts: Sequence[str], labels: Sequence[Any] | None = None,
               label_names: list[str] | None = None, name: str = "list",
               columns: dict[str, Sequence[Any]] | None = None):
    if labels is not None and len(labels) != len(texts):
      raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    self.columns = {k: list(v) for k, v in (columns or {}).items()}  # e.g. created_at
    self.texts = list(texts)
    self.labels = None if labels is None else list(labels)
    self.has_labels = labels is not None
    self.label_names = label_names
    self.name = name

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, index):
    record = {"text": self.texts[index]}
    record.update({k: v[index] for k, v in self.columns.items()})
    if self.labels is not None:
      record["label"] = self.labels[index]
    return record


def _labelled(texts: list[str], raw_labels: list[Any] | None, name: str,
              policy: DocPolicy | None = None, columns: dict[str, list] | None = None):
  """ListSource (labels mapped to ints over their sorted distinct values), after `policy`.

  columns: more per-document values (POST_FIELDS) that follow their document
  through the policy (a chunked document repeats them, as it does its label).
  """
  if policy is not None:
    # The policy carries each document's row number; labels and columns follow it.
    texts, rows, stats = apply_policy(texts, list(range(len(texts))), policy, name)
    pick = lambda values: None if values is None else [values[r] for r in rows]
    source = _labelled(texts, pick(raw_labels), name,
                       columns={k: pick(v) for k, v in (columns or {}).items()})
    source._stats = stats
    return source
  if raw_labels is None:
    return ListSource(texts, name=name, columns=columns)
  distinct = set(raw_labels)
  if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
    ordered = sorted(distinct)
  elif all(re.fullmatch(r"-?\d+", str(v)) for v in distinct):
    ordered = sorted(distinct, key=lambda v: int(str(v)))  # CSV "2" < "10".
  else:
    ordered = sorted(distinct, key=str)
  index = {v: i for i, v in enumerate(ordered)}
  return ListSource(texts, [index[v] for v in raw_labels],
                    [str(v) for v in ordered], name, columns)


# --------------------------------------------------------------------- embedded


def _open_embedded(spec: str, policy: DocPolicy) -> TextSource:
  _, _, rest = spec.partition(":")
  name, _, split = rest.partition(":")
  if name == "python-docs":
    split = split or "train"
    return _labelled(corpora.python_docs(split), None, f"python-docs:{split}", policy)
  if name == "stdlib-docstrings" and not split:
    texts, labels = corpora.stdlib_docstrings()
    return _labelled(texts, labels, "stdlib-docstrings", policy)
  if name == "digits" and not split:
    raise UserError(
        "embedded:digits is an image dataset, not text; use it with an image "
        "config (e.g. configs/mae.py)")
  raise UserError(
      f"unknown embedded dataset '{rest}'; use embedded:python-docs"
      "[:train|:eval], embedded:stdlib-docstrings or embedded:digits")


# ------------------------------------------------------------------------ files


# Formats that are never documents; anything else that decodes as UTF-8 is text.
_BINARY_EXTS = frozenset({
    ".parquet", ".arrow", ".feather", ".avro", ".orc", ".npy", ".npz", ".pkl", ".pickle",
    ".h5", ".hdf5", ".zip", ".tar", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".pdf", ".doc",
    ".docx", ".xls", ".xlsx", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".mp3", ".mp4",
    ".wav", ".so", ".exe", ".bin"})
_COMPRESSED = (".gz", ".zst")
_READ_CHUNK = 1 << 20


def _check_readable(path: str):
  """One-line UserError for a missing path, a symlink loop, a directory or a non-file."""
  if not os.path.exists(path):
    if os.path.lexists(path):
      raise UserError(f"data file '{path}' is a broken symlink or a symlink loop; point "
                      "file: at the real file")
    raise UserError(f"data file '{path}' does not exist; check the path in file:PATH")
  if os.path.isdir(path):
    raise UserError(
        f"data path '{path}' is a directory; point file: at a .txt, .jsonl or "
        ".csv file")
  if not os.path.isfile(path):
    raise UserError(f"data path '{path}' is not a regular file (a device, pipe or socket); "
                    "point file: at a file on disk")


def _read_bytes(path: str) -> bytes:
  """The file's bytes; `.gz` decompressed as a stream (`.zst` when zstandard is installed)."""
  _check_readable(path)
  try:
    if path.lower().endswith(".gz"):
      import gzip  # pylint: disable=g-import-not-at-top
      import zlib  # pylint: disable=g-import-not-at-top
      chunks = []
      try:
        with gzip.open(path, "rb") as f:
          for block in iter(lambda: f.read(_READ_CHUNK), b""):
            chunks.append(block)
      except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"data file '{path}' is not a complete gzip file ({e or 'truncated'}); "
                        "re-compress it with gzip or give the uncompressed file") from None
      return b"".join(chunks)
    if path.lower().endswith(".zst"):
      try:
        import zstandard  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise UserError(f"data file '{path}' is zstd-compressed and the zstandard package is "
                        "not installed; `pip install zstandard` or decompress it "
                        "(`zstd -d`)") from None
      try:
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
          return b"".join(iter(lambda: r.read(_READ_CHUNK), b""))
      except zstandard.ZstdError as e:
        raise UserError(f"data file '{path}' is not a valid zstd file ({e})") from None
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"cannot read data file '{path}': {e.strerror or e}; check its "
                    "permissions") from None


def _read_utf8(path: str, strict: bool = True) -> str:
  """File contents as text; one-line UserError for missing/empty/non-UTF-8.

  strict=False keeps undecodable bytes as surrogate escapes for apply_policy.
  A UTF-8 byte order mark is dropped; `.gz` files are decompressed.
  """
  data = _read_bytes(path)
  if not data.strip():
    raise UserError(f"data file '{path}' is empty; it needs at least one document")
  if not strict:
    return data.decode("utf-8-sig", errors="surrogateescape")
  try:
    return data.decode("utf-8-sig")  # Tolerates a BOM from Windows editors.
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(
        f"data file '{path}' is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
        f"{e.start}, line {line}); re-encode it as UTF-8, e.g. `iconv -f "
        "latin1 -t utf-8`, or set data.invalid_utf8=replace or skip") from None


def _read_txt(path: str, text: str):
  text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
  lines = text.split("\n")
  # A blank line between non-blank ones means paragraphs are the documents.
  if any(not line.strip() for line in lines):
    docs = re.split(r"\n[ \t\r\f\v]*\n", text)
  else:
    docs = lines
  return [d.strip() for d in docs if d.strip()], None, {}


def _read_jsonl(path: str, text: str):
  texts, labels, columns = [], [], {}
  with_label = None
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(
          f"'{path}' line {lineno} is not valid JSON ({e.msg}); each line must "
          'be one object like {"text": ...}') from None
    if not isinstance(record, dict):
      raise UserError(
          f"'{path}' line {lineno} is a JSON {type(record).__name__}, not an "
          'object; each line must look like {"text": ...}')
    if "text" not in record:
      raise UserError(
          f"'{path}' line {lineno} has no 'text' key (keys: "
          f"{', '.join(sorted(record)) or 'none'}); rename the text field to 'text'")
    if not isinstance(record["text"], str):
      raise UserError(
          f"'{path}' line {lineno}: 'text' is a {type(record['text']).__name__}, "
          "not a string")
    if with_label is None:
      with_label = "label" in record
    elif with_label != ("label" in record):
      raise UserError(
          f"'{path}' line {lineno} {'lacks' if with_label else 'has'} a 'label' "
          "unlike the first record; give every record a label or none")
    if with_label and not isinstance(record["label"], (str, int)):
      raise UserError(
          f"'{path}' line {lineno}: 'label' must be a string or an integer")
    if record["text"].strip():
      for key in POST_FIELDS:  # A column missing from some records reads as None.
        if key in record or key in columns:
          columns.setdefault(key, [None] * len(texts)).append(record.get(key))
      texts.append(record["text"])
      if with_label:
        labels.append(record["label"])
  return texts, labels if with_label else None, columns


def _read_csv(path: str, text: str):
  old_limit = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Long documents.
  try:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      header = []
    if "text" not in header:
      raise UserError(
          f"'{path}' has no 'text' column (columns: {', '.join(header) or 'none'}); "
          "name the document column 'text'")
    text_col = header.index("text")
    label_col = header.index("label") if "label" in header else None
    post_cols = {k: header.index(k) for k in POST_FIELDS if k in header}
    texts, labels, columns = [], [], {k: [] for k in post_cols}
    try:
      for row in reader:
        if not any(row):
          continue
        if len(row) != len(header):
          raise UserError(
              f"'{path}' line {reader.line_num} has {len(row)} fields but the "
              f"header has {len(header)}; quote fields that contain commas")
        if row[text_col].strip():
          texts.append(row[text_col])
          for key, col in post_cols.items():
            columns[key].append(row[col])
          if label_col is not None:
            labels.append(row[label_col])
    except csv.Error as e:
      raise UserError(f"'{path}' line {reader.line_num}: bad CSV ({e})") from None
  finally:
    csv.field_size_limit(old_limit)
  return texts, labels if label_col is not None else None, columns


_FILE_READERS = {".jsonl": _read_jsonl, ".csv": _read_csv}  # anything else: _read_txt


def _file_format(path: str) -> str:
  """The extension that picks the reader: `.jsonl` of `posts.jsonl.gz`, "" for `LICENSE`."""
  stem, ext = os.path.splitext(path)
  if ext.lower() in _COMPRESSED:
    ext = os.path.splitext(stem)[1]
  return ext.lower()


def _open_file(path: str, policy: DocPolicy) -> TextSource:
  path = os.path.expanduser(path)
  ext = _file_format(path)
  if ext in _BINARY_EXTS:
    raise UserError(
        f"unsupported data file '{path}' ({ext} is not text); use a text file (.txt, .md, "
        "... one document per line or blank-line separated), .jsonl or .csv, optionally .gz")
  text = _read_utf8(path, strict=policy.invalid_utf8 == "error")
  texts, labels, columns = _FILE_READERS.get(ext, _read_txt)(path, text)
  if not texts:
    raise UserError(
        f"data file '{path}' has no non-empty documents; it needs at least one")
  source = _labelled(texts, labels, f"file:{path}", policy, columns)
  if not len(source):
    raise UserError(
        f"data file '{path}' has no documents left after skipping "
        f"{source.stats['invalid_utf8_skipped']} with invalid UTF-8 "
        "(data.invalid_utf8=skip); re-encode it as UTF-8 or use replace")
  return source


# ------------------------------------------------------------------------- API


def open_source(spec: str, policy: DocPolicy | None = None) -> TextSource:
  """Opens a data spec (see module docstring) as a random-access TextSource."""
  policy = policy or DocPolicy()
  if not isinstance(spec, str) or not spec:
    raise UserError(f"empty data spec; use one of: {SPEC_FORMS}")
  if spec.startswith("embedded:"):
    return _open_embedded(spec, policy)
  if spec.startswith("file:"):
    return _open_file(spec[len("file:"):], policy)
  if spec.startswith("tfds:"):
    return tfds_lib.open_text(spec, policy)
  raise UserError(f"unknown data spec '{spec}'; use one of: {SPEC_FORMS}")


def train_eval_sources(spec: str, eval_spec: str | None = None,
                       eval_fraction: float = 0.05, seed: int = 0,
                       policy: DocPolicy | None = None
                       ) -> tuple[TextSource, TextSource]:
  """(train, eval) sources for a run: `eval_spec` if given, else the fixed
  python-docs eval split for `embedded:python-docs`, else `holdout_split`."""
  if eval_spec:
    return open_source(spec, policy), open_source(eval_spec, policy)
  if spec in ("embedded:python-docs", "embedded:python-docs:train"):
    return open_source(spec, policy), open_source("embedded:python-docs:eval", policy)
  return holdout_split(open_source(spec, policy), eval_fraction, seed)
