"""Frozen-encoder evaluation of an image model (MAE): probes and reconstruction grids.

At every eval of the training loop, and read-only in `tx-jax eval`: a linear
probe, k-NN and k-means NMI on the frozen encoder's `pre_logits` when the
data has labels, and a PNG grid of original / masked / reconstructed held-out
images in workdir/reconstructions/.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from tx_jax import parallel
from tx_jax.data import images
from tx_jax.evaluation.image_grid import save_image_grid
from tx_jax.evaluation.probe import probe_metrics

# Training images used to fit the brightness/contrast readout of norm-pix predictions
# (default of evaluation.readout_fit_examples).
STATS_FIT_IMAGES = 1024


class FrozenEncoderEvaluation:
  """At every eval: probes of the frozen encoder's features when the data has
  labels (linear probe, k-NN, k-means NMI on `pre_logits`) and a PNG grid of
  original / masked / reconstructed eval images in workdir/reconstructions/."""

  def __init__(self, config, objective, prep: images.Preprocess, train_src, eval_src):
    self.config, self.objective, self.prep = config, objective, prep
    self.train_src, self.eval_src = train_src, eval_src
    self._jitted = None

  def _functions(self):
    """Jitted encode / reconstruct / patch-stat inputs over the run's mesh; outputs
    replicated on every host."""
    if self._jitted is None:
      mesh = parallel.make_mesh(self.config.mesh)
      rules = parallel.resolve_rules(self.config.mesh.rules)
      out = parallel.replicated(mesh)
      obj = self.objective
      encode = jax.jit(lambda p, x: obj.encode(p, x)[0], out_shardings=out)
      recon = jax.jit(lambda p, x, w: obj.reconstruct(p, x, jax.random.key(0), w),
                      out_shardings=out)
      stats = jax.jit(lambda p, x: obj.patch_stats_inputs(p, x, jax.random.key(1)),
                      out_shardings=out)
      self._jitted = (parallel.batch_sharding(mesh, rules), encode, recon, stats)
      self._mesh = mesh
    return self._jitted

  def _on_mesh(self, params):
    """params as they are when already on the run's mesh (training), else replicated
    onto it (e.g. `tx-jax eval` loads them onto one device)."""
    leaf = jax.tree_util.tree_leaves(params)[0]
    if getattr(leaf, "sharding", None) is not None and (
        leaf.sharding.device_set == set(self._mesh.devices.flat)):
      return params
    return jax.device_put(params, parallel.replicated(self._mesh))

  def features(self, params, source, limit: int | None = None):
    """(pre_logits [n, D] float32, labels [n]) of `limit` (seeded random) images of `source`."""
    sharding, encode, _, _ = self._functions()
    params = self._on_mesh(params)
    t = self.config.train
    n_proc, pid = jax.process_count(), jax.process_index()
    local_bs = t.batch_size // n_proc
    feats, labels = [], []
    source = images.image_subset(source, limit, t.seed)
    for batch in images.image_eval_batches(source, self.prep, t.batch_size,
                                           num_threads=self.config.data.num_threads):
      local = {"image": batch["image"][pid * local_bs:(pid + 1) * local_bs]}
      out = np.asarray(jax.device_get(encode(params, parallel.global_batch(local, sharding)
                                             ["image"])))
      valid = batch["valid"] > 0
      feats.append(out[valid])
      labels.append(batch["label"][valid])
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels)

  def __call__(self, params, step: int, workdir: str) -> dict[str, float]:
    ev = self.config.evaluation
    metrics = self.metrics(params)
    if ev.reconstructions:
      self.save_reconstructions(params, os.path.join(
          workdir, "reconstructions", f"step_{step:06d}.png"), ev.reconstructions, step)
    return metrics

  def metrics(self, params) -> dict[str, float]:
    """Linear probe / k-NN / k-means NMI of the frozen encoder, when both splits have
    labels and evaluation.probe is on; {} otherwise (and on processes other than 0)."""
    ev = self.config.evaluation
    metrics = {}
    if ev.probe and self.train_src.has_labels and self.eval_src.has_labels:
      train_x, train_y = self.features(params, self.train_src, ev.probe_train_examples or None)
      test_x, test_y = self.features(params, self.eval_src, ev.probe_test_examples or None)
      if jax.process_index() == 0:
        metrics.update(probe_metrics(train_x, train_y, test_x, test_y, knn_k=ev.knn_k,
                                     seed=self.config.train.seed))
    return metrics

  def save_reconstructions(self, params, path: str, count: int, step: int):
    """Writes the grid for the first `count` eval images (a fixed mask, comparable over steps)."""
    _, _, recon, stats = self._functions()
    readout = None
    if self.objective.norm_pix_loss:  # brightness/contrast read out, fit on training images
      limit = self.config.evaluation.get("readout_fit_examples", STATS_FIT_IMAGES)
      fit = images.image_subset(self.train_src, limit, self.config.train.seed)
      parts = [[], [], []]  # decoder states, masks, patch stats of the valid rows
      for b in images.image_eval_batches(fit, self.prep, self.config.train.batch_size):
        for part, x in zip(parts, jax.device_get(stats(params, b["image"]))):
          part.append(np.asarray(x)[b["valid"] > 0])
      readout = self.objective.fit_patch_stats_readout(*[np.concatenate(p) for p in parts])
    n = min(count, len(self.eval_src))
    originals = np.stack([self.prep.eval(self.eval_src[i]["image"], self.eval_src[i]["id"])
                          for i in range(n)])
    rebuilt, mask = jax.device_get(recon(params, originals, readout))
    if jax.process_index() != 0:
      return
    mean, std = np.asarray(self.prep.mean, np.float32), np.asarray(self.prep.std, np.float32)
    shown = lambda x: np.asarray(x) * std + mean                           # back to [0, 1]
    mask = np.asarray(mask)                                                # 1 = masked
    save_image_grid(path, {"original": shown(originals), "masked": shown(originals),
                           "reconstruction": shown(rebuilt),
                           # as in the MAE paper's figures: the visible patches pasted back
                           "+ visible": shown(np.where(mask > 0, rebuilt, originals))},
                    title=f"step {step}: {self.objective.mask_ratio:.0%} of patches masked "
                          "(held-out images)",
                    highlight={"masked": mask})
