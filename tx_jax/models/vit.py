"""Vision Transformer patch encoder and the MAE masked autoencoder.

Images (B, H, W, C) are cut into N = (H/P)·(W/P) non-overlapping P×P patches
that pass through the same `Stack` of Transformer blocks as the text models.
`ViT` returns `(output, out)`: `out["pre_logits"]` is the pooled image
representation (B, D) (CLS token or the mean of the patch tokens) and
`out["patch_tokens"]` the per-patch features (B, N, D), so evaluators pick a
representation by name.

`MAE` (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners")
shuffles each example's patches with its own random noise, encodes only the
first round((1 - mask_ratio)·N), and lets a light decoder (its own `Stack`)
predict the pixels of every patch from the encoded ones plus a shared mask
token. The loss lives in `tx_jax.objectives.mae`.

Shape letters: B batch, N patches, K kept (visible) patches, T tokens
(K or N, + 1 with a CLS token), D width, P patch side, C channels.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax.models.layers import (DEFAULT_KERNEL_INIT, P, Projection, Stack, TransformerConfig,
                                  constrain, make_norm)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Image and patch geometry of a ViT; its blocks come from a TransformerConfig."""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  pooling: str = "cls"           # cls (CLS token) | mean (mean of the patch tokens)
  posemb: str = "sincos2d"       # sincos2d (fixed) | learned
  num_classes: int = 0           # 0: no head, the output is the pooled representation

  @property
  def grid(self) -> int:
    """Patches per side: image_size // patch_size."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Patches per image N = grid²."""
    return self.grid ** 2

  @property
  def patch_dim(self) -> int:
    """Pixels per patch P·P·C."""
    return self.patch_size ** 2 * self.channels

  def validate(self, d_model: int) -> "ViTConfig":
    """Raises ValueError naming the first inconsistent field."""
    if self.patch_size < 1 or self.image_size % self.patch_size:
      raise ValueError(f"model.image_size={self.image_size} must be a multiple of "
                       f"model.patch_size={self.patch_size}")
    if self.channels < 1:
      raise ValueError(f"model.channels must be positive, got {self.channels}")
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"model.pooling={self.pooling!r} is not one of ('cls', 'mean')")
    if self.posemb not in ("sincos2d", "learned"):
      raise ValueError(f"model.posemb={self.posemb!r} is not one of ('sincos2d', 'learned')")
    if self.posemb == "sincos2d" and d_model % 4:
      raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {d_model}")
    return self


# Flat size table: TransformerConfig fields of the encoder, ViTConfig fields,
# and `decoder_<field>` overrides that turn the encoder's TransformerConfig into
# the MAE decoder's. `tiny` trains on 8×8 digits on a CPU in minutes; `B/16` is
# ViT-B/16 with MAE's 8-layer, 512-wide decoder (He et al. 2022, table 1).
VIT_SIZES: dict[str, dict] = {
    "tiny": dict(image_size=8, patch_size=2, channels=1, num_layers=4, d_model=128,
                 num_heads=4, mlp_dim=256, decoder_num_layers=2, decoder_d_model=64,
                 decoder_num_heads=4, decoder_mlp_dim=256),
    "B/16": dict(image_size=224, patch_size=16, channels=3, num_layers=12, d_model=768,
                 num_heads=12, mlp_dim=3072, decoder_num_layers=8, decoder_d_model=512,
                 decoder_num_heads=16, decoder_mlp_dim=2048),
}


def vit_configs(flat: dict) -> tuple[TransformerConfig, ViTConfig, TransformerConfig]:
  """(encoder, ViT geometry, MAE decoder) configs from one flat dict of fields.

  Keys named like TransformerConfig fields set the encoder; ViTConfig fields
  the geometry; `decoder_<field>` the decoder (which otherwise copies the
  encoder). Positions are added by the ViT, so the blocks use positions="none".
  Raises ValueError on unknown keys or inconsistent values.
  """
  t_names = {f.name for f in dataclasses.fields(TransformerConfig)}
  v_names = {f.name for f in dataclasses.fields(ViTConfig)}
  enc, geo, dec = {}, {}, {}
  for key, value in flat.items():
    if key.startswith("decoder_") and key[len("decoder_"):] in t_names:
      dec[key[len("decoder_"):]] = value
    elif key in t_names:
      enc[key] = value
    elif key in v_names:
      geo[key] = value
    else:
      raise ValueError(f"model.{key} is not a ViT/MAE field")
  vit = ViTConfig(**geo)
  enc = {"positions": "none", "max_len": vit.num_patches + 1, **enc}
  if enc["positions"] != "none" or dec.get("positions", "none") != "none":
    raise ValueError("a ViT adds its own positions (model.posemb); leave model.positions='none'")
  encoder = TransformerConfig(**enc).validate()
  decoder = dataclasses.replace(encoder, **dec).validate()
  vit.validate(encoder.d_model)
  ViTConfig(**{**geo, "num_classes": 0}).validate(decoder.d_model)
  return encoder, vit, decoder


def make_vit_config(size: str, **overrides) -> dict:
  """The flat field dict of a size-table entry plus overrides (see vit_configs)."""
  if size not in VIT_SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(VIT_SIZES)}")
  flat = {**VIT_SIZES[size], **overrides}
  vit_configs(flat)  # checks it
  return flat


# ------------------------------------------------------------------ patches


def patchify(images: Array, patch: int) -> Array:
  """(B, H, W, C) -> (B, N, P·P·C); patches in row-major grid order, pixels (p, q, c)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                                         # (B, h, w, P, P, C)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Array, patch: int, channels: int) -> Array:
  """(B, N, P·P·C) -> (B, H, W, C) for a square grid; the inverse of patchify."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sin-cos positions (grid², width), MAE's layout.

  For the patch at (row i, column j): [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]
  with ω_k = 10000^(-k / (width/4)), k < width/4.
  """
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  col = cols.reshape(-1, 1) * omega                                          # (N, width/4)
  row = rows.reshape(-1, 1) * omega
  return np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], 1).astype(
      np.float32)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """How many patches stay visible: round((1 - ratio)·N), at least one."""
  return max(1, int(round((1.0 - mask_ratio) * num_patches)))


def random_masking(rng: Array | None, batch: int, num_patches: int, mask_ratio: float,
                   noise: Array | None = None):
  """Per-example random masking by shuffle of `noise` (B, N), drawn from `rng` if not given.

  Returns ids_keep (B, K) int32 (visible patches, in shuffled order), mask
  (B, N) float32 with 1 = masked, and ids_restore (B, N) int32 that puts the
  shuffled sequence back in grid order.
  """
  keep = num_kept(num_patches, mask_ratio)
  if noise is None:
    noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)                 # (B, N)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  shuffled_mask = (jnp.arange(num_patches) >= keep).astype(jnp.float32)      # (N,)
  mask = jnp.take(shuffled_mask, ids_restore)                                # (B, N)
  return ids_shuffle[:, :keep], mask, ids_restore


# ------------------------------------------------------------------ modules


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, N, D): a dense map of each flattened patch (= a P×P, stride-P conv)."""
  cfg: TransformerConfig
  vit: ViTConfig

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """(B, H, W, C) -> (B, N, D)."""
    cfg, p, c = self.cfg, self.vit.patch_size, self.vit.channels
    b, h, w, _ = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p, p, c)                           # (B, N, P, P, C)
    # LeCun-normal over the P·P·C inputs, like a conv kernel.
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=(0, 1, 2), out_axis=3)
    kernel = self.param("kernel", P(init, ("patch_height", "patch_width", "channels", "embed")),
                        (p, p, c, cfg.d_model), cfg.params_dtype)
    bias = self.param("bias", P(nn.initializers.zeros, ("embed",)), (cfg.d_model,),
                      cfg.params_dtype)
    dt = cfg.compute_dtype
    y = jnp.einsum("bnpqc,pqcd->bnd", x.astype(dt), kernel.astype(dt)) + bias.astype(dt)
    return constrain(y, ("act_batch", "act_len", "act_embed"))


class PositionEmbedding(nn.Module):
  """Adds (N, D) positions to (B, N, D) tokens: fixed 2-D sin-cos or learned."""
  cfg: TransformerConfig
  vit: ViTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, N, D) -> (B, N, D) with positions added."""
    n, d = self.vit.num_patches, self.cfg.d_model
    if self.vit.posemb == "learned":
      pos = self.param("pos_embedding", P(DEFAULT_KERNEL_INIT, ("positions", "embed")), (n, d),
                       self.cfg.params_dtype)
    else:
      pos = jnp.asarray(sincos_2d(self.vit.grid, d))
    return x + pos.astype(x.dtype)[None]


def _gather_tokens(x: Array, ids: Array) -> Array:
  """x (B, N, D), ids (B, K) -> (B, K, D)."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


class ViT(nn.Module):
  """Vision Transformer encoder: images (B, H, W, C) -> (output, out).

  With `ids_keep` (B, K) only those patches are encoded (MAE). `out` holds
  "embedded" (patch + position embeddings of the encoded patches), "block_XX",
  "encoded" (all final tokens, CLS first if any), "patch_tokens" (B, K or N, D)
  and "pre_logits" (B, D), the pooled representation. The output is the class
  logits when `vit.num_classes` > 0, else "pre_logits".
  """
  cfg: TransformerConfig
  vit: ViTConfig

  @nn.compact
  def __call__(self, images: Array, *, ids_keep: Array | None = None,
               deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """images (B, H, W, C) -> (class logits (B, classes) or pre_logits (B, D), out)."""
    cfg, vit = self.cfg, self.vit
    x = PatchEmbed(cfg, vit, name="patch_embed")(images)                      # (B, N, D)
    x = PositionEmbedding(cfg, vit, name="posemb")(x)
    if ids_keep is not None:
      x = _gather_tokens(x, ids_keep)                                        # (B, K, D)
    embedded = x
    if vit.pooling == "cls":
      cls = self.param("cls", P(DEFAULT_KERNEL_INIT, ("embed",)), (cfg.d_model,),
                       cfg.params_dtype)
      cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.d_model))
      x = jnp.concatenate([cls, x], axis=1)                                  # (B, 1 + K, D)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    h, out = Stack(cfg, cfg.num_layers, deterministic=deterministic, name="encoder")(
        x, {"mask": None})
    h = make_norm(cfg, "final_norm")(h)
    patch_tokens = h[:, 1:] if vit.pooling == "cls" else h
    pooled = h[:, 0] if vit.pooling == "cls" else jnp.mean(patch_tokens, axis=1)
    out.update(embedded=embedded, encoded=h, patch_tokens=patch_tokens, pre_logits=pooled)
    if vit.num_classes:
      logits = Projection(cfg, (vit.num_classes,), ("embed", "classes"),
                          name="head")(pooled)
      return logits.astype(jnp.float32), out
    return pooled, out


class MAEDecoder(nn.Module):
  """Encoded visible tokens + mask tokens -> (pixel predictions (B, N, P·P·C),
  final hidden states (B, N, Dd))."""
  cfg: TransformerConfig       # the decoder's blocks
  vit: ViTConfig

  @nn.compact
  def __call__(self, encoded: Array, ids_restore: Array, deterministic: bool = True):
    """encoded (B, [1 +] K, D) (CLS first with cls pooling), ids_restore (B, N)
    -> (pixels (B, N, P·P·C) float32, hidden (B, N, Dd))."""
    cfg, vit = self.cfg, self.vit
    has_cls = vit.pooling == "cls"
    # The kernel maps the encoder's width to the decoder's: two different axes.
    x = Projection(cfg, (cfg.d_model,), ("embed", "decoder_embed"),
                   name="embed")(encoded)                                    # (B, [1+]K, Dd)
    cls, visible = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
    b, k, d = visible.shape
    n = vit.num_patches
    mask_token = self.param("mask_token", P(DEFAULT_KERNEL_INIT, ("embed",)), (d,),
                            cfg.params_dtype)
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n - k, d))
    x = jnp.concatenate([visible, fill], axis=1)                             # (B, N, Dd) shuffled
    x = _gather_tokens(x, ids_restore)                                       # grid order
    x = PositionEmbedding(cfg, vit, name="posemb")(x)
    if has_cls:
      x = jnp.concatenate([cls, x], axis=1)
    x = constrain(x, ("act_batch", "act_len", "act_embed"))
    h, _ = Stack(cfg, cfg.num_layers, deterministic=deterministic, name="decoder")(
        x, {"mask": None})
    h = make_norm(cfg, "final_norm")(h)
    pred = Projection(cfg, (vit.patch_dim,), ("embed", "patch_pixels"),
                      name="pixels")(h)
    if has_cls:
      pred, h = pred[:, 1:], h[:, 1:]
    return pred.astype(jnp.float32), h


class MAE(nn.Module):
  """Masked autoencoder: images (B, H, W, C) -> (pixel predictions (B, N, P·P·C), out).

  The mask comes from the "mask" RNG stream (one noise draw per example), so
  it is fixed by the rng the caller passes, or from an explicit `noise` (B, N):
  the patches with the K smallest values stay visible. `out` holds the encoder's named
  intermediates plus "mask" (B, N) (1 = masked), "ids_keep" (B, K) and
  "decoder_hidden" (B, N, Dd), the decoder's final states per patch.
  `encode` runs the encoder on every patch (no masking) for features.
  """
  cfg: TransformerConfig       # encoder
  vit: ViTConfig
  decoder: TransformerConfig
  mask_ratio: float = 0.75

  def setup(self):
    """The ViT encoder and the MAE decoder."""
    self.encoder = ViT(self.cfg, dataclasses.replace(self.vit, num_classes=0))
    self.pixel_decoder = MAEDecoder(self.decoder, self.vit)

  def __call__(self, images: Array, *, deterministic: bool = True,
               mask_ratio: float | None = None, noise: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """images (B, H, W, C) -> (pixel predictions (B, N, P·P·C) float32, out).

    Needs a "mask" rng unless `noise` (B, N) is given (the patches with the
    lowest noise are kept, as in transformers' ViTMAE); mask_ratio overrides
    the module's for this call.
    """
    ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    rng = self.make_rng("mask") if noise is None else None
    ids_keep, mask, ids_restore = random_masking(rng, images.shape[0], self.vit.num_patches,
                                                 ratio, noise)
    _, out = self.encoder(images, ids_keep=ids_keep, deterministic=deterministic)
    pred, hidden = self.pixel_decoder(out["encoded"], ids_restore, deterministic)
    out.update(mask=mask, ids_keep=ids_keep, decoder_hidden=hidden)
    return pred, out

  def encode(self, images: Array, deterministic: bool = True):
    """Every patch through the encoder: (pre_logits (B, D), out)."""
    return self.encoder(images, deterministic=deterministic)
