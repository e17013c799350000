"""BERT (masked LM encoder) on CPython's documentation, by default.

Launch:
  tx-jax train --config configs/bert.py --workdir runs/bert            # tiny, CPU, minutes
  tx-jax train --config configs/bert.py:base --workdir /mnt/runs/bert   # BERT-base shape
  tx-jax eval --workdir runs/bert    # eval/accuracy = masked-token accuracy

Options: --config.objective_options.sentence_order=true (or sentence_task=sop)
adds ALBERT's sentence-order prediction head, sentence_task=nsp BERT's
next-sentence prediction; --config.data.source=file:docs.txt or
tfds:NAME:SPLIT trains on other text.

Expected: `tiny` (byte tokens, 4 layers, d 128, 600 steps of 16 x 128) reaches
held-out eval/accuracy 0.56 and eval/loss 1.64 on the masked bytes, against 0.175
for always predicting the most frequent byte and 3.29 nats for a unigram model
(benchmarks/text_baselines.py); it used 330 CPU-seconds, so under 6 minutes on
2 quiet CPU cores.
"""

import dataclasses

import ml_collections

from tx_jax.data.mlm import MLM_SPECIALS as SPECIALS  # <pad> <mask> <cls> <sep>
from tx_jax.models import ENCODER_SIZES, make_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.objective = "masked_lm"
  # MaskedLM keyword arguments: BERT's MLM transform head; sentence-order head.
  c.objective_options = ml_collections.ConfigDict(dict(mlm_head=True, sentence_order=False,
                                                      sentence_task=""))
  model = make_config(ENCODER_SIZES, size)
  if size == "base":
    # Scanned (one compiled layer, flat compile time in depth), matmul outputs kept.
    model = dataclasses.replace(model, dtype="bfloat16", dropout_rate=0.1, scan_layers=True,
                                remat="dots")
  c.model = ml_collections.ConfigDict(dataclasses.asdict(model))

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:python-docs:train", eval_source="embedded:python-docs:eval",
      tokenizer="byte" if model.vocab_size <= 256 + len(SPECIALS) else
      f"spm-train:{model.vocab_size - len(SPECIALS)}",
      specials=SPECIALS, seq_len=model.max_len, eval_batches=0,
      # BERT: 15% of non-special tokens; of those 80% [MASK], 10% random, 10% kept.
      mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1))

  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=16, seed=0, log_every=50, eval_every=300,
      checkpoint_every=300, keep_checkpoints=3, async_checkpoints=True, nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.98, eps=1e-6))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if size == "base":
    # BERT-base's recipe scale (256 x 512 for 1M steps); needs a prepared corpus.
    c.train.update(steps=1_000_000, batch_size=256, eval_every=5000, checkpoint_every=5000)
    c.data.update(source="tfds:lm1b:train", eval_source="tfds:lm1b:test", eval_batches=50)
    c.optim.update(lr=1e-4, warmup_steps=10_000, b2=0.999)
  return c
