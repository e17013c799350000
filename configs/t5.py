"""T5 (encoder-decoder, span corruption) on CPython's documentation, by default.

Launch:
  tx-jax train --config configs/t5.py --workdir runs/t5             # tiny, CPU, minutes
  tx-jax train --config configs/t5.py:base --workdir /mnt/runs/t5     # original T5-base shape
  tx-jax generate --workdir runs/t5 --prompt "Return the <extra_id_0> of x." --beam-size 4

Supervised seq2seq (e.g. translation) on pairs, 5% held out for eval:
  tx-jax train --config configs/t5.py:seq2seq --workdir runs/mt \
      --config.data.source=file:pairs.jsonl    # lines {"input": ..., "target": ...}

Span corruption follows T5: 15% noise in spans of mean length 3, each span
replaced by a sentinel <extra_id_k> in the inputs; the targets list each
sentinel and its span, then </s>. Pieces are cut so the corrupted inputs fill
data.seq_len exactly; the targets length follows (128 -> 29, 512 -> 114).
Sentinels are specials after the base vocabulary (ids ascending from
<extra_id_0>; T5's SentencePiece vocabulary counts down from the top instead).

Expected: `tiny` (byte tokens, 3 + 2 layers, d 128, 600 steps of 16 x 128
inputs / 29 targets) ends with eval/loss 2.50 nats per target token against
3.55 for a unigram model of the training targets, eval/accuracy 0.35 against
0.13 for the most frequent target token (benchmarks/text_baselines.py); it
used 295 CPU-seconds, so under 5 minutes on 2 quiet CPU cores.
"""

import dataclasses

import ml_collections

from tx_jax.data.span_corruption import t5_specials
from tx_jax.models import ENC_DEC_SIZES, make_config

NUM_SENTINELS = 100   # as T5


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """arg: "tiny" | "base", optionally ",seq2seq" ("seq2seq" alone = tiny)."""
  parts = (arg or "tiny").split(",")
  seq2seq = "seq2seq" in parts
  size = ([p for p in parts if p != "seq2seq"] or ["tiny"])[0]
  c = ml_collections.ConfigDict()
  c.objective = "seq2seq" if seq2seq else "span_corruption"
  c.objective_options = ml_collections.ConfigDict()
  model = make_config(ENC_DEC_SIZES, size)
  if size == "base":
    # Scanned stacks (one compiled layer each), matmul outputs kept.
    model = dataclasses.replace(model, dtype="bfloat16", dropout_rate=0.1, scan_layers=True,
                                remat="dots")
  c.model = ml_collections.ConfigDict(dataclasses.asdict(model))

  specials = t5_specials(NUM_SENTINELS)   # <pad> (decoder start), </s>, <extra_id_0..99>
  c.data = ml_collections.ConfigDict(dict(
      source="embedded:python-docs:train", eval_source="embedded:python-docs:eval",
      # T5-base: 32,000 SentencePiece pieces + 102 specials, padded to 32,128.
      tokenizer="byte" if model.vocab_size <= 256 + len(specials) else "spm-train:32000",
      specials=specials, seq_len=model.max_len, eval_batches=0,
      noise_density=0.15, mean_noise_span_length=3.0,
      targets_len=0))   # seq2seq only: 0 = data.seq_len (span corruption computes its own)

  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=16, seed=0, log_every=50, eval_every=300,
      checkpoint_every=300, keep_checkpoints=3, async_checkpoints=True, nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.98, eps=1e-8))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if seq2seq:  # pairs from data.source (required); 5% held out unless eval_source is set
    c.data.update(source="", eval_source="")
  if size == "base":
    # T5's pretraining scale: 2^11 rows of 512 tokens for 2^19 steps.
    c.train.update(steps=524_288, batch_size=2048, eval_every=5000, checkpoint_every=5000)
    c.data.update(source="tfds:lm1b:train", eval_source="tfds:lm1b:test", eval_batches=50)
    c.optim.update(lr=1e-3, warmup_steps=10_000)
  return c
