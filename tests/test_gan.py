"""Transformer GAN: models, losses, R1, EMA and sample-quality metrics against independent
references; the alternating step; CLI runs, resume and bad input."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tx_jax.evaluation import sample_quality as sq
from tx_jax.models.gan import Discriminator, Generator, gan_configs
from tx_jax.objectives import gan as gan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=8, patch_size=2, channels=1, latent_dim=8, num_layers=1, d_model=16,
             num_heads=2, mlp_dim=32)


def small_networks(**overrides):
  gcfg, dcfg, geo = gan_configs({**SMALL, **overrides})
  gen, disc = Generator(gcfg, geo), Discriminator(dcfg, geo)
  pg = nn.unbox(gen.init(jax.random.key(0), jnp.zeros((1, geo.latent_dim)))["params"])
  pd = nn.unbox(disc.init(jax.random.key(1), jnp.zeros((1, 8, 8, geo.channels)))["params"])
  return gen, disc, pg, pd, geo


# ------------------------------------------------------------------ models


def test_generator_makes_images_in_range_and_discriminator_one_logit():
  gen, disc, pg, pd, geo = small_networks()
  z = jax.random.normal(jax.random.key(2), (5, geo.latent_dim))
  x = gen.apply({"params": pg}, z)
  assert x.shape == (5, 8, 8, 1)
  assert float(jnp.max(jnp.abs(x))) < 1.0
  assert float(jnp.std(x)) > 0  # not a constant image
  assert disc.apply({"params": pd}, x).shape == (5,)
  gen_s, _, pg_s, _, _ = small_networks(output="sigmoid")
  y = gen_s.apply({"params": pg_s}, z)
  assert float(jnp.min(y)) > 0.0 and float(jnp.max(y)) < 1.0
  # Parameters carry logical names that match the kernel's real shape.
  boxed = gen.init(jax.random.key(0), jnp.zeros((1, geo.latent_dim)))["params"]
  tokens = boxed["tokens"]["kernel"]
  assert tokens.names == ("latent", "positions", "embed")
  assert tokens.value.shape == (geo.latent_dim, 16, 16)


def test_gan_config_rejects_inconsistent_fields():
  with pytest.raises(ValueError, match="multiple of model.patch_size"):
    gan_configs({**SMALL, "image_size": 10, "patch_size": 4})
  with pytest.raises(ValueError, match="not a GAN field"):
    gan_configs({**SMALL, "decoder_d_model": 8})
  g, d, _ = gan_configs({**SMALL, "discriminator_d_model": 32, "generator_num_layers": 2})
  assert (g.d_model, g.num_layers, d.d_model, d.num_layers) == (16, 2, 32, 1)


# ------------------------------------------------------------------ losses, R1, EMA


def test_losses_match_their_formulas():
  r, f = jnp.array([2.0, -1.0, 0.0]), jnp.array([-3.0, 0.5, 0.0])
  np.testing.assert_allclose(gan_lib.discriminator_losses(r, f),
                             np.log1p(np.exp(-np.asarray(r))) + np.log1p(np.exp(np.asarray(f))),
                             rtol=1e-6)
  np.testing.assert_allclose(gan_lib.generator_losses(f), np.log1p(np.exp(-np.asarray(f))),
                             rtol=1e-6)
  np.testing.assert_allclose(gan_lib.discriminator_losses(r, f, "hinge"),
                             [0.0 + 0.0, 2.0 + 1.5, 1.0 + 1.0])
  np.testing.assert_allclose(gan_lib.generator_losses(f, "hinge"), [3.0, -0.5, 0.0])


def test_r1_penalty_matches_finite_differences():
  _, disc, _, pd, _ = small_networks()
  images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  discriminate = lambda p, x: disc.apply({"params": p}, x)
  r1 = np.asarray(gan_lib.r1_penalty(discriminate, pd, images))
  f = jax.jit(lambda x: discriminate(pd, x))
  eps = 1e-2
  for b in range(3):  # central differences of example b's own logit, pixel by pixel
    grad = np.zeros(64)
    for i in range(64):
      step = np.zeros((1, 64), np.float32)
      step[0, i] = eps
      up = images[b:b + 1] + step.reshape(1, 8, 8, 1)
      down = images[b:b + 1] - step.reshape(1, 8, 8, 1)
      grad[i] = (float(f(up)[0]) - float(f(down)[0])) / (2 * eps)
    np.testing.assert_allclose(r1[b], np.sum(grad ** 2), rtol=2e-2)
  assert r1.min() > 0


def test_ema_update_follows_its_formula():
  ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
  params = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
  for step, decay in [(0, 0.999), (5, 0.999), (10_000, 0.999), (10_000, 0.5)]:
    beta = float(gan_lib.ema_decay_at(step, decay))
    assert beta == pytest.approx(min(decay, (1 + step) / (10 + step)), rel=1e-6)
    new = gan_lib.ema_update(ema, params, beta)
    np.testing.assert_allclose(new["a"], beta * np.array([1.0, 2.0]) + (1 - beta) *
                               np.array([3.0, -2.0]), rtol=1e-6)
    np.testing.assert_allclose(new["b"]["c"], beta * 3.0, rtol=1e-6)


def test_by_key_updates_each_network_with_its_own_optimizer():
  params = {"g": jnp.ones(3), "d": jnp.ones(2), "ema": jnp.ones(3)}
  tx = gan_lib.by_key({"g": optax.sgd(0.1), "d": optax.sgd(1.0)})
  state = tx.init(params)
  assert set(state) == {"g", "d"}
  grads = {"g": jnp.full(3, 2.0), "d": jnp.full(2, 2.0), "ema": jnp.full(3, 5.0)}
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["g"], -0.2)
  np.testing.assert_allclose(updates["d"], -2.0)
  np.testing.assert_allclose(updates["ema"], 0.0)


# ------------------------------------------------------------------ sample-quality math


def _fid_reference(mu1, s1, mu2, s2):
  """float64 FID through scipy-free eigendecomposition of the product (non-symmetric)."""
  eig = np.linalg.eigvals(np.asarray(s1, np.float64) @ np.asarray(s2, np.float64))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


def test_frechet_distance_matches_closed_forms():
  # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert sq.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
  # 2-D, non-commuting: for a 2x2 M with real positive spectrum, tr sqrt(M) =
  # sqrt(tr M + 2 sqrt(det M)).
  s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
  s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
  m = s1 @ s2
  tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
  closed = 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  got = sq.frechet_distance(np.zeros(2), s1, np.array([1.0, 0.0]), s2)
  assert got == pytest.approx(closed, rel=1e-10)
  # Identical Gaussians are at distance 0; a singular covariance stays finite.
  assert sq.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)
  singular = np.diag([1.0, 0.0, 0.0])
  assert sq.frechet_distance(mu1, singular, mu2, np.diag(b)) == pytest.approx(
      _fid_reference(mu1, singular, mu2, np.diag(b)), rel=1e-8)


def test_fid_of_samples_from_known_gaussians_converges_to_the_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s1 = q @ np.diag(np.linspace(0.5, 2.0, d)) @ q.T
  s2 = np.diag(np.linspace(1.0, 3.0, d))
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  x = rng.multivariate_normal(mu1, s1, 200_000).astype(np.float32)
  y = rng.multivariate_normal(mu2, s2, 200_000).astype(np.float32)
  assert sq.fid(x, y) == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=0.02)


def test_inception_score_and_coverage_at_their_extremes():
  k = 10
  confident_even = np.eye(k)[np.arange(1000) % k]  # sure, all classes equally
  assert sq.inception_score(confident_even) == pytest.approx(k, rel=1e-6)
  assert sq.class_coverage(confident_even) == 1.0
  one_class = np.eye(k)[np.zeros(1000, int)]
  assert sq.inception_score(one_class) == pytest.approx(1.0, rel=1e-6)
  assert sq.class_coverage(one_class) == pytest.approx(0.1)
  unsure = np.full((1000, k), 1.0 / k)
  assert sq.inception_score(unsure) == pytest.approx(1.0, rel=1e-6)
  # A class predicted for 5 of 1000 samples (< 0.2 * 1000 / 10) is not covered.
  rare = np.eye(k)[np.r_[np.zeros(5, int), 1 + np.arange(995) % 9]]
  assert sq.class_coverage(rare) == pytest.approx(0.9)


# ------------------------------------------------------------------ the alternating step


def small_config(**model):
  from tx_jax.train import config as config_lib
  base = config_lib.load_config_file(os.path.join(ROOT, "configs", "gan.py"))
  flags = [f"model.{k}={v}" for k, v in {**SMALL, **model}.items()]
  return config_lib.apply_overrides(base, flags + ["train.batch_size=8"])


@pytest.fixture(scope="module")
def objective_and_state():
  from tx_jax.objectives.gan import GANObjective
  from tx_jax.train import optim
  config = small_config()
  obj = GANObjective.from_config(config)
  tx = obj.optimizer(config.optim, lambda cfg: optim.make_optimizer(cfg, 100))
  params = nn.unbox(obj.init_params(jax.random.key(0)))
  real = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  return obj, tx, params, tx.init(params), real


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def test_discriminator_step_leaves_generator_unchanged(objective_and_state):
  obj, tx, params, opt_state, real = objective_and_state
  new, new_state, loss, sums, grads = jax.jit(
      lambda p, s: obj.discriminator_update(p, s, tx, real, jnp.ones(8), jax.random.key(1)))(
          params, opt_state)
  assert not _same(new["discriminator"], params["discriminator"])
  assert _same(new["generator"], params["generator"]) and _same(new["ema"], params["ema"])
  assert _same(new_state["generator"], opt_state["generator"])
  assert np.isfinite(float(loss)) and float(sums["weight"]) == 8
  assert set(grads) == set(params["discriminator"])


def test_generator_step_leaves_discriminator_unchanged(objective_and_state):
  obj, tx, params, opt_state, _ = objective_and_state
  new, new_state, loss, grads = jax.jit(
      lambda p, s: obj.generator_update(p, s, tx, 8, jax.random.key(2), 0))(params, opt_state)
  assert not _same(new["generator"], params["generator"])
  assert _same(new["discriminator"], params["discriminator"])
  assert _same(new_state["discriminator"], opt_state["discriminator"])
  # The EMA followed the new generator by its formula (step 0: beta = 1/10).
  beta = min(obj.ema_decay, 1 / 10)
  for e, g, e_new in zip(*(jax.tree_util.tree_leaves(t) for t in
                           (params["ema"], new["generator"], new["ema"]))):
    np.testing.assert_allclose(e_new, beta * np.asarray(e) + (1 - beta) * np.asarray(g),
                               rtol=1e-5, atol=1e-7)


def test_train_step_updates_both_networks_and_skips_non_finite(objective_and_state):
  from tx_jax.train import step as step_lib
  from tx_jax.train.state import TrainState
  obj, tx, params, opt_state, real = objective_and_state
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.random.key_data(jax.random.key(0)),
                     skipped=jnp.zeros((), jnp.int32), skip_run=jnp.zeros((), jnp.int32))
  train_step = jax.jit(step_lib.make_train_step(obj, tx))
  batch = {"image": real, "valid": np.ones(8, np.float32)}
  new, metrics = train_step(state, batch)
  assert int(new.step) == 1 and int(new.skipped) == 0
  for key in ("generator", "discriminator", "ema"):
    assert not _same(new.params[key], params[key])
  assert float(metrics["grad_norm"]) > 0 and np.isfinite(float(metrics["train/loss"]))
  bad, metrics = train_step(new, {**batch, "image": np.full_like(real, np.nan)})
  assert int(bad.skipped) == 1 and int(bad.step) == 2 and not bool(metrics["finite"])
  assert _same(bad.params, new.params) and _same(bad.opt_state, new.opt_state)
  with pytest.raises(ValueError, match="cannot accumulate"):
    step_lib.make_train_step(obj, tx, accumulate_steps=2)


def test_gan_refuses_gradient_accumulation(objective_and_state):
  from tx_jax.errors import UserError
  from tx_jax.train import optim
  obj = objective_and_state[0]
  cfg = small_config().optim
  with cfg.unlocked():
    cfg.accumulate_steps = 2
  with pytest.raises(UserError, match="accumulate_steps=2"):
    obj.optimizer(cfg, lambda c: optim.make_optimizer(c, 10))
