"""Masked image reconstruction (MAE): predict the pixels of the masked patches.

Batches: "image" float32 (B, H, W, C), normalised by the data's mean/std, and
"valid" float32 (B,) (0 on rows that only pad an eval batch). The loss is the
mean squared error over the pixels of each masked patch, averaged over masked
patches; visible patches never enter it. With `norm_pix_loss` each target
patch is first normalised by its own pixel mean and variance (He et al. 2022,
sec. 3), so predicting each patch's mean scores var / (var + eps), i.e. 1 on
every patch that is not flat; `summarize` reports that baseline beside the loss
as "mean_predictor_loss".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax.data import images
from tx_jax.errors import UserError
from tx_jax.evaluation.frozen_encoder import FrozenEncoderEvaluation
from tx_jax.models import TransformerConfig, count_params
from tx_jax.models.vit import MAE, ViTConfig, num_kept, patchify, unpatchify, vit_configs
from tx_jax.objectives.base import Data, Objective, register

NORM_PIX_EPS = 1e-6


def patch_targets(images, patch: int, norm_pix: bool):
  """Targets (B, N, P·P·C) and, per patch, the loss of predicting the patch mean (B, N)."""
  target = patchify(images.astype(jnp.float32), patch)
  var = jnp.var(target, axis=-1)                                             # (B, N), biased
  if not norm_pix:
    return target, var
  mean = jnp.mean(target, axis=-1, keepdims=True)
  target = (target - mean) / jnp.sqrt(var[..., None] + NORM_PIX_EPS)
  return target, var / (var + NORM_PIX_EPS)


def masked_patch_loss(pred, images, mask, valid, patch: int, norm_pix: bool) -> dict:
  """Sums over the masked patches of valid rows: squared error, count, mean-predictor loss.

  pred (B, N, P·P·C), images (B, H, W, C), mask (B, N) with 1 = masked,
  valid (B,). Each patch's error is the mean over its pixels.
  """
  target, mean_pred_loss = patch_targets(images, patch, norm_pix)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)                   # (B, N)
  weights = mask * valid[:, None]
  counted = weights > 0  # `where`, not a product: visible patches never reach the sums
  return {"sq_err": jnp.sum(jnp.where(counted, per_patch * weights, 0.0)),
          "weight": jnp.sum(weights),
          "mean_predictor": jnp.sum(jnp.where(counted, mean_pred_loss * weights, 0.0))}


def preprocess_from_config(config, vit) -> images.Preprocess:
  """How the run's images are resized, normalised and augmented (config.data)."""
  d = config.data
  return images.Preprocess(
      image_size=vit.image_size, channels=vit.channels, mean=tuple(d.mean), std=tuple(d.std),
      resize=d.resize, crop_scale=tuple(d.crop_scale), flip=d.flip,
      eval_crop_fraction=d.eval_crop_fraction)


class ImageInputs:
  """How a trained image model reads data outside training (`tx-jax embed`): any
  image spec, preprocessed exactly as the run's evaluation images."""

  def __init__(self, prep: images.Preprocess):
    self.prep = prep

  def open(self, spec: str) -> images.ImageSource:
    """The image source of a data spec."""
    return images.open_image_source(spec)

  def collate(self, records) -> dict[str, np.ndarray]:
    """Records -> {"image": (B, H, W, C)} preprocessed as the run's eval images."""
    return {"image": np.stack([self.prep.eval(r["image"], r.get("id", "")) for r in records])}


@register("mae")
class MAEObjective(Objective):
  """MAE pretraining of a ViT encoder; the unit of work is one image.

  Config sections beyond the text runs': `model` holds the flat ViT/MAE fields
  (see `tx_jax.models.vit.vit_configs`), `data` the image spec, normalisation
  stats and augmentation, `evaluation` the probe and reconstruction settings.
  """
  unit = "images"
  uses_tokenizer = False

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray | None = None, *,
               vit: ViTConfig = ViTConfig(), decoder: TransformerConfig | None = None,
               mask_ratio: float = 0.75, norm_pix_loss: bool = True, inputs=None):
    if not 0.0 <= mask_ratio < 1.0:
      raise ValueError(f"mae.mask_ratio must be in [0, 1), got {mask_ratio}")
    del token_bytes  # images have no tokens
    self.cfg, self.vit = model_cfg, vit
    self.decoder_cfg = decoder or model_cfg
    self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
    self.model = MAE(model_cfg, vit, self.decoder_cfg, self.mask_ratio)
    # Reads and preprocesses data outside training (`tx-jax embed`): an object with
    # open(spec) -> source and collate(records) -> {"image": (B, H, W, C)}; the
    # train code builds it from the run's data config.
    self.inputs = inputs

  @classmethod
  def from_model_config(cls, model, **options) -> "MAEObjective":
    """From a run's `model` section (flat ViT/MAE fields, see models.vit.vit_configs)
    and its objective_options (mask_ratio, norm_pix_loss)."""
    encoder, vit, decoder = vit_configs(dict(model))
    return cls(encoder, vit=vit, decoder=decoder, **options)

  @classmethod
  def from_config(cls, config, tokenizer=None) -> "MAEObjective":
    del tokenizer  # images have no tokens
    options = dict(config.get("objective_options") or {})
    unknown = sorted(set(options) - {"mask_ratio", "norm_pix_loss"})
    if unknown:
      raise UserError(f"objective_options {unknown} are not options of 'mae'; it takes "
                      "['mask_ratio', 'norm_pix_loss']")
    try:
      objective = cls.from_model_config(config.model, **options)
    except ValueError as e:
      raise UserError(str(e)) from None
    objective.inputs = ImageInputs(preprocess_from_config(config, objective.vit))
    return objective

  # --- data ------------------------------------------------------------------------

  @classmethod
  def open_data(cls, config) -> Data:
    d = config.data
    train, evaluation = images.image_train_eval_sources(d.source, d.eval_source or None,
                                                        d.eval_fraction, config.train.seed)
    return Data(train, evaluation)

  def _checked(self, data: Data):
    images.check_first_images(self.inputs.prep, data.train, data.eval)

  def init_len(self, config) -> int:
    return self.vit.num_patches

  def units_per_batch(self, config) -> int:
    return config.train.batch_size

  def train_iterator(self, config, data: Data):
    return images.run_train_iterator(config, data.train, self.inputs.prep)

  def eval_batches(self, config, data: Data):
    self._checked(data)
    return images.run_eval_batches(config, data.eval, self.inputs.prep)

  def evaluation(self, config, data: Data):
    return FrozenEncoderEvaluation(config, self, self.inputs.prep, data.train, data.eval)

  def benchmark_shape(self, config) -> dict:
    return {"image_size": self.vit.image_size}

  def dummy_images(self, batch: int = 1):
    """Zero images (batch, H, W, C) of the model's geometry."""
    v = self.vit
    return jnp.zeros((batch, v.image_size, v.image_size, v.channels), jnp.float32)

  def synthetic_batch(self, batch: int, seq_len: int = 0, vocab: int = 0, seed: int = 0) -> dict:
    """Random normalised images, for throughput benchmarks (seq_len, vocab: unused)."""
    del seq_len, vocab
    v = self.vit
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(batch, v.image_size, v.image_size, v.channels)
                                ).astype(np.float32),
            "valid": np.ones(batch, np.float32)}

  def init_params(self, rng, seq_len: int = 0):
    """Parameters of the MAE (encoder and pixel decoder)."""
    del seq_len  # the image size is fixed by the config
    return self.model.init({"params": rng, "mask": rng}, self.dummy_images())["params"]

  def apply(self, params, images, rng, train: bool = False, mask_ratio: float | None = None):
    """(pixel predictions (B, N, P·P·C), out); the mask is drawn from `rng`."""
    mask_rng, dropout_rng = jax.random.split(rng)
    return self.model.apply({"params": params}, images, deterministic=not train,
                            mask_ratio=mask_ratio, rngs={"mask": mask_rng, "dropout": dropout_rng})

  def loss_fn(self, params, batch, rng, train: bool):
    pred, out = self.apply(params, batch["image"], rng, train)
    valid = batch["valid"] if "valid" in batch else jnp.ones(pred.shape[:1], jnp.float32)
    sums = masked_patch_loss(pred, batch["image"], out["mask"], valid, self.vit.patch_size,
                             self.norm_pix_loss)
    return sums["sq_err"] / jnp.maximum(sums["weight"], 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["sq_err"]) / w,
            "mean_predictor_loss": float(sums["mean_predictor"]) / w}

  def encode(self, params, images):
    """Unmasked encoder features: (pre_logits (B, D), out with "patch_tokens" (B, N, D))."""
    return self.model.apply({"params": params}, images, method=MAE.encode)

  # --- `tx-jax embed` hooks (see tx_jax.analysis.embed) ---------------------------

  def open_embed_source(self, spec: str):
    return self._inputs().open(spec)

  def embed_collate(self, records) -> dict:
    return self._inputs().collate(records)

  def _inputs(self):
    if self.inputs is None:
      raise ValueError("this MAEObjective was built without data inputs; build it with "
                       "MAEObjective.from_config(run_config)")
    return self.inputs

  def embed_batch(self, params, batch, layer: str = "pre_logits", pooling: str = "mean"):
    """(B, D) features of the unmasked encoder.

    "pre_logits" is the encoder's own pooled vector (CLS token or patch mean, as
    model.pooling says; `pooling` does not apply). Token layers ("embedded",
    "block_XX", "encoded", "patch_tokens") are pooled by `pooling`: "mean" over
    the patch tokens (CLS excluded) or "cls" (the CLS token of a CLS model).
    """
    _, out = self.encode(params, batch["image"])
    if layer not in out:
      raise ValueError(f"unknown layer {layer!r}; this model has {', '.join(out)}")
    x = out[layer].astype(jnp.float32)
    if layer == "pre_logits":
      return x
    has_cls = self.vit.pooling == "cls" and x.shape[1] == self.vit.num_patches + 1
    if pooling == "mean":
      return jnp.mean(x[:, 1:] if has_cls else x, axis=1)
    if pooling == "cls" and has_cls:
      return x[:, 0]
    raise ValueError(f"pooling {pooling!r} does not apply to layer {layer!r}; use mean"
                     + (" or cls" if has_cls else ""))

  def embed_setup(self, config, layer, pooling, seq_len):
    """(layer, pooling as applied, None): for "pre_logits" the model's own pooling
    ("model:cls" token or "model:mean" of the patches), whatever `pooling` asked."""
    layer = layer or "pre_logits"
    return layer, f"model:{self.vit.pooling}" if layer == "pre_logits" else pooling or "mean", None

  def patch_stats_inputs(self, params, images, rng):
    """Decoder states (B, N, Dd), mask (B, N) and each patch's pixel mean and std (B, N, 2)."""
    _, out = self.apply(params, images, rng)
    patches = patchify(images.astype(jnp.float32), self.vit.patch_size)
    stats = jnp.stack([jnp.mean(patches, -1), jnp.std(patches, -1)], axis=-1)
    return out["decoder_hidden"].astype(jnp.float32), out["mask"], stats

  @staticmethod
  def fit_patch_stats_readout(hidden, mask, stats, ridge: float = 1e-2) -> np.ndarray:
    """Ridge regression [hidden, 1] -> (mean, std) over the masked patches: (Dd + 1, 2).

    Norm-pix predictions say nothing about a patch's brightness and contrast.
    To draw them as pixels without using the hidden patch's own mean and std
    (which would paint the answer into the picture), both are read out
    linearly from the decoder's states, fit on images other than those shown.
    """
    rows = np.asarray(mask).reshape(-1) > 0
    x = np.asarray(hidden, np.float64).reshape(-1, np.shape(hidden)[-1])[rows]
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = np.asarray(stats, np.float64).reshape(-1, 2)[rows]
    reg = ridge * len(x) * np.eye(x.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    return np.linalg.solve(x.T @ x + reg, x.T @ y).astype(np.float32)

  def reconstruct(self, params, images, rng, stats_readout=None):
    """(reconstruction, mask) as images (B, H, W, C) in the input's normalised units.

    Visible patches are copied; masked ones are the model's prediction. With
    norm-pix targets the prediction is un-normalised by the mean and std that
    `stats_readout` (from fit_patch_stats_readout) reads from the decoder
    states. mask is 1 on masked pixels.
    """
    pred, out = self.apply(params, images, rng)
    p, c = self.vit.patch_size, self.vit.channels
    patches = patchify(images.astype(jnp.float32), p)
    if self.norm_pix_loss:
      if stats_readout is None:
        raise ValueError("norm-pix predictions need a stats_readout to become pixels")
      h = out["decoder_hidden"].astype(jnp.float32)
      stats = h @ stats_readout[:-1] + stats_readout[-1]                       # (B, N, 2)
      pred = pred * jnp.maximum(stats[..., 1:], 0.0) + stats[..., :1]
    mask = out["mask"][..., None]                                            # (B, N, 1)
    recon = unpatchify(patches * (1 - mask) + pred * mask, p, c)
    return recon, unpatchify(jnp.broadcast_to(mask, patches.shape), p, c)

  def flops_per_unit(self, params, seq_len: int = 0) -> float:
    """Training FLOPs per image (the loop's unit): 6·(matmul params × tokens) + attention.

    The encoder sees K (+1 CLS) tokens, the decoder N (+1); attention adds
    12·L·D·T² per layer stack (scores and weighted sum, forward + backward).
    """
    del seq_len
    cls = 1 if self.vit.pooling == "cls" else 0
    t_enc = num_kept(self.vit.num_patches, self.mask_ratio) + cls
    t_dec = self.vit.num_patches + cls
    n_enc = count_params(params["encoder"])
    n_dec = count_params(params["pixel_decoder"])
    enc, dec = self.cfg, self.decoder_cfg
    return (6 * (n_enc * t_enc + n_dec * t_dec)
            + 12 * (enc.num_layers * enc.d_model * t_enc ** 2
                    + dec.num_layers * dec.d_model * t_dec ** 2))
