"""Span-contrastive encoder (two spans of a document embed alike), for clustering.

Launch:
  tx-jax train --config configs/contrastive.py --workdir runs/spans
  tx-jax embed --workdir runs/spans --data embedded:stdlib-docstrings --out spans.npz
  tx-jax analyze --embeddings spans.npz --out report --k 18
  tx-jax topics --data file:posts.csv --out DIR --objective contrastive   # all of the above

Self-supervised on the stdlib docstrings themselves (their package labels are
never used). Measured (benchmarks/results/stdlib_docstrings.md, topics-sized
model: 2 layers, d 128, 2,000 SentencePiece pieces): after 600 steps held-out
eval/accuracy (the partner span is the nearest of the batch of 64) 0.81 and
k-means (k 18) NMI 0.27 on pre_logits, 0.29 on block_00; resumed to 1,200 steps,
0.84 and NMI 0.31 on pre_logits, 0.32 on `--layer block_00` (mean pooling), above
TF-IDF + k-means (0.30). This config's own 1,500 steps (one schedule): 0.83 and
NMI 0.316 on pre_logits, 0.327 on `--layer block_00` (means over 5 k-means seeds).
"""

import dataclasses

import ml_collections

from tx_jax.models import TransformerConfig


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown size {arg!r}; use tiny")
  c = ml_collections.ConfigDict()
  c.objective = "contrastive"
  c.objective_options = ml_collections.ConfigDict(dict(temperature=0.05))  # InfoNCE
  # A bidirectional Encoder; 2 layers, d 128: minutes on 2 CPU cores.
  c.model = ml_collections.ConfigDict(dataclasses.asdict(TransformerConfig(
      vocab_size=2000, num_layers=2, d_model=128, num_heads=2, mlp_dim=512, max_len=64,
      dropout_rate=0.1).validate()))

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:stdlib-docstrings", eval_source="", tokenizer="spm-train:2000",
      seq_len=64,         # the longest span, and the context `tx-jax embed` uses
      min_span=8,         # the shortest span (tokens), unless the document is shorter
      eval_batches=0))

  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=64, seed=0, log_every=50, eval_every=500,
      checkpoint_every=500, keep_checkpoints=3, async_checkpoints=True, nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.98, eps=1e-6))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))
  return c
