"""Supervised (input, target) text pairs for seq2seq fine-tuning, from local files.

  file:PATH.jsonl   one object per line with string "input" and "target"
  file:PATH.csv     a header with "input" and "target" columns

`open_pair_source(spec)` returns a random-access source of
{"input": str, "target": str}; it works with `sources.holdout_split`.
"""

import csv
import io
import json
import os
import sys

from tx_jax.data import sources
from tx_jax.errors import UserError

_FORMAT = ('file:PATH.jsonl (lines like {"input": ..., "target": ...}) or file:PATH.csv '
           'with input and target columns')


class PairSource(sources.TextSource):
  """In-memory (input, target) pairs."""

  def __init__(self, inputs: list[str], targets: list[str], name: str):
    self.inputs, self.targets, self.name = inputs, targets, name

  def __len__(self):
    return len(self.inputs)

  def __getitem__(self, index):
    return {"input": self.inputs[index], "target": self.targets[index]}


def _jsonl_pairs(path: str, text: str):
  pairs = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"'{path}' line {lineno} is not valid JSON ({e.msg}); each line must be "
                      'one object like {"input": ..., "target": ...}') from None
    if not isinstance(record, dict) or "input" not in record or "target" not in record:
      keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
      raise UserError(f"'{path}' line {lineno} lacks 'input'/'target' (has: {keys or 'none'}); "
                      "seq2seq data needs both fields on every line")
    if not isinstance(record["input"], str) or not isinstance(record["target"], str):
      raise UserError(f"'{path}' line {lineno}: 'input' and 'target' must be strings")
    pairs.append((record["input"], record["target"]))
  return pairs


def _csv_pairs(path: str, text: str):
  old_limit = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  try:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if "input" not in header or "target" not in header:
      raise UserError(f"'{path}' needs 'input' and 'target' columns (columns: "
                      f"{', '.join(header) or 'none'}); rename them in the header")
    i, t = header.index("input"), header.index("target")
    pairs = []
    try:
      for row in reader:
        if not any(row):
          continue
        if len(row) != len(header):
          raise UserError(f"'{path}' line {reader.line_num} has {len(row)} fields but the "
                          f"header has {len(header)}; quote fields that contain commas")
        pairs.append((row[i], row[t]))
    except csv.Error as e:
      raise UserError(f"'{path}' line {reader.line_num}: bad CSV ({e})") from None
  finally:
    csv.field_size_limit(old_limit)
  return pairs


def open_pair_source(spec: str) -> PairSource:
  """Opens `file:PATH.jsonl|.csv` of input/target pairs (see module docstring)."""
  if not isinstance(spec, str) or not spec.startswith("file:"):
    raise UserError(f"seq2seq data {spec!r} is not a pair file; use {_FORMAT}")
  path = os.path.expanduser(spec[len("file:"):])
  ext = os.path.splitext(path)[1].lower()
  readers = {".jsonl": _jsonl_pairs, ".csv": _csv_pairs}
  if ext not in readers:
    raise UserError(f"seq2seq data '{path}' is not .jsonl or .csv; use {_FORMAT}")
  pairs = [(a, b) for a, b in readers[ext](path, sources._read_utf8(path))  # pylint: disable=protected-access
           if a.strip() and b.strip()]
  if not pairs:
    raise UserError(f"'{path}' has no pair with a non-empty input and target")
  return PairSource([a for a, _ in pairs], [b for _, b in pairs], spec)
