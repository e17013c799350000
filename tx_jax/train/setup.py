"""Builds what a run needs from its config: tokenizer, data, objective, state shapes.

Shared by training, evaluation and inference (generate, embed), so a trained
model is always rebuilt by exactly the code that trained it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.data import pipeline, sources, tokenizers
from tx_jax.errors import UserError
from tx_jax.objectives import get_objective
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import optim
from tx_jax.train.state import TrainState


@dataclasses.dataclass
class Experiment:
  """Everything objective-specific the loop needs, behind a small interface."""
  config: object
  tokenizer: object
  objective: object
  init_len: int                         # sequence length used to initialise params
  units_per_batch: int                  # tokens (or images) per global batch
  train_iterator: Callable[[], object]  # per-host iterator with get_state/set_state
  eval_batches: Callable[[], Iterator[dict]]
  lr: Callable[[int], float]

  def meta(self) -> dict:
    return {"objective": self.config.objective, "model": self.config.model.to_dict(),
            "tokenizer": self.tokenizer.fingerprint()}


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def get_tokenizer(config, workdir: str, create: bool, train_source=None):
  """The workdir's tokenizer; created from `data.tokenizer` on the first run.

  `data.tokenizer` is "byte", "spm:PATH.model" (an existing SentencePiece
  model) or "spm-train:N" (train an N-piece SentencePiece on the train data).
  """
  path = tokenizer_dir(workdir)
  specials = tuple(config.data.get("specials", ()))
  if os.path.isdir(path):
    return tokenizers.load_tokenizer(path)
  if not create:
    raise UserError(f"{workdir!r} holds no tokenizer/: is it a tx-jax train workdir?")
  spec = config.data.tokenizer
  if spec.startswith("spm-train:"):
    try:
      vocab = int(spec.split(":", 1)[1])
    except ValueError:
      raise UserError(f"data.tokenizer={spec!r}: expected spm-train:VOCAB_SIZE") from None
    texts = (train_source[i]["text"] for i in range(len(train_source)))
    tok = tokenizers.train_sentencepiece(texts, vocab, os.path.join(workdir, "spm"))
    tok = tokenizers.make_tokenizer(f"spm:{os.path.join(workdir, 'spm.model')}", specials)
  else:
    tok = tokenizers.make_tokenizer(spec, specials)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
  return tok


def build_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  if config.objective not in _KNOWN:
    raise UserError(f"objective {config.objective!r} is unknown; choose one of {sorted(_KNOWN)}")
  return _KNOWN[config.objective](config, workdir, create_tokenizer)


def _lm_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  d, t = config.data, config.train
  train_source = sources.open_source(d.source)
  eval_source = sources.open_source(d.eval_source) if d.eval_source else None
  if eval_source is None:
    train_source, eval_source = sources.holdout_split(train_source, 0.05, t.seed)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  if config.model.vocab_size < tok.vocab_size:
    raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
  objective = get_objective(config.objective)(config_lib.model_config(config),
                                              _padded_bytes(tok, config.model.vocab_size))
  n_proc, pid = jax.process_count(), jax.process_index()
  local_bs = t.batch_size // n_proc

  def train_iterator():
    return pipeline.lm_train_iterator(train_source, tok, d.seq_len, local_bs, t.seed,
                                      shard_index=pid, shard_count=n_proc)

  def eval_batches():
    # Every host builds the same global batches and keeps its rows.
    for i, batch in enumerate(pipeline.lm_eval_batches(eval_source, tok, d.seq_len,
                                                       t.batch_size)):
      if d.eval_batches and i >= d.eval_batches:
        return
      yield {k: v[pid * local_bs:(pid + 1) * local_bs] for k, v in batch.items()}

  tx_lr = optim.lr_schedule(config.optim, t.steps)
  return Experiment(config, tok, objective, d.seq_len, t.batch_size * d.seq_len,
                    train_iterator, eval_batches, lambda s: float(tx_lr(s)))


def _padded_bytes(tok, vocab_size: int) -> np.ndarray:
  table = np.zeros(vocab_size, np.float32)
  lengths = tok.token_byte_lengths()
  table[:len(lengths)] = lengths
  return table


def _contrastive_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  from tx_jax.train import contrastive_experiment  # imports this module
  return contrastive_experiment.contrastive_experiment(config, workdir, create_tokenizer)


_KNOWN: dict[str, Callable] = {"causal_lm": _lm_experiment,
                               "contrastive": _contrastive_experiment}


def init_state(objective, tx, init_len: int, seed: int, boxed: bool = False) -> TrainState:
  """A fresh TrainState; with boxed=True leaves keep their logical-axis boxes."""
  rng = jax.random.key(seed)
  boxed_params = objective.init_params(rng, init_len)
  params = nn.unbox(boxed_params)
  opt_state = tx.init(params)
  if boxed:  # optimizer moments mirror the params' boxes so they shard like them
    params, opt_state = boxed_params, _box_like(opt_state, boxed_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32))


def state_shapes(objective, tx, init_len: int, seed: int):
  """Abstract TrainState with logical-partition boxes (no memory allocated)."""
  return jax.eval_shape(lambda: init_state(objective, tx, init_len, seed, boxed=True))


def _box_like(opt_state, boxed_params):
  """Re-attaches the params' logical names to every params-shaped subtree of opt_state."""
  params_def = jax.tree_util.tree_structure(parallel.strip_boxes(boxed_params))
  boxes = jax.tree_util.tree_leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

  def visit(node):
    if jax.tree_util.tree_structure(node) == params_def:
      leaves = jax.tree_util.tree_leaves(node)
      return jax.tree_util.tree_unflatten(
          params_def, [b.replace_boxed(l) if isinstance(b, nn.Partitioned) else l
                       for b, l in zip(boxes, leaves)])
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(c) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(c) for c in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return node
  return visit(opt_state)


@dataclasses.dataclass
class Trained:
  config: object
  tokenizer: object
  objective: object
  params: object
  step: int


def load_trained(workdir: str, mesh=None) -> Trained:
  """Config, tokenizer, objective and newest params of a workdir, for inference."""
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} does not exist; train first with tx-jax train")
  config = config_lib.load_workdir_config(workdir)
  tok = get_tokenizer(config, workdir, create=False)
  objective = get_objective(config.objective)(config_lib.model_config(config),
                                              _padded_bytes(tok, config.model.vocab_size))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise UserError(f"{workdir!r} has no checkpoint yet; train first with tx-jax train")
  mesh = mesh or parallel.make_mesh(
      type("M", (), {"data": 1, "fsdp": 1, "tensor": 1})(), devices=jax.devices()[:1])
  rules = parallel.resolve_rules(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  boxed = state_shapes(objective, tx, config.data.get("seq_len", 1), config.train.seed)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = ckpt_lib.abstract_with_shardings(parallel.strip_boxes(boxed), shardings)
  state, _, _ = checkpointer.restore(step, abstract)
  checkpointer.close()
  return Trained(config, tok, objective, state.params, step)
