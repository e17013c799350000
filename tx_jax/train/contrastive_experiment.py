"""Experiment builder for the span-contrastive objective (registered in `setup._KNOWN`).

Train batches are span pairs of `data.source` (`tx_jax.data.spans`); the generic
loop trains, evaluates (held-out InfoNCE loss and span-retrieval accuracy),
checkpoints and resumes it like the causal LM.
"""

from __future__ import annotations

import jax

from tx_jax.data import spans
from tx_jax.train import optim
from tx_jax.train.setup import (Experiment, check_vocab, get_tokenizer, host_eval_batches,
                                 make_objective, text_sources)


def contrastive_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  d, t = config.data, config.train
  train_source, eval_source = text_sources(config)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  check_vocab(config, tok)
  objective = make_objective(config, tok)  # objective_options.temperature
  n_proc, pid = jax.process_count(), jax.process_index()
  local_bs = t.batch_size // n_proc
  min_span = d.get("min_span", 8)

  def train_iterator():
    return spans.span_train_iterator(train_source, tok, d.seq_len, local_bs, t.seed, min_span,
                                     shard_index=pid, shard_count=n_proc)

  eval_batches = host_eval_batches(
      lambda: spans.span_eval_batches(eval_source, tok, d.seq_len, t.batch_size, min_span),
      d.eval_batches, t.batch_size)

  tx_lr = optim.lr_schedule(config.optim, t.steps)
  return Experiment(config, tok, objective, d.seq_len, 2 * t.batch_size * d.seq_len,
                    train_iterator, eval_batches, lambda s: float(tx_lr(s)))
