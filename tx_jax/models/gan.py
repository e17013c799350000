"""Transformer GAN: a patch-token generator and a ViT discriminator.

The generator (TransGAN-style, Jiang et al. 2021, without its upsampling
stages) maps noise z (B, Z) by one linear map to N patch tokens (B, N, D),
adds learned positions, runs a `Stack` of Transformer blocks, maps every
token to its P·P·C pixels and reassembles the image (B, H, W, C) in
(-1, 1) (tanh) or (0, 1) (sigmoid). The discriminator is the `ViT` of
models/vit.py with a one-logit head: images (B, H, W, C) -> (B,) logits.
Their parameters are two separate trees (`init` each module on its own).
The losses, the R1 penalty and the weight average live in
`tx_jax.objectives.gan`.

Shape letters: B batch, Z noise width, N patches, D width, P patch side,
C channels.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tx_jax.models.layers import Projection, Stack, TransformerConfig, constrain, make_norm
from tx_jax.models.vit import PositionEmbedding, ViT, ViTConfig, unpatchify

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GANConfig:
  """Image geometry, noise and output range of a GAN; the blocks of each network
  come from its own TransformerConfig."""
  image_size: int = 32
  patch_size: int = 4
  channels: int = 3
  latent_dim: int = 128
  output: str = "tanh"             # tanh: pixels in (-1, 1) | sigmoid: (0, 1)
  disc_pooling: str = "mean"       # the discriminator's pooling: mean | cls

  def vit(self, posemb: str = "learned", num_classes: int = 0) -> ViTConfig:
    """The ViT geometry (image, patch, channels) both networks share."""
    return ViTConfig(image_size=self.image_size, patch_size=self.patch_size,
                     channels=self.channels, pooling=self.disc_pooling, posemb=posemb,
                     num_classes=num_classes)

  def validate(self) -> "GANConfig":
    """Raises ValueError naming the first inconsistent field."""
    if self.patch_size < 1 or self.image_size % self.patch_size:
      raise ValueError(f"model.image_size={self.image_size} must be a multiple of "
                       f"model.patch_size={self.patch_size}")
    if self.latent_dim < 1:
      raise ValueError(f"model.latent_dim must be positive, got {self.latent_dim}")
    if self.output not in ("tanh", "sigmoid"):
      raise ValueError(f"model.output={self.output!r} is not one of ('tanh', 'sigmoid')")
    self.vit().validate(4)
    return self


# Flat size table: GANConfig fields, TransformerConfig fields shared by both
# networks, and `generator_<field>` / `discriminator_<field>` overrides.
# `tiny` trains on the 8×8 digits on a CPU in minutes; `cifar` is a 32×32 model
# with 4×4 patches (N = 64 tokens).
GAN_SIZES: dict[str, dict] = {
    "tiny": dict(image_size=8, patch_size=2, channels=1, latent_dim=64, num_layers=3,
                 d_model=128, num_heads=4, mlp_dim=256),
    "cifar": dict(image_size=32, patch_size=4, channels=3, latent_dim=128, num_layers=6,
                  d_model=384, num_heads=6, mlp_dim=1536),
}


def gan_configs(flat: dict) -> tuple[TransformerConfig, TransformerConfig, GANConfig]:
  """(generator blocks, discriminator blocks, geometry) from one flat dict of fields.

  TransformerConfig fields set both networks; `generator_<field>` and
  `discriminator_<field>` set one. Both add their own positions, so the
  blocks use positions="none". Raises ValueError on unknown keys or
  inconsistent values.
  """
  t_names = {f.name for f in dataclasses.fields(TransformerConfig)}
  g_names = {f.name for f in dataclasses.fields(GANConfig)}
  shared, parts, geo = {}, {"generator": {}, "discriminator": {}}, {}
  for key, value in flat.items():
    prefix, _, field = key.partition("_")
    if prefix in parts and field in t_names:
      parts[prefix][field] = value
    elif key in t_names:
      shared[key] = value
    elif key in g_names:
      geo[key] = value
    else:
      raise ValueError(f"model.{key} is not a GAN field")
  gan = GANConfig(**geo).validate()
  n = (gan.image_size // gan.patch_size) ** 2
  built = []
  for part in ("generator", "discriminator"):
    fields = {"positions": "none", "max_len": n + 1, **shared, **parts[part]}
    if fields["positions"] != "none":
      raise ValueError("a GAN adds its own positions; leave model.positions='none'")
    built.append(TransformerConfig(**fields).validate())
  return built[0], built[1], gan


def make_gan_config(size: str, **overrides) -> dict:
  """The flat field dict of a size-table entry plus overrides (see gan_configs)."""
  if size not in GAN_SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(GAN_SIZES)}")
  flat = {**GAN_SIZES[size], **overrides}
  gan_configs(flat)  # checks it
  return flat


class Generator(nn.Module):
  """Noise (B, Z) -> images (B, H, W, C) in the output range of `gan.output`."""
  cfg: TransformerConfig
  gan: GANConfig

  @nn.compact
  def __call__(self, z: Array, deterministic: bool = True) -> Array:
    """Noise z (B, latent) -> images (B, H, W, C)."""
    cfg, gan = self.cfg, self.gan
    vit = gan.vit(posemb="learned")
    n = vit.num_patches
    # One kernel (Z, N, D): every token reads the whole noise vector.
    x = Projection(cfg, (n, cfg.d_model), ("latent", "positions", "embed"),
                   name="tokens")(z.astype(jnp.float32))                        # (B, N, D)
    x = PositionEmbedding(cfg, vit, name="posemb")(x)
    x = constrain(x, ("act_batch", "act_len", "act_embed"))
    h, _ = Stack(cfg, cfg.num_layers, deterministic=deterministic, name="blocks")(
        x, {"mask": None})
    h = make_norm(cfg, "final_norm")(h)
    pixels = Projection(cfg, (vit.patch_dim,), ("embed", "patch_pixels"),
                        name="pixels")(h).astype(jnp.float32)                 # (B, N, P·P·C)
    images = unpatchify(pixels, vit.patch_size, vit.channels)                 # (B, H, W, C)
    return jnp.tanh(images) if gan.output == "tanh" else jax.nn.sigmoid(images)


class Discriminator(nn.Module):
  """Images (B, H, W, C) -> real-vs-fake logits (B,): a ViT with one output."""
  cfg: TransformerConfig
  gan: GANConfig

  @nn.compact
  def __call__(self, images: Array, deterministic: bool = True) -> Array:
    """Images (B, H, W, C) -> real-vs-fake logits (B,)."""
    logits, _ = ViT(self.cfg, self.gan.vit(posemb="learned", num_classes=1), name="vit")(
        images, deterministic=deterministic)
    return logits[:, 0]


def latent_noise(rng: Array, batch: int, latent_dim: int) -> Array:
  """Standard normal noise (B, Z)."""
  return jax.random.normal(rng, (batch, latent_dim), jnp.float32)
