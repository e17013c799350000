"""GPT (decoder-only causal LM) on CPython's documentation, by default.

Launch:
  tx-jax train --config configs/gpt.py --workdir runs/gpt            # tiny, CPU, minutes
  tx-jax train --config configs/gpt.py:124m --workdir /mnt/runs/gpt2 # GPT-2 small shape
  tx-jax benchmark --config configs/gpt.py:bench
  tx-jax plan --config configs/gpt.py:1b --topology v5p:2x2x2   # 1.3B: what fits where

Expected: `tiny` (800 steps of 16 x 128 tokens) reaches eval/bits_per_byte
about 2.25 on the held-out topics; 1000 steps gave 2.19 in 9.5 CPU-minutes on
2 cores (a byte bigram model gets about 3.8).
"""

import dataclasses

import ml_collections

from tx_jax.models import DECODER_SIZES, make_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.objective = "causal_lm"
  model = make_config(DECODER_SIZES, size)
  if size in ("124m", "1b"):
    model = dataclasses.replace(model, dtype="bfloat16", scan_layers=True, remat="dots")
  c.model = ml_collections.ConfigDict(dataclasses.asdict(model))

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:python-docs:train", eval_source="embedded:python-docs:eval",
      # A SentencePiece trained on the train split (lossless: bits per byte stay exact).
      tokenizer="byte" if model.vocab_size <= 256 else f"spm-train:{model.vocab_size}",
      seq_len=model.max_len, eval_batches=0,
      # Documents longer than max_doc_len characters are cut into pieces ("chunk")
      # or cut off ("truncate"); invalid UTF-8 in data files is an "error", or
      # each affected document is "replace"d (U+FFFD) or "skip"ped. Counts go to
      # <workdir>/data_stats.json.
      max_doc_len=1_000_000, over_length="chunk", invalid_utf8="error",
      # Disjoint document shards behind every global batch (0 = one per process);
      # pin it to keep the data identical when the number of hosts changes.
      shards=0))

  c.train = ml_collections.ConfigDict(dict(
      steps=800, batch_size=16, seed=0, log_every=25, eval_every=200,
      checkpoint_every=200, keep_checkpoints=3, async_checkpoints=True,
      # Non-finite loss/gradients: "skip" leaves the state unchanged and stops the
      # run after max_consecutive_skips in a row; "stop" stops at the first one.
      nonfinite="skip", max_consecutive_skips=10))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.95, eps=1e-8))

  # Mesh sizes (-1 fills the remaining devices) and the logical-axis rules preset.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if size == "124m":
    c.train.update(steps=600_000, batch_size=512, eval_every=2000, checkpoint_every=2000)
    c.data.update(source="tfds:lm1b:train", eval_source="tfds:lm1b:test", eval_batches=50)
    # 512 rows in 4 micro-batches: on a v5e-16, 32 whole rows per chip make float32
    # logits (and their gradient) of 6 GiB each, past its 16 GiB (README, `tx-jax plan`).
    c.optim.update(lr=6e-4, warmup_steps=2000, accumulate_steps=4)
  if size == "1b":
    # GPT-3 XL's recipe scale: 1M-token batches (512 x 2048), lr 2e-4; FSDP over all chips.
    c.train.update(steps=300_000, batch_size=512, eval_every=2000, checkpoint_every=1000)
    c.data.update(source="tfds:lm1b:train", eval_source="tfds:lm1b:test", eval_batches=50)
    # 4 micro-batches of 128 rows: a v5p-8 holds 16 rows of 2048 tokens per chip at once.
    c.optim.update(lr=2e-4, warmup_steps=2000, accumulate_steps=4)
    c.mesh.update(data=1, fsdp=-1)
  if size == "bench":
    c.train.update(batch_size=8)
    c.optim.update(warmup_steps=100)
  return c
