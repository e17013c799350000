"""Embeddings from any trained model: one vector per document, streamed to an .npz.

The trained model is run by its own objective's model (`objective.model.apply`),
so there is no second implementation: models return `(logits, out)` and the
representation is `out[layer]` (B, T, D), e.g. "embedded", "block_00", ...,
"pre_logits" (decoders, encoders; the default), or for an encoder-decoder,
whose encoder runs alone, "encoder/block_00", ..., "encoded" (its default),
pooled over the document's real (non-padding) tokens:

  mean   average over the real tokens
  cls    the first token (the tokenizer's `<cls>` when it has one: BERT-style
         tokenizers get `<cls> ... <sep>` around every document, as in training)
  last   the last real token (the natural summary of a causal decoder)

Documents are tokenized one batch at a time and written into a preallocated
[N, D] float32 array, so memory does not grow with the data (no token ids are
held beyond the current batch). Every batch has batch_size rows (the last one
is padded) and a length from a few power-of-two buckets, so the model compiles
a handful of times at most; batches are sharded over all local devices on the
batch axis. Documents longer than the context are truncated to its first
tokens and counted.

Objectives whose inputs are not text (e.g. a masked autoencoder on images)
plug in by defining three methods, and are then embedded by the same loop:

  open_embed_source(spec) -> source: `len(source)`, `source[i]` -> a record dict
      (optional keys: "label", "id", "text"), and optional `label_names`.
  embed_collate(records) -> dict of numpy arrays with leading axis len(records)
      (preprocessing, e.g. resize/normalise images).
  embed_batch(params, batch, layer, pooling) -> (B, D) array; traced under jit,
      so it must be pure JAX. It should raise ValueError naming the valid
      layers/poolings for ones it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.errors import UserError

POOLINGS = ("mean", "cls", "last")
MAX_TEXT_CHARS = 2000  # Texts kept in the .npz per document (fixed-width unicode).
MIN_BUCKET = 16  # Shortest padded length of a batch of text.


# --------------------------------------------------------------------- pooling


def pool(hidden, segment_ids, pooling: str):
  """Pools hidden (B, T, D) over real tokens (segment_ids > 0) -> (B, D) float32.

  Rows without any real token (padding rows) pool to zeros.
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
    # Real tokens are left-aligned, so the last one is at count - 1.
    last = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where(count[:, None] > 0, last, 0.0)
  raise UserError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")


# ------------------------------------------------------------------ text inputs


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
  from tx_jax.models import EncoderDecoder
  if isinstance(model, EncoderDecoder):
    def forward(params, tokens, segment_ids):
      return model.apply({"params": params}, tokens, None, inputs_segment_ids=segment_ids,
                         deterministic=True)[1]
  else:
    def forward(params, tokens, segment_ids):
      return model.apply({"params": params}, tokens, segment_ids=segment_ids,
                         deterministic=True)[1]
  return forward


def text_embed_fn(model, layer: str, pooling: str) -> Callable:
  """(params, batch) -> (B, D): `model`'s out[layer] pooled over real tokens."""
  forward = text_forward(model)

  def fn(params, batch):
    out = forward(params, batch["tokens"], batch["segment_ids"])
    return pool(out[layer], batch["segment_ids"], pooling)
  return fn


def model_layers(model, seq_len: int) -> list[str]:
  """Names of the (B, T, D) intermediates a text model returns (no compute)."""
  from tx_jax.models import EncoderDecoder
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  forward = text_forward(model)

  def shapes(t):
    # An encoder-decoder's parameters need decoder inputs to exist.
    args = (t, t) if isinstance(model, EncoderDecoder) else (t,)
    return forward(model.init(jax.random.key(0), *args)["params"], t, jnp.ones_like(t))
  out = jax.eval_shape(shapes, tokens)
  return [k for k, v in out.items() if getattr(v, "ndim", 0) == 3]


def default_layer(layers: list[str]) -> str:
  """The final hidden states: pre_logits, or an encoder-decoder's encoder output."""
  return "pre_logits" if "pre_logits" in layers else "encoded"


# ------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Embedded:
  embeddings: np.ndarray   # [N, D] float32
  indices: np.ndarray      # [N] int64: positions in the source
  truncated: int           # documents cut to the context
  seconds: float
  layer: str = ""          # the pooled intermediate, when known


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Zero-pads every array's leading axis up to `rows` (the fixed batch shape)."""
  return {k: np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])
          if len(v) < rows else v for k, v in batch.items()}


def embed_mesh(devices=None):
  """A data-parallel mesh over the local devices (parameters replicated)."""
  devices = jax.local_devices() if devices is None else devices
  return parallel.make_mesh(type("M", (), {"data": -1, "fsdp": 1, "tensor": 1})(), devices)


def embed_records(params, source, collate, embed_fn, *, batch_size: int = 64,
                  indices=None, mesh=None, progress: bool = True,
                  callback: Callable[[int], None] | None = None) -> Embedded:
  """Runs `embed_fn(params, batch) -> (B, D)` over source[indices] in fixed-shape batches.

  collate(records) -> (batch of numpy arrays [len(records), ...], truncated
  count). batch_size is rounded up to a multiple of the device count. The
  next batch is prepared on the host while the device computes the current
  one. callback(done) is called after each batch with the documents finished.
  """
  mesh = mesh or embed_mesh()
  indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
  n = len(indices)
  if n == 0:
    raise UserError("no documents to embed; the data is empty")
  if batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {batch_size}")
  devices = mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  sharding = parallel.batch_sharding(mesh, parallel.RULE_PRESETS["dp"])
  replicated = parallel.replicated(mesh)
  params = jax.device_put(params, replicated)
  fn = jax.jit(embed_fn, in_shardings=(replicated, sharding), out_shardings=replicated)

  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, desc="embed", unit="doc", dynamic_ncols=True, mininterval=1.0)
  out = None
  truncated = 0
  pending = None  # (start, count, device result) of the batch in flight
  t0 = time.perf_counter()

  def finish(item):
    nonlocal out
    start, count, result = item
    result = np.asarray(result)[:count]
    if out is None:  # D is known only after the first batch.
      out = np.zeros((n, result.shape[1]), np.float32)
    out[start:start + count] = result
    if bar is not None:
      bar.update(count)
    if callback is not None:
      callback(start + count)

  for start in range(0, n, batch_size):
    chunk = indices[start:start + batch_size]
    batch, cut = collate([source[int(i)] for i in chunk])
    truncated += cut
    result = fn(params, parallel.global_batch(_pad_rows(batch, batch_size), sharding))
    if pending is not None:
      finish(pending)
    pending = (start, len(chunk), result)
  finish(pending)
  if bar is not None:
    bar.close()
  if not np.isfinite(out).all():
    bad = int((~np.isfinite(out).all(axis=1)).sum())
    raise UserError(f"{bad} of {n} embeddings are NaN/inf; the checkpoint is unhealthy "
                    "(check train/loss in metrics.jsonl) or pick another --layer")
  return Embedded(out, indices, truncated, time.perf_counter() - t0)


def embed_texts(trained, source, *, layer: str | None = None, pooling: str = "mean",
                batch_size: int = 64, seq_len: int | None = None, indices=None, mesh=None,
                progress: bool = True, callback=None) -> Embedded:
  """Embeds a text source with a trained text model (any objective whose
  `.model` returns (logits, out)); see the module docstring for layer/pooling
  (layer None: the model's final hidden states)."""
  model = trained.objective.model
  max_len = trained.config.model.max_len
  seq_len = int(seq_len or trained.config.data.get("seq_len", max_len))
  if not 1 <= seq_len <= max_len:
    raise UserError(f"--seq-len {seq_len} must be in 1..{max_len} (the model's max_len)")
  if pooling not in POOLINGS:
    raise UserError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
  layers = model_layers(model, seq_len)
  layer = layer or default_layer(layers)
  if layer not in layers:
    raise UserError(f"unknown layer {layer!r}; this model has {', '.join(layers)}")
  inputs = TextInputs(trained.tokenizer, seq_len)
  result = embed_records(trained.params, source, inputs.collate,
                         text_embed_fn(model, layer, pooling), batch_size=batch_size,
                         indices=indices, mesh=mesh, progress=progress, callback=callback)
  return dataclasses.replace(result, layer=layer)


def embed_with_objective(trained, source, *, layer: str, pooling: str, batch_size: int = 64,
                         indices=None, mesh=None, progress=True, callback=None) -> Embedded:
  """Embeds through the objective's own hook (see module docstring), e.g. images."""
  objective = trained.objective

  def collate(records):
    return objective.embed_collate(records), 0

  def fn(params, batch):
    return objective.embed_batch(params, batch, layer, pooling)
  try:
    return embed_records(trained.params, source, collate, fn, batch_size=batch_size,
                         indices=indices, mesh=mesh, progress=progress, callback=callback)
  except ValueError as e:  # The hook's own check of layer/pooling, raised while tracing.
    raise UserError(f"{type(objective).__name__}: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------- the file


def sample_indices(n: int, sample: int | None, seed: int = 0) -> np.ndarray:
  """All of range(n), or a seeded random `sample` of it in source order."""
  if sample is None or sample >= n:
    return np.arange(n)
  if sample < 1:
    raise UserError(f"--sample must be >= 1, got {sample}")
  return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def _fixed_width_texts(texts, max_chars: int) -> np.ndarray:
  return np.asarray([t[:max_chars] for t in texts], dtype=str)


def _labels_array(values):
  if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    return np.asarray(values, np.int64)
  return np.asarray([str(v) for v in values], dtype=str)


def write_npz(path: str, result: Embedded, source, meta: dict,
              max_text_chars: int = MAX_TEXT_CHARS) -> dict[str, np.ndarray]:
  """Writes embeddings [N, D], ids [N], texts [N] / labels [N] / label_names when the
  source has them, and `meta` (a JSON string), atomically (tmp file + rename)."""
  records = [source[int(i)] for i in result.indices]
  ids = result.indices
  if records and all("id" in r for r in records):
    ids = _labels_array([r["id"] for r in records])
  arrays = {"embeddings": result.embeddings, "ids": ids}
  if records and all("text" in r for r in records):
    arrays["texts"] = _fixed_width_texts([r["text"] for r in records], max_text_chars)
  if getattr(source, "has_labels", False) or (records and all("label" in r for r in records)):
    arrays["labels"] = _labels_array([r["label"] for r in records])
    if getattr(source, "label_names", None):
      arrays["label_names"] = np.asarray(source.label_names, dtype=str)
  arrays["meta"] = np.asarray(json.dumps(meta))
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return arrays


def _check_out_dir(out_path: str):
  """UserError now, before the model loads, if out_path's directory cannot be made."""
  parent = os.path.dirname(os.path.abspath(out_path))
  while not os.path.isdir(parent):
    if os.path.lexists(parent):
      raise UserError(f"--out {out_path!r}: {parent!r} is not a directory; pick another path")
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--out {out_path!r}: cannot create files under {parent!r} (not "
                    "writable); pick another path")


def embed_workdir(workdir: str, spec: str, out_path: str, *, layer: str | None = None,
                  pooling: str = "mean", batch_size: int = 64, seq_len: int | None = None,
                  sample: int | None = None, seed: int = 0, progress: bool = True,
                  callback=None) -> dict:
  """`tx-jax embed`: the newest checkpoint of workdir over data spec -> out_path (.npz).

  Returns a summary (n, dim, truncated, seconds, docs_per_s, ...).
  """
  if not out_path.endswith(".npz"):
    raise UserError(f"--out {out_path!r} must end in .npz")
  _check_out_dir(out_path)
  from tx_jax.train import setup  # Checkpoint + config code, not the training loop.
  mesh = embed_mesh()
  trained = setup.load_trained(workdir, mesh=mesh)
  objective = trained.objective
  hooked = hasattr(objective, "embed_batch")
  if hooked:
    source = objective.open_embed_source(spec)
  else:
    from tx_jax.data import sources
    source = sources.open_source(spec)
  if len(source) == 0:
    raise UserError(f"data {spec!r} has no documents; give a non-empty dataset")
  indices = sample_indices(len(source), sample, seed)
  kw = dict(layer=layer, pooling=pooling, batch_size=batch_size, indices=indices, mesh=mesh,
            progress=progress, callback=callback)
  if hooked:
    kw["layer"] = layer or "pre_logits"
    result = embed_with_objective(trained, source, **kw)
  else:
    result = embed_texts(trained, source, seq_len=seq_len, **kw)
  layer = result.layer or kw["layer"]
  if hasattr(objective, "applied_pooling"):
    pooling = objective.applied_pooling(layer, pooling)
  seq = None if hooked else int(seq_len or trained.config.data.get("seq_len"))
  meta = {"workdir": os.path.abspath(workdir), "step": int(trained.step), "data": spec,
          "objective": trained.config.objective, "layer": layer, "pooling": pooling,
          "seq_len": seq, "truncated": int(result.truncated)}
  write_npz(out_path, result, source, meta)
  n, dim = result.embeddings.shape
  return {"out": out_path, "n": n, "dim": dim, **{k: meta[k] for k in (
      "step", "layer", "pooling", "seq_len", "truncated")},
          "seconds": round(result.seconds, 2),
          "docs_per_s": round(n / max(result.seconds, 1e-9), 1)}
