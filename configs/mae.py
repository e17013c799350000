"""MAE: masked image reconstruction with a ViT encoder.

Launch:
  tx-jax train --config configs/mae.py --workdir runs/mae          # tiny, digits, CPU
  tx-jax train --config configs/mae.py:b16 --workdir /shared/mae_b16  # ViT-B/16, ImageNet (a
                                          # directory every host sees: NFS or gcsfuse)

`tiny` works on scikit-learn's 8×8 digits at their native size: 2×2 patches
(a 4×4 grid, N = 16), 75% masked (4 patches visible), a 4-layer 128-wide
encoder and a 2-layer 64-wide decoder, 6000 steps of 128 images (604 s on 2
CPU cores). Expected (benchmarks/mae_digits.py, results in
benchmarks/results/mae_digits.md): eval/loss about 0.30 against 0.72 for
eval/mean_predictor_loss (predicting every masked patch's mean); frozen-encoder
linear probe about 0.95, 20-NN 0.91, k-means NMI 0.775, against 0.78 / 0.31 /
0.09 for a randomly initialised encoder and 0.97 / 0.97 / 0.74 for raw pixels.
The k-means NMI keeps rising with training (0.38 at step 1000, 0.71 at 3000):
shorter runs do not beat raw pixels.

`b16` is ViT-B/16 (85.6M encoder parameters) with MAE's 8-layer 512-wide
decoder on ImageNet at 224×224, the paper's recipe (He et al. 2022): random
resized crop (scale 0.2-1) + flip, batch 4096, AdamW lr 1.5e-4·batch/256,
betas (0.9, 0.95), weight decay 0.05, 40 warmup epochs, 800 epochs. It needs
`tfds build imagenet2012 --file_format=array_record` (manual download).
"""

import dataclasses

import ml_collections

from tx_jax.models.vit import make_vit_config, vit_configs


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size = arg or "tiny"
  if size not in ("tiny", "b16"):
    raise ValueError(f"unknown size {size!r}; use configs/mae.py:tiny or configs/mae.py:b16")
  c = ml_collections.ConfigDict()
  c.objective = "mae"
  flat = make_vit_config("tiny" if size == "tiny" else "B/16",
                         **({"dtype": "bfloat16", "remat": "dots", "scan_layers": True}
                            if size == "b16" else {}))
  encoder, vit, decoder = vit_configs(flat)
  # Every encoder field, the ViT geometry, and the decoder's own widths.
  c.model = ml_collections.ConfigDict({
      **dataclasses.asdict(encoder), **dataclasses.asdict(vit),
      **{f"decoder_{k}": getattr(decoder, k)
         for k in ("num_layers", "d_model", "num_heads", "mlp_dim")}})
  c.objective_options = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix_loss=True))

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:digits", eval_source="", eval_fraction=0.2,
      # Per-channel stats of the pixels in [0, 1] (digits: all 1,797 images).
      mean=[0.3053], std=[0.3760],
      resize=False, crop_scale=[1.0, 1.0], flip=False, eval_crop_fraction=1.0,
      eval_examples=0,  # 0: the whole eval split
      num_threads=0))

  c.evaluation = ml_collections.ConfigDict(dict(
      probe=True, probe_train_examples=0, probe_test_examples=0, knn_k=20,
      reconstructions=8, readout_fit_examples=1024))

  c.train = ml_collections.ConfigDict(dict(
      steps=6000, batch_size=128, seed=0, log_every=50, eval_every=1000,
      checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True,
      nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.05, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.95, eps=1e-8))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if size == "b16":
    steps_per_epoch = 1_281_167 // 4096
    c.data.update(source="tfds:imagenet2012:train", eval_source="tfds:imagenet2012:validation",
                  mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize=True,
                  crop_scale=[0.2, 1.0], flip=True, eval_crop_fraction=0.875,
                  eval_examples=10_000, num_threads=16)
    c.evaluation.update(probe_train_examples=50_000, probe_test_examples=10_000)
    c.train.update(steps=800 * steps_per_epoch, batch_size=4096, log_every=100,
                   eval_every=10 * steps_per_epoch, checkpoint_every=2 * steps_per_epoch)
    c.optim.update(lr=1.5e-4 * 4096 / 256, warmup_steps=40 * steps_per_epoch,
                   min_lr_ratio=0.0, clip_norm=0.0)
    c.mesh.update(data=1, fsdp=-1, rules="fsdp")
  return c
