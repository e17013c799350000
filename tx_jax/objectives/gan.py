"""Transformer GAN: adversarial training of a patch-token generator against a ViT.

Params are {"generator", "discriminator", "ema"}: "ema" is an exponential
moving average of the generator's weights (Karras et al. 2018), the network
that is evaluated and sampled. One train step updates the discriminator and
then, against the updated discriminator, the generator:

  D: mean_x l_D(D(x), D(G(z))) + (γ/2) · mean_x ||∇_x D(x)||²   (R1, Mescheder et al. 2018)
  G: mean_z l_G(D(G(z)))
  ema <- β·ema + (1 - β)·G,   β = min(ema_decay, (1 + step) / (10 + step))

with the non-saturating logistic losses l_D(r, f) = softplus(-r) +
softplus(f), l_G(f) = softplus(-f) (Goodfellow et al. 2014), or the hinge
losses l_D = relu(1 - r) + relu(1 + f), l_G = -f. Batches: "image" float32
(B, H, W, C) normalised to the generator's output range, "valid" (B,).

With `augment_shift` > 0 every image the discriminator sees in training, real
or generated, in both updates (and R1's reals), is first moved by a random
whole number of pixels in each direction, up to round(augment_shift · size),
the vacated pixels black: the translation of differentiable augmentation
(Zhao et al. 2020). On a small training set the discriminator otherwise
learns the images by heart and the generator gets worse the longer it trains;
since the same moves apply to real and generated images, the generator is
still pushed toward the unmoved images. Evaluation sees no augmentation.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.data import images
from tx_jax.errors import UserError
from tx_jax.evaluation import sample_quality
from tx_jax.models import TransformerConfig, count_params
from tx_jax.models.gan import Discriminator, GANConfig, Generator, gan_configs, latent_noise
from tx_jax.objectives.base import Data, Objective, register

LOSSES = ("nonsaturating", "hinge")


def discriminator_losses(real_logits, fake_logits, loss: str = "nonsaturating"):
  """Per-example discriminator loss (B,) from logits of real and generated images (B,)."""
  if loss == "hinge":
    return jax.nn.relu(1.0 - real_logits) + jax.nn.relu(1.0 + fake_logits)
  return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def generator_losses(fake_logits, loss: str = "nonsaturating"):
  """Per-example generator loss (B,) from the logits of its images (B,)."""
  if loss == "hinge":
    return -fake_logits
  return jax.nn.softplus(-fake_logits)


def r1_penalty(discriminate: Callable, disc_params, images):
  """||∇_x D(x)||² per example (B,): the gradient of each logit by its own image.

  The rows of a batch do not interact in the discriminator, so the gradient
  of the summed logits gives every example's own input gradient at once.
  """
  grads = jax.grad(lambda x: jnp.sum(discriminate(disc_params, x)))(images)  # (B, H, W, C)
  return jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=tuple(range(1, grads.ndim)))


def translate(images, offsets, fill: float):
  """images (B, H, W, C), each moved by its offsets (B, 2) int (down, right) in pixels;
  the pixels moved in from outside the image are `fill`. Differentiable in images."""
  _, h, w, _ = images.shape
  rows = jnp.arange(h)[None, :] - offsets[:, :1]                      # source row (B, H)
  cols = jnp.arange(w)[None, :] - offsets[:, 1:]                      # source col (B, W)
  moved = jnp.take_along_axis(images, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1)
  moved = jnp.take_along_axis(moved, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2)
  inside = (((rows >= 0) & (rows < h))[:, :, None, None]
            & ((cols >= 0) & (cols < w))[:, None, :, None])
  return jnp.where(inside, moved, jnp.asarray(fill, images.dtype))


def random_translate(rng, images, max_shift: int, fill: float):
  """`translate` by offsets drawn uniformly from [-max_shift, max_shift] per image and axis."""
  offsets = jax.random.randint(rng, (images.shape[0], 2), -max_shift, max_shift + 1)
  return translate(images, offsets, fill)


def ema_decay_at(step, decay: float):
  """β at `step` (0-based updates done before this one): min(decay, (1+step)/(10+step))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, beta):
  """β·ema + (1 - β)·params, leaf by leaf."""
  return jax.tree_util.tree_map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


class KeyedTransformation(NamedTuple):
  """An optax transformation per top-level params key (see `by_key`), with the parts."""
  init: Callable
  update: Callable
  parts: dict


def by_key(parts: dict[str, optax.GradientTransformation]) -> KeyedTransformation:
  """One optax transformation per top-level key of the params; keys absent from
  `parts` (the EMA) get zero updates and no state.

  The state is a plain dict {key: state of that key's transformation}, so a
  step can update one network and leave the other's state alone:
  `tx.parts[k].update(grads[k], state[k], params[k])`.
  """
  def init(params):
    return {k: tx.init(params[k]) for k, tx in parts.items()}

  def update(updates, state, params=None):
    out, new_state = {}, {}
    for k, g in updates.items():
      if k in parts:
        out[k], new_state[k] = parts[k].update(g, state[k], None if params is None else params[k])
      else:
        out[k] = jax.tree_util.tree_map(jnp.zeros_like, g)
    return out, new_state

  return KeyedTransformation(init, update, dict(parts))


OPTIONS = {"loss": "nonsaturating", "r1_gamma": 0.1, "ema_decay": 0.999,
           "discriminator_lr_ratio": 1.0, "augment_shift": 0.0}


@register("gan")
class GANObjective(Objective):
  """A Transformer GAN on images; the unit of work is one real image.

  Config: `model` holds the flat GAN fields (models.gan.gan_configs),
  `objective_options` the losses (loss, r1_gamma, ema_decay,
  discriminator_lr_ratio, augment_shift), `data` the image spec (pixels are mapped to the
  generator's output range, so there is no mean/std to set), `evaluation`
  the sample-quality settings (tx_jax.evaluation.sample_quality).
  """
  unit = "images"
  uses_tokenizer = False

  def __init__(self, generator_cfg: TransformerConfig, discriminator_cfg: TransformerConfig,
               gan: GANConfig, *, loss: str = "nonsaturating", r1_gamma: float = 0.1,
               ema_decay: float = 0.999, discriminator_lr_ratio: float = 1.0,
               augment_shift: float = 0.0):
    if loss not in LOSSES:
      raise ValueError(f"objective_options.loss={loss!r} is not one of {LOSSES}")
    if r1_gamma < 0 or not 0 <= ema_decay < 1 or discriminator_lr_ratio <= 0:
      raise ValueError("need objective_options.r1_gamma >= 0, 0 <= ema_decay < 1 and "
                       "discriminator_lr_ratio > 0")
    if not 0 <= augment_shift < 0.5:
      raise ValueError(f"objective_options.augment_shift={augment_shift} must be in [0, 0.5) "
                       "(a fraction of the image size)")
    self.generator_cfg, self.discriminator_cfg, self.gan = generator_cfg, discriminator_cfg, gan
    self.loss, self.r1_gamma = loss, float(r1_gamma)
    self.ema_decay, self.discriminator_lr_ratio = float(ema_decay), float(discriminator_lr_ratio)
    self.generator = Generator(generator_cfg, gan)
    self.discriminator = Discriminator(discriminator_cfg, gan)
    # Pixels x in [0, 1] are fed as (x - mean) / std = the generator's output range.
    mean, std = (0.5, 0.5) if gan.output == "tanh" else (0.0, 1.0)
    self.pixel_mean, self.pixel_std = mean, std
    # Whole pixels of the translation; the fill is a black pixel in the generator's range.
    self.max_shift = int(round(float(augment_shift) * gan.image_size))
    self.prep = None

  # --- building ----------------------------------------------------------------------

  @classmethod
  def from_config(cls, config, tokenizer=None) -> "GANObjective":
    del tokenizer  # images have no tokens
    options = dict(config.get("objective_options") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise UserError(f"objective_options {unknown} are not options of 'gan'; it takes "
                      f"{sorted(OPTIONS)}")
    try:
      objective = cls(*gan_configs(dict(config.model)), **options)
    except ValueError as e:
      raise UserError(str(e)) from None
    d, g = config.data, objective.gan
    c = g.channels
    objective.prep = images.Preprocess(
        image_size=g.image_size, channels=c, mean=(objective.pixel_mean,) * c,
        std=(objective.pixel_std,) * c, resize=d.resize, crop_scale=tuple(d.crop_scale),
        flip=d.flip, eval_crop_fraction=d.eval_crop_fraction)
    return objective

  @classmethod
  def open_data(cls, config) -> Data:
    d = config.data
    train, evaluation = images.image_train_eval_sources(d.source, d.eval_source or None,
                                                        d.eval_fraction, config.train.seed)
    return Data(train, evaluation)

  def optimizer(self, optim_cfg, make_default):
    """The default optimizer per network (the discriminator's lr scaled by
    discriminator_lr_ratio); none for the EMA, which the step sets itself."""
    if optim_cfg.accumulate_steps != 1:
      raise UserError(f"optim.accumulate_steps={optim_cfg.accumulate_steps}: a GAN step "
                      "alternates two updates on one batch and cannot accumulate; set "
                      "optim.accumulate_steps=1 and a smaller train.batch_size")
    disc_cfg = optim_cfg.copy_and_resolve_references()
    with disc_cfg.unlocked():
      disc_cfg.lr = optim_cfg.lr * self.discriminator_lr_ratio
    return by_key({"generator": make_default(optim_cfg),
                   "discriminator": make_default(disc_cfg)})

  # --- batches -----------------------------------------------------------------------

  def init_len(self, config) -> int:
    return (self.gan.image_size // self.gan.patch_size) ** 2

  def units_per_batch(self, config) -> int:
    return config.train.batch_size

  def _checked(self, data: Data):
    images.check_first_images(self.prep, data.train, data.eval)

  def train_iterator(self, config, data: Data):
    return images.run_train_iterator(config, data.train, self.prep)

  def eval_batches(self, config, data: Data):
    self._checked(data)
    return images.run_eval_batches(config, data.eval, self.prep)

  # --- the networks ------------------------------------------------------------------

  def _dummy_images(self, batch: int = 1):
    g = self.gan
    return jnp.zeros((batch, g.image_size, g.image_size, g.channels), jnp.float32)

  def init_params(self, rng, seq_len: int = 0):
    """{"generator", "discriminator", "ema"} (boxed); the EMA starts as the generator."""
    del seq_len
    g_rng, d_rng = jax.random.split(rng)
    gen = self.generator.init(g_rng, jnp.zeros((1, self.gan.latent_dim)))["params"]
    disc = self.discriminator.init(d_rng, self._dummy_images())["params"]
    return {"generator": gen, "discriminator": disc, "ema": gen}

  def generate_images(self, gen_params, z, train: bool = False):
    """Generator output (B, H, W, C) in its range from noise z (B, Z)."""
    return self.generator.apply({"params": gen_params}, z, deterministic=not train)

  def discriminate(self, disc_params, images_, train: bool = False):
    """The discriminator's logits (B,) of images (B, H, W, C)."""
    return self.discriminator.apply({"params": disc_params}, images_, deterministic=not train)

  def to_unit(self, x):
    """Generator output -> pixels in [0, 1]."""
    return jnp.clip(x * self.pixel_std + self.pixel_mean, 0.0, 1.0)

  def sample(self, gen_params, z):
    """Pixels in [0, 1] (B, H, W, C) of the generator `gen_params` from noise z (B, Z)."""
    return self.to_unit(self.generate_images(gen_params, z))

  def _noise(self, rng, batch: int):
    return latent_noise(rng, batch, self.gan.latent_dim)

  def augment(self, rng, images_):
    """Training images as the discriminator sees them: randomly translated with
    augment_shift, else unchanged."""
    if not self.max_shift:
      return images_
    return random_translate(rng, images_, self.max_shift, -self.pixel_mean / self.pixel_std)

  # --- the two updates ---------------------------------------------------------------

  def discriminator_loss(self, disc_params, real, fake, valid, rng=None):
    """(mean adversarial loss + (γ/2)·mean R1, sums) over the valid rows; real and
    fake are augmented first (rng) when augment_shift is on."""
    if self.max_shift:
      real_rng, fake_rng = jax.random.split(rng)
      real, fake = self.augment(real_rng, real), self.augment(fake_rng, fake)
    disc = lambda p, x: self.discriminate(p, x, train=True)
    real_logits, fake_logits = disc(disc_params, real), disc(disc_params, fake)
    adv = discriminator_losses(real_logits, fake_logits, self.loss)
    r1 = r1_penalty(disc, disc_params, real) if self.r1_gamma else jnp.zeros_like(adv)
    w = jnp.maximum(jnp.sum(valid), 1.0)
    loss = jnp.sum(adv * valid) / w + 0.5 * self.r1_gamma * jnp.sum(r1 * valid) / w
    return loss, {"d_loss": jnp.sum(adv * valid), "r1": jnp.sum(r1 * valid),
                  "real_logit": jnp.sum(real_logits * valid),
                  "fake_logit": jnp.sum(fake_logits * valid), "weight": jnp.sum(valid)}

  def generator_loss(self, gen_params, disc_params, z, rng=None):
    """The generator's loss against the discriminator on samples of noise z
    (augmented first, rng, when augment_shift is on)."""
    fake = self.augment(rng, self.generate_images(gen_params, z, train=True))
    return jnp.mean(generator_losses(self.discriminate(disc_params, fake, train=True),
                                     self.loss))

  def discriminator_update(self, params, opt_state, tx, real, valid, rng):
    """The discriminator's step against samples of the current generator (held fixed):
    -> (params, opt_state, loss, sums, grads); only "discriminator" changes."""
    fake = jax.lax.stop_gradient(self.generate_images(params["generator"],
                                                      self._noise(rng, real.shape[0]), True))
    (loss, sums), grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(
        params["discriminator"], real, fake, valid, jax.random.fold_in(rng, 1))
    part = tx.parts["discriminator"]
    updates, state = part.update(grads, opt_state["discriminator"], params["discriminator"])
    return ({**params, "discriminator": optax.apply_updates(params["discriminator"], updates)},
            {**opt_state, "discriminator": state}, loss, sums, grads)

  def generator_update(self, params, opt_state, tx, batch_size: int, rng, step):
    """The generator's step against the (already updated) discriminator, then the
    EMA: -> (params, opt_state, loss, grads); "discriminator" is unchanged."""
    z = self._noise(rng, batch_size)
    loss, grads = jax.value_and_grad(self.generator_loss)(
        params["generator"], params["discriminator"], z, jax.random.fold_in(rng, 1))
    part = tx.parts["generator"]
    updates, state = part.update(grads, opt_state["generator"], params["generator"])
    gen = optax.apply_updates(params["generator"], updates)
    ema = ema_update(params["ema"], gen, ema_decay_at(step, self.ema_decay))
    return ({**params, "generator": gen, "ema": ema}, {**opt_state, "generator": state},
            loss, grads)

  def train_update(self, params, opt_state, tx, batch, rng, step):
    """One GAN step (see tx_jax.train.step): the discriminator, then the generator.

    -> (params, opt_state, loss, sums, grads): loss is the discriminator's
    adversarial loss + R1 term; sums add "g_loss"; grads are both networks'.
    """
    d_rng, g_rng = jax.random.split(rng)
    real = batch["image"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(real.shape[:1], jnp.float32)
    params, opt_state, d_loss, sums, d_grads = self.discriminator_update(
        params, opt_state, tx, real, valid, d_rng)
    params, opt_state, g_loss, g_grads = self.generator_update(
        params, opt_state, tx, real.shape[0], g_rng, step)
    sums = {**sums, "g_loss": g_loss * sums["weight"]}
    return params, opt_state, d_loss, sums, {"generator": g_grads, "discriminator": d_grads}

  def loss_fn(self, params, batch, rng, train: bool):
    """Held-out: the discriminator's loss on real images against the EMA generator's
    samples, and the generator loss of those samples; (mean d_loss, sums)."""
    real = batch["image"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(real.shape[:1], jnp.float32)
    fake = self.generate_images(params["ema"], self._noise(rng, real.shape[0]))
    real_logits = self.discriminate(params["discriminator"], real)
    fake_logits = self.discriminate(params["discriminator"], fake)
    adv = discriminator_losses(real_logits, fake_logits, self.loss)
    sums = {"d_loss": jnp.sum(adv * valid),
            "g_loss": jnp.sum(generator_losses(fake_logits, self.loss) * valid),
            "real_correct": jnp.sum((real_logits > 0) * valid),
            "fake_correct": jnp.sum((fake_logits < 0) * valid), "weight": jnp.sum(valid)}
    return sums["d_loss"] / jnp.maximum(sums["weight"], 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    out = {"loss": float(sums["d_loss"]) / w, "generator_loss": float(sums["g_loss"]) / w}
    if "real_correct" in sums:
      out["discriminator_accuracy"] = (float(sums["real_correct"]) +
                                       float(sums["fake_correct"])) / (2 * w)
    return out

  # --- benchmark ---------------------------------------------------------------------

  def synthetic_batch(self, batch_size: int, seq_len: int = 0, vocab: int = 0,
                      seed: int = 0) -> dict:
    del seq_len, vocab
    g = self.gan
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (batch_size, g.image_size, g.image_size, g.channels)
                                 ).astype(np.float32),
            "valid": np.ones(batch_size, np.float32)}

  def flops_per_unit(self, params, seq_len: int = 0) -> float:
    """Training FLOPs per real image, counting matmuls (2 per multiply-add) and attention.

    Per image the step runs: D forward on the real and a fake image and
    backward (3 passes each), R1's input gradient and its gradient (about 3
    more passes over the real image), G forward + backward for the
    discriminator's fake (forward only) and the generator's own (3 passes,
    through D too: 3 D passes). Passes: G 4, D 2·3 + 3 + 3 = 12.
    """
    del seq_len
    n = self.init_len(None)
    per_pass = lambda p, cfg: 2 * count_params(p) * n + 4 * cfg.num_layers * cfg.d_model * n ** 2
    g = per_pass(params["generator"], self.generator_cfg)
    d = per_pass(params["discriminator"], self.discriminator_cfg)
    return 4 * g + (12 if self.r1_gamma else 9) * d

  def benchmark_shape(self, config) -> dict:
    return {"image_size": self.gan.image_size}

  # --- evaluation and generation -----------------------------------------------------

  def evaluation(self, config, data: Data):
    ev = config.evaluation
    classifier = sample_quality.ClassifierConfig(
        num_classes=max(len(data.train.label_names or ()), 1), steps=int(ev.classifier_steps),
        seed=int(ev.classifier_seed))
    return sample_quality.GeneratorEvaluation(
        config, self.sample, self.gan.latent_dim, self.prep, data.train, data.eval,
        {"": "ema", "generator_": "generator"}, classifier)

  def generate(self, trained, request: dict) -> list[str]:
    """`tx-jax generate --num-samples N [--out FILE.npz] [--grid FILE.png] [--seed S]`:
    N samples of the EMA generator, `images` [N, H, W, C] float32 in [0, 1]."""
    n, seed = int(request.get("num_samples") or 0), int(request.get("seed") or 0)
    out, grid = request.get("out"), request.get("grid")
    if n <= 0:
      raise UserError("--num-samples must be positive")
    if not out and not grid:
      raise UserError("a GAN writes images: give --out samples.npz and/or --grid samples.png")
    for path, ext in ((out, ".npz"), (grid, ".png")):
      if path and not path.endswith(ext):
        raise UserError(f"{path!r}: expected a {ext} file name")
      if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"the folder of {path!r} does not exist; create it first")
    sample = jax.jit(self.sample)
    chunks, batch = [], 256
    for i in range(0, n, batch):
      z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),
                                       (min(batch, n - i), self.gan.latent_dim)), np.float32)
      chunks.append(np.asarray(sample(trained.params["ema"], z), np.float32))
    samples = np.concatenate(chunks)
    lines = []
    if out:
      tmp = out[:-len(".npz")] + ".tmp.npz"
      np.savez(tmp, images=samples)
      os.replace(tmp, out)
      lines.append(f"wrote {n} images {list(samples.shape[1:])} to {out}")
    if grid:
      from tx_jax.evaluation.image_grid import save_image_grid  # pylint: disable=g-import-not-at-top
      cols = min(n, 16)
      rows = {f"{r * cols}-{(r + 1) * cols - 1}": samples[r * cols:(r + 1) * cols]
              for r in range(min(8, n // cols))}  # full rows only
      save_image_grid(grid, rows, title=f"{trained.workdir} step {trained.step}: EMA generator")
      lines.append(f"wrote a grid of {sum(len(v) for v in rows.values())} samples to {grid}")
    return lines
