"""What every text objective shares: sources, tokenizer checks, sharded batches,
token cross-entropy, the Transformer FLOPs formula, and embedding text.

A text objective subclasses `TextObjective` and supplies its batch format as
two methods, `rows(source, seq_len, batch_size, seed, shard_index,
shard_count)` (a resumable train iterator of one data shard) and
`eval_rows(source, seq_len, batch_size)` (the global eval batches, in
order); the sharding over processes, the eval slicing and the learning
signal's bookkeeping are done here once.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.data import pipeline, sources
from tx_jax.data.doc_policy import DocPolicy
from tx_jax.errors import UserError
from tx_jax.models import EncoderDecoder, TransformerConfig, count_params
from tx_jax.objectives.base import Data, Objective

POOLINGS = ("mean", "cls", "last")
MIN_BUCKET = 16  # Shortest padded length of a batch of text to embed.
EVAL_FRACTION = 0.05  # Held out of data.source when there is no data.eval_source.


# ------------------------------------------------------------------ shared math


def token_cross_entropy(logits, targets, weights):
  """Summed weighted cross-entropy (nats) and weighted correct count over (B, T)."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)    # (B, T)
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return jnp.sum(nll * weights), jnp.sum(correct)


def transformer_flops(params, cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12·L·d·T (nanoGPT / PaLM appendix B)."""
  return 6 * count_params(params) + 12 * cfg.num_layers * cfg.d_model * seq_len


def pool(hidden, segment_ids, pooling: str):
  """Pools hidden (B, T, D) over real tokens (segment_ids > 0) -> (B, D) float32.

  mean: average of the real tokens; cls: the first token; last: the last real
  token (real tokens are left-aligned). Rows without a real token pool to zeros.
  """
  hidden = hidden.astype(jnp.float32)
  real = segment_ids > 0                                                   # (B, T)
  count = jnp.sum(real, axis=1)                                            # (B,)
  if pooling == "mean":
    # where, not multiply: a non-finite value at a padded position must not leak.
    summed = jnp.sum(jnp.where(real[..., None], hidden, 0.0), axis=1)     # (B, D)
    return summed / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
  if pooling == "cls":
    return jnp.where(count[:, None] > 0, hidden[:, 0], 0.0)
  if pooling == "last":
    last = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where(count[:, None] > 0, last, 0.0)
  raise UserError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")


# ------------------------------------------------------------- config and data


def transformer_config(config) -> TransformerConfig:
  """The frozen architecture dataclass from `config.model`, checked."""
  names = {f.name for f in dataclasses.fields(TransformerConfig)}
  fields = {k: v for k, v in config.model.items() if k in names}
  try:
    return TransformerConfig(**fields).validate()
  except ValueError as e:
    raise UserError(str(e)) from None


def check_vocab(config, tok):
  """The model's vocabulary must hold every token id the tokenizer makes."""
  if config.model.vocab_size < tok.vocab_size:
    raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                    f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def token_bytes(tok, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes each token id stands for (0 past the tokenizer's ids), (V,) float32."""
  table = np.zeros(vocab_size, np.float32)
  if tok is None:  # no tokenizer (benchmarks, plans): one byte per token
    table[:] = 1.0
    return table
  lengths = tok.token_byte_lengths()
  table[:len(lengths)] = lengths
  return table


def objective_options(cls, config, reserved=("model_cfg", "token_bytes")) -> dict:
  """`config.objective_options`, checked against the keyword arguments of `cls`."""
  options = dict(config.get("objective_options") or {})
  accepted = inspect.signature(cls).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise UserError(f"objective_options {unknown} are not options of {config.objective!r}; "
                    f"it takes {sorted(set(accepted) - set(reserved))}")
  return options


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


# ------------------------------------------------------------------ embedding


@dataclasses.dataclass
class TextInputs:
  """Turns records {"text": ...} into fixed-shape token batches for a text model."""
  tokenizer: Any
  seq_len: int

  def __post_init__(self):
    ids = getattr(self.tokenizer, "special_ids", {})
    # Mirror BERT-style training rows: <cls> piece <sep>.
    self.prefix = [ids["<cls>"]] if "<cls>" in ids else []
    self.suffix = [ids["<sep>"]] if "<sep>" in ids else []
    room = self.seq_len - len(self.prefix) - len(self.suffix)
    if room < 1:
      raise UserError(f"seq_len={self.seq_len} leaves no room for text; use a larger --seq-len")
    self.room = room

  def collate(self, records) -> tuple[dict[str, np.ndarray], int]:
    """-> ({"tokens", "segment_ids": int32 [len(records), T]}, documents truncated).

    T is the smallest bucket (16, 32, 64, ..., capped at seq_len) that holds the
    batch's longest row: short posts do not pay for the whole context, and the
    model compiles once per bucket (at most log2(seq_len) - 3 shapes).
    """
    rows, truncated = [], 0
    for record in records:
      ids = self.tokenizer.encode(record["text"])
      if len(ids) > self.room:
        truncated += 1
        ids = ids[:self.room]
      rows.append(self.prefix + list(ids) + self.suffix)
    longest = max((len(r) for r in rows), default=1)
    width = min(self.seq_len, max(MIN_BUCKET, 1 << (longest - 1).bit_length()))
    tokens = np.zeros((len(rows), width), np.int32)
    segment_ids = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      tokens[i, :len(row)] = row
      segment_ids[i, :len(row)] = 1
    return {"tokens": tokens, "segment_ids": segment_ids}, truncated


def text_forward(model) -> Callable:
  """(params, tokens, segment_ids) -> the named intermediates of a text model.

  Decoders and encoders take the tokens alone; an encoder-decoder runs only
  its encoder (no decoder inputs), so its intermediates are the encoder's.
  """
  if isinstance(model, EncoderDecoder):
    def forward(params, tokens, segment_ids):
      return model.apply({"params": params}, tokens, None, inputs_segment_ids=segment_ids,
                         deterministic=True)[1]
  else:
    def forward(params, tokens, segment_ids):
      return model.apply({"params": params}, tokens, segment_ids=segment_ids,
                         deterministic=True)[1]
  return forward


def model_layers(model, seq_len: int) -> list[str]:
  """Names of the (B, T, D) intermediates a text model returns (no compute)."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  forward = text_forward(model)

  def shapes(t):
    # An encoder-decoder's parameters need decoder inputs to exist.
    args = (t, t) if isinstance(model, EncoderDecoder) else (t,)
    return forward(model.init(jax.random.key(0), *args)["params"], t, jnp.ones_like(t))
  out = jax.eval_shape(shapes, tokens)
  return [k for k, v in out.items() if getattr(v, "ndim", 0) == 3]


# ------------------------------------------------------------------ the base class


class TextObjective(Objective):
  """An objective on tokenized text; subclasses give the batch format and the loss.

  Subclasses set `self.cfg` (TransformerConfig) and `self.model` (a text model
  returning (logits, out)); `from_config` attaches `self.tokenizer`.
  """

  tokenizer = None

  @classmethod
  def open_data(cls, config) -> Data:
    """data.source and data.eval_source under the config's document policy; without an
    eval source, python-docs' fixed eval split or a seeded 5% of the documents."""
    d = config.data
    policy = DocPolicy.from_config(d)
    train = sources.open_source(d.source, policy)
    eval_spec = d.eval_source or (
        "embedded:python-docs:eval" if d.source in ("embedded:python-docs",
                                                    "embedded:python-docs:train") else None)
    if eval_spec is None:
      evaluation = None
    else:
      evaluation = sources.open_source(eval_spec, policy)
    stats = {"train": train.stats, **({"eval": evaluation.stats} if evaluation else {})}
    if evaluation is None:
      train, evaluation = sources.holdout_split(train, EVAL_FRACTION, config.train.seed)
    return Data(train, evaluation, stats)

  @classmethod
  def from_config(cls, config, tokenizer):
    if tokenizer is not None:
      check_vocab(config, tokenizer)
    objective = cls.build(config, tokenizer, objective_options(cls, config))
    objective.tokenizer = tokenizer
    return objective

  @classmethod
  def build(cls, config, tokenizer, options: dict):
    """The objective from the checked config pieces (override for extra arguments)."""
    return cls(transformer_config(config), token_bytes(tokenizer, config.model.vocab_size),
               **options)

  # Batch format: override both.
  def rows(self, source, seq_len: int, batch_size: int, seed: int, shard_index: int,
           shard_count: int):
    """A resumable train iterator of one data shard: batches of batch_size rows."""
    raise NotImplementedError

  def eval_rows(self, source, seq_len: int, batch_size: int):
    """The global eval batches of `source`, in order, the same at every call."""
    raise NotImplementedError

  def train_iterator(self, config, data: Data):
    d, t = config.data, config.train
    shards, shard_count = process_shards(config)
    per_shard = [self.rows(data.train, d.seq_len, t.batch_size // shard_count, t.seed, i,
                           shard_count) for i in shards]
    return per_shard[0] if len(per_shard) == 1 else pipeline.ConcatRows(per_shard)

  def eval_batches(self, config, data: Data):
    d, t = config.data, config.train
    return host_eval_batches(lambda: self.eval_rows(data.eval, d.seq_len, t.batch_size),
                             d.eval_batches, t.batch_size)

  def init_params(self, rng, seq_len: int):
    """Parameters of the text model for (1, seq_len) token rows."""
    return self.model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

  def flops_per_unit(self, params, seq_len: int) -> float:
    return transformer_flops(params, self.cfg, seq_len)

  # --- embedding: the model's named intermediates pooled over real tokens ----------

  def open_embed_source(self, spec: str):
    return sources.open_source(spec)

  def default_layer(self, layers: list[str]) -> str:
    """The final hidden states: pre_logits, or an encoder-decoder's encoder output."""
    return "pre_logits" if "pre_logits" in layers else "encoded"

  def embed_setup(self, config, layer, pooling, seq_len):
    """Defaults: the final hidden states, the workdir's `embed.pooling` (an imported
    sentence encoder's own) or mean; L2-normalised when `embed.normalize`."""
    defaults = config.get("embed") or {}
    pooling = pooling or defaults.get("pooling", "mean")
    self.embed_normalized = bool(defaults.get("normalize", False))
    max_len = config.model.max_len
    seq_len = int(seq_len or config.data.get("seq_len", max_len))
    if not 1 <= seq_len <= max_len:
      raise UserError(f"--seq-len {seq_len} must be in 1..{max_len} (the model's max_len)")
    if pooling not in POOLINGS:
      raise UserError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    layers = model_layers(self.model, seq_len)
    layer = layer or self.default_layer(layers)
    if layer not in layers:
      raise UserError(f"unknown layer {layer!r}; this model has {', '.join(layers)}")
    self._inputs = TextInputs(self.tokenizer, seq_len)
    return layer, pooling, seq_len

  def embed_collate(self, records):
    return self._inputs.collate(records)

  def embed_batch(self, params, batch, layer: str, pooling: str):
    out = text_forward(self.model)(params, batch["tokens"], batch["segment_ids"])
    x = pool(out[layer], batch["segment_ids"], pooling)                      # (B, D)
    if self.embed_normalized:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x
