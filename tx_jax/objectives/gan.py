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
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

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


def ema_decay_at(step, decay: float):
  """β at `step` (0-based updates done before this one): min(decay, (1+step)/(10+step))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, beta):
  """β·ema + (1 - β)·params, leaf by leaf."""
  return jax.tree_util.tree_map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


def by_key(parts: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
  """One optax transformation per top-level key of the params; keys absent from
  `parts` (the EMA) get zero updates and no state.

  The state is a plain dict {key: state of that key's transformation}, so a
  step can update one network and leave the other's state alone:
  `parts[k].update(grads[k], state[k], params[k])`.
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

  return optax.GradientTransformation(init, update)
