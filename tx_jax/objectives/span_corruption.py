"""T5 span corruption: an EncoderDecoder reconstructs the dropped spans.

Trained with teacher forcing on packed batches from `tx_jax.data.span_corruption`
(supervised pairs, `seq2seq.py`, reuse everything but the data). Metrics: loss
and accuracy over target tokens, and exact match, the fraction of examples
whose every target token is the argmax prediction (teacher-forced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax.data import span_corruption as span_data
from tx_jax.errors import UserError
from tx_jax.models import EncoderDecoder, TransformerConfig, count_params
from tx_jax.objectives.base import register
from tx_jax.objectives.text import (TextObjective, token_bytes, token_cross_entropy,
                                    transformer_config)


def exact_matches(logits, targets, segment_ids):
  """(examples fully correct, examples) over packed rows: segment ids (B, T), 0 = pad."""
  b, t = targets.shape
  wrong = ((jnp.argmax(logits, -1) != targets) & (segment_ids > 0)).astype(jnp.int32)
  example = (jnp.arange(b)[:, None] * t + segment_ids).reshape(-1)        # (B*T,) ids
  wrong_per = jax.ops.segment_sum(wrong.reshape(-1), example, num_segments=b * t + 1)
  present = jax.ops.segment_sum((segment_ids > 0).reshape(-1).astype(jnp.int32), example,
                                num_segments=b * t + 1) > 0
  return jnp.sum(present & (wrong_per == 0)), jnp.sum(present)


def check_targets_len(config, targets_len: int):
  """UserError unless the decoder's rows fit model.max_len."""
  if not 1 <= targets_len <= config.model.max_len:
    raise UserError(f"targets length {targets_len} must be in 1..model.max_len="
                    f"{config.model.max_len}; adjust data.targets_len or data.seq_len")


@register("span_corruption")
class SpanCorruption(TextObjective):
  """T5 span corruption: reconstruct the dropped spans after their sentinels.

  The unit of tokens_per_s is the encoder input token.
  """

  def __init__(self, model_cfg: TransformerConfig, token_bytes: np.ndarray, *,
               targets_len: int = 0):
    del token_bytes
    self.cfg = model_cfg
    self.model = EncoderDecoder(model_cfg)
    self.targets_len = targets_len   # only for the FLOPs estimate

  @staticmethod
  def span_settings(config, tok) -> span_data.SpanSettings:
    d = config.data
    return span_data.SpanSettings.from_tokenizer(
        tok, noise_density=d.noise_density, mean_span_length=d.mean_noise_span_length)

  @classmethod
  def targets_length(cls, config, tok) -> int:
    """Decoder length of a row: what span corruption leaves of data.seq_len tokens."""
    _, targets_len, _ = span_data.span_lengths(config.data.seq_len, cls.span_settings(config, tok))
    return targets_len

  @classmethod
  def build(cls, config, tokenizer, options):
    targets_len = 0  # without a tokenizer (benchmarks): the FLOPs use seq_len targets
    if tokenizer is not None:
      targets_len = cls.targets_length(config, tokenizer)
      check_targets_len(config, targets_len)
    return cls(transformer_config(config), token_bytes(tokenizer, config.model.vocab_size),
               targets_len=targets_len, **options)

  def rows(self, source, seq_len, batch_size, seed, shard_index, shard_count):
    """Packed span-corrupted pieces (`tx_jax.data.span_corruption`)."""
    return span_data.span_train_iterator(source, self.tokenizer, seq_len, batch_size, seed,
                                         self._settings, shard_index, shard_count)

  def eval_rows(self, source, seq_len, batch_size):
    """The held-out documents, corrupted the same way at every call."""
    return span_data.span_eval_batches(source, self.tokenizer, seq_len, batch_size,
                                       self._settings)

  def train_iterator(self, config, data):
    self._settings = self.span_settings(config, self.tokenizer)
    return super().train_iterator(config, data)

  def eval_batches(self, config, data):
    self._settings = self.span_settings(config, self.tokenizer)
    return super().eval_batches(config, data)

  def init_params(self, rng, seq_len: int):
    """Parameters of the encoder-decoder for (1, seq_len) rows on both sides."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, tokens)["params"]

  def loss_fn(self, params, batch, rng, train: bool):
    logits, _ = self.model.apply(
        {"params": params}, batch["inputs"], batch["decoder_inputs"],
        inputs_positions=batch["inputs_positions"],
        inputs_segment_ids=batch["inputs_segment_ids"],
        decoder_positions=batch["targets_positions"],
        decoder_segment_ids=batch["targets_segment_ids"], deterministic=not train,
        rngs={"dropout": rng} if train else None)                          # (B, T, V)
    weights = batch["weights"]
    nll, correct = token_cross_entropy(logits, batch["targets"], weights)
    weight = jnp.sum(weights)
    exact, examples = exact_matches(logits, batch["targets"], batch["targets_segment_ids"])
    sums = {"nll": nll, "correct": correct, "weight": weight, "exact": exact,
            "examples": examples}
    return nll / jnp.maximum(weight, 1.0), sums

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["nll"]) / w, "accuracy": float(sums["correct"]) / w,
            "exact_match": float(sums["exact"]) / max(float(sums["examples"]), 1.0)}

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Random full rows for `tx-jax benchmark` (targets_len, else seq_len, targets)."""
    rng = np.random.default_rng(seed)
    t = self.targets_len or seq_len
    enc, dec = (batch_size, seq_len), (batch_size, t)
    targets = rng.integers(0, vocab, dec, dtype=np.int32)
    return {"inputs": rng.integers(0, vocab, enc, dtype=np.int32),
            "inputs_segment_ids": np.ones(enc, np.int32),
            "inputs_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), enc).copy(),
            "decoder_inputs": np.concatenate([np.zeros((batch_size, 1), np.int32),
                                              targets[:, :-1]], 1),
            "targets": targets, "targets_segment_ids": np.ones(dec, np.int32),
            "targets_positions": np.broadcast_to(np.arange(t, dtype=np.int32), dec).copy(),
            "weights": np.ones(dec, np.float32)}

  def flops_per_unit(self, params, seq_len: int) -> float:
    """Training FLOPs per encoder token: 6 x (encoder params + decoder params x T/S)
    plus attention (12·L·d per query-key row), for inputs S and targets T."""
    cfg, t = self.cfg, self.targets_len or seq_len
    n_enc = count_params(params.get("encoder", {}))
    n_rest = count_params(params) - n_enc    # decoder, embeddings and readout
    enc_layers = cfg.num_encoder_layers or cfg.num_layers
    attn = 12 * cfg.d_model * (enc_layers * seq_len + cfg.num_layers * (t + seq_len) * t / seq_len)
    return 6 * (n_enc + n_rest * t / seq_len) + attn

  def generate(self, trained, request: dict) -> list[str]:
    """Decodes the target of the prompt: greedy, or beam search with --beam-size > 1."""
    from tx_jax.generate import generate_seq2seq  # pylint: disable=g-import-not-at-top
    if request.get("prompt") is None:
      raise UserError("an encoder-decoder decodes the target of an input; pass --prompt TEXT")
    return [generate_seq2seq(trained, request["prompt"],
                             max_new_tokens=request.get("max_new_tokens"),
                             beam_size=request.get("beam_size", 1),
                             alpha=request.get("length_penalty", 0.6))]
