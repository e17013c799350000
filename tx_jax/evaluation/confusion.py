"""Confusion matrices: their metrics, a PNG (matplotlib, Agg backend), and the
classifier's per-eval writer of both."""

import json
import os

import jax
import numpy as np


def confusion_metrics(confusion: np.ndarray, names: list[str] | None = None) -> dict:
  """Accuracy, macro-F1 and per-class precision / recall / f1 / support of a confusion
  matrix (rows true, columns predicted). Macro-F1 averages over the classes that occur
  as a label or a prediction (as scikit-learn's f1_score(average="macro")); an
  undefined precision or recall counts as 0."""
  c = np.asarray(confusion, np.float64)
  tp, support, predicted = np.diag(c), c.sum(1), c.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  present = (support > 0) | (predicted > 0)
  total = max(c.sum(), 1.0)
  metrics = {"accuracy": float(tp.sum() / total),
             "macro_f1": float(f1[present].mean()) if present.any() else 0.0}
  names = names or [str(i) for i in range(len(c))]
  for i, name in enumerate(names):
    metrics[f"precision/{name}"] = float(precision[i])
    metrics[f"recall/{name}"] = float(recall[i])
    metrics[f"f1/{name}"] = float(f1[i])
    metrics[f"support/{name}"] = float(support[i])
  return metrics


def save_confusion_matrix(path: str, confusion: np.ndarray, names: list[str],
                          title: str = "") -> str:
  """Saves confusion (K, K) (rows: true class, columns: predicted) as a PNG heat map.

  Cells are coloured by the row-normalised rate (recall per true class) and
  print the counts; writes atomically (temp file + rename); returns `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  c = np.asarray(confusion, np.float64)
  k = len(c)
  rates = c / np.maximum(c.sum(1, keepdims=True), 1.0)
  side = 1.6 + 0.42 * k
  fig, ax = plt.subplots(figsize=(side + 1.2, side))
  image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
  ax.set_yticks(range(k), names, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if k <= 30:
    for i in range(k):
      for j in range(k):
        if c[i, j]:
          ax.text(j, i, f"{int(c[i, j])}", ha="center", va="center", fontsize=6,
                  color="white" if rates[i, j] > 0.5 else "black")
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
  acc = np.trace(c) / max(c.sum(), 1.0)
  ax.set_title(f"{title}  accuracy {acc:.3f}".strip(), fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=80)
  plt.close(fig)
  os.replace(tmp, path)
  return path


class ConfusionEvaluation:
  """At every eval: workdir/confusion/step_XXXXXX.png of the eval set's confusion matrix
  (from the sums `summarize` just turned into metrics) and workdir/labels.json."""

  def __init__(self, objective):
    self.objective = objective   # has .labels and .last_confusion (the eval sums')

  def __call__(self, params, step: int, workdir: str) -> dict[str, float]:
    """Writes the PNG and labels.json (process 0); no extra metrics."""
    del params
    if jax.process_index() != 0:
      return {}
    obj = self.objective
    path = os.path.join(workdir, "labels.json")
    if not os.path.exists(path):
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"labels": obj.labels}, f, indent=2)
      os.replace(tmp, path)
    if obj.last_confusion is not None:
      save_confusion_matrix(os.path.join(workdir, "confusion", f"step_{step:06d}.png"),
                            obj.last_confusion, obj.labels, title=f"step {step}: eval set")
    return {}

  def metrics(self, params) -> dict[str, float]:
    """No metrics beyond the eval sums' (`tx-jax eval`)."""
    return {}
