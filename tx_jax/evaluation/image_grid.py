"""A labelled grid of images saved as PNG (matplotlib, Agg backend)."""

import os

import numpy as np


def save_image_grid(path: str, rows: dict[str, np.ndarray], title: str = "",
                    highlight: dict[str, np.ndarray] | None = None) -> str:
  """Saves rows of images (name -> [R, H, W, C] in [0, 1]) as one PNG grid.

  `highlight[name]` ([R, H, W, 1], 1 = highlighted) paints those pixels of
  that row a flat blue-grey, e.g. to show which patches a model never saw.
  Writes atomically (temp file + rename); returns `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(rows)
  cols = len(rows[names[0]])
  fig, axes = plt.subplots(len(names), cols, figsize=(1.1 * cols + 1.2, 1.2 * len(names) + 0.4),
                           squeeze=False)
  for r, name in enumerate(names):
    for c in range(cols):
      image = np.clip(np.asarray(rows[name][c], np.float32), 0.0, 1.0)
      rgb = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3]
      if highlight and name in highlight:
        mask = np.asarray(highlight[name][c], bool)[..., :1]
        rgb = np.where(mask, np.array([0.35, 0.45, 0.65], np.float32), rgb)
      ax = axes[r, c]
      ax.imshow(rgb, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=80)
  plt.close(fig)
  os.replace(tmp, path)
  return path
