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
from tx_jax.train.setup import Experiment, get_tokenizer, make_objective


def _text_sources(config):
  d = config.data
  return sources.train_eval_sources(d.source, d.eval_source or None, 0.05, config.train.seed)


def _check_vocab(config, tok):
  if config.model.vocab_size < tok.vocab_size:
    raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def _host_slices(make_batches, eval_batches: int, batch_size: int):
  """eval_batches() factory: every host builds the same global batches, keeps its rows."""
  n_proc, pid = jax.process_count(), jax.process_index()
  local = batch_size // n_proc

  def batches():
    for i, batch in enumerate(make_batches()):
      if eval_batches and i >= eval_batches:
        return
      yield {k: v[pid * local:(pid + 1) * local] for k, v in batch.items()}
  return batches


def _experiment(config, tok, objective, units_per_batch, train_iterator, eval_batches):
  tx_lr = optim.lr_schedule(config.optim, config.train.steps)
  return Experiment(config, tok, objective, config.data.seq_len, units_per_batch,
                    train_iterator, eval_batches, lambda s: float(tx_lr(s)))


def masked_lm_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  """BERT: masked pieces of `data.source`; options in config.objective_options."""
  d, t = config.data, config.train
  train_source, eval_source = _text_sources(config)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  _check_vocab(config, tok)
  objective = make_objective(config, tok)
  settings = denoising.MaskedLMSettings.from_tokenizer(
      tok, mask_rate=d.mask_rate, mask_token_rate=d.mask_token_rate,
      random_token_rate=d.random_token_rate, sentence_order=objective.sentence_order)
  n_proc, pid = jax.process_count(), jax.process_index()
  return _experiment(
      config, tok, objective, t.batch_size * d.seq_len,
      lambda: denoising.mlm_train_iterator(train_source, tok, d.seq_len, t.batch_size // n_proc,
                                           t.seed, settings, pid, n_proc),
      _host_slices(lambda: denoising.mlm_eval_batches(eval_source, tok, d.seq_len,
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
  train_source, eval_source = _text_sources(config)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  _check_vocab(config, tok)
  settings = _span_settings(config, tok)
  _, targets_len, _ = denoising.span_lengths(d.seq_len, settings)
  _check_targets_len(config, targets_len)
  objective = make_objective(config, tok, targets_len=targets_len)
  n_proc, pid = jax.process_count(), jax.process_index()
  return _experiment(
      config, tok, objective, t.batch_size * d.seq_len,
      lambda: denoising.span_train_iterator(train_source, tok, d.seq_len, t.batch_size // n_proc,
                                            t.seed, settings, pid, n_proc),
      _host_slices(lambda: denoising.span_eval_batches(eval_source, tok, d.seq_len,
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
  _check_vocab(config, tok)
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
      _host_slices(lambda: denoising.pair_eval_batches(eval_source, tok, d.seq_len, targets_len,
                                                       t.batch_size, settings),
                   d.eval_batches, t.batch_size))
