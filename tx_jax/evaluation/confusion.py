"""A confusion matrix drawn as PNG (matplotlib, Agg backend)."""

import os

import numpy as np


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
