"""Transformer GAN: a patch-token generator against a ViT discriminator.

Launch:
  tx-jax train --config configs/gan.py --workdir runs/gan              # tiny, digits, CPU
  tx-jax generate --workdir runs/gan --num-samples 64 --out samples.npz --grid samples.png
  tx-jax train --config configs/gan.py:cifar --workdir runs/gan_cifar  # 32x32, tfds:cifar10
  tx-jax train --config configs/gan.py:cifar --workdir runs/gan_dir \\
      --config.data.source=file:/path/to/images   # a folder of images (resized to 32x32)

`tiny` works on scikit-learn's 8×8 digits at their native size: 2×2 patches
(N = 16 tokens), a 2-layer 64-wide generator and discriminator, the
non-saturating loss with R1 (γ = 0.01) and an EMA of the generator
(β = 0.999), Adam (β1 = 0, β2 = 0.99) at 3e-4 (discriminator 2×) decayed
(cosine) to a tenth, batch 256, 3000 steps (11 min 52 s, 1,306 CPU seconds, alone
on a 2-core CPU). Measured over 3 training seeds (benchmarks/gan_digits.py,
benchmarks/results/gan_digits.md): FID 22.8 (20.6-23.9) for the EMA generator
against 59.0 for a full-covariance Gaussian fit to the training pixels (every seed
under half of it) and 4.4 for real held-out images (batch 128: 26.1, 22.9-31.1);
Inception Score 6.5 (real 9.4), confidence 0.87 (real 0.99), every class covered
on every seed.
Metrics are in the feature space of a small CNN trained once on the labelled
training images (tx_jax/evaluation/sample_quality.py), not Inception's.

`cifar` is a 6-layer 384-wide generator and discriminator on 32×32 images
with 4×4 patches (N = 64), batch 128, 200k steps; on a folder of images
without class subfolders only the sample grids are made (FID needs labels
to train its classifier).
"""

import dataclasses

import ml_collections

from tx_jax.models.gan import gan_configs, make_gan_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size = arg or "tiny"
  if size not in ("tiny", "cifar"):
    raise ValueError(f"unknown size {size!r}; use configs/gan.py:tiny or configs/gan.py:cifar")
  c = ml_collections.ConfigDict()
  c.objective = "gan"
  flat = make_gan_config(size, **({"num_layers": 2, "d_model": 64, "mlp_dim": 128}
                                  if size == "tiny" else {}))
  gen, disc, geo = gan_configs(flat)
  # Every field once: the generator's and discriminator's blocks share them unless a
  # generator_<field> / discriminator_<field> override is given.
  c.model = ml_collections.ConfigDict({
      **{k: v for k, v in dataclasses.asdict(gen).items() if k != "max_len"},
      **dataclasses.asdict(geo)})
  c.objective_options = ml_collections.ConfigDict(dict(
      loss="nonsaturating", r1_gamma=0.01, ema_decay=0.999, discriminator_lr_ratio=2.0,
      # random translation of every image D sees (DiffAugment); 0.125 (1 pixel) on seed 1:
      # FID 40.3 at step 3000 against 31.05 without, so off here
      augment_shift=0.0))

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:digits", eval_source="", eval_fraction=0.2,
      resize=False, crop_scale=[1.0, 1.0], flip=False, eval_crop_fraction=1.0,
      eval_examples=0,  # 0: the whole eval split
      num_threads=0))

  c.evaluation = ml_collections.ConfigDict(dict(
      num_samples=0,          # 0: as many as the held-out images (the same N for every set)
      coverage_min_share=0.2,  # a class is covered with >= 0.2 * N / K samples
      grid_samples=16,
      classifier_steps=500, classifier_seed=0))

  c.train = ml_collections.ConfigDict(dict(
      steps=3000, batch_size=256, seed=0, log_every=100, eval_every=1000,
      checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True,
      nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      # cosine decay to 0.1 x lr over the 3000 steps, at batch 64: FID 28-32 over 3
      # seeds (constant lr: 29-38); decayed over 4500 steps it got worse (40-46)
      lr=3e-4, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=0.0,
      accumulate_steps=1, b1=0.0, b2=0.99, eps=1e-8))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if size == "cifar":
    c.data.update(source="tfds:cifar10:train", eval_source="tfds:cifar10:test", flip=True,
                  eval_examples=10_000, num_threads=8)
    c.evaluation.update(num_samples=10_000, grid_samples=16, classifier_steps=5000)
    c.train.update(steps=200_000, batch_size=128, log_every=200, eval_every=10_000,
                   checkpoint_every=5000)
    c.optim.update(lr=2e-4)
  return c
