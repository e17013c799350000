"""ViT / MAE: masking, loss, positions and patches against naive references; CLI runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax.models import count_params
from tx_jax.models.vit import (MAE, VIT_SIZES, ViT, make_vit_config, num_kept, patchify,
                               random_masking, sincos_2d, unpatchify, vit_configs)
from tx_jax.objectives.mae import MAEObjective, masked_patch_loss

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=8, patch_size=2, channels=1, num_layers=1, d_model=32, num_heads=2,
             mlp_dim=64, decoder_num_layers=1, decoder_d_model=16, decoder_num_heads=2,
             decoder_mlp_dim=32)
TINY_FLAGS = ["--config.model.num_layers=1", "--config.model.d_model=32",
              "--config.model.num_heads=2", "--config.model.mlp_dim=64",
              "--config.model.decoder_num_layers=1", "--config.model.decoder_d_model=16",
              "--config.model.decoder_num_heads=2", "--config.model.decoder_mlp_dim=32",
              "--config.train.batch_size=16", "--config.train.log_every=2",
              "--config.data.eval_examples=64", "--config.evaluation.probe_train_examples=200",
              "--config.evaluation.reconstructions=4",
              "--config.evaluation.readout_fit_examples=64",
              "--config.evaluation.probe_test_examples=100"]


def run_cli(args, timeout=600, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(), **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


def small_objective(**overrides) -> MAEObjective:
  enc, vit, dec = vit_configs({**SMALL, **overrides})
  return MAEObjective(enc, vit=vit, decoder=dec)


def init(obj):
  return nn.unbox(obj.init_params(jax.random.key(0)))


@pytest.fixture(scope="module")
def small():
  obj = small_objective()
  params = init(obj)
  images = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  return obj, params, images


# ------------------------------------------------------------------ masking


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (196, 0.75), (49, 0.75), (16, 0.5),
                                     (10, 0.33), (64, 0.9)])
def test_masking_keeps_exactly_round_of_visible(n, ratio):
  ids_keep, mask, ids_restore = random_masking(jax.random.key(1), 5, n, ratio)
  keep = round((1 - ratio) * n)
  ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
  assert ids_keep.shape == (5, keep)
  np.testing.assert_array_equal(mask.sum(1), n - keep)
  for row in range(5):
    assert len(set(ids_keep[row])) == keep
    np.testing.assert_array_equal(np.sort(ids_keep[row]), np.flatnonzero(mask[row] == 0))
    # ids_restore inverts the shuffle whose first `keep` entries are ids_keep.
    shuffle = np.argsort(ids_restore[row])
    np.testing.assert_array_equal(shuffle[:keep], ids_keep[row])
  assert num_kept(n, ratio) == keep


def test_masks_differ_per_example_and_step_and_repeat_per_seed(small):
  obj, params, images = small
  base = jax.random.key(7)
  masks = lambda rng: obj.apply(params, images, rng, train=True)[1]["mask"]

  def mask_at(seed_key, step):  # the train step's rng: fold_in(key, step)
    return np.asarray(masks(jax.random.fold_in(seed_key, step)))

  m3 = mask_at(base, 3)
  assert len({row.tobytes() for row in m3}) == len(m3)        # every example its own mask
  assert not np.array_equal(m3, mask_at(base, 4))              # a new mask each step
  np.testing.assert_array_equal(m3, mask_at(jax.random.key(7), 3))  # same seed and step
  assert not np.array_equal(m3, mask_at(jax.random.key(8), 3))


def test_encoder_sees_only_visible_patches(small):
  obj, params, images = small
  rng = jax.random.key(3)
  _, out = obj.apply(params, images, rng)
  mask = np.asarray(out["mask"])
  assert out["patch_tokens"].shape == (6, num_kept(16, 0.75), 32)
  pixel_mask = np.asarray(unpatchify(jnp.repeat(mask[..., None], 4, -1), 2, 1)) > 0
  noise = np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
  _, hidden_changed = obj.apply(params, np.where(pixel_mask, images + noise, images), rng)
  np.testing.assert_allclose(hidden_changed["encoded"], out["encoded"], atol=1e-6)
  _, seen_changed = obj.apply(params, np.where(pixel_mask, images, images + noise), rng)
  assert not np.allclose(seen_changed["encoded"], out["encoded"], atol=1e-3)


# --------------------------------------------------------------------- loss


def naive_loss(pred, images, mask, patch, eps=1e-6):
  """Mean over masked patches of the MSE to the patch normalised by its own mean/var."""
  b, h, w, c = images.shape
  total, count = 0.0, 0
  for i in range(b):
    n = 0
    for r in range(0, h, patch):
      for q in range(0, w, patch):
        if mask[i, n]:
          target = images[i, r:r + patch, q:q + patch].astype(np.float64).reshape(-1)
          target = (target - target.mean()) / np.sqrt(target.var() + eps)
          total += np.mean((pred[i, n] - target) ** 2)
          count += 1
        n += 1
  return total / count


def test_loss_counts_masked_patches_only(small):
  obj, params, images = small
  rng = jax.random.key(5)
  pred, out = obj.apply(params, images, rng)
  pred, mask = np.asarray(pred), np.asarray(out["mask"])
  valid = np.ones(6, np.float32)
  sums = masked_patch_loss(pred, images, mask, valid, 2, True)
  np.testing.assert_allclose(float(sums["sq_err"] / sums["weight"]),
                             naive_loss(pred, images, mask, 2), rtol=1e-5)
  loss, _ = obj.loss_fn(params, {"image": images, "valid": valid}, rng, False)
  np.testing.assert_allclose(float(loss), naive_loss(pred, images, mask, 2), rtol=1e-5)
  # Perturbing visible patches (prediction and pixels) changes nothing...
  visible = (mask == 0)[..., None]
  noise = np.random.default_rng(2).normal(size=pred.shape).astype(np.float32)
  pixel_visible = np.asarray(unpatchify(jnp.asarray(np.broadcast_to(visible, pred.shape)
                                                    .astype(np.float32)), 2, 1)) > 0
  moved = masked_patch_loss(np.where(visible, pred + 1e3 * noise, pred),
                            np.where(pixel_visible, images * 5 + 1, images), mask, valid, 2, True)
  for key in sums:
    assert float(moved[key]) == float(sums[key]), key
  # ...and perturbing one masked patch does change the loss.
  i, n = np.argwhere(mask > 0)[0]
  bumped = pred.copy()
  bumped[i, n] += 1.0
  assert float(masked_patch_loss(bumped, images, mask, valid, 2, True)["sq_err"]) != float(
      sums["sq_err"])
  # Padding rows (valid = 0) drop out entirely.
  half = masked_patch_loss(pred, images, mask, np.array([1, 1, 1, 0, 0, 0], np.float32), 2, True)
  assert float(half["weight"]) == mask[:3].sum()


def test_mean_predictor_baseline(small):
  obj, _, images = small
  mask = np.ones((6, 16), np.float32)
  zeros = np.zeros((6, 16, 4), np.float32)  # = each patch's own mean, after normalising
  sums = masked_patch_loss(zeros, images, mask, np.ones(6, np.float32), 2, True)
  np.testing.assert_allclose(float(sums["sq_err"]), float(sums["mean_predictor"]), rtol=1e-6)
  np.testing.assert_allclose(float(sums["mean_predictor"]) / 96, 1.0, atol=1e-4)
  flat = np.zeros_like(images)  # constant patches: predicting the mean is exact
  sums = masked_patch_loss(zeros, flat, mask, np.ones(6, np.float32), 2, True)
  assert float(sums["mean_predictor"]) == 0.0


def test_patch_stats_readout_recovers_a_linear_map():
  rng = np.random.default_rng(6)
  hidden = rng.normal(size=(20, 16, 8)).astype(np.float32)
  w, b = rng.normal(size=(8, 2)), np.array([0.5, 1.0])
  mask = (rng.random((20, 16)) < 0.75).astype(np.float32)
  stats = np.where(mask[..., None] > 0, hidden @ w + b, 1e6)  # visible patches must not count
  got = MAEObjective.fit_patch_stats_readout(hidden, mask, stats, ridge=0.0)
  np.testing.assert_allclose(got[:-1], w, atol=1e-4)
  np.testing.assert_allclose(got[-1], b, atol=1e-4)


def test_reconstruction_copies_visible_patches_and_draws_masked_ones(small):
  obj, params, images = small
  readout = np.zeros((17, 2), np.float32)
  readout[-1] = [0.25, 0.0]  # every masked patch: mean 0.25, no contrast
  recon, pixel_mask = map(np.asarray, obj.reconstruct(params, images, jax.random.key(2), readout))
  _, out = obj.apply(params, images, jax.random.key(2))
  want_mask = np.repeat(np.repeat(np.asarray(out["mask"]).reshape(6, 4, 4), 2, 1), 2, 2)
  np.testing.assert_array_equal(pixel_mask[..., 0], want_mask)
  np.testing.assert_array_equal(recon[pixel_mask == 0], images[pixel_mask == 0])
  np.testing.assert_allclose(recon[pixel_mask == 1], 0.25, atol=1e-6)
  with pytest.raises(ValueError, match="stats_readout"):
    obj.reconstruct(params, images, jax.random.key(2))


# ------------------------------------------------------- positions, patches


def test_sincos_positions_match_formula():
  grid, width = 3, 8
  got = sincos_2d(grid, width)
  want = np.zeros((grid * grid, width))
  for i in range(grid):        # row
    for j in range(grid):      # column
      for k in range(width // 4):
        w = 1.0 / 10000 ** (k / (width // 4))
        want[i * grid + j, k] = np.sin(j * w)
        want[i * grid + j, width // 4 + k] = np.cos(j * w)
        want[i * grid + j, width // 2 + k] = np.sin(i * w)
        want[i * grid + j, 3 * width // 4 + k] = np.cos(i * w)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_patchify_matches_naive_loop_and_round_trips():
  x = np.random.default_rng(4).normal(size=(2, 6, 6, 3)).astype(np.float32)
  got = np.asarray(patchify(jnp.asarray(x), 3))
  for b in range(2):
    for n in range(4):
      r, q = divmod(n, 2)
      want = [x[b, 3 * r + p, 3 * q + s, c] for p in range(3) for s in range(3) for c in range(3)]
      np.testing.assert_array_equal(got[b, n], want)
  np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(got), 3, 3)), x)


def test_patch_embedding_is_a_strided_conv(small):
  obj, params, images = small
  kernel = np.asarray(params["encoder"]["patch_embed"]["kernel"])           # (P, P, C, D)
  conv = jax.lax.conv_general_dilated(images, kernel, (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, out = obj.encode(params, images)
  emb = np.asarray(out["embedded"]) - sincos_2d(4, 32)[None]
  np.testing.assert_allclose(emb, np.asarray(conv).reshape(6, 16, 32)
                             + np.asarray(params["encoder"]["patch_embed"]["bias"]), atol=1e-5)


def test_pooling_and_named_outputs():
  for pooling in ("cls", "mean"):
    obj = small_objective(pooling=pooling)
    params = init(obj)
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 1)).astype(np.float32)
    pooled, out = obj.encode(params, x)
    assert pooled.shape == (3, 32) and out["patch_tokens"].shape == (3, 16, 32)
    want = out["encoded"][:, 0] if pooling == "cls" else out["patch_tokens"].mean(1)
    np.testing.assert_allclose(np.asarray(out["pre_logits"]), np.asarray(want), atol=1e-6)
    assert "block_00" in out


def test_vit_b16_encoder_parameter_count():
  """ViT-B/16 (Dosovitskiy et al. 2021), counted by hand:
  patch embedding 16·16·3·768 + 768 = 590,592; CLS 768; per block: 4 attention
  projections (768·768 + 768) + MLP (768·3072 + 3072 + 3072·768 + 768) + 2
  LayerNorms (2·768 each) = 7,087,872, ×12 = 85,054,464; final LayerNorm 1,536.
  Fixed sin-cos positions add nothing (learned ones add 196·768 = 150,528).
  """
  hand = 590_592 + 768 + 12 * 7_087_872 + 1_536
  assert hand == 85_647_360
  for posemb, want in (("sincos2d", hand), ("learned", hand + 150_528)):
    enc, vit, dec = vit_configs(make_vit_config("B/16", posemb=posemb))
    shapes = jax.eval_shape(lambda: MAE(enc, vit, dec).init(
        {"params": jax.random.key(0), "mask": jax.random.key(0)},
        jnp.zeros((1, 224, 224, 3)))["params"])
    assert count_params(shapes["encoder"]) == want
    alone = jax.eval_shape(lambda: ViT(enc, vit).init(jax.random.key(0),
                                                      jnp.zeros((1, 224, 224, 3)))["params"])
    assert count_params(alone) == want
  assert VIT_SIZES["B/16"]["decoder_d_model"] == 512


def test_param_names_match_kernel_shapes(small):
  obj, _, _ = small
  boxed = jax.eval_shape(lambda: obj.init_params(jax.random.key(0)))
  sizes = {"patch_height": 2, "patch_width": 2, "channels": 1, "decoder_embed": 16,
           "patch_pixels": 4, "positions": 16}
  leaves = jax.tree_util.tree_leaves_with_path(boxed,
                                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path
    for name, dim in zip(leaf.names, leaf.value.shape):
      if name in sizes:
        assert dim == sizes[name], (path, name, dim)


def test_bad_model_fields():
  with pytest.raises(ValueError, match="multiple of"):
    vit_configs({**SMALL, "patch_size": 3})
  with pytest.raises(ValueError, match="not a ViT/MAE field"):
    vit_configs({**SMALL, "patch": 2})
  with pytest.raises(ValueError, match="positions"):
    vit_configs({**SMALL, "positions": "rope"})


# ---------------------------------------------------------------- CLI runs


def test_bad_image_inputs_exit_2(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
      (["--config.model.channels=3", "--config.data.mean=[0.3, 0.3, 0.3]",
        "--config.data.std=[0.4, 0.4, 0.4]"], "has 1 channel(s) but model.channels=3"),
      ([f"--config.data.source=file:{empty}"], "holds no image files"),
      (["--config.model.image_size=16", "--config.model.patch_size=4"],
       "is 8x8 but model.image_size=16 and data.resize=false"),
  ]
  for flags, message in cases:
    wd = tmp_path / "wd"
    out = run_cli(["train", "--config", "configs/mae.py", "--workdir", str(wd), *flags],
                  timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert not (wd / "checkpoints").exists()


@pytest.mark.slow
def test_train_resume_and_eval_on_a_sharded_mesh(tmp_path, capsys):
  """6 steps on 8 fake devices (data 2 × fsdp 4); resuming from step 3 ends
  bit-identical to the straight run; metrics and reconstructions are written."""
  wd = tmp_path / "run"
  env = {"XLA_FLAGS": xla_flags(8)}
  common = ["train", "--config", "configs/mae.py", "--workdir", str(wd), *TINY_FLAGS,
            "--config.train.steps=6", "--config.train.checkpoint_every=3",
            "--config.train.eval_every=6", "--config.train.async_checkpoints=false",
            "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.rules=fsdp"]
  first = run_cli(common, env_extra=env)
  assert first.returncode == 0, first.stderr[-3000:]
  from tx_jax.train.trained import load_trained
  straight = jax.device_get(load_trained(str(wd)).params)
  lines = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6] and "images_per_s" in train_lines[0]
  final = [l for l in lines if "eval/loss" in l][-1]
  for key in ("eval/linear_probe_accuracy", "eval/knn_accuracy", "eval/kmeans_nmi",
              "eval/mean_predictor_loss"):
    assert 0 <= final[key] <= 1.5, key
  assert (wd / "reconstructions" / "step_000006.png").stat().st_size > 1000

  shutil.rmtree(wd / "checkpoints" / "6")
  # Evaluation settings do not touch the training state; no pictures this time.
  again = run_cli(common + ["--config.evaluation.reconstructions=0"], env_extra=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from step 3" in again.stdout
  resumed = jax.device_get(load_trained(str(wd)).params)
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  from tx_jax import cli  # `tx-jax eval`, in this process
  assert cli.main(["eval", "--workdir", str(wd)]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["step"] == 6 and 0 < record["eval/loss"] < 2
  assert 0 <= record["eval/linear_probe_accuracy"] <= 1 and 0 <= record["eval/kmeans_nmi"] <= 1

  # `tx-jax embed` on an MAE workdir: the encoder's pre_logits of the eval-preprocessed
  # images (naive numpy preprocessing here), with labels, ready for `tx-jax analyze`.
  npz = tmp_path / "digits.npz"
  assert cli.main(["embed", "--workdir", str(wd), "--data", "embedded:digits", "--out",
                   str(npz), "--sample", "40", "--batch-size", "16"]) == 0
  got = np.load(npz)
  index = [int(str(i).split("[")[1].rstrip("]")) for i in got["ids"]]
  from sklearn.datasets import load_digits
  digits = load_digits()
  np.testing.assert_array_equal(got["labels"], digits.target[index])
  pixels = ((digits.images[index] / 16.0 - 0.3053) / 0.3760)[..., None].astype(np.float32)
  trained = load_trained(str(wd))
  want = trained.objective.encode(trained.params, pixels)[0]
  assert got["embeddings"].shape == (40, 32)
  np.testing.assert_allclose(got["embeddings"], want, atol=1e-4, rtol=1e-4)
  # pre_logits is pooled by the model itself; the meta says so, not the unused --pooling.
  meta = json.loads(str(got["meta"]))
  assert (meta["layer"], meta["pooling"]) == ("pre_logits", f"model:{trained.config.model.pooling}")
  capsys.readouterr()
  assert cli.main(["analyze", "--embeddings", str(npz), "--out", str(tmp_path / "report"),
                   "--k", "10"]) == 0
  report = json.load(open(tmp_path / "report" / "report.json"))
  assert report["k"] == 10 and 0 <= report["metrics"]["nmi"] <= 1
