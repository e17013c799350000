"""Image data: sources (digits, TFDS, folders), preprocessing, grain pipelines."""

import math
import os
import sys

import numpy as np
import pytest

from tx_jax.data import corpora, images
from tx_jax.errors import UserError


def digits_prep(**kw):
  base = dict(image_size=8, channels=1, mean=(0.3,), std=(0.4,), resize=False)
  return images.Preprocess(**{**base, **kw})


def write_png(path, array):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


# ------------------------------------------------------------------- sources


def test_digits_source_and_holdout_split():
  src = images.open_image_source("embedded:digits")
  raw, labels = corpora.digits()
  assert len(src) == 1797 and src.has_labels and src.label_names == [str(i) for i in range(10)]
  np.testing.assert_array_equal(src[5]["image"], raw[5])
  assert src[5]["label"] == labels[5]
  train, evals = images.image_train_eval_sources("embedded:digits", None, 0.2, seed=0)
  assert len(evals) == round(0.2 * 1797) and len(train) + len(evals) == 1797
  ids = {train[i]["id"] for i in range(len(train))} | {evals[i]["id"] for i in range(len(evals))}
  assert len(ids) == 1797  # disjoint and complete
  # The split is grain's index shuffle of the source (the remembered indices
  # included: each is read twice here).
  from grain import experimental as grain_exp
  for part, offset in ((evals, 0), (train, len(evals))):
    for i in (0, 7, len(part) - 1):
      want = grain_exp.index_shuffle(offset + i, max_index=1796, seed=0, rounds=4)
      assert part[i]["id"] == part[i]["id"] == f"embedded:digits[{want}]"


def test_tfds_image_sets_with_mock_data(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=6):
    cifar = images.open_image_source("tfds:cifar10:train")
    assert len(cifar) == 6 and cifar.has_labels and len(cifar.label_names) == 10
    raw = cifar.data_source[3]
    np.testing.assert_array_equal(cifar[3]["image"], raw["image"])
    assert cifar[3]["image"].shape == (32, 32, 3) and cifar[3]["label"] == int(raw["label"])
    # Resized to 16x16 through the train pipeline (random resized crop + flip).
    prep = images.Preprocess(16, 3, (0.5,) * 3, (0.25,) * 3, crop_scale=(0.3, 1.0), flip=True)
    batch = next(images.image_train_iterator(cifar, prep, 4, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert np.abs(batch["image"]).max() <= 0.5 / 0.25 + 1e-5  # (x - 0.5) / 0.25, x in [0, 1]
    mnist = images.open_image_source("tfds:mnist:test")
    assert mnist[0]["image"].shape == (28, 28, 1)
    # ImageNet as configs/mae.py:b16 reads it: any size, centre crop 0.875 -> 224x224.
    imagenet = images.open_image_source("tfds:imagenet2012:validation")
    assert imagenet.has_labels and len(imagenet.label_names) == 1000
    assert imagenet[0]["image"].ndim == 3 and imagenet[0]["image"].shape[-1] == 3
    prep = images.Preprocess(224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             eval_crop_fraction=0.875)
    assert prep.eval(imagenet[0]["image"]).shape == (224, 224, 3)
    with pytest.raises(UserError, match="no image feature"):
      images.open_image_source("tfds:imdb_reviews:train")
  with pytest.raises(UserError, match="tfds build cifar10"):
    images.open_image_source("tfds:cifar10:train")  # not prepared, no network
  assert "tensorflow" not in sys.modules


def test_folder_source_labels_from_subfolders(tmp_path):
  rng = np.random.default_rng(0)
  pics = {f"{c}/{i}.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
          for c in ("cat", "dog") for i in range(2)}
  for rel, array in pics.items():
    write_png(str(tmp_path / "labelled" / rel), array)
  src = images.open_image_source(f"file:{tmp_path / 'labelled'}")
  assert len(src) == 4 and src.label_names == ["cat", "dog"]
  assert [src[i]["label"] for i in range(4)] == [0, 0, 1, 1]
  for i in range(4):
    np.testing.assert_array_equal(src[i]["image"], pics[src[i]["id"]])  # PNG is lossless
  write_png(str(tmp_path / "flat" / "a.png"), np.zeros((4, 4), np.uint8))
  flat = images.open_image_source(f"file:{tmp_path / 'flat'}")
  assert not flat.has_labels and flat[0]["image"].shape == (4, 4, 1)


def test_folder_user_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("not an image")
  with pytest.raises(UserError, match="holds no image files"):
    images.open_image_source(f"file:{tmp_path / 'empty'}")
  with pytest.raises(UserError, match="does not exist"):
    images.open_image_source(f"file:{tmp_path / 'missing'}")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"not a png at all")
  src = images.open_image_source(f"file:{tmp_path / 'bad'}")
  with pytest.raises(UserError, match="cannot be read"):
    src[0]
  with pytest.raises(UserError, match="unknown image data spec"):
    images.open_image_source("http://example.com/x.png")
  with pytest.raises(UserError, match="embedded:digits"):
    images.open_image_source("embedded:python-docs")


# ------------------------------------------------------------- preprocessing


def test_preprocess_checks_channels_and_size():
  prep = digits_prep()
  with pytest.raises(UserError, match="has 3 channel.*model.channels=1"):
    prep.eval(np.zeros((8, 8, 3), np.uint8), "x.png")
  with pytest.raises(UserError, match="is 9x8 but model.image_size=8 and data.resize=false"):
    prep.eval(np.zeros((9, 8, 1), np.uint8), "x.png")
  with pytest.raises(UserError, match="need 1 values"):
    images.Preprocess(8, 1, (0.1, 0.2), (1.0, 1.0))
  with pytest.raises(UserError, match="crop_scale"):
    digits_prep(crop_scale=(0.0, 1.0))


def test_preprocess_normalises_and_resizes():
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
  out = digits_prep().eval(raw)
  np.testing.assert_allclose(out, (raw / 255.0 - 0.3) / 0.4, rtol=1e-6, atol=1e-6)
  # Resizing keeps a constant image constant and a left-to-right ramp increasing.
  prep = images.Preprocess(8, 3, (0.0,) * 3, (1.0,) * 3, resize=True)
  flat = prep.eval(np.full((20, 30, 3), 200, np.uint8))
  assert flat.shape == (8, 8, 3)
  np.testing.assert_allclose(flat, 200 / 255.0, atol=1e-5)
  ramp = np.broadcast_to(np.linspace(0, 1, 30, dtype=np.float32)[None, :, None], (20, 30, 1))
  gray = images.Preprocess(8, 1, (0.0,), (1.0,), resize=True).eval(ramp)
  assert (np.diff(gray[4, :, 0]) > 0).all()
  # The centred square of a wide image: the middle 20 of 30 columns.
  np.testing.assert_allclose(gray[:, 0, 0].mean(), (5 + 20 / 16 - 0.5) / 29, atol=0.01)


def test_random_resized_crop_box_matches_the_definition():
  rng = np.random.default_rng(1)
  for _ in range(300):
    left, top, right, bottom = images.random_resized_crop_box((40, 60), (0.2, 0.9), rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
    # Rounding w and h moves area/aspect by at most one pixel's worth.
    assert 0.2 * 2400 - (w + h + 1) <= w * h <= 0.9 * 2400 + (w + h + 1)
    assert math.log(3 / 4) - 0.1 <= math.log(w / h) <= math.log(4 / 3) + 0.1
  a = images.random_resized_crop_box((40, 60), (0.2, 1.0), np.random.default_rng(7))
  assert a == images.random_resized_crop_box((40, 60), (0.2, 1.0), np.random.default_rng(7))


def test_flip_mirrors_half_the_time():
  raw = np.random.default_rng(2).random((8, 8, 1)).astype(np.float32)
  prep = images.Preprocess(8, 1, (0.0,), (1.0,), resize=False, flip=True)
  outs = [prep.train(raw, np.random.default_rng(s)) for s in range(40)]
  flipped = sum(np.allclose(o, raw[:, ::-1]) for o in outs)
  kept = sum(np.allclose(o, raw) for o in outs)
  assert flipped + kept == 40 and 8 < flipped < 32


# ------------------------------------------------------------------ pipelines


def _image_keys(batch):
  return [b.tobytes() for b in np.asarray(batch["image"])]


def test_train_iterator_epochs_resume_and_shards():
  src = images.ArraySource(np.random.default_rng(3).random((10, 8, 8, 1), np.float32),
                           np.arange(10), name="toy")
  prep = digits_prep()
  everything = {prep.eval(src[i]["image"]).tobytes() for i in range(10)}
  it = images.image_train_iterator(src, prep, 5, seed=0)
  epoch = _image_keys(next(it)) + _image_keys(next(it))
  assert set(epoch) == everything  # one epoch: each image once
  state = it.get_state()
  after = [next(it)["image"] for _ in range(3)]
  resumed = images.image_train_iterator(src, prep, 5, seed=0)
  resumed.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(resumed)["image"], want)
  other = images.image_train_iterator(src, prep, 5, seed=1)
  assert _image_keys(next(other)) + _image_keys(next(other)) != epoch
  shards = [images.image_train_iterator(src, prep, 5, seed=0, shard_index=i, shard_count=2)
            for i in range(2)]
  assert set(_image_keys(next(shards[0]))).isdisjoint(_image_keys(next(shards[1])))
  changed = images.image_train_iterator(src, prep, 4, seed=0)
  with pytest.raises(UserError, match="batch_size: 5 -> 4"):
    changed.set_state(state)


def test_train_batches_run_across_epochs_each_a_permutation():
  # 3 images, batches of 4: batch boundaries and epoch boundaries differ.
  pixels = np.arange(3, dtype=np.uint8)[:, None, None, None] * np.ones((3, 8, 8, 1), np.uint8)
  src = images.ArraySource(pixels, np.array([7, 8, 9]), name="three")
  prep = digits_prep(mean=(0.0,), std=(1.0,))
  it = images.image_train_iterator(src, prep, 4, seed=2, labels=True)
  batches = [next(it) for _ in range(6)]   # 24 positions = 8 epochs
  seen = np.concatenate([np.rint(b["image"][:, 0, 0, 0] * 255) for b in batches]).astype(int)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, seen + 7)  # each label rides with its image
  epochs = seen.reshape(8, 3)
  assert all(sorted(e) == [0, 1, 2] for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1    # reshuffled, not one order repeated
  # The image is normalised as the per-image evaluation view would be.
  np.testing.assert_allclose(batches[0]["image"][0],
                             (pixels[seen[0]].astype(np.float32) / 255 - 0.0) / 1.0)


def test_augmented_stream_is_deterministic_per_seed():
  src = images.open_image_source("embedded:digits")
  prep = digits_prep(crop_scale=(0.5, 1.0), flip=True)
  a = next(images.image_train_iterator(src, prep, 8, seed=4))
  b = next(images.image_train_iterator(src, prep, 8, seed=4, num_threads=2))
  np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_in_order_and_pad():
  src = images.open_image_source("embedded:digits")
  prep = digits_prep()
  batches = list(images.image_eval_batches(src, prep, 64, limit=150))
  assert [b["image"].shape[0] for b in batches] == [64, 64, 64]
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert valid.sum() == 150 and (labels[150:] == -1).all()
  np.testing.assert_array_equal(labels[:150], corpora.digits()[1][:150])
  np.testing.assert_allclose(batches[2]["image"][149 - 128], prep.eval(src[149]["image"]))
