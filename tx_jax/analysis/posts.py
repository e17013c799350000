"""Social-media posts as they come: reading, cleaning and collapsing reposts.

A post is a record with `text` and optionally `id`, `label`, `created_at` and
`author` (the columns `tx_jax.data.sources` keeps from .csv/.jsonl files).
Cleaning is only for the bag-of-words side (c-TF-IDF, TF-IDF features,
coherence); the text shown to analysts is always the post as written.
"""

import dataclasses
import re

import numpy as np

from tx_jax.errors import UserError

# Tokens for CountVectorizer: #hashtags and @mentions whole, words of 2+
# characters that are not pure numbers, and each emoji (pictographs, symbols,
# dingbats, flags) as a token of its own.
EMOJI = "\U0001F1E6-\U0001F1FF\U0001F300-\U0001FAFF\u2600-\u27BF"
TOKEN_PATTERN = rf"(?u)[#@]\w+|\b(?!\d+\b)\w\w+\b|[{EMOJI}]"
URL_RE = re.compile(r"(?i)\b(?:https?://|www\.)\S+")
MENTION_RE = re.compile(r"(?<![\w@])@\w+")
URL_MODES = ("keep", "remove", "token")
MENTION_MODES = ("keep", "remove", "token")


def clean_text(text, urls="remove", mentions="token"):
  """One post for the bag of words: URLs and @mentions kept, removed or made one token.

  "token" replaces every URL by `URL` and every mention by `@user`, so that
  "links to something" or "replies to someone" still count without each
  address or handle becoming a term of its own.
  """
  if urls not in URL_MODES or mentions not in MENTION_MODES:
    raise UserError(f"urls={urls!r} / mentions={mentions!r}: use one of {', '.join(URL_MODES)}")
  if urls != "keep":
    text = URL_RE.sub(" URL " if urls == "token" else " ", text)
  if mentions != "keep":
    text = MENTION_RE.sub(" @user " if mentions == "token" else " ", text)
  return text


@dataclasses.dataclass(frozen=True)
class Reposts:
  """Exact reposts collapsed: unique[j] is the first post of text j, inverse[i] the text of post i."""
  unique: np.ndarray   # [U] int, index of the first post with each distinct text
  inverse: np.ndarray  # [N] int in [0, U)
  counts: np.ndarray   # [U] int, how many posts share each text


def collapse_reposts(texts):
  """Groups posts with the same text (whitespace-normalised) -> Reposts.

  Raises UserError when every post is a copy of one text: there is nothing to
  find topics in.
  """
  keys = [" ".join(str(t).split()) for t in texts]
  if not keys:
    raise UserError("no posts; give at least two posts with different texts")
  first = {}
  inverse = np.empty(len(keys), np.int64)
  for i, key in enumerate(keys):
    inverse[i] = first.setdefault(key, len(first))
  unique = np.full(len(first), -1, np.int64)
  for i in range(len(keys) - 1, -1, -1):
    unique[inverse[i]] = i
  counts = np.bincount(inverse, minlength=len(first))
  if len(first) < 2:
    raise UserError(
        f"all {len(keys)} posts are the same text ({keys[0][:60]!r}); topics need at least "
        "two different posts")
  return Reposts(unique, inverse, counts)


TIME_COLUMNS = ("created_at", "date", "timestamp")  # The first one present is the time.


@dataclasses.dataclass
class Posts:
  """Columns of a post collection; optional ones are None when the data lacks them."""
  texts: list
  ids: np.ndarray
  labels: np.ndarray | None = None
  label_names: list | None = None
  created_at: list | None = None   # values of the time column, as read
  time_column: str | None = None   # which of TIME_COLUMNS they came from
  authors: list | None = None
  rows: np.ndarray | None = None   # each post's position in its data source


def posts_from_source(source):
  """The columns of a `tx_jax.data.sources` TextSource -> Posts."""
  records = [source[i] for i in range(len(source))]
  if not records:
    raise UserError(f"{source.name} has no posts; give a non-empty dataset")

  def column(key):
    values = [r.get(key) for r in records]
    return None if all(v is None for v in values) else values

  ids = column("id")
  time_column = next((c for c in TIME_COLUMNS if column(c) is not None), None)
  return Posts(
      texts=[r["text"] for r in records],
      ids=np.arange(len(records)) if ids is None else np.asarray([str(v) for v in ids]),
      labels=None if column("label") is None else np.asarray(column("label")),
      label_names=getattr(source, "label_names", None),
      created_at=column(time_column) if time_column else None, time_column=time_column,
      authors=column("author"))


def load_posts(spec):
  """Posts of a data spec (`file:posts.csv`, `file:posts.jsonl`, `embedded:...`)."""
  from tx_jax.data import sources
  return posts_from_source(sources.open_source(spec))


def load_embedded_posts(npz_path, data=None):
  """The `tx-jax embed` .npz and, optionally, the data spec it embedded -> (embeddings, Posts).

  With data, the posts' full texts and their time / author columns come from
  the source (the .npz keeps only ids, labels and texts cut to a length),
  matched to the embeddings by the .npz ids (the source's `id` column, or
  record indices when it has none).
  """
  from tx_jax.analysis.report import _load
  x, ids, labels, texts = _load(npz_path)
  with np.load(npz_path, allow_pickle=False) as f:
    label_names = f["label_names"].tolist() if "label_names" in f.files else None
  if data is None:
    if texts is None:
      raise UserError(f"{npz_path} has no texts; pass the data spec it embedded as well")
    return x, Posts([str(t) for t in texts], ids, labels, label_names)
  posts = load_posts(data)
  if np.issubdtype(posts.ids.dtype, np.integer):
    rows = np.asarray(ids, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(posts.texts)):
      raise UserError(f"{npz_path} indexes posts beyond the {len(posts.texts)} of {data}; "
                      "pass the data spec the embeddings were made from")
  else:
    where = {str(v): i for i, v in enumerate(posts.ids)}
    missing = [str(v) for v in ids if str(v) not in where]
    if missing:
      raise UserError(f"{len(missing)} ids of {npz_path} are not in {data} (first: "
                      f"{missing[0]!r}); pass the data spec the embeddings were made from")
    rows = np.asarray([where[str(v)] for v in ids], np.int64)
  pick = lambda values: None if values is None else [values[r] for r in rows]
  return x, Posts([posts.texts[r] for r in rows], posts.ids[rows],
                  None if posts.labels is None else posts.labels[rows],
                  posts.label_names or label_names, pick(posts.created_at), posts.time_column,
                  pick(posts.authors), rows)
