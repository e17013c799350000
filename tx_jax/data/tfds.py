"""TFDS through `tfds.data_source` (array_record files, no TensorFlow): text and images.

`tfds:NAME[/CONFIG]:SPLIT` opens a prepared split lazily; records are mapped
to the project's {"text", "label"} or {"image", "id", "label"} records. Text
and label features of the sets we know are listed; others are found by kind.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from tx_jax.data.doc_policy import DocPolicy
from tx_jax.data.source import Source
from tx_jax.errors import UserError

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


class TfdsSource(Source):
  """A `tfds.data_source` with records mapped to {"text", "label"}."""
  unit = "docs"

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


def open_text(spec: str, policy: DocPolicy) -> TfdsSource:
  """A text split as a source of {"text", "label"} records."""
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




class TfdsImageSource(Source):
  """A `tfds.data_source` with records mapped to {"image", "id", "label"}."""
  unit = "images"

  def __init__(self, data_source, image_key: str, label_key: str | None,
               label_names: list[str] | None, name: str):
    self.data_source, self.image_key, self.label_key = data_source, image_key, label_key
    self.has_labels, self.label_names, self.name = label_key is not None, label_names, name

  def __len__(self):
    return len(self.data_source)

  def __getitem__(self, index):
    record = self.data_source[index]
    out = {"image": np.asarray(record[self.image_key]), "id": f"{self.name}[{index}]"}
    if self.label_key is not None:
      out["label"] = int(np.asarray(record[self.label_key]))
    return out


def _feature_class(feature) -> str:
  return type(feature).__name__


def open_images(spec: str) -> TfdsImageSource:
  """An image split as a source of {"image", "id", "label"} records."""
  ds, name, split = tfds_data_source(spec, example="tfds:cifar10:train")
  features = ds.dataset_info.features
  images = [k for k, f in features.items() if _feature_class(f) == "Image"]
  if not images:
    raise UserError(f"TFDS dataset '{name}' has no image feature (features: "
                    f"{', '.join(features)}); it is not an image dataset")
  image_key = "image" if "image" in images else images[0]
  labels = [k for k, f in features.items() if _feature_class(f) == "ClassLabel"]
  label_key = "label" if "label" in labels else (labels[0] if labels else None)
  label_names = list(features[label_key].names) if label_key else None
  if len(ds) == 0:
    raise UserError(f"TFDS split '{split}' of '{name}' is empty; pick another split")
  return TfdsImageSource(ds, image_key, label_key, label_names, spec)
