"""Text VAE: the KL, the reparameterised gradient, free bits, the collapse diagnostics
(active units, mutual information) against independent numpy references; a tiny
VAE that memorises two sentences; resume after SIGKILL and mesh equality; the
CLI (generate, embed, eval) and its user errors."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax.models import TransformerConfig, TransformerVAE, VAEConfig
from tx_jax.objectives import vae as vae_lib

from xla_flags import xla_flags

TINY = TransformerConfig(vocab_size=64, num_layers=1, num_encoder_layers=1, d_model=32,
                         num_heads=4, mlp_dim=64, max_len=16, positions="rope")


# --- the math -------------------------------------------------------------------------

def test_gaussian_kl_matches_quadrature_and_float64_closed_form():
  rng = np.random.default_rng(0)
  mu_q, mu_p = rng.normal(size=(2, 6))
  ls_q, ls_p = rng.uniform(-1.0, 0.7, size=(2, 6))
  got = np.asarray(vae_lib.gaussian_kl(jnp.float32(mu_q), jnp.float32(ls_q),
                                       jnp.float32(mu_p), jnp.float32(ls_p)))
  # Reference 1: numerical integration of q log(q / p) in float64.
  x = np.linspace(-15, 15, 200_001)
  for d in range(6):
    sq, sp = math.exp(ls_q[d]), math.exp(ls_p[d])
    log_q = -0.5 * ((x - mu_q[d]) / sq) ** 2 - math.log(sq * math.sqrt(2 * math.pi))
    log_p = -0.5 * ((x - mu_p[d]) / sp) ** 2 - math.log(sp * math.sqrt(2 * math.pi))
    ref = np.trapezoid(np.exp(log_q) * (log_q - log_p), x)
    assert got[d] == pytest.approx(ref, rel=1e-5, abs=1e-6)
  # Reference 2: the textbook closed form, float64; and the N(0, 1) default.
  sq2, sp2 = np.exp(2 * ls_q), np.exp(2 * ls_p)
  closed = ls_p - ls_q + (sq2 + (mu_q - mu_p) ** 2) / (2 * sp2) - 0.5
  np.testing.assert_allclose(got, closed, rtol=1e-5, atol=1e-6)
  std = np.asarray(vae_lib.gaussian_kl(jnp.float32(mu_q), jnp.float32(ls_q)))
  np.testing.assert_allclose(std, -ls_q + (sq2 + mu_q ** 2) / 2 - 0.5, rtol=1e-5, atol=1e-6)


def test_reparameterised_gradient_matches_score_function_monte_carlo():
  """d/d(posterior biases) E_q[sum sin z] through the model's own z = mu + sigma eps,
  against the score-function estimate and the closed form E sin z = sin mu e^{-s^2/2}."""
  model = TransformerVAE(TINY, VAEConfig(latent_dim=4))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
  params = model.init(jax.random.key(0), tokens, None)["params"]
  # Spread the posterior so the gradients are not all near the same value.
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["posterior_mu"]["bias"] = jnp.asarray([0.5, -1.0, 1.5, 0.0])
  params["posterior_log_sigma"]["bias"] = jnp.asarray([-0.5, 0.0, 0.3, -1.0])
  k = 4096
  eps = jax.random.normal(jax.random.key(2), (k, 2, 4))

  def objective(p):
    def one(e):
      _, out = model.apply({"params": p}, tokens, None, eps=e)
      return jnp.sum(jnp.sin(out["z"]))
    return jnp.mean(jax.vmap(one)(eps))
  grads = jax.grad(objective)(params)
  g_mu = np.asarray(grads["posterior_mu"]["bias"], np.float64)
  g_ls = np.asarray(grads["posterior_log_sigma"]["bias"], np.float64)

  _, out = model.apply({"params": params}, tokens, None)
  mu, ls = np.asarray(out["mu"], np.float64), np.asarray(out["log_sigma"], np.float64)
  s2 = np.exp(2 * ls)
  exact_mu = np.sum(np.cos(mu) * np.exp(-s2 / 2), 0)              # d/d bias = sum over rows
  exact_ls = np.sum(-s2 * np.sin(mu) * np.exp(-s2 / 2), 0)
  # Score function (REINFORCE): E[f(z) d log q(z)], f centred by its mean (a baseline).
  m = 400_000
  e = np.random.default_rng(3).normal(size=(m, 2, 4))
  z = mu + np.exp(ls) * e
  f = np.sin(z) - np.mean(np.sin(z), 0)
  score_mu = np.sum(np.mean(f * e / np.exp(ls), 0), 0)
  score_ls = np.sum(np.mean(f * (e ** 2 - 1), 0), 0)
  np.testing.assert_allclose(score_mu, exact_mu, atol=0.02)       # the references agree
  np.testing.assert_allclose(score_ls, exact_ls, atol=0.02)
  np.testing.assert_allclose(g_mu, score_mu, atol=0.06)
  np.testing.assert_allclose(g_ls, score_ls, atol=0.06)
  np.testing.assert_allclose(g_mu, exact_mu, atol=0.05)
  np.testing.assert_allclose(g_ls, exact_ls, atol=0.05)


def test_free_bits_clamp_each_dim_on_its_batch_mean():
  kl = jnp.asarray([[0.05, 0.9, 0.2], [0.15, 0.7, 0.1], [9.0, 9.0, 9.0]], jnp.float32)
  valid = jnp.asarray([1.0, 1.0, 0.0])                 # the third row only pads the batch
  lam = 0.25
  got = vae_lib.free_bits_kl(kl, valid, lam)
  means = [(0.05 + 0.15) / 2, (0.9 + 0.7) / 2, (0.2 + 0.1) / 2]
  assert float(got) == pytest.approx(2 * sum(max(m, lam) for m in means), rel=1e-6)
  # Dims under the floor get no gradient; the one above gets valid rows' weight 1.
  grad = np.asarray(jax.grad(lambda k: vae_lib.free_bits_kl(k, valid, lam))(kl))
  np.testing.assert_array_equal(grad, [[0, 1, 0], [0, 1, 0], [0, 0, 0]])
  assert float(vae_lib.free_bits_kl(kl, valid, 0.0)) == pytest.approx(0.05 + 0.9 + 0.2 + 0.15 +
                                                                       0.7 + 0.1, rel=1e-6)


def test_bag_of_words_loss_matches_numpy_and_trains_only_when_asked():
  """The auxiliary loss is -sum_t w_t log softmax(head(z))[x_t] over target tokens, added
  to the training loss and reported (never added) at evaluation."""
  objective = vae_lib.TextVAE(TINY, np.ones(64), VAEConfig(latent_dim=4), bos_id=1, eos_id=2,
                              bow_weight=0.5, free_bits=0.0, kl_schedule="constant")
  plain = vae_lib.TextVAE(TINY, np.ones(64), VAEConfig(latent_dim=4), bos_id=1, eos_id=2,
                          free_bits=0.0, kl_schedule="constant")
  rng = np.random.default_rng(5)
  targets = rng.integers(3, 64, (3, 8)).astype(np.int32)
  weights = np.ones((3, 8), np.float32)
  weights[1, 5:] = 0.0
  batch = {"inputs": np.concatenate([np.ones((3, 1), np.int32), targets[:, :-1]], 1),
           "targets": targets, "segment_ids": (weights > 0).astype(np.int32),
           "weights": weights, "step": np.zeros(3, np.int32)}
  params = objective.init_params(jax.random.key(0), 8)
  assert "bag_of_words" in params and "bag_of_words" not in plain.init_params(
      jax.random.key(0), 8)
  key = jax.random.key(1)
  _, out = objective.apply(params, batch, key, train=False)
  logits = np.asarray(out["bag_of_words"], np.float64)                  # (B, V)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  ref = -sum(weights[b, t] * log_p[b, targets[b, t]] for b in range(3) for t in range(8))
  loss_eval, sums = objective.loss_fn(params, batch, key, train=False)
  assert float(sums["bow_nll"]) == pytest.approx(ref, rel=1e-5)
  # Evaluation is the true bound: nll + KL, no bag of words.
  tokens = weights.sum()
  assert float(loss_eval) == pytest.approx((float(sums["nll"]) + float(sums["kl"])) / tokens,
                                           rel=1e-6)
  assert objective.summarize(jax.device_get(sums))["bow_loss"] == pytest.approx(ref / tokens,
                                                                                 rel=1e-5)
  loss_train, sums_train = objective.loss_fn(params, batch, key, train=True)
  assert float(loss_train) == pytest.approx(
      (float(sums_train["nll"]) + float(sums_train["kl"]) + 0.5 * float(sums_train["bow_nll"]))
      / tokens, rel=1e-5)


def test_kl_schedules():
  kw = dict(warmup_steps=10, total_steps=100, cycles=4, cycle_ratio=0.5)
  lin = [float(vae_lib.kl_weight(s, "linear", **kw)) for s in (0, 4, 9, 50)]
  np.testing.assert_allclose(lin, [0.1, 0.5, 1.0, 1.0], rtol=1e-6)
  # 4 cycles of 25 steps, rising over the first 12.5 of each.
  cyc = [float(vae_lib.kl_weight(s, "cyclical", **kw)) for s in (0, 5, 12.5, 20, 25, 30)]
  np.testing.assert_allclose(cyc, [0.0, 0.4, 1.0, 1.0, 0.0, 0.4], rtol=1e-6, atol=1e-7)
  assert float(vae_lib.kl_weight(7, "constant", **kw)) == 1.0
  with pytest.raises(ValueError, match="kl_schedule"):
    vae_lib.kl_weight(0, "sigmoid", **kw)


def test_active_units_match_numpy_variance():
  rng = np.random.default_rng(4)
  scales = np.array([0.0, 0.05, 0.09, 0.12, 1.0, 3.0])   # variance 0, .0025, .0081, .0144, 1, 9
  mu = rng.normal(size=(5000, 6)) * scales + rng.normal(size=6) * 5
  ref = int(np.sum(np.var(mu, axis=0) > 0.01))
  assert ref == 3
  got = vae_lib.active_units(mu.sum(0).astype(np.float32), (mu ** 2).sum(0).astype(np.float32),
                             len(mu))
  assert got == ref


def naive_mutual_info(mu, log_sigma, eps):
  """Direct double loop over Gaussian densities (no vectorisation, no logsumexp);
  E_q(z|x) log q(z|x) is minus the entropy, sum_d log(sigma_d sqrt(2 pi e))."""
  n, dims = mu.shape
  sigma = np.exp(log_sigma)
  z = mu + sigma * eps
  def density(zi, j):
    return np.prod(np.exp(-0.5 * ((zi - mu[j]) / sigma[j]) ** 2) / (sigma[j] * math.sqrt(2 * math.pi)))
  total = 0.0
  for i in range(n):
    entropy = sum(math.log(sigma[i, d] * math.sqrt(2 * math.pi * math.e)) for d in range(dims))
    q_agg = np.mean([density(z[i], j) for j in range(n)])
    total += -entropy - math.log(q_agg)
  return total / n


def test_mutual_info_matches_naive_loop_and_known_limits():
  rng = np.random.default_rng(5)
  mu = rng.normal(size=(60, 3))
  ls = rng.uniform(-1.0, 0.0, size=(60, 3))
  eps = rng.normal(size=(60, 3))
  assert vae_lib.mutual_info(mu, ls, eps) == pytest.approx(naive_mutual_info(mu, ls, eps),
                                                           rel=1e-9)
  # Two well-separated groups of identical posteriors: I(x; z) = log 2.
  n = 2000
  mu2 = np.where(np.arange(n)[:, None] < n // 2, 4.0, -4.0) * np.ones((n, 2))
  ls2 = np.full((n, 2), math.log(0.5))
  assert vae_lib.mutual_info(mu2, ls2, rng.normal(size=(n, 2))) == pytest.approx(
      math.log(2), abs=0.02)
  # Every posterior the same: z says nothing about x (0 up to the Monte-Carlo error
  # of the one draw per x, ~ 1 / sqrt(n)).
  assert abs(vae_lib.mutual_info(np.zeros((n, 2)), np.zeros((n, 2)),
                                 rng.normal(size=(n, 2)))) < 0.05


# --- a tiny VAE memorises two sentences ------------------------------------------------

def test_overfit_on_two_sentences_reconstructs_both_at_temperature_0():
  import optax
  from tx_jax.data import sentences, sources, tokenizers
  tok = tokenizers.ByteTokenizer(("<s>", "</s>", "<unk>"))
  bos, eos, unk = (tok.special_ids[s] for s in ("<s>", "</s>", "<unk>"))
  texts = ["the cat sat on the mat.", "a dog ran far away!"]
  cfg = TransformerConfig(vocab_size=260, num_layers=1, num_encoder_layers=1, d_model=32,
                          num_heads=4, mlp_dim=64, max_len=32, positions="rope")
  objective = vae_lib.TextVAE(cfg, tok.token_byte_lengths(), VAEConfig(latent_dim=4),
                              bos_id=bos, eos_id=eos, unk_id=unk, kl_schedule="constant",
                              free_bits=0.5)
  batch = next(sentences.sentence_eval_batches(sources.ListSource(texts), tok, 32, 2, bos, eos))
  batch["step"] = np.zeros(2, np.int32)
  params = objective.init_params(jax.random.key(0), 32)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, i):
    grads, _ = jax.grad(objective.loss_fn, has_aux=True)(params, batch, jax.random.key(i), True)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for i in range(400):
    params, opt = step(params, opt, i)
  mu, _ = objective.posterior(params, jnp.asarray(batch["targets"]),
                              jnp.asarray(batch["segment_ids"]))
  out = vae_lib.decode_latents(objective.model, params, mu, jax.random.key(0), max_len=32,
                               bos_id=bos, eos_id=eos)
  decoded = [tok.decode([t for t in row if t != eos]) for row in np.asarray(out).tolist()]
  assert decoded == texts
  # The first token comes from z alone, so z must tell the two apart.
  assert float(jnp.linalg.norm(mu[0] - mu[1])) > 0.5


def test_latent_memory_carries_z_to_every_layer_and_decodes_from_the_cache():
  cfg = TransformerConfig(vocab_size=64, num_layers=2, num_encoder_layers=1, d_model=32,
                          num_heads=4, mlp_dim=64, max_len=12, positions="rope")
  model = TransformerVAE(cfg, VAEConfig(latent_dim=4, memory_slots=3))
  tokens = jnp.zeros((2, 12), jnp.int32)
  boxed = model.init(jax.random.key(0), tokens, tokens)["params"]
  assert boxed["latent_to_memory"]["kernel"].names == ("latent", "positions", "embed")
  params = nn.unbox(boxed)
  assert params["latent_to_memory"]["kernel"].shape == (4, 3, 32)
  assert all("cross_attn" in params["decoder"][f"block_{i:02d}"] for i in range(2))
  # latent_to_embed starts at zero, so at initialisation z reaches the decoder only
  # through the memory: two z give different logits, and none with a zero memory kernel.
  z = jax.random.normal(jax.random.key(1), (2, 4))
  start = jnp.zeros((2, 1), jnp.int32)
  logits = lambda p, z: model.apply({"params": p}, None, start, z=z)[0]
  first = np.asarray(logits(params, z))
  assert np.abs(first[0] - first[1]).max() > 1e-3
  silent = jax.tree_util.tree_map(lambda x: x, params)
  silent["latent_to_memory"] = {k: jnp.zeros_like(v) for k, v in
                                params["latent_to_memory"].items()}
  flat = np.asarray(logits(silent, z))
  np.testing.assert_allclose(flat[0], flat[1], atol=1e-6)
  # Greedy decoding through the KV cache picks, at every step, the argmax of the
  # full (cache-free) forward over the tokens decoded so far.
  out = np.asarray(vae_lib.decode_latents(model, params, z, jax.random.key(0), max_len=8,
                                          bos_id=1, eos_id=63))
  inputs = np.concatenate([np.ones((2, 1), np.int32), out[:, :-1]], axis=1)
  full = np.asarray(model.apply({"params": params}, None, jnp.asarray(inputs), z=z)[0])
  for row in range(2):
    ended = np.flatnonzero(out[row] == 63)
    n = ended[0] + 1 if len(ended) else 8
    np.testing.assert_array_equal(full[row, :n].argmax(-1), out[row, :n])


# --- one train step on any mesh equals the 1-device step ------------------------------

def vae_family():
  """(objective, batch): a 1+1-layer VAE with word dropout and a KL warm-up, and a
  batch with padded rows."""
  from test_parallel import B, T, V
  rng = np.random.default_rng(0)
  cfg = TransformerConfig(vocab_size=V, num_layers=1, num_encoder_layers=1, d_model=32,
                          num_heads=4, mlp_dim=64, max_len=T, positions="rope")
  # No free bits: the z projection starts at zero, so at step one the encoder's only
  # gradient is the KL's, which free bits would clamp away.
  objective = vae_lib.TextVAE(cfg, np.ones(V, np.float32), VAEConfig(latent_dim=8), bos_id=1,
                              eos_id=2, unk_id=3, kl_warmup_steps=4, free_bits=0.0,
                              word_dropout=0.2)
  batch = objective.synthetic_batch(B, T, V)
  lengths = rng.integers(3, T + 1, B)
  lengths[5] = 0                                          # a row that only pads the batch
  real = np.arange(T)[None] < lengths[:, None]
  batch["segment_ids"] = real.astype(np.int32)
  batch["weights"] = real.astype(np.float32)
  batch["step"] = np.full(B, 2, np.int32)
  return objective, batch


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_vae_train_step_on_mesh_equals_single_device(shape, monkeypatch):
  import test_parallel as tp
  monkeypatch.setattr(tp, "family", lambda name: vae_family())
  tp.train_step.cache_clear()
  start, ref, ref_m, _ = tp.train_step("vae")
  _, new, m, _ = tp.train_step("vae", shape)
  tp.train_step.cache_clear()
  assert tp.rel(m["train/loss"], ref_m["train/loss"]) <= 1e-5
  assert tp.rel(m["grad_norm"], ref_m["grad_norm"]) <= 1e-5
  tp.assert_close_trees(tp.adam_mu(new), tp.adam_mu(ref), new.params, ref.params)
  assert int(new.step) == 1
  moved = [tp.rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(ref.params),
                                        jax.tree_util.tree_leaves(start.params)) if a.size >= 512]
  assert moved and min(moved) > 1e-3


# --- the CLI: a tiny VAE trained, SIGKILLed, resumed; generate, embed, eval ----------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_TINY = ["--config.model.num_layers=1", "--config.model.num_encoder_layers=1",
            "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.data.seq_len=32",
            "--config.train.batch_size=8", "--config.data.tokenizer=byte",
            "--config.model.vocab_size=259", "--config.vae.latent_dim=4",
            "--config.data.eval_batches=2", "--config.vae.kl_warmup_steps=4"]
STEPS, EVERY = 8, 2
CHAIN = ["train", "--config", "configs/vae.py", *CLI_TINY, f"--config.train.steps={STEPS}",
         f"--config.train.checkpoint_every={EVERY}", f"--config.train.eval_every={STEPS}",
         "--config.train.log_every=2", "--config.model.dropout_rate=0.1"]


def cli_env(cache):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(),
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def tx(args, cache, **kw):
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], cwd=ROOT, env=cli_env(cache),
                        capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from test_reliability import sealed_steps
  base = tmp_path_factory.mktemp("vae_runs")
  cache = base / "xla_cache"
  straight = base / "straight"
  done = tx([*CHAIN, "--config.train.async_checkpoints=false", "--workdir", str(straight)],
            cache, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  killed = base / "killed"
  with open(base / "kill.err", "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "tx_jax", *CHAIN, "--workdir", str(killed)],
                            cwd=ROOT, env=cli_env(cache), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 600
    while not {2, 4} & set(sealed_steps(killed)):
      assert proc.poll() is None and time.time() < deadline, open(base / "kill.err").read()
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = sealed_steps(killed)
  resumed = tx([*CHAIN, "--workdir", str(killed)], cache, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  return {"straight": straight, "killed": killed, "killed_at": killed_at, "cache": cache,
          "resumed_stdout": resumed.stdout, "base": base}


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(runs):
  from test_reliability import final_state
  assert max(runs["killed_at"]) < STEPS
  assert f"resuming from step {max(runs['killed_at'])}" in runs["resumed_stdout"]
  (step_a, a), (step_b, b) = final_state(runs["straight"]), final_state(runs["killed"])
  assert step_a == step_b == STEPS and a.keys() == b.keys() and len(a) > 20
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  evals = [json.loads(l) for l in open(runs["straight"] / "metrics.jsonl") if "eval/kl" in l]
  for key in ("loss", "reconstruction_loss", "kl", "active_units", "mutual_info",
              "elbo_bits_per_byte"):
    assert math.isfinite(evals[-1][f"eval/{key}"]), key


@pytest.mark.slow
def test_generate_interpolate_reconstruct_and_embed_on_a_trained_workdir(runs, tmp_path):
  wd, cache = str(runs["straight"]), runs["cache"]
  out = tx(["generate", "--workdir", wd, "--interpolate", "Return the value.",
            "The list is empty.", "--num-samples", "4", "--temperature", "0",
            "--max-new-tokens", "12"], cache)
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(out.stdout.rstrip("\n").split("\n")) == 4
  prior = tx(["generate", "--workdir", wd, "--num-samples", "3", "--max-new-tokens", "8"], cache)
  assert prior.returncode == 0 and len(prior.stdout.rstrip("\n").split("\n")) == 3
  again = tx(["generate", "--workdir", wd, "--num-samples", "3", "--max-new-tokens", "8"], cache)
  assert again.stdout == prior.stdout                     # seeded
  recon = tx(["generate", "--workdir", wd, "--reconstruct", "Return the value.",
              "--temperature", "0", "--max-new-tokens", "8"], cache)
  assert recon.returncode == 0 and len(recon.stdout.rstrip("\n").split("\n")) == 1
  # embed writes the posterior means: compare with the objective's own posterior.
  npz = tmp_path / "mu.npz"
  emb = tx(["embed", "--workdir", wd, "--data", "embedded:python-docs:eval", "--sample", "5",
            "--out", str(npz)], cache)
  assert emb.returncode == 0, emb.stderr[-2000:]
  got = np.load(npz)
  assert got["embeddings"].shape == (5, 4)
  from tx_jax.train.trained import load_trained
  trained = load_trained(wd)
  obj = trained.objective
  texts = [str(t) for t in got["texts"]]
  tokens, segments = vae_lib.encoder_rows(obj.tokenizer, texts, 32, obj.eos_id)
  mu, _ = obj.posterior(trained.params, tokens, segments)
  np.testing.assert_allclose(got["embeddings"], np.asarray(mu), rtol=1e-4, atol=1e-5)


def one_line_error(result, pattern):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("tx-jax: error: "), result.stderr[-2000:]
  assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("override, pattern", [
    ("--config.vae.latent_dim=0", r"vae\.latent_dim=0 must be >= 1"),
    ("--config.vae.kl_schedule=sigmoid", r"vae\.kl_schedule='sigmoid' is not one of"),
    ("--config.vae.free_bit=1.0", r"unknown config key .vae\.free_bit."),
    ("--config.vae.bow_weight=-1.0", r"vae\.bow_weight=-1\.0 must be a finite number >= 0"),
    ("--config.vae.memory_slots=-1", r"vae\.memory_slots=-1 must be >= 0"),
])
def test_bad_vae_settings_exit_2_with_one_line(override, pattern, tmp_path):
  result = tx(["train", "--config", "configs/vae.py", *CLI_TINY, override, "--workdir",
               str(tmp_path / "w")], tmp_path / "cache")
  one_line_error(result, pattern)


def test_interpolation_on_a_gpt_workdir_exits_2(tmp_path):
  golden = os.path.join(ROOT, "tests", "golden", "gpt_tiny")
  result = tx(["generate", "--workdir", golden, "--interpolate", "a", "b", "--num-samples", "3"],
              tmp_path / "cache")
  one_line_error(result, r"--prompt")


@pytest.mark.slow
def test_vae_generate_bad_requests_exit_2(runs):
  wd, cache = str(runs["straight"]), runs["cache"]
  one_line_error(tx(["generate", "--workdir", wd, "--prompt", "Return"], cache),
                 r"does not continue a prompt")
  one_line_error(tx(["generate", "--workdir", wd, "--interpolate", "a", "b"], cache),
                 r"--num-samples N >= 2")
