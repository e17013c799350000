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

from xla_flags import xla_flags

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


def _numpy_translate(images, offsets, fill):
  """Reference: each image shifted by np.roll, the wrapped-around rows and columns set to
  fill."""
  out = np.empty_like(images)
  for i, (dy, dx) in enumerate(offsets):
    moved = np.roll(images[i], (dy, dx), axis=(0, 1))
    if dy > 0:
      moved[:dy] = fill
    elif dy < 0:
      moved[dy:] = fill
    if dx > 0:
      moved[:, :dx] = fill
    elif dx < 0:
      moved[:, dx:] = fill
    out[i] = moved
  return out


def test_translation_matches_numpy_and_its_gradient_is_the_reverse_move():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 5, 7, 2)).astype(np.float32)
  offsets = np.array([[0, 0], [1, -2], [-1, 3], [4, 0], [-5, -7], [2, 2]], np.int32)
  got = np.asarray(gan_lib.translate(jnp.asarray(images), jnp.asarray(offsets), -1.0))
  np.testing.assert_array_equal(got, _numpy_translate(images, offsets, -1.0))
  # A move is linear in the pixels: the gradient of <w, move(x)> is w moved back
  # (zeros where the pixel left the image).
  w = rng.normal(size=images.shape).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(gan_lib.translate(x, jnp.asarray(offsets), -1.0) * w))(
      jnp.asarray(images))
  np.testing.assert_allclose(grad, _numpy_translate(w, -offsets, 0.0), rtol=1e-6)
  # Random moves stay within the bound, and every offset in it is drawn.
  moved = gan_lib.random_translate(jax.random.key(0), jnp.asarray(
      np.ones((400, 5, 5, 1), np.float32)), 1, 0.0)
  blank = np.asarray(moved)[..., 0] == 0
  assert set(np.unique(blank[:, 0].all(1) * 1 - blank[:, -1].all(1) * 1)) == {-1, 0, 1}
  assert not blank[:, 1:-1, 1:-1].any()


def test_augmentation_changes_only_what_the_discriminator_sees():
  from tx_jax.objectives.gan import GANObjective
  config = small_config()
  with config.unlocked():
    config.objective_options.augment_shift = 0.125
  obj = GANObjective.from_config(config)
  assert obj.max_shift == 1
  params = nn.unbox(obj.init_params(jax.random.key(0)))
  real = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  fake = np.random.default_rng(1).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  valid = jnp.ones(8)
  # The augmented discriminator loss is the plain one on the images moved by the same draws.
  key = jax.random.key(3)
  real_key, fake_key = jax.random.split(key)
  bound = [-1, 2]
  moved = [_numpy_translate(x, np.asarray(jax.random.randint(k, (8, 2), *bound)), -1.0)
           for x, k in ((real, real_key), (fake, fake_key))]
  plain = GANObjective.from_config(small_config())
  got, _ = obj.discriminator_loss(params["discriminator"], real, fake, valid, key)
  want, _ = plain.discriminator_loss(params["discriminator"], *moved, valid)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  # Held-out evaluation is not augmented.
  batch = {"image": real, "valid": np.ones(8, np.float32)}
  np.testing.assert_allclose(float(obj.loss_fn(params, batch, jax.random.key(4), False)[0]),
                             float(plain.loss_fn(params, batch, jax.random.key(4), False)[0]),
                             rtol=1e-6)
  from tx_jax.errors import UserError
  with config.unlocked():
    config.objective_options.augment_shift = 0.5
  with pytest.raises(UserError, match="augment_shift=0.5"):
    GANObjective.from_config(config)


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


# ------------------------------------------------------------------ CLI, resume, bad input

TINY_FLAGS = ["--config.model.num_layers=1", "--config.model.d_model=16",
              "--config.model.num_heads=2", "--config.model.mlp_dim=32",
              "--config.model.latent_dim=8", "--config.train.batch_size=16",
              "--config.train.steps=4", "--config.train.log_every=2",
              "--config.train.eval_every=4", "--config.train.checkpoint_every=2",
              "--config.train.async_checkpoints=false", "--config.data.eval_examples=64",
              "--config.evaluation.classifier_steps=20", "--config.evaluation.num_samples=64",
              "--config.evaluation.grid_samples=4"]


def cli_env(devices=1, cache=None):
  """The environment of a CLI run on `devices` CPU devices; with `cache`, compiled
  programs persist in that folder."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_cli(args, timeout=900, devices=1, cache=None):
  """`python -m tx_jax ARGS` in cli_env(devices, cache)."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=cli_env(devices, cache))


def one_line_error(result, *needles):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_gan(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gan") / "run")
  result = run_cli(["train", "--config", "configs/gan.py", "--workdir", workdir, *TINY_FLAGS])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_train_logs_sample_quality_and_generate_writes_images(trained_gan, tmp_path):
  import json
  records = [json.loads(line) for line in open(os.path.join(trained_gan, "metrics.jsonl"))]
  evals = [r for r in records if "eval/fid" in r]
  assert len(evals) == 1 and evals[0]["step"] == 4
  ev = evals[0]
  for prefix in ("", "generator_", "real_", "gaussian_"):
    assert ev[f"eval/{prefix}fid"] >= 0
    assert 1.0 <= ev[f"eval/{prefix}inception_score"] <= 10.0
    assert 0.0 <= ev[f"eval/{prefix}class_coverage"] <= 1.0
  assert ev["eval/real_fid"] < ev["eval/gaussian_fid"]
  assert 0 <= ev["eval/discriminator_accuracy"] <= 1 and "eval/loss" in ev
  assert "train/loss" in records[0] and records[0]["images_per_s"] > 0
  assert os.path.isfile(os.path.join(trained_gan, "samples", "step_000004.png"))
  meta = json.load(open(os.path.join(trained_gan, "sample_quality", "classifier.npz.json")))
  assert meta["config"]["steps"] == 20 and 0 <= meta["heldout_accuracy"] <= 1

  from tx_jax.train.trained import load_trained
  trained = load_trained(trained_gan)
  out, grid = str(tmp_path / "s.npz"), str(tmp_path / "s.png")
  lines = trained.objective.generate(trained, {"num_samples": 5, "out": out, "grid": grid,
                                               "seed": 3})
  assert len(lines) == 2
  with np.load(out) as data:
    samples = data["images"]
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.float32
  assert samples.min() >= 0.0 and samples.max() <= 1.0 and samples.std() > 0
  assert os.path.getsize(grid) > 0
  # Same seed, same images; another seed, others.
  again = str(tmp_path / "t.npz")
  trained.objective.generate(trained, {"num_samples": 5, "out": again, "seed": 3})
  np.testing.assert_array_equal(np.load(again)["images"], samples)
  trained.objective.generate(trained, {"num_samples": 5, "out": again, "seed": 4})
  assert not np.array_equal(np.load(again)["images"], samples)
  from tx_jax.errors import UserError
  with pytest.raises(UserError, match="--out"):
    trained.objective.generate(trained, {"num_samples": 5})

  result = run_cli(["eval", "--workdir", trained_gan])
  assert result.returncode == 0, result.stderr[-2000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["step"] == 4 and line["eval/fid"] >= 0
  assert line["eval/real_fid"] == pytest.approx(ev["eval/real_fid"], rel=1e-6)


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  from tx_jax.train import checkpoint as ckpt_lib
  flags = [*TINY_FLAGS, "--config.train.steps=6", "--config.train.eval_every=6",
           "--config.train.log_every=1"]
  cache = tmp_path / "xla_cache"   # the three runs compile the same programs once
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert run_cli(["train", "--config", "configs/gan.py", "--workdir", straight, *flags],
                 cache=cache).returncode == 0
  proc = subprocess.Popen([sys.executable, "-m", "tx_jax", "train", "--config", "configs/gan.py",
                           "--workdir", killed, *flags],
                          cwd=ROOT, env=cli_env(cache=cache), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  sealed = os.path.join(killed, "checkpoints", "4", ckpt_lib.MANIFEST)
  deadline = time.time() + 900
  while not os.path.exists(sealed) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(sealed)
  result = run_cli(["train", "--config", "configs/gan.py", "--workdir", killed, *flags],
                   cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resuming from step 4" in result.stdout

  def final(workdir):
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
      step, _ = c.newest_good_step()
      state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
          state=ckpt_lib.ocp.args.StandardRestore()))["state"]
    return step, jax.tree_util.tree_flatten_with_path(state)[0]

  (step_a, a), (step_b, b) = final(straight), final(killed)
  assert step_a == step_b == 6 and len(a) == len(b)
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  keys = {str(p[1]) for p, _ in a if len(p) > 1}
  assert any("generator" in k for k in keys) and any("ema" in k for k in keys)


def test_image_size_not_divisible_by_patch_exits_2(tmp_path):
  workdir = str(tmp_path / "w")
  result = run_cli(["train", "--config", "configs/gan.py", "--workdir", workdir,
                    "--config.model.image_size=10", "--config.model.patch_size=4"])
  one_line_error(result, "model.image_size=10", "model.patch_size=4")
  assert not os.path.exists(workdir)


def test_generate_num_samples_on_a_non_gan_workdir_exits_2(tmp_path):
  import shutil
  copy = str(tmp_path / "gpt")
  shutil.copytree(os.path.join(ROOT, "tests", "golden", "gpt_tiny"), copy)
  one_line_error(run_cli(["generate", "--workdir", copy, "--num-samples", "4"]))
