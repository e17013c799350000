"""Text VAE: maximise the ELBO of a Transformer-VAE on one sentence per row.

    ELBO(x) = E_q(z|x) log p(x|z) - KL(q(z|x) || N(0, I))

with one reparameterised sample of z per sentence (`tx_jax.models.vae`). The
training loss is the negative ELBO per target token with three defences
against posterior collapse (the decoder learning to ignore z), all in the
config's `vae` section:

  kl_schedule   the KL term's weight beta over train steps: "linear" warm-up
                from 0 to 1 over kl_warmup_steps (Bowman et al. 2016),
                "cyclical" (Fu et al. 2019: kl_cycles cycles over train.steps,
                each rising linearly over its first kl_cycle_ratio, then 1),
                or "constant" (1). The step comes with every train batch
                (`tx_jax.data.sentences`: batch k carries step = k).
  free_bits     nats per latent dim under which KL is not penalised (Kingma et
                al. 2016): each dim pays max(its mean KL over the batch,
                free_bits); beta multiplies the clamped sum.
  word_dropout  the decoder's input tokens (not the start token) are replaced
                by <unk> with this probability (Bowman et al. 2016), so it must
                get what it misses from z.

Evaluation always reports the true bound (beta 1, no free bits, no word
dropout): `loss` is the negative ELBO per token, `reconstruction_loss` its
reconstruction part per token, `kl` nats per sentence, `elbo_bits_per_byte`
(nll + KL) / ln 2 / UTF-8 bytes (an upper bound on the bits per byte of the
held-out text, comparable with a causal LM's bits_per_byte), `active_units`
(dims whose posterior mean varies across the eval set by more than 0.01,
Burda et al. 2016) and, from the evaluation hook, `mutual_info` I(x; z) under
q (Hoffman & Johnson 2016; estimator of He et al. 2019) over the whole eval
set.

`vae.unconditional=true` trains the same decoder with z = 0 and no KL: the
unconditional LM of the same size, the baseline of benchmarks/vae_text.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.generate import filter_logits
from tx_jax.models import TransformerConfig, TransformerVAE, VAEConfig, count_params

KL_SCHEDULES = ("constant", "linear", "cyclical")
ACTIVE_UNIT_VARIANCE = 0.01  # Burda et al. 2016's threshold on Var_x E_q[z_d]


# --- the math -------------------------------------------------------------------------


def gaussian_kl(mu, log_sigma, prior_mu=0.0, prior_log_sigma=0.0):
  """KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)) per dim: (..., L) -> (..., L) nats.

  The prior defaults to the VAE's N(0, 1).
  """
  ratio = jnp.exp(2.0 * (log_sigma - prior_log_sigma))
  return 0.5 * (ratio + jnp.square(mu - prior_mu) * jnp.exp(-2.0 * prior_log_sigma) - 1.0) - (
      log_sigma - prior_log_sigma)


def free_bits_kl(kl, valid, free_bits: float):
  """KL term with free bits: n * sum_d max(mean_b kl[b, d], free_bits) over valid rows.

  kl (B, L), valid (B,) 1/0. free_bits 0 gives sum_b,d kl. The clamp is on the
  batch mean per dim, so a dim below it gets no gradient at all.
  """
  n = jnp.sum(valid)
  per_dim = jnp.sum(kl * valid[:, None], axis=0) / jnp.maximum(n, 1.0)        # (L,)
  return n * jnp.sum(jnp.maximum(per_dim, free_bits))


def kl_weight(step, schedule: str, *, warmup_steps: int, total_steps: int, cycles: int,
              cycle_ratio: float):
  """beta at train step `step` (int or traced scalar) under `schedule`."""
  step = jnp.asarray(step, jnp.float32)
  if schedule == "constant":
    return jnp.float32(1.0)
  if schedule == "linear":
    return jnp.minimum(1.0, (step + 1.0) / max(int(warmup_steps), 1))   # 1 from warmup - 1
  if schedule == "cyclical":
    period = max(total_steps / max(int(cycles), 1), 1.0)
    phase = jnp.mod(step, period) / period                                  # [0, 1)
    return jnp.minimum(1.0, phase / max(float(cycle_ratio), 1e-9))
  raise ValueError(f"vae.kl_schedule={schedule!r} is not one of {KL_SCHEDULES}")


def active_units(mu_sum, mu_sq_sum, count, threshold: float = ACTIVE_UNIT_VARIANCE) -> int:
  """Dims whose posterior mean has variance > threshold over `count` sentences,
  from the per-dim sums of mu and mu^2 (L,)."""
  n = max(float(count), 1.0)
  mean = np.asarray(mu_sum, np.float64) / n
  var = np.asarray(mu_sq_sum, np.float64) / n - mean ** 2
  return int(np.sum(var > threshold))


def mutual_info(mu, log_sigma, eps) -> float:
  """I(x; z) under q(z|x) q(x), x uniform over the N given posteriors (He et al. 2019).

  mu, log_sigma, eps (N, L): z_i = mu_i + sigma_i eps_i is one draw per x_i;
  I = E_x E_q(z|x) log q(z|x) - E_q(z) log q(z), with the aggregate posterior
  q(z) = mean_n q(z | x_n) evaluated exactly over all N. float64; O(N^2 L).
  """
  mu, log_sigma, eps = (np.asarray(a, np.float64) for a in (mu, log_sigma, eps))
  n, dims = mu.shape
  z = mu + np.exp(log_sigma) * eps
  # E_q(z|x) log q(z|x) = -entropy of a diagonal Gaussian.
  neg_entropy = np.mean(-0.5 * dims * math.log(2 * math.pi) - np.sum(log_sigma + 0.5, axis=1))
  log_q = np.empty((n, n))                                 # log q(z_i | x_j)
  for start in range(0, n, 256):
    zi = z[start:start + 256, None, :]                     # (b, 1, L)
    diff = (zi - mu[None]) * np.exp(-log_sigma)[None]      # (b, N, L)
    log_q[start:start + 256] = (-0.5 * np.sum(diff ** 2, -1) - np.sum(log_sigma, -1)[None]
                                - 0.5 * dims * math.log(2 * math.pi))
  top = np.max(log_q, axis=1, keepdims=True)
  log_qz = top[:, 0] + np.log(np.mean(np.exp(log_q - top), axis=1))
  return float(neg_entropy - np.mean(log_qz))


def word_dropout(inputs, segment_ids, rng, rate: float, unk_id: int):
  """inputs (B, T) with each real token after the first replaced by unk_id w.p. rate."""
  keep_first = jnp.arange(inputs.shape[1])[None, :] > 0
  drop = jax.random.bernoulli(rng, rate, inputs.shape) & keep_first & (segment_ids > 0)
  return jnp.where(drop, unk_id, inputs)


# --- the loss -------------------------------------------------------------------------


class TextVAELoss:
  """The ELBO of a TransformerVAE on sentence batches (`tx_jax.data.sentences` keys).

  token_bytes[v]: UTF-8 bytes of token v (for bits per byte); unk_id: the
  word-dropout token (needed when word_dropout > 0).
  """

  def __init__(self, model_cfg: TransformerConfig, vae_cfg: VAEConfig, token_bytes, *,
               unk_id: int | None = None, kl_schedule: str = "linear",
               kl_warmup_steps: int = 1000, kl_cycles: int = 4, kl_cycle_ratio: float = 0.5,
               free_bits: float = 0.0, word_dropout: float = 0.0,
               unconditional: bool = False, total_steps: int = 1):
    if kl_schedule not in KL_SCHEDULES:
      raise ValueError(f"vae.kl_schedule={kl_schedule!r} is not one of {KL_SCHEDULES}")
    if not 0.0 <= word_dropout < 1.0:
      raise ValueError(f"vae.word_dropout={word_dropout} must be in [0, 1)")
    if free_bits < 0:
      raise ValueError(f"vae.free_bits={free_bits} must be >= 0 (nats per latent dim)")
    if word_dropout > 0 and unk_id is None:
      raise ValueError("vae.word_dropout > 0 needs an <unk> token in data.specials")
    self.cfg, self.vae = model_cfg, vae_cfg.validate(model_cfg)
    self.model = TransformerVAE(model_cfg, self.vae)
    self.token_bytes = jnp.asarray(token_bytes, jnp.float32)
    self.unk_id = unk_id
    self.schedule = dict(schedule=kl_schedule, warmup_steps=kl_warmup_steps,
                         total_steps=total_steps, cycles=kl_cycles, cycle_ratio=kl_cycle_ratio)
    self.free_bits, self.word_dropout = float(free_bits), float(word_dropout)
    self.unconditional = bool(unconditional)

  def init_params(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, tokens)["params"]

  def kl_weight(self, step):
    return kl_weight(step, **self.schedule)

  def apply(self, params, batch, rng, train: bool):
    """(logits (B, T, V), out) for one batch with a fresh z per row (and word
    dropout when training)."""
    eps_rng, word_rng, dropout_rng = jax.random.split(rng, 3)
    inputs, segments = batch["inputs"], batch["segment_ids"]
    if train and self.word_dropout > 0:
      inputs = word_dropout(inputs, segments, word_rng, self.word_dropout, self.unk_id)
    b, latent = inputs.shape[0], self.vae.latent_dim
    z = jnp.zeros((b, latent), jnp.float32) if self.unconditional else None
    eps = jax.random.normal(eps_rng, (b, latent), jnp.float32)
    return self.model.apply(
        {"params": params}, batch["targets"], inputs, segment_ids=segments,
        decoder_segment_ids=segments, eps=eps, z=z, deterministic=not train,
        rngs={"dropout": dropout_rng} if train else None)

  def loss_fn(self, params, batch, rng, train: bool):
    logits, out = self.apply(params, batch, rng, train)                     # (B, T, V)
    weights, targets = batch["weights"], batch["targets"]
    valid = (jnp.sum(weights, axis=1) > 0).astype(jnp.float32)               # (B,)
    nll_tok = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    nll = jnp.sum(nll_tok * weights)
    tokens = jnp.sum(weights)
    latent = self.vae.latent_dim
    if self.unconditional:
      mu = jnp.zeros((targets.shape[0], latent), jnp.float32)
      kl = jnp.zeros_like(mu)
    else:
      mu = out["mu"]
      kl = gaussian_kl(mu, out["log_sigma"])                                # (B, L)
    kl_sum = jnp.sum(kl * valid[:, None])
    if train:
      beta = self.kl_weight(jnp.max(batch["step"])) if "step" in batch else 1.0
      kl_term = beta * free_bits_kl(kl, valid, self.free_bits)
    else:  # the true bound
      kl_term = kl_sum
    mu_valid = mu * valid[:, None]
    sums = {"nll": nll, "weight": tokens, "kl": kl_sum, "sequences": jnp.sum(valid),
            "bytes": jnp.sum(jnp.take(self.token_bytes, targets) * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
            "mu_sum": jnp.sum(mu_valid, axis=0), "mu_sq_sum": jnp.sum(mu_valid * mu, axis=0)}
    return (nll + kl_term) / jnp.maximum(tokens, 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    n = max(float(sums["sequences"]), 1.0)
    nll, kl = float(sums["nll"]), float(sums["kl"])
    byte_count = max(float(sums["bytes"]), 1.0)
    return {"loss": (nll + kl) / w, "reconstruction_loss": nll / w, "kl": kl / n,
            "accuracy": float(sums["correct"]) / w,
            "elbo_bits_per_byte": (nll + kl) / math.log(2) / byte_count,
            "reconstruction_bits_per_byte": nll / math.log(2) / byte_count,
            "active_units": active_units(sums["mu_sum"], sums["mu_sq_sum"], n)}

  def posterior(self, params, tokens, segment_ids):
    """(mu, log_sigma) (B, L) of q(z|x) for sentences tokens (B, T) (1/0 segments)."""
    _, out = self.model.apply({"params": params}, tokens, None, segment_ids=segment_ids)
    return out["mu"], out["log_sigma"]

  def flops_per_unit(self, params, seq_len: int) -> float:
    """Training FLOPs per target token: 6N + 12·(encoder + decoder layers)·d·T."""
    layers = self.cfg.num_layers + (self.cfg.num_encoder_layers or self.cfg.num_layers)
    return 6 * count_params(params) + 12 * layers * self.cfg.d_model * seq_len


# --- decoding from z ------------------------------------------------------------------


def init_decoder_cache(model: TransformerVAE, batch_size: int):
  """Zeroed decoder KV cache of model.cfg.max_len positions (shapes only)."""
  tokens = jax.ShapeDtypeStruct((batch_size, model.cfg.max_len), jnp.int32)
  z = jax.ShapeDtypeStruct((batch_size, model.vae.latent_dim), jnp.float32)
  shapes = jax.eval_shape(lambda t, z: model.init(jax.random.key(0), None, t, z=z, decode=True),
                          tokens, z)["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id",
                                             "temperature", "top_k", "top_p"))
def decode_latents(model: TransformerVAE, params, z, rng, *, max_len: int, bos_id: int,
                   eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Sentences from latents z (B, L): (B, max_len) token ids, eos_id after the end.

  One token per step from the decoder's KV cache, starting from <s>; temperature
  0 is greedy, else sampling with tx_jax.generate's temperature / top-k / top-p.
  """
  if not 0 < max_len <= model.cfg.max_len:
    raise ValueError(f"max_len={max_len} must be in 1..{model.cfg.max_len}, the KV cache size")
  b = z.shape[0]

  def body(i, carry):
    cache, token, done, out = carry
    (logits, _), mutated = model.apply(
        {"params": params, "cache": cache}, None, token[:, None],
        decoder_positions=jnp.full((b, 1), i, jnp.int32), z=z, decode=True, mutable=["cache"])
    logits = logits[:, -1]
    if temperature == 0:
      new = jnp.argmax(logits, -1).astype(jnp.int32)
    else:
      new = jax.random.categorical(jax.random.fold_in(rng, i),
                                   filter_logits(logits, temperature, top_k, top_p)
                                   ).astype(jnp.int32)
    new = jnp.where(done, eos_id, new)
    return mutated["cache"], new, done | (new == eos_id), out.at[:, i].set(new)

  init = (init_decoder_cache(model, b), jnp.full((b,), bos_id, jnp.int32),
          jnp.zeros((b,), bool), jnp.full((b, max_len), eos_id, jnp.int32))
  return jax.lax.fori_loop(0, max_len, body, init)[3]
