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
  bow_weight    weight of a bag-of-words loss (Zhao et al. 2017): a head
                predicts every target token from z alone (cross-entropy per
                token, `bow_loss`), so the encoder has to put the sentence's
                content into z from the first step, before the decoder has
                learnt to do without it. Training loss only; 0 turns the head off.

Evaluation always reports the true bound (beta 1, no free bits, no word
dropout, no bag of words): `loss` is the negative ELBO per token,
`reconstruction_loss` its reconstruction part per token, `kl` nats per
sentence, `elbo_bits_per_byte` (nll + KL) / ln 2 / UTF-8 bytes (an upper
bound on the bits per byte of the held-out text, comparable with a causal LM's
bits_per_byte), `active_units`
(dims whose posterior mean varies across the eval set by more than 0.01,
Burda et al. 2016) and, from the evaluation hook, `mutual_info` I(x; z) under
q (Hoffman & Johnson 2016; estimator of He et al. 2019) over the whole eval
set.

`vae.unconditional=true` trains the same decoder with z = 0 and no KL: the
unconditional LM of the same size, the baseline of benchmarks/vae_text.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.data import sentences
from tx_jax.errors import UserError
from tx_jax.generate import decode_latents
from tx_jax.models import TransformerConfig, TransformerVAE, VAEConfig, count_params
from tx_jax.objectives.base import Data, register
from tx_jax.objectives.text import (TextObjective, pool, token_bytes,
                                    token_cross_entropy, transformer_config)

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


# --- the objective --------------------------------------------------------------------

SPECIALS = ("<s>", "</s>", "<unk>")   # start, end, word-dropout token (data.specials)
VECTOR_LAYERS = ("mu", "log_sigma", "pooled")


@register("vae")
class TextVAE(TextObjective):
  """The ELBO of a TransformerVAE on one sentence per row (`tx_jax.data.sentences`).

  token_bytes[v]: UTF-8 bytes of token v (for bits per byte). bos_id / eos_id
  start and end every row; unk_id replaces dropped decoder inputs.
  """

  def __init__(self, model_cfg: TransformerConfig, token_bytes, vae_cfg: VAEConfig | None = None,
               *, bos_id: int = 0, eos_id: int = 0, unk_id: int | None = None,
               kl_schedule: str = "linear", kl_warmup_steps: int = 1000, kl_cycles: int = 4,
               kl_cycle_ratio: float = 0.5, free_bits: float = 0.0, word_dropout: float = 0.0,
               bow_weight: float = 0.0, unconditional: bool = False, total_steps: int = 1,
               units: str = "sentences", mutual_info: bool = True):
    vae_cfg = vae_cfg or VAEConfig()
    if kl_schedule not in KL_SCHEDULES:
      raise ValueError(f"vae.kl_schedule={kl_schedule!r} is not one of {KL_SCHEDULES}")
    if not 0.0 <= word_dropout < 1.0:
      raise ValueError(f"vae.word_dropout={word_dropout} must be in [0, 1)")
    if free_bits < 0:
      raise ValueError(f"vae.free_bits={free_bits} must be >= 0 (nats per latent dim)")
    if not (bow_weight >= 0 and math.isfinite(bow_weight)):
      raise ValueError(f"vae.bow_weight={bow_weight} must be a finite number >= 0")
    if word_dropout > 0 and unk_id is None:
      raise ValueError("vae.word_dropout > 0 needs an <unk> token in data.specials")
    if units not in sentences.UNITS:
      raise ValueError(f"vae.units={units!r} is not one of {sentences.UNITS}")
    self.bow_weight = 0.0 if unconditional else float(bow_weight)
    vae_cfg = dataclasses.replace(vae_cfg, bag_of_words=self.bow_weight > 0)
    self.cfg, self.vae = model_cfg, vae_cfg.validate(model_cfg)
    self.model = TransformerVAE(model_cfg, self.vae)
    self.token_bytes = jnp.asarray(token_bytes, jnp.float32)
    self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
    self.schedule = dict(schedule=kl_schedule, warmup_steps=kl_warmup_steps,
                         total_steps=total_steps, cycles=kl_cycles, cycle_ratio=kl_cycle_ratio)
    self.free_bits, self.word_dropout = float(free_bits), float(word_dropout)
    self.unconditional, self.units = bool(unconditional), units
    self.with_mutual_info = bool(mutual_info)

  # --- building ----------------------------------------------------------------------

  @classmethod
  def open_data(cls, config) -> Data:
    """The text sources, each document cut into `vae.units` (sentences by default)."""
    data = super().open_data(config)
    unit = config.get("vae", {}).get("units", "sentences")
    if unit not in sentences.UNITS:
      raise UserError(f"vae.units={unit!r} is not one of {sentences.UNITS}")
    return Data(sentences.unit_source(data.train, unit), sentences.unit_source(data.eval, unit),
                data.stats)

  @classmethod
  def build(cls, config, tokenizer, options: dict):
    """From config.model, config.vae (the fields of VAEConfig and the options of
    __init__) and the tokenizer's <s>, </s>, <unk>."""
    section = dict(config.get("vae") or {})
    # bag_of_words follows bow_weight; the other VAEConfig fields are settings.
    latent_fields = [f.name for f in dataclasses.fields(VAEConfig) if f.name != "bag_of_words"]
    latent = {k: section.pop(k) for k in latent_fields if k in section}
    ids = dict(bos_id=0, eos_id=0, unk_id=None)
    if tokenizer is not None:
      missing = [s for s in SPECIALS[:2] if s not in tokenizer.special_ids]
      if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)}; a VAE needs "
                        f"data.specials={list(SPECIALS)}")
      ids = dict(bos_id=tokenizer.special_ids["<s>"], eos_id=tokenizer.special_ids["</s>"],
                 unk_id=tokenizer.special_ids.get("<unk>"))
    accepted = set(inspect.signature(cls).parameters) - {
        "model_cfg", "token_bytes", "vae_cfg", "bos_id", "eos_id", "unk_id", "total_steps"}
    unknown = sorted(set(section) - accepted)
    if unknown:
      raise UserError(f"vae.{unknown[0]} is not a VAE setting; use one of "
                      f"{sorted(accepted | set(latent_fields))}")
    try:
      return cls(transformer_config(config), token_bytes(tokenizer, config.model.vocab_size),
                 VAEConfig(**latent), total_steps=int(config.train.steps), **ids,
                 **{**section, **options})
    except ValueError as e:
      raise UserError(str(e)) from None

  # --- batches -----------------------------------------------------------------------

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    return sentences.sentence_train_iterator(source, self.tokenizer, seq_len, batch_size, seed,
                                             self.bos_id, self.eos_id, shard_index,
                                             shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    return sentences.sentence_eval_batches(source, self.tokenizer, seq_len, batch_size,
                                           self.bos_id, self.eos_id)

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random full-length sentences (step 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
            "weights": ones.astype(np.float32), "step": np.zeros(batch_size, np.int32)}

  # --- the loss ----------------------------------------------------------------------

  def init_params(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, tokens)["params"]

  def kl_weight(self, step):
    """beta of the KL term at train step `step` under the configured schedule."""
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
    nll, correct = token_cross_entropy(logits, targets, weights)
    tokens = jnp.sum(weights)
    if self.unconditional:
      mu = jnp.zeros((targets.shape[0], self.vae.latent_dim), jnp.float32)
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
    extra = {}
    if self.bow_weight > 0:
      log_bag = jax.nn.log_softmax(out["bag_of_words"], axis=-1)            # (B, V)
      bag_nll = -jnp.sum(jnp.take_along_axis(log_bag, targets, axis=1) * weights)
      extra["bow_nll"] = bag_nll
      if train:
        kl_term = kl_term + self.bow_weight * bag_nll
    sums = {**extra, "nll": nll, "weight": tokens, "kl": kl_sum, "sequences": jnp.sum(valid),
            "bytes": jnp.sum(jnp.take(self.token_bytes, targets) * weights),
            "correct": correct,
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
            "active_units": active_units(sums["mu_sum"], sums["mu_sq_sum"], n),
            **({"bow_loss": float(sums["bow_nll"]) / w} if "bow_nll" in sums else {})}

  def flops_per_unit(self, params, seq_len: int) -> float:
    """Training FLOPs per target token: 6N + 12·(encoder + decoder layers)·d·T."""
    layers = self.cfg.num_layers + (self.cfg.num_encoder_layers or self.cfg.num_layers)
    return 6 * count_params(params) + 12 * layers * self.cfg.d_model * seq_len

  # --- evaluation --------------------------------------------------------------------

  def evaluation(self, config, data: Data):
    """I(x; z) over the whole eval set at every eval (vae.mutual_info), or None."""
    if self.unconditional or not self.with_mutual_info:
      return None
    return MutualInfoEvaluation(config, self, data)

  def posterior(self, params, tokens, segment_ids):
    """(mu, log_sigma) (B, L) of q(z|x) for sentences tokens (B, T) (1/0 segments)."""
    _, out = self.model.apply({"params": params}, tokens, None, segment_ids=segment_ids)
    return out["mu"], out["log_sigma"]

  # --- inference: embed --------------------------------------------------------------

  def embed_setup(self, config, layer, pooling, seq_len):
    """Layers: "mu" (default: the posterior mean), "log_sigma", "pooled" (the encoder's
    mean-pooled states) as they are, or an encoder block "encoder/block_XX" pooled."""
    max_len = config.model.max_len
    seq_len = int(seq_len or config.data.get("seq_len", max_len))
    if not 1 <= seq_len <= max_len:
      raise UserError(f"--seq-len {seq_len} must be in 1..{max_len} (the model's max_len)")
    blocks = [f"encoder/block_{i:02d}"
              for i in range(self.cfg.num_encoder_layers or self.cfg.num_layers)]
    layer = layer or "mu"
    if layer not in VECTOR_LAYERS + tuple(blocks):
      raise UserError(f"unknown layer {layer!r}; a VAE embeds {', '.join(VECTOR_LAYERS)} or "
                      f"{', '.join(blocks)}")
    self._embed_len = seq_len
    return layer, (f"model:{layer}" if layer in VECTOR_LAYERS else pooling), seq_len

  def embed_collate(self, records):
    """Records -> encoder rows (tokens + </s>, as in training) [n, seq_len], truncated count."""
    texts = [record["text"] for record in records]
    tokens, segments = encoder_rows(self.tokenizer, texts, self._embed_len, self.eos_id)
    truncated = sum(len(self.tokenizer.encode(t)) > self._embed_len - 1 for t in texts)
    return {"tokens": tokens, "segment_ids": segments}, truncated

  def embed_batch(self, params, batch, layer: str, pooling: str):
    segments = batch["segment_ids"]
    _, out = self.model.apply({"params": params}, batch["tokens"], None, segment_ids=segments)
    if layer in VECTOR_LAYERS:
      return out[layer].astype(jnp.float32)
    return pool(out[layer], segments, pooling)

  # --- inference: generate -----------------------------------------------------------

  def generate(self, trained, request: dict) -> list[str]:
    """Sentences from the prior (--num-samples N), along the line between the posterior
    means of two sentences (--interpolate A B, N points from A to B), or decoded from
    one sentence's posterior mean (--reconstruct TEXT). Greedy at --temperature 0."""
    if request.get("prompt") is not None:
      raise UserError("a VAE does not continue a prompt; use --num-samples N (sentences from "
                      "the prior), --interpolate A B or --reconstruct TEXT")
    interpolate, reconstruct = request.get("interpolate"), request.get("reconstruct")
    if interpolate is not None and reconstruct is not None:
      raise UserError("give one of --interpolate A B and --reconstruct TEXT")
    n = int(request.get("num_samples") or 1)
    seed = int(request.get("seed") or 0)
    max_len = request.get("max_new_tokens") or trained.config.data.seq_len
    if not 1 <= max_len <= self.cfg.max_len:
      raise UserError(f"--max-new-tokens must be in 1..{self.cfg.max_len} (model.max_len)")
    params = trained.params
    if interpolate is not None:
      if len(interpolate) != 2 or n < 2:
        raise UserError("--interpolate takes two sentences A B and --num-samples N >= 2 "
                        "(the points from A to B)")
      mu, _ = self.posterior(params, *self._encoder_rows(list(interpolate), trained))
      t = jnp.linspace(0.0, 1.0, n)[:, None]
      z = (1 - t) * mu[0] + t * mu[1]                                        # (N, L)
    elif reconstruct is not None:
      mu, _ = self.posterior(params, *self._encoder_rows([reconstruct], trained))
      z = jnp.repeat(mu, n, axis=0)
    else:
      z = jax.random.normal(jax.random.key(seed), (n, self.vae.latent_dim), jnp.float32)
    out = decode_latents(self.model, params, z, jax.random.key(seed + 1), max_len=int(max_len),
                         bos_id=self.bos_id, eos_id=self.eos_id,
                         temperature=float(request.get("temperature") or 0.0),
                         top_k=int(request.get("top_k") or 0),
                         top_p=float(request.get("top_p") or 1.0))
    return [self.tokenizer.decode([t for t in row if t != self.eos_id])
            for row in np.asarray(out).tolist()]

  def _encoder_rows(self, texts, trained):
    if any(not self.tokenizer.encode(t) for t in texts):
      raise UserError("a sentence to encode is empty; pass some text")
    return encoder_rows(self.tokenizer, texts, trained.config.data.seq_len, self.eos_id)


def encoder_rows(tokenizer, texts, seq_len: int, eos_id: int):
  """Encoder inputs of texts as in training (tokens + </s>, cut to seq_len):
  (tokens, segment_ids) int32 [n, seq_len], segments 1 on the text, 0 = padding."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  segments = np.zeros((len(texts), seq_len), np.int32)
  for i, text in enumerate(texts):
    row = (tokenizer.encode(text) + [eos_id])[:seq_len]
    tokens[i, :len(row)], segments[i, :len(row)] = row, 1
  return tokens, segments


class MutualInfoEvaluation:
  """At every eval (and in `tx-jax eval`): `mutual_info`, I(x; z) over the posteriors
  of every eval sentence, one seeded draw of z per sentence (He et al. 2019)."""

  def __init__(self, config, objective: TextVAE, data: Data):
    self.config, self.objective = config, objective
    self.batches = objective.eval_batches(config, data)
    self._jitted = None

  def _functions(self):
    if self._jitted is None:
      mesh = parallel.make_mesh(self.config.mesh)
      rules = parallel.resolve_rules(self.config.mesh.rules)

      def posterior(params, batch):
        mu, log_sigma = self.objective.posterior(params, batch["targets"],
                                                 batch["segment_ids"])
        return mu, log_sigma, jnp.sum(batch["weights"], axis=1) > 0
      self._jitted = (mesh, parallel.batch_sharding(mesh, rules),
                      jax.jit(posterior, out_shardings=parallel.replicated(mesh)))
    return self._jitted

  def __call__(self, params, step: int, workdir: str) -> dict[str, float]:
    """The metrics at an eval of the training loop (writes nothing)."""
    return self.metrics(params)

  def metrics(self, params) -> dict[str, float]:
    """{"mutual_info": nats} over every eval sentence (read-only)."""
    mesh, sharding, posterior = self._functions()
    leaf = jax.tree_util.tree_leaves(params)[0]
    if getattr(leaf, "sharding", None) is None or (
        leaf.sharding.device_set != set(mesh.devices.flat)):
      params = jax.device_put(params, parallel.replicated(mesh))  # e.g. one device in eval
    mus, log_sigmas = [], []
    for local in self.batches():
      mu, log_sigma, valid = jax.device_get(posterior(params, parallel.global_batch(
          {k: local[k] for k in ("targets", "segment_ids", "weights")}, sharding)))
      mus.append(np.asarray(mu)[valid])
      log_sigmas.append(np.asarray(log_sigma)[valid])
    mu, log_sigma = np.concatenate(mus), np.concatenate(log_sigmas)
    eps = np.random.default_rng(self.config.train.seed).normal(size=mu.shape)
    return {"mutual_info": mutual_info(mu, log_sigma, eps)}
