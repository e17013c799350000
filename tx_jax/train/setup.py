"""Builds what a run needs from its config: tokenizer, data, objective, state shapes.

Shared by training, evaluation and inference (generate, embed), so a trained
model is always rebuilt by exactly the code that trained it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.data import pipeline, sources, tokenizers
from tx_jax.data.doc_policy import DocPolicy
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
  data_stats: dict = dataclasses.field(default_factory=dict)  # what the DocPolicy did
  # Optional evaluation beyond the loss (probes, images): (params, step, workdir)
  # -> metrics, logged as eval/<name> at every eval.
  extra_eval: Callable[[object, int, str], dict] | None = None

  def meta(self) -> dict:
    return {"objective": self.config.objective, "model": self.config.model.to_dict(),
            "tokenizer": self.tokenizer.fingerprint() if self.tokenizer else None}


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
    if jax.process_index() == 0:  # one writer on the shared workdir; the others wait
      tokenizers.train_sentencepiece(texts, vocab, os.path.join(workdir, "spm"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tx_jax: spm tokenizer trained")
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
  builder = _KNOWN[config.objective]
  if isinstance(builder, str):  # "module:function", imported on use
    module, name = builder.split(":")
    builder = getattr(importlib.import_module(module), name)
  return builder(config, workdir, create_tokenizer)


def make_objective(config, tok, **extra):
  """The configured objective; `config.objective_options` are its keyword arguments."""
  options = dict(config.get("objective_options") or {})
  cls = get_objective(config.objective)
  accepted = inspect.signature(cls).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise UserError(f"objective_options {unknown} are not options of {config.objective!r}; "
                    f"it takes {sorted(set(accepted) - {'model_cfg', 'token_bytes'})}")
  if cls.data_kind == "images":  # ViT configs from config.model, inputs from config.data
    from tx_jax.train import experiments_images  # imports this module
    return experiments_images.image_objective(cls, config, options, extra)
  return cls(config_lib.model_config(config), _padded_bytes(tok, config.model.vocab_size),
             **options, **extra)


def check_vocab(config, tok):
  """The model's vocabulary must hold every token id the tokenizer makes."""
  if config.model.vocab_size < tok.vocab_size:
    raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def text_sources(config):
  """(train, eval) text sources of a run under the config's document policy."""
  d = config.data
  return sources.train_eval_sources(d.source, d.eval_source or None, 0.05, config.train.seed,
                                    DocPolicy.from_config(d))


def host_eval_batches(make_batches, limit: int, batch_size: int):
  """eval_batches() factory: every host builds the same global batches (at most
  `limit`, 0 = all) and keeps its own rows."""
  n_proc, pid = jax.process_count(), jax.process_index()
  local = batch_size // n_proc

  def batches():
    for i, batch in enumerate(make_batches()):
      if limit and i >= limit:
        return
      yield {k: v[pid * local:(pid + 1) * local] for k, v in batch.items()}
  return batches


def _lm_experiment(config, workdir: str, create_tokenizer: bool) -> Experiment:
  d, t = config.data, config.train
  policy = DocPolicy.from_config(d)
  train_source = sources.open_source(d.source, policy)
  eval_source = sources.open_source(d.eval_source, policy) if d.eval_source else None
  data_stats = {"train": train_source.stats,
                **({"eval": eval_source.stats} if eval_source else {})}
  if eval_source is None:
    train_source, eval_source = sources.holdout_split(train_source, 0.05, t.seed)
  tok = get_tokenizer(config, workdir, create_tokenizer, train_source)
  check_vocab(config, tok)
  objective = make_objective(config, tok)
  shards, shard_count = process_shards(config)

  def train_iterator():
    per_shard = [pipeline.lm_train_iterator(train_source, tok, d.seq_len,
                                            t.batch_size // shard_count, t.seed,
                                            shard_index=i, shard_count=shard_count)
                 for i in shards]
    return per_shard[0] if len(per_shard) == 1 else pipeline.ConcatRows(per_shard)

  eval_batches = host_eval_batches(
      lambda: pipeline.lm_eval_batches(eval_source, tok, d.seq_len, t.batch_size),
      d.eval_batches, t.batch_size)
  tx_lr = optim.lr_schedule(config.optim, t.steps)
  return Experiment(config, tok, objective, d.seq_len, t.batch_size * d.seq_len,
                    train_iterator, eval_batches, lambda s: float(tx_lr(s)), data_stats)


def process_shards(config) -> tuple[list[int], int]:
  """The data shards this process reads, and how many there are in all.

  `data.shards` disjoint slices of the documents (0 = one per process) each
  give batch_size / shards rows of every global batch; process p reads the
  p-th consecutive share of them. Pinning data.shards keeps the global batches
  identical when the number of processes changes (a 1-process run with
  data.shards=2 sees what 2 processes see).
  """
  n_proc, pid = jax.process_count(), jax.process_index()
  count = config.data.get("shards", 0) or n_proc
  if count % n_proc or config.train.batch_size % count:
    raise UserError(f"data.shards={count} must be a multiple of the {n_proc} processes and "
                    f"divide train.batch_size={config.train.batch_size}")
  per_process = count // n_proc
  return list(range(pid * per_process, (pid + 1) * per_process)), count


def _padded_bytes(tok, vocab_size: int) -> np.ndarray:
  table = np.zeros(vocab_size, np.float32)
  lengths = tok.token_byte_lengths()
  table[:len(lengths)] = lengths
  return table


def uses_tokenizer(config) -> bool:
  return get_objective(config.objective).data_kind != "images"


_KNOWN: dict[str, Callable | str] = {
    "causal_lm": _lm_experiment,
    "masked_lm": "tx_jax.train.experiments_text:masked_lm_experiment",
    "span_corruption": "tx_jax.train.experiments_text:span_corruption_experiment",
    "seq2seq": "tx_jax.train.experiments_text:seq2seq_experiment",
    "mae": "tx_jax.train.experiments_images:mae_experiment",
    "contrastive": "tx_jax.train.contrastive_experiment:contrastive_experiment",
}


def init_state(objective, tx, init_len: int, seed: int, boxed: bool = False) -> TrainState:
  """A fresh TrainState; with boxed=True leaves keep their logical-axis boxes."""
  rng = jax.random.key(seed)
  boxed_params = objective.init_params(rng, init_len)
  params = nn.unbox(boxed_params)
  opt_state = tx.init(params)
  if boxed:  # optimizer moments mirror the params' boxes so they shard like them
    params, opt_state = boxed_params, _box_like(opt_state, boxed_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32),
                    skip_run=jnp.zeros((), jnp.int32))


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
  """Config, tokenizer, objective and newest intact params of a workdir, for inference.

  Read-only: a corrupt newest checkpoint is reported and the one before it used.
  """
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} does not exist; train first with tx-jax train")
  config = config_lib.load_workdir_config(workdir)
  tok = get_tokenizer(config, workdir, create=False) if uses_tokenizer(config) else None
  objective = make_objective(config, tok)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"{workdir!r} has no checkpoint yet; train first with tx-jax train")
  with ckpt_lib.Checkpointer(directory, async_save=False, read_only=True) as checkpointer:
    step, _ = checkpointer.newest_good_step()
    if step is None:
      raise UserError(f"{workdir!r} has no checkpoint yet; train first with tx-jax train")
    mesh = mesh or parallel.make_mesh(
        type("M", (), {"data": 1, "fsdp": 1, "tensor": 1})(), devices=jax.devices()[:1])
    rules = parallel.resolve_rules(config.mesh.rules)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    boxed = state_shapes(objective, tx, config.data.get("seq_len", 1), config.train.seed)
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = ckpt_lib.abstract_with_shardings(parallel.strip_boxes(boxed), shardings)
    checkpointer.check_compatible(step, abstract, {
        "objective": config.objective, "model": config.model.to_dict(),
        "tokenizer": tok.fingerprint() if tok else None})
    state, _ = checkpointer.restore(step, abstract)
  return Trained(config, tok, objective, state.params, step)
