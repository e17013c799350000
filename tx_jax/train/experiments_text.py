"""Experiment builders for the encoder objectives: masked LM, span corruption, seq2seq.

Registered by name in `setup._KNOWN`; each returns a `setup.Experiment` whose
iterators come from `tx_jax.data.denoising`, so the generic loop trains,
evaluates, checkpoints and resumes them like the causal LM.
"""

from __future__ import annotations

import jax

from tx_jax.data import denoising, pairs, sources
from tx_jax.errors import UserError
from tx_jax.train import optim
from tx_jax.train.setup import (Experiment, check_vocab, get_tokenizer, host_eval_batches,
                                 make_objective, text_sources)


def _experiment(config, tok, objective, units_per_batch, train_iterator, eval_batches):
  tx_lr = optim.lr_schedule(config.optim, config.train.steps)
  return Experiment(config, tok, objective, config.data.seq_len, units_per_batch,
                    train_iterator, eval_batches, lambda s: float(tx_lr(s)))


def masked_lm_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  """BERT: masked pieces of `data.source`; options in config.objective_options."""
  d, t = config.data, config.train
  train_source, eval_source = text_sources(config)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  check_vocab(config, tok)
  objective = make_objective(config, tok)
  settings = denoising.MaskedLMSettings.from_tokenizer(
      tok, mask_rate=d.mask_rate, mask_token_rate=d.mask_token_rate,
      random_token_rate=d.random_token_rate, sentence_order=objective.sentence_order)
  n_proc, pid = jax.process_count(), jax.process_index()
  return _experiment(
      config, tok, objective, t.batch_size * d.seq_len,
      lambda: denoising.mlm_train_iterator(train_source, tok, d.seq_len, t.batch_size // n_proc,
                                           t.seed, settings, pid, n_proc),
      host_eval_batches(lambda: denoising.mlm_eval_batches(eval_source, tok, d.seq_len,
                                                      t.batch_size, settings),
                   d.eval_batches, t.batch_size))


def _span_settings(config, tok):
  d = config.data
  return denoising.SpanSettings.from_tokenizer(
      tok, noise_density=d.noise_density, mean_span_length=d.mean_noise_span_length)


def _check_targets_len(config, targets_len: int):
  if not 1 <= targets_len <= config.model.max_len:
    raise UserError(f"targets length {targets_len} must be in 1..model.max_len="
                    f"{config.model.max_len}; adjust data.targets_len or data.seq_len")


def span_corruption_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  """T5: span-corrupted pieces of `data.source`; targets length from data.seq_len."""
  d, t = config.data, config.train
  train_source, eval_source = text_sources(config)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  check_vocab(config, tok)
  settings = _span_settings(config, tok)
  _, targets_len, _ = denoising.span_lengths(d.seq_len, settings)
  _check_targets_len(config, targets_len)
  objective = make_objective(config, tok, targets_len=targets_len)
  n_proc, pid = jax.process_count(), jax.process_index()
  return _experiment(
      config, tok, objective, t.batch_size * d.seq_len,
      lambda: denoising.span_train_iterator(train_source, tok, d.seq_len, t.batch_size // n_proc,
                                            t.seed, settings, pid, n_proc),
      host_eval_batches(lambda: denoising.span_eval_batches(eval_source, tok, d.seq_len,
                                                       t.batch_size, settings),
                   d.eval_batches, t.batch_size))


def seq2seq_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  """Supervised pairs from `file:` .jsonl/.csv with input/target columns."""
  d, t = config.data, config.train
  train_source = pairs.open_pair_source(d.source)
  if d.eval_source:
    eval_source = pairs.open_pair_source(d.eval_source)
  else:
    train_source, eval_source = sources.holdout_split(train_source, 0.05, t.seed)
  texts = None
  if create_tokenizer and d.tokenizer.startswith("spm-train:"):  # trained on both sides
    texts = sources.ListSource([train_source[i][k] for i in range(len(train_source))
                                for k in ("input", "target")])
  tok = get_tokenizer(config, workdir, create_tokenizer, texts)
  check_vocab(config, tok)
  settings = _span_settings(config, tok)
  targets_len = d.targets_len or d.seq_len
  _check_targets_len(config, targets_len)
  objective = make_objective(config, tok, targets_len=targets_len)
  n_proc, pid = jax.process_count(), jax.process_index()
  return _experiment(
      config, tok, objective, t.batch_size * d.seq_len,
      lambda: denoising.pair_train_iterator(train_source, tok, d.seq_len, targets_len,
                                            t.batch_size // n_proc, t.seed, settings, pid,
                                            n_proc),
      host_eval_batches(lambda: denoising.pair_eval_batches(eval_source, tok, d.seq_len, targets_len,
                                                       t.batch_size, settings),
                   d.eval_batches, t.batch_size))
