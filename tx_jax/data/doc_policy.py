"""What to do with hostile documents: over-long ones and invalid UTF-8.

Config keys (section `data`): `max_doc_len` (characters, 0: no limit),
`over_length` ("chunk" | "truncate") and `invalid_utf8` ("error" | "replace"
| "skip"). Sources apply the policy as they read and report counts.
"""

import dataclasses
import re
from typing import Any

from tx_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DocPolicy:
  """What to do with hostile documents.

  max_doc_len: longest document in characters (0: no limit). Longer ones are
    cut into max_doc_len pieces (over_length="chunk", labels repeated) or cut
    off (over_length="truncate"). TFDS sets are read lazily, so there only
    "truncate" applies (the LM pipeline splits every document into seq_len
    pieces anyway).
  invalid_utf8: bytes that are not UTF-8 in a data file (or lone surrogates
    from JSON escapes) are an "error" naming the place, or every affected
    document is "replace"d (U+FFFD per bad byte) or "skip"ped.
  """
  max_doc_len: int = 0
  over_length: str = "chunk"
  invalid_utf8: str = "error"

  def __post_init__(self):
    if self.over_length not in ("chunk", "truncate"):
      raise UserError(f"data.over_length={self.over_length!r} is not 'chunk' or 'truncate'")
    if self.invalid_utf8 not in ("error", "replace", "skip"):
      raise UserError(f"data.invalid_utf8={self.invalid_utf8!r} is not 'error', 'replace' "
                      "or 'skip'")
    if self.max_doc_len < 0:
      raise UserError(f"data.max_doc_len must be >= 0 (0: no limit), got {self.max_doc_len}")

  @classmethod
  def from_config(cls, data_cfg) -> "DocPolicy":
    """From a config's `data` section; missing keys keep the defaults."""
    return cls(**{f.name: data_cfg[f.name] for f in dataclasses.fields(cls)
                  if f.name in data_cfg})


# Surrogate escapes of undecodable bytes (errors="surrogateescape") and lone
# surrogates from JSON "\udXXX" escapes: neither can be encoded to UTF-8.
_BAD_UNICODE = re.compile("[\ud800-\udfff]")


def apply_policy(texts: list[str], labels: list[Any] | None, policy: DocPolicy,
                 origin: str) -> tuple[list[str], list[Any] | None, dict[str, int]]:
  """(texts, labels, counts) after the policy's UTF-8 and length rules."""
  stats = {"documents_read": len(texts), "invalid_utf8_replaced": 0,
           "invalid_utf8_skipped": 0, "over_length_truncated": 0, "over_length_chunked": 0}
  out_texts, out_labels = [], []
  limit = policy.max_doc_len
  for i, text in enumerate(texts):
    label = labels[i] if labels is not None else None
    if _BAD_UNICODE.search(text):
      if policy.invalid_utf8 == "error":
        raise UserError(
            f"{origin} document {i + 1} holds invalid Unicode (a lone surrogate such as a "
            "\\udc80 escape); fix it or set data.invalid_utf8=replace or skip")
      if policy.invalid_utf8 == "skip":
        stats["invalid_utf8_skipped"] += 1
        continue
      text = _BAD_UNICODE.sub("\ufffd", text)
      stats["invalid_utf8_replaced"] += 1
    pieces = [text]
    if limit and len(text) > limit:
      if policy.over_length == "truncate":
        pieces = [text[:limit]]
        stats["over_length_truncated"] += 1
      else:
        pieces = [text[s:s + limit] for s in range(0, len(text), limit)]
        stats["over_length_chunked"] += 1
    out_texts += pieces
    out_labels += [label] * len(pieces)
  stats["documents"] = len(out_texts)
  return out_texts, out_labels if labels is not None else None, stats
