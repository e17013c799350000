"""Embeddings from any trained model: one vector per document, streamed to an .npz.

The model is run by its own objective, through four hooks of the objective
contract (`tx_jax.objectives.base.Objective`), so there is no second
implementation of any model:

  open_embed_source(spec) -> source: `len(source)`, `source[i]` -> a record dict
      (optional keys: "label", "id", "text"), and optional `label_names`.
  embed_setup(config, layer, pooling, seq_len) -> (layer, pooling as applied,
      seq_len): checks the options before anything runs.
  embed_collate(records) -> a batch of numpy arrays with leading axis
      len(records), or (batch, documents truncated).
  embed_batch(params, batch, layer, pooling) -> (B, D); traced under jit. It
      raises ValueError naming the valid layers/poolings for ones it does not know.

Text models pool a named intermediate out[layer] (B, T, D) ("embedded",
"block_00", ..., "pre_logits"; for an encoder-decoder, whose encoder runs
alone, "encoder/block_00", ..., "encoded") over the real tokens: mean, cls
(the first token: BERT-style tokenizers get `<cls> ... <sep>` around every
document, as in training) or last (the natural summary of a causal decoder).

Documents are collated one batch at a time and written into a preallocated
[N, D] float32 array, so memory does not grow with the data. Every batch has
batch_size rows (the last one is padded) and, for text, a length from a few
power-of-two buckets, so the model compiles a handful of times at most;
batches are sharded over all local devices on the batch axis. Documents
longer than the context are truncated to their first tokens and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from tx_jax import parallel
from tx_jax.errors import UserError
from tx_jax.train.trained import load_trained

MAX_TEXT_CHARS = 2000  # Texts kept in the .npz per document (fixed-width unicode).


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
  fn = jax.jit(embed_fn, in_shardings=(replicated, sharding), out_shardings=replicated,
               compiler_options=parallel.mesh_compiler_options(mesh))

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


def embed_source(trained, source, *, layer: str | None = None, pooling: str | None = None,
                 batch_size: int = 64, seq_len: int | None = None, indices=None, mesh=None,
                 progress: bool = True, callback=None) -> Embedded:
  """Embeds `source` with a loaded model through its objective's embedding hooks;
  layer None: the objective's default (a text model's final hidden states)."""
  layer, pooling, seq_len = trained.objective.embed_setup(trained.config, layer, pooling, seq_len)
  result = embed_with_objective(trained, source, layer=layer, pooling=pooling,
                                batch_size=batch_size, indices=indices, mesh=mesh,
                                progress=progress, callback=callback)
  return dataclasses.replace(result, layer=layer)


def embed_with_objective(trained, source, *, layer: str, pooling: str, batch_size: int = 64,
                         indices=None, mesh=None, progress=True, callback=None) -> Embedded:
  """Embeds through the objective's hooks (see the module docstring).

  `embed_collate` returns a batch, or (batch, documents truncated) for text.
  """
  objective = trained.objective

  def collate(records):
    batch = objective.embed_collate(records)
    return batch if isinstance(batch, tuple) else (batch, 0)

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
                  pooling: str | None = None, batch_size: int = 64, seq_len: int | None = None,
                  sample: int | None = None, seed: int = 0, progress: bool = True,
                  callback=None) -> dict:
  """`tx-jax embed`: the newest checkpoint of workdir over data spec -> out_path (.npz).

  Returns a summary (n, dim, truncated, seconds, docs_per_s, ...).
  """
  if not out_path.endswith(".npz"):
    raise UserError(f"--out {out_path!r} must end in .npz")
  _check_out_dir(out_path)
  mesh = embed_mesh()
  trained = load_trained(workdir, mesh=mesh)
  objective = trained.objective
  source = objective.open_embed_source(spec)
  if len(source) == 0:
    raise UserError(f"data {spec!r} has no documents; give a non-empty dataset")
  indices = sample_indices(len(source), sample, seed)
  layer, applied, seq = objective.embed_setup(trained.config, layer, pooling, seq_len)
  result = embed_with_objective(trained, source, layer=layer, pooling=applied,
                                batch_size=batch_size, indices=indices, mesh=mesh,
                                progress=progress, callback=callback)
  meta = {"workdir": os.path.abspath(workdir), "step": int(trained.step), "data": spec,
          "objective": trained.config.objective, "layer": layer, "pooling": applied,
          "normalized": bool(objective.embed_normalized),
          "seq_len": seq, "truncated": int(result.truncated)}
  write_npz(out_path, result, source, meta)
  n, dim = result.embeddings.shape
  return {"out": out_path, "n": n, "dim": dim, **{k: meta[k] for k in (
      "step", "layer", "pooling", "seq_len", "truncated")},
          "seconds": round(result.seconds, 2),
          "docs_per_s": round(n / max(result.seconds, 1e-9), 1)}
