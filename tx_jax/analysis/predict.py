"""`tx-jax predict`: a trained classifier's labels and class probabilities, one CSV row
per document (or image), streamed in batches with a progress bar.

CSV columns: `id` (the record's id, else its index in the data), `label` (the
true label, when the data has labels), `predicted`, then `p_<class>` for every
class of the workdir's label vocabulary.
"""

from __future__ import annotations

import csv
import os

import jax
import numpy as np

from tx_jax.errors import UserError
from tx_jax.train.trained import load_trained


def predict_workdir(workdir: str, spec: str, out: str, batch_size: int = 64,
                    progress: bool = True) -> dict:
  """Writes `out` (CSV); returns {"documents", "out", "accuracy" (when labelled)}."""
  trained = load_trained(workdir)
  objective = trained.objective
  if not hasattr(objective, "probabilities"):
    raise UserError(f"{workdir!r} holds a {trained.config.objective} model, not a classifier; "
                    "predict needs a workdir trained with configs/classify.py")
  if batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {batch_size}")
  source = objective.open_embed_source(spec)
  n = len(source)
  if n == 0:
    raise UserError(f"{spec} has no documents")
  labels = objective.labels
  names = getattr(source, "label_names", None)
  fn = jax.jit(objective.probabilities)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=n, desc="predict", unit="doc", dynamic_ncols=True, mininterval=1.0)
  correct = counted = 0
  tmp = out + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    has_labels = bool(getattr(source, "has_labels", False))
    writer.writerow(["id", *(["label"] if has_labels else []), "predicted",
                     *[f"p_{c}" for c in labels]])
    for start in range(0, n, batch_size):
      records = [source[i] for i in range(start, min(n, start + batch_size))]
      batch = objective.predict_collate(records)
      rows = len(records)
      padded = {k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()}  # one shape: one compile
      probs = np.asarray(fn(trained.params, padded))[:rows]
      for i, (record, p) in enumerate(zip(records, probs)):
        predicted = labels[int(np.argmax(p))]
        row = [record.get("id", start + i)]
        if has_labels:
          truth = record.get("label")
          truth = (names[truth] if names is not None and isinstance(truth, (int, np.integer))
                   and 0 <= truth < len(names) else truth)
          row.append(truth)
          counted += 1
          correct += int(str(truth) == predicted)
        writer.writerow([*row, predicted, *[f"{x:.6f}" for x in p]])
      if bar is not None:
        bar.update(rows)
  os.replace(tmp, out)
  if bar is not None:
    bar.close()
  summary = {"documents": n, "out": out, "step": trained.step}
  if counted:
    summary["accuracy"] = correct / counted
  return summary
