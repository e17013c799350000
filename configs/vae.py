"""Transformer-VAE on sentences of CPython's documentation, by default.

Launch:
  tx-jax train --config configs/vae.py --workdir runs/vae            # tiny, CPU, minutes
  tx-jax generate --workdir runs/vae --num-samples 5                 # from the prior
  tx-jax generate --workdir runs/vae --interpolate "A" "B" --num-samples 5
  tx-jax generate --workdir runs/vae --reconstruct "Return the value." --temperature 0
  tx-jax embed --workdir runs/vae --data embedded:stdlib-docstrings --out mu.npz
  tx-jax train --config configs/vae.py:base --workdir /mnt/runs/vae  # accelerator size

Each python-docs topic is cut into sentences (`vae.units`), one per row of
`data.seq_len` tokens (<s> sentence </s>). Against posterior collapse: a
linear KL warm-up, free bits per latent dim and decoder word dropout (see
tx_jax/objectives/vae.py). benchmarks/vae_text.py trains this config and the
same decoder without z (`--config.vae.unconditional=true`) and records the
held-out numbers in benchmarks/results/vae_text.md.

Expected (`tiny`, 600 steps of 128 sentences, measured alone on a 2-core CPU in
8 min 17 s, 926 CPU seconds): eval/kl 61.7 nats per sentence, eval/active_units 32
of 32, eval/mutual_info 5.98 nats (the estimator's ceiling is log of the 463 eval
sentences, 6.1), eval/reconstruction_loss 3.214 nats/token against 3.438 for the
same decoder without z, eval/elbo_bits_per_byte 2.89 (the decoder alone: 1.92).
Batch 32 (the default before) left z almost unused (3.600 against 3.649): the
model had seen too few sentences, with or without KL pressure. Measured and left
off (benchmarks/results/vae_text.md): word dropout, a bag-of-words loss, a smaller
initial posterior sigma, z as cross-attention memory (`vae.memory_slots`).
"""

import dataclasses

import ml_collections

from tx_jax.models import VAE_SIZES, TransformerConfig, VAEConfig

SPECIALS = ["<s>", "</s>", "<unk>"]   # start, end, word-dropout token


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size = arg or "tiny"
  if size not in VAE_SIZES:
    raise ValueError(f"unknown size {size!r}; use one of {sorted(VAE_SIZES)}")
  c = ml_collections.ConfigDict()
  c.objective = "vae"
  model = TransformerConfig(**VAE_SIZES[size]["model"]).validate()
  c.model = ml_collections.ConfigDict(dataclasses.asdict(model))
  latent = VAEConfig(**VAE_SIZES[size]["vae"])

  c.vae = ml_collections.ConfigDict(dict(
      latent_dim=latent.latent_dim,
      init_log_sigma=latent.init_log_sigma,  # q(z|x)'s log sigma at step 0
      memory_slots=latent.memory_slots,      # K > 0: z also as K cross-attention vectors
      units="sentences",        # or "documents" (data already one sentence per record)
      kl_schedule="linear",     # linear | cyclical | constant
      kl_warmup_steps=200,      # linear: beta reaches 1 here
      kl_cycles=4,              # cyclical: cycles over train.steps ...
      kl_cycle_ratio=0.5,       # ... each rising over this fraction of it
      free_bits=2.0,            # nats per latent dim that KL does not pay for
      word_dropout=0.0,         # decoder inputs replaced by <unk> (0.25 measured worse)
      bow_weight=0.0,           # bag-of-words loss from z (Zhao et al. 2017); 0: no head
      unconditional=False,      # true: the same decoder with z = 0, no KL (the baseline)
      mutual_info=True))        # eval/mutual_info over the eval set at every eval

  c.data = ml_collections.ConfigDict(dict(
      source="embedded:python-docs:train", eval_source="embedded:python-docs:eval",
      # SentencePiece pieces + the 3 specials = model.vocab_size.
      tokenizer=f"spm-train:{model.vocab_size - len(SPECIALS)}", specials=SPECIALS,
      seq_len=model.max_len, eval_batches=0,
      max_doc_len=1_000_000, over_length="chunk", invalid_utf8="error", shards=0))

  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=128, seed=0, log_every=25, eval_every=200,
      checkpoint_every=200, keep_checkpoints=3, async_checkpoints=True,
      nonfinite="skip", max_consecutive_skips=10))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.95, eps=1e-8))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))

  if size == "base":
    c.vae.update(kl_warmup_steps=10_000)
    c.train.update(steps=100_000, batch_size=256, eval_every=2000, checkpoint_every=2000)
    c.data.update(source="tfds:lm1b:train", eval_source="tfds:lm1b:test", eval_batches=50)
    c.vae.update(units="documents")   # lm1b is one sentence per record
    c.optim.update(lr=5e-4, warmup_steps=2000)
  return c
