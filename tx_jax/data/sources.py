"""Data specs -> random-access text sources.

Specs:
  embedded:python-docs[:train|:eval|:all]   CPython doc topics (default: train)
  embedded:stdlib-docstrings                stdlib docstrings, labelled by package
  file:PATH                                 .txt, .jsonl or .csv
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

import numpy as np

from tx_jax.data import corpora
from tx_jax.data.doc_policy import DocPolicy, apply_policy
from tx_jax.errors import UserError

# Optional per-post columns of .jsonl/.csv files, kept in each record as read.
POST_FIELDS = ("id", "created_at", "date", "timestamp", "author")
SPEC_FORMS = (
    "embedded:python-docs[:train|:eval], embedded:stdlib-docstrings, "
    "file:PATH.txt|.jsonl|.csv, tfds:NAME[/CONFIG]:SPLIT")


class TextSource:
  """Random-access documents; grain reads it through `__len__`/`__getitem__`."""

  name: str = "source"
  has_labels: bool = False
  label_names: list[str] | None = None

  @property
  def stats(self) -> dict[str, int]:
    """Counts of what the DocPolicy did while reading (empty if nothing was counted)."""
    return getattr(self, "_stats", {})

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r}, {len(self)} docs)"


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


class SubsetSource(TextSource):
  """Documents `perm(offset + i)` of `parent`, i < length, for a seeded
  permutation `perm` of the parent's indices (grain's index_shuffle: O(1)
  memory, and picklable for grain worker processes)."""

  def __init__(self, parent: TextSource, offset: int, length: int, seed: int,
               name: str):
    self.parent, self.offset, self.length, self.seed = (
        parent, offset, length, seed)
    self.has_labels = parent.has_labels
    self.label_names = parent.label_names
    self.name = name

  def __len__(self):
    return self.length

  def parent_index(self, index: int) -> int:
    from grain import experimental as grain_exp  # pylint: disable=g-import-not-at-top
    if not 0 <= index < self.length:
      raise IndexError(index)
    return grain_exp.index_shuffle(
        self.offset + index, max_index=len(self.parent) - 1, seed=self.seed,
        rounds=4)

  def __getitem__(self, index):
    return self.parent[self.parent_index(index)]

  @property
  def stats(self):
    return self.parent.stats


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


def _read_utf8(path: str, strict: bool = True) -> str:
  """File contents as text; one-line UserError for missing/empty/non-UTF-8.

  strict=False keeps undecodable bytes as surrogate escapes for apply_policy.
  """
  if not os.path.exists(path):
    raise UserError(f"data file '{path}' does not exist; check the path in file:PATH")
  if os.path.isdir(path):
    raise UserError(
        f"data path '{path}' is a directory; point file: at a .txt, .jsonl or "
        ".csv file")
  with open(path, "rb") as f:
    data = f.read()
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
  text = text.replace("\r\n", "\n").strip()
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


_FILE_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}


def _open_file(path: str, policy: DocPolicy) -> TextSource:
  path = os.path.expanduser(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in _FILE_READERS:
    raise UserError(
        f"unsupported data file '{path}'; use a .txt (one document per line "
        "or blank-line separated), .jsonl or .csv file")
  text = _read_utf8(path, strict=policy.invalid_utf8 == "error")
  texts, labels, columns = _FILE_READERS[ext](path, text)
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


# ------------------------------------------------------------------------- TFDS

# Text and label features of the TFDS sets we know; others fall back below.
TFDS_FIELDS = {
    "lm1b": ("text", None),
    "sentiment140": ("text", "polarity"),
    "reddit": ("content", "subreddit"),
    "reddit_tifu": ("documents", None),
    "imdb_reviews": ("text", "label"),
    "ag_news_subset": ("description", "label"),
}
_TEXT_FIELD_NAMES = ("text", "content", "document", "documents", "sentence",
                     "description", "body")


def _tfds_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def _as_python(value):
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  elif isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  return value


class TfdsSource(TextSource):
  """A `tfds.data_source` with records mapped to {"text", "label"}."""

  def __init__(self, data_source, text_key: str, label_key: str | None,
               label_names: list[str] | None, name: str, truncate_at: int = 0):
    self.truncate_at = truncate_at  # characters; 0: keep whole documents
    self.data_source = data_source
    self.text_key, self.label_key = text_key, label_key
    self.has_labels = label_key is not None
    self.label_names = label_names
    self.name = name

  def __len__(self):
    return len(self.data_source)

  def __getitem__(self, index):
    return self.map_record(self.data_source[index])

  def map_record(self, record: dict[str, Any]) -> dict[str, Any]:
    text = _as_python(record[self.text_key])
    text = text if isinstance(text, str) else str(text)
    out = {"text": text[:self.truncate_at] if self.truncate_at else text}
    if self.label_key is not None:
      out["label"] = _as_python(record[self.label_key])
    return out


def _feature_kinds(features) -> dict[str, str]:
  """{feature name: 'text' | 'class' | 'media' | 'other'} of a FeaturesDict."""
  kinds = {}
  for key, feature in features.items():
    cls = type(feature).__name__
    kinds[key] = ("text" if cls == "Text" else
                  "class" if cls == "ClassLabel" else
                  "media" if cls in ("Image", "Video", "Audio") else "other")
  return kinds


def tfds_fields(name: str, features) -> tuple[str, str | None]:
  """(text key, label key or None) for TFDS dataset `name` with `features`."""
  base = name.split("/")[0]
  kinds = _feature_kinds(features)
  if base in TFDS_FIELDS and TFDS_FIELDS[base][0] in kinds:
    text_key, label_key = TFDS_FIELDS[base]
    return text_key, label_key if label_key in kinds else None
  texts = [k for k, kind in kinds.items() if kind == "text" and k != "id"]
  named = [k for k in _TEXT_FIELD_NAMES if k in texts]
  # Image sets carry string ids/filenames; those are not documents.
  if not named and ("media" in kinds.values() or not texts):
    raise UserError(
        f"TFDS dataset '{name}' has no text feature (features: "
        f"{', '.join(kinds)}); it is not a text dataset (images go through an "
        "image config)")
  text_key = (named or texts)[0]
  label_key = "label" if "label" in kinds else None
  return text_key, label_key


def tfds_data_source(spec: str, example: str = "tfds:imdb_reviews:train"):
  """(`tfds.data_source` of `tfds:NAME[/CONFIG]:SPLIT`, NAME, SPLIT); UserError if unusable."""
  rest = spec[len("tfds:"):]
  name, sep, split = rest.partition(":")
  if not name or not sep or not split:
    raise UserError(
        f"bad TFDS spec '{spec}'; use tfds:NAME[/CONFIG]:SPLIT, e.g. {example}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.environ.get("TFDS_DATA_DIR") or None
  try:
    # download=False: never reach for the network from a training job.
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
        f"unknown TFDS dataset '{name}' (or one that needs TensorFlow); see "
        "https://www.tensorflow.org/datasets/catalog for names") from None
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, (ValueError, KeyError)) and re.search(
        r"BuilderConfig|[Ss]plit", first_line):
      # A bad /CONFIG or SPLIT of a known dataset; tfds names the valid ones.
      raise UserError(
          f"bad TFDS spec '{spec}': {first_line[:300]}") from None
    raise UserError(
        f"TFDS dataset '{name}' split '{split}' is not prepared under "
        f"{data_dir or _tfds_data_dir()} ({type(e).__name__}); prepare it once "
        f"with `tfds build {name} --file_format=array_record` or set "
        "TFDS_DATA_DIR to where it is") from None
  return ds, name, split


def _open_tfds(spec: str, policy: DocPolicy) -> TextSource:
  ds, name, split = tfds_data_source(spec)
  features = ds.dataset_info.features
  text_key, label_key = tfds_fields(name, features)
  label_names = None
  if label_key is not None and type(features[label_key]).__name__ == "ClassLabel":
    label_names = list(features[label_key].names)
  if len(ds) == 0:
    raise UserError(f"TFDS split '{split}' of '{name}' is empty; pick another split")
  truncate_at = policy.max_doc_len if policy.over_length == "truncate" else 0
  return TfdsSource(ds, text_key, label_key, label_names, spec, truncate_at)


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
    return _open_tfds(spec, policy)
  raise UserError(f"unknown data spec '{spec}'; use one of: {SPEC_FORMS}")


def holdout_split(source: TextSource, eval_fraction: float = 0.05,
                  seed: int = 0) -> tuple[TextSource, TextSource]:
  """(train, eval): a deterministic random `eval_fraction` of docs held out.

  Lazy: a seeded permutation of the indices (grain's index_shuffle) keeps
  this O(1) in memory even for TFDS sets with tens of millions of documents.
  """
  n = len(source)
  if not 0 < eval_fraction < 1:
    raise UserError(f"eval fraction must be in (0, 1), got {eval_fraction}")
  if n < 2:
    raise UserError(
        f"{source.name} has {n} document(s); holding some out for eval needs "
        "at least 2 (or give a separate eval source)")
  n_eval = min(n - 1, max(1, int(round(n * eval_fraction))))
  # Positions [0, n_eval) of the permutation are eval, the rest train.
  eval_src = SubsetSource(source, 0, n_eval, seed, f"{source.name}[eval]")
  train_src = SubsetSource(source, n_eval, n - n_eval, seed,
                           f"{source.name}[train]")
  return train_src, eval_src


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
