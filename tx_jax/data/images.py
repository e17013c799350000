"""Image data: sources, preprocessing (resize, random resized crop, flip) and grain pipelines.

Specs:
  embedded:digits            scikit-learn's 8×8 digits (1,797 images, labels 0-9)
  tfds:NAME[/CONFIG]:SPLIT   any TFDS image set through `tfds.data_source`
                             (e.g. tfds:cifar10:train, tfds:imagenet2012:validation)
  file:DIR                   a folder of image files; when every image sits in
                             a first-level subfolder, the subfolder names are labels

An `ImageSource` has `len(src)` and `src[i] -> {"image": (H, W, C) uint8 or
float32 in [0, 1], "id": str, "label": int (when has_labels)}`. Batches are
dicts of numpy arrays: "image" float32 (B, S, S, C) normalised by the
configured mean/std, "valid" float32 (B,) (0 on rows that pad the last eval
batch) and, for evaluation, "label" int32 (B,) (-1 where unknown).

Train iterators are grain `DatasetIterator`s over whole batches: a batch is read
and preprocessed in one call (images that need no resize are normalised as one
array), per-image augmentation draws from a generator seeded by (seed, position
in the stream), so `get_state()` / `set_state()` resume bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator


import grain
import numpy as np

from tx_jax.data import corpora
from tx_jax.data import tfds as tfds_lib
from tx_jax.data.source import Source, SubsetSource, holdout_split
from tx_jax.data.pipeline import SettingsIterator
from tx_jax.errors import UserError

IMAGE_SPEC_FORMS = "embedded:digits, tfds:NAME[/CONFIG]:SPLIT, file:DIR (a folder of images)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")


class ImageSource(Source):
  """Random-access images: `src[i] -> {"image": (H, W, C) array, "id"}` (+ "label")."""
  name = "images"
  unit = "images"


class ArraySource(ImageSource):
  """In-memory images [N, H, W, C] with optional integer labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               label_names: list[str] | None = None, name: str = "arrays"):
    self.images, self.labels = images, labels
    self.has_labels, self.label_names, self.name = labels is not None, label_names, name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    record = {"image": self.images[index], "id": f"{self.name}[{index}]"}
    if self.labels is not None:
      record["label"] = int(self.labels[index])
    return record


class FolderSource(ImageSource):
  """Image files under a folder, in sorted path order, decoded with PIL."""

  def __init__(self, root: str, paths: list[str], labels: list[int] | None,
               label_names: list[str] | None):
    self.root, self.paths, self.labels = root, paths, labels
    self.has_labels, self.label_names = labels is not None, label_names
    self.name = f"file:{root}"

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    path = self.paths[index]
    record = {"image": read_image_file(os.path.join(self.root, path)), "id": path}
    if self.labels is not None:
      record["label"] = self.labels[index]
    return record


def read_image_file(path: str) -> np.ndarray:
  """(H, W, C) uint8 from an image file; palette/CMYK/... become RGB, 1-bit/16-bit gray L."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("1", "I", "I;16", "F"):
        img = img.convert("L")
      elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
      elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")
      array = np.asarray(img, np.uint8)
  except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
    raise UserError(f"image file '{path}' cannot be read ({type(e).__name__}); remove or "
                    "replace it") from None
  return array[..., None] if array.ndim == 2 else array


def _open_folder(root: str) -> FolderSource:
  root = os.path.expanduser(root)
  if not os.path.exists(root):
    raise UserError(f"image folder '{root}' does not exist; check the path in file:DIR")
  if not os.path.isdir(root):
    raise UserError(f"'{root}' is a file; for images file: takes a folder of image files")
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  paths.sort()
  if not paths:
    raise UserError(f"image folder '{root}' holds no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add images or fix the path")
  tops = [p.split(os.sep)[0] if os.sep in p else None for p in paths]
  if None in tops:  # images at the top level: no labels
    return FolderSource(root, paths, None, None)
  names = sorted(set(tops))
  index = {n: i for i, n in enumerate(names)}
  return FolderSource(root, paths, [index[t] for t in tops], names)


def open_image_source(spec: str) -> ImageSource:
  """Opens an image data spec (see module docstring) as a random-access ImageSource."""
  if not isinstance(spec, str) or not spec:
    raise UserError(f"empty image data spec; use one of: {IMAGE_SPEC_FORMS}")
  if spec == "embedded:digits":
    images, labels = corpora.digits()
    return ArraySource(images, labels, [str(i) for i in range(10)], "embedded:digits")
  if spec.startswith("embedded:"):
    raise UserError(f"'{spec}' is not an embedded image dataset; the embedded image set is "
                    "embedded:digits")
  if spec.startswith("tfds:"):
    return tfds_lib.open_images(spec)
  if spec.startswith("file:"):
    return _open_folder(spec[len("file:"):])
  raise UserError(f"unknown image data spec '{spec}'; use one of: {IMAGE_SPEC_FORMS}")


def image_subset(source: ImageSource, limit: int | None, seed: int = 0) -> ImageSource:
  """A seeded random `limit` images of `source` (all of it when limit is None or larger).

  Random, not the first `limit`: some sets (TFDS ImageNet train) are stored
  grouped by class.
  """
  if limit is None or limit >= len(source):
    return source
  return SubsetSource(source, 0, int(limit), seed,
                                   f"{source.name}[{limit} of {len(source)}]")


def image_train_eval_sources(spec: str, eval_spec: str | None = None,
                             eval_fraction: float = 0.2, seed: int = 0):
  """(train, eval) sources: `eval_spec` if given, else a seeded held-out fraction."""
  if eval_spec:
    return open_image_source(spec), open_image_source(eval_spec)
  return holdout_split(open_image_source(spec), eval_fraction, seed)


# ---------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Image -> float32 (S, S, C), normalised: (x - mean) / std with x in [0, 1].

  Evaluation: a centred square crop of `eval_crop_fraction` of the shorter
  side, resized to S (1.0 = the whole shorter side; ImageNet uses 0.875).
  Training: a random resized crop (area fraction uniform in `crop_scale`,
  aspect ratio log-uniform in [3/4, 4/3]; (1, 1) = the evaluation crop), then
  a horizontal flip with probability 1/2 when `flip`. With `resize` False
  every image must already be S×S.
  """
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  resize: bool = True
  crop_scale: tuple[float, float] = (1.0, 1.0)
  flip: bool = False
  eval_crop_fraction: float = 1.0

  def __post_init__(self):
    # Config lists become tuples, so equal settings compare (and repr) equal.
    for name in ("mean", "std", "crop_scale"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if len(self.mean) != self.channels or len(self.std) != self.channels:
      raise UserError(f"data.mean and data.std need {self.channels} values (model.channels), "
                      f"got {len(self.mean)} and {len(self.std)}")
    if min(self.std) <= 0:
      raise UserError(f"data.std values must be positive, got {list(self.std)}")
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise UserError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    if not 0 < self.eval_crop_fraction <= 1:
      raise UserError(f"data.eval_crop_fraction must be in (0, 1], got "
                      f"{self.eval_crop_fraction}")

  def check(self, image: np.ndarray, where: str) -> np.ndarray:
    """The image as (H, W, C); UserError on a wrong channel count or (no resize) size."""
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3:
      raise UserError(f"image {where} has shape {image.shape}; expected (height, width, "
                      "channels)")
    h, w, c = image.shape
    if c != self.channels:
      raise UserError(f"image {where} has {c} channel(s) but model.channels={self.channels}; "
                      f"set --config.model.channels={c} (and {c} data.mean/data.std values) "
                      "or convert the images")
    if not self.resize and (h, w) != (self.image_size, self.image_size):
      raise UserError(f"image {where} is {h}x{w} but model.image_size={self.image_size} and "
                      "data.resize=false; set --config.data.resize=true or resize the images")
    return image

  @property
  def augments(self) -> bool:
    """Whether a training view is random (a crop or a flip), not the evaluation view."""
    return self.flip or self.crop_scale != (1.0, 1.0)

  def is_identity_view(self, images) -> bool:
    """Whether the evaluation view of each (checked) image is the image itself,
    normalised: all S×S with the whole image kept, so no resize."""
    return all(self._center_box(*im.shape[:2]) is None for im in images)

  def normalise(self, images: np.ndarray) -> np.ndarray:
    """(x - mean) / std of images (any leading axes) in [0, 1] or integer pixels."""
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return ((_to_unit_float(images) - mean) / std).astype(np.float32)

  def _finish(self, image: np.ndarray, box, flip: bool) -> np.ndarray:
    image = _to_unit_float(image) if box is None else _resize(image, box, self.image_size)
    if flip:
      image = image[:, ::-1]
    return self.normalise(image)

  def _center_box(self, h: int, w: int):
    """The evaluation crop of an h×w image; None when it is the image itself."""
    if (h, w) == (self.image_size, self.image_size) and self.eval_crop_fraction == 1.0:
      return None
    side = min(h, w) * self.eval_crop_fraction
    top, left = (h - side) / 2, (w - side) / 2
    return (left, top, left + side, top + side)

  def eval(self, image: np.ndarray, where: str = "") -> np.ndarray:
    return self.eval_checked(self.check(image, where))

  def eval_checked(self, image: np.ndarray) -> np.ndarray:
    """The evaluation view of an image `check` has passed."""
    return self._finish(image, self._center_box(*image.shape[:2]), False)

  def train(self, image: np.ndarray, rng: np.random.Generator, where: str = "") -> np.ndarray:
    return self.train_checked(self.check(image, where), rng)

  def train_checked(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training view of an image `check` has passed."""
    flip = bool(self.flip and rng.random() < 0.5)
    if self.crop_scale == (1.0, 1.0):
      box = self._center_box(*image.shape[:2])
    else:
      box = random_resized_crop_box(image.shape[:2], self.crop_scale, rng)
    return self._finish(image, box, flip)


def random_resized_crop_box(shape: tuple[int, int], scale: tuple[float, float],
                            rng: np.random.Generator, ratio=(3 / 4, 4 / 3)):
  """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop."""
  h, w = shape
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return (left, top, left + cw, top + ch)
  # Fallback: the whole image, clamped to the allowed aspect ratios, centred.
  if w / h < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif w / h > ratio[1]:
    cw, ch = int(round(h * ratio[1])), h
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return (left, top, left + cw, top + ch)


def _to_unit_float(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if np.issubdtype(image.dtype, np.integer):
    return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
  return image.astype(np.float32)


def _resize(image: np.ndarray, box, size: int) -> np.ndarray:
  """Crops `box` (float pixel coordinates) and resizes it to size×size, bilinear, in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _to_unit_float(image)
  # Each channel as a 32-bit float image: any channel count, no 8-bit rounding.
  planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
      (size, size), Image.BILINEAR, box=box)) for c in range(image.shape[-1])]
  return np.stack(planes, axis=-1)


# -------------------------------------------------------------------- pipelines


class _BatchReader:
  """Reads the records at some source indices and preprocesses them into one batch.

  Images that need no augmentation and no resize are normalised together, as one
  (B, S, S, C) array; the others one by one (in `num_threads` threads when > 0).
  """

  def __init__(self, source: ImageSource, prep: Preprocess, labels: bool, num_threads: int):
    self.source, self.prep, self.labels = source, prep, labels
    self.num_threads, self._pool = num_threads, None

  def _map(self, fn, *args):
    if self.num_threads <= 0:
      return list(map(fn, *args))
    if self._pool is None:
      import concurrent.futures  # pylint: disable=g-import-not-at-top
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
    return list(self._pool.map(fn, *args))

  def __call__(self, indices, rngs=None) -> dict[str, np.ndarray]:
    """indices: source indices; rngs: one generator per image for a training crop/flip
    (None: the evaluation view)."""
    records = [self.source[int(i)] for i in indices]
    raw = [self.prep.check(r["image"], r.get("id", "")) for r in records]
    if rngs is None and self.prep.is_identity_view(raw):
      batch = self.prep.normalise(np.stack(raw))
    elif rngs is None:
      batch = np.stack(self._map(self.prep.eval_checked, raw))
    else:
      batch = np.stack(self._map(self.prep.train_checked, raw, rngs))
    out = {"image": batch, "valid": np.ones(len(records), np.float32)}
    if self.labels:
      out["label"] = np.asarray([r.get("label", -1) for r in records], np.int32)
    return out


class _TrainBatch(grain.transforms.Map):
  """Batch number b -> the images at stream positions [b B, (b + 1) B).

  Position p is image `perm_e[p mod n]` of this host's n images, e = p div n its
  epoch and perm_e a permutation drawn from (seed, e): every epoch is freshly
  shuffled, and batches run on across epoch boundaries. A crop or flip at
  position p draws from a generator seeded by (seed, p), so the stream is the same
  whatever the thread count, and resuming at batch b is exact.
  """

  def __init__(self, reader: _BatchReader, batch_size: int, seed: int, shard_index: int,
               shard_count: int):
    self.reader, self.batch_size, self.seed = reader, batch_size, seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.n = len(range(shard_index, len(reader.source), shard_count))
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 1:  # batches move forward: keep the two latest epochs
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n)
    return self._perms[epoch]

  def map(self, element):
    start = int(element) * self.batch_size
    positions = np.arange(start, start + self.batch_size)
    epochs, within = np.divmod(positions, self.n)
    shuffled = np.empty_like(positions)
    for e in np.unique(epochs):
      shuffled[epochs == e] = self._perm(int(e))[within[epochs == e]]
    rngs = None
    if self.reader.prep.augments:
      rngs = [np.random.default_rng((self.seed, int(p))) for p in positions]
    return self.reader(self.shard_index + shuffled * self.shard_count, rngs)


class ImageIterator(SettingsIterator):
  pipeline = "image"


def image_train_iterator(source: ImageSource, prep: Preprocess, batch_size: int, seed: int,
                         shard_index: int = 0, shard_count: int = 1,
                         num_threads: int = 0, labels: bool = False,
                         iterator_cls: type[SettingsIterator] = ImageIterator
                         ) -> SettingsIterator:
  """Shuffled, augmented batches {"image" (B, S, S, C), "valid" (B,)} (+ "label" (B,)
  with `labels`), forever.

  batch_size is per host; this host reads images shard_index::shard_count.
  Each epoch is reshuffled from the seed. num_threads > 0 reads and augments a
  batch's images in that many threads while the next batch is prepared in the
  background (same batches, faster).
  """
  if batch_size < 1:
    raise UserError(f"batch size per host must be >= 1, got {batch_size}")
  if not 0 <= seed < 2**32:
    raise UserError(f"train.seed must be in [0, 2**32), got {seed}")
  if len(source) < shard_count or len(source) == 0:
    raise UserError(f"{source.name} has {len(source)} images, fewer than the {shard_count} "
                    "hosts reading it; use more data")
  reader = _BatchReader(source, prep, labels, num_threads)
  ds = grain.MapDataset.range(2**62).map(
      _TrainBatch(reader, batch_size, seed, shard_index, shard_count))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_threads else 0,
                                            prefetch_buffer_size=2 if num_threads else 0))
  config = {"source": source.name, "num_images": len(source), "batch_size": int(batch_size),
            "seed": int(seed), "shard_index": int(shard_index),
            "shard_count": int(shard_count), "preprocess": repr(prep), "order": "batches"}
  return iterator_cls(iter(ds), config)


def image_eval_batches(source: ImageSource, prep: Preprocess, batch_size: int,
                       limit: int | None = None, num_threads: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
  """The first `limit` (default all) images in order, as full batches of
  {"image", "valid", "label"}; the last batch is padded with valid = 0 rows."""
  n = len(source) if limit is None else min(limit, len(source))
  if n == 0:
    raise UserError(f"eval data {source.name} has no images")
  reader = _BatchReader(source, prep, True, num_threads)
  for start in range(0, n, batch_size):
    batch = reader(range(start, min(n, start + batch_size)))
    rows = len(batch["valid"])
    if rows < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
      batch["label"][rows:] = -1
    yield batch


def check_first_images(prep: Preprocess, *sources):
  """Preprocesses the first image of each source: a wrong size or channel count fails
  now, in one line, instead of inside a training step."""
  for src in sources:
    first = src[0]
    prep.eval(first["image"], first["id"])


def run_train_iterator(config, source, prep: Preprocess):
  """This process's rows of every global train batch of an image run (config.train /
  config.data): shard pid of the process count."""
  import jax  # pylint: disable=g-import-not-at-top
  n_proc, pid = jax.process_count(), jax.process_index()
  return image_train_iterator(source, prep, config.train.batch_size // n_proc, config.train.seed,
                              shard_index=pid, shard_count=n_proc,
                              num_threads=config.data.num_threads)


def run_eval_batches(config, source, prep: Preprocess):
  """A factory of this process's rows of an image run's eval batches (at most
  data.eval_examples seeded images): every host builds the same global batches."""
  import jax  # pylint: disable=g-import-not-at-top
  d, t = config.data, config.train
  subset = image_subset(source, d.eval_examples or None, t.seed)
  n_proc, pid = jax.process_count(), jax.process_index()
  local_bs = t.batch_size // n_proc

  def batches():
    for batch in image_eval_batches(subset, prep, t.batch_size, num_threads=d.num_threads):
      yield {k: batch[k][pid * local_bs:(pid + 1) * local_bs] for k in ("image", "valid")}
  return batches
