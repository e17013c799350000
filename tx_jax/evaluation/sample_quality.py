"""Sample-quality metrics of image generators: FID, Inception Score, class coverage.

The Inception network of the usual FID (Heusel et al. 2017) is replaced by a
small convolutional classifier trained once, with a fixed seed, on the
labelled training images of the run (`train_classifier`), so the metrics
exist for any labelled image set, 8×8 digits included, offline. Scores are
therefore comparable between runs on the same data and classifier settings,
not with published Inception FIDs.

- FID: the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features (`features`, width F) of two image sets,
  ||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), in float64.
- Inception Score: exp(E_x KL(p(y|x) || p(y))) over the classifier's softmax;
  at most the number of classes, high when every sample is confidently one
  class and the classes are evenly used.
- Class coverage: the share of classes that receive at least
  `min_share` × N / K of the N samples' argmax predictions (a class seen once
  in a thousand samples is not covered).
- Confidence: the mean top-class probability.

FID is biased upwards for small N, so every set compared here (real held-out
images, the Gaussian baseline, the generator's samples) uses the same N.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tx_jax.data import images

# --------------------------------------------------------------------- the math


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), covariance (F, F)) in float64; the covariance is the unbiased one."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"need [n >= 2, F] features, got shape {x.shape}")
  return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative round-off clipped)."""
  w, v = np.linalg.eigh((matrix + matrix.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  tr((Σ1 Σ2)^½) is computed as the sum of the square roots of the
  eigenvalues of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same spectrum), which
  stays real and stable where scipy's sqrtm of a singular product is not.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root = _psd_sqrt(s1)
  middle = root @ s2 @ root
  eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)
  value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig)))
  return max(value, 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two feature sets [n, F] and [m, F]."""
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def inception_score(probs: np.ndarray, eps: float = 1e-12) -> float:
  """exp(mean_x KL(p(y|x) || p(y))) of class probabilities [n, K], p(y) their mean."""
  p = np.asarray(probs, np.float64)
  marginal = p.mean(0, keepdims=True)
  kl = np.sum(p * (np.log(p + eps) - np.log(marginal + eps)), axis=1)
  return float(np.exp(kl.mean()))


def class_coverage(probs: np.ndarray, min_share: float = 0.2) -> float:
  """Share of the K classes predicted (argmax) for at least min_share·n/K of n samples."""
  p = np.asarray(probs)
  n, k = p.shape
  counts = np.bincount(np.argmax(p, axis=1), minlength=k)
  return float(np.mean(counts >= max(1.0, min_share * n / k)))


def sample_metrics(features, probs, reference_features, min_share: float = 0.2) -> dict:
  """fid (against `reference_features`), inception_score, class_coverage, confidence."""
  return {"fid": fid(features, reference_features), "inception_score": inception_score(probs),
          "class_coverage": class_coverage(probs, min_share),
          "confidence": float(np.mean(np.max(probs, axis=1)))}


def fit_pixel_gaussian(images: np.ndarray):
  """(mean (D,), covariance (D, D)) of flattened images [n, H, W, C], float64."""
  return gaussian_stats(np.asarray(images).reshape(len(images), -1))


def sample_pixel_gaussian(mean, cov, n: int, shape, seed: int) -> np.ndarray:
  """n draws of N(mean, cov) as images [n, *shape], clipped to [0, 1] (float32)."""
  rng = np.random.default_rng(seed)
  x = rng.multivariate_normal(mean, cov, size=n, method="eigh")
  return np.clip(x, 0.0, 1.0).reshape(n, *shape).astype(np.float32)


# ---------------------------------------------------------------- the classifier


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The feature classifier: three 3×3 convolutions (the last two with stride 2),
  global mean pooling, a `feature_dim`-wide layer (the FID features) and the
  class logits. Trained with AdamW on the training images in [0, 1]."""
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)
  feature_dim: int = 128
  steps: int = 2000
  batch_size: int = 128
  lr: float = 1e-3
  weight_decay: float = 1e-4
  seed: int = 0


class FeatureClassifier(nn.Module):
  """Images (B, H, W, C) in [0, 1] -> (logits (B, K), features (B, feature_dim))."""
  cfg: ClassifierConfig

  @nn.compact
  def __call__(self, images):
    x = images * 2.0 - 1.0
    for i, width in enumerate(self.cfg.widths):
      x = nn.gelu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, name=f"conv_{i}")(x))
    x = jnp.mean(x, axis=(1, 2))                                             # (B, widths[-1])
    features = nn.gelu(nn.Dense(self.cfg.feature_dim, name="features")(x))
    return nn.Dense(self.cfg.num_classes, name="logits")(features), features


def train_classifier(images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig):
  """Params of a FeatureClassifier trained on images [n, H, W, C] in [0, 1], labels [n].

  Minibatches are drawn from numpy's generator seeded by cfg.seed and the
  init from jax.random.key(cfg.seed): the same data and config give the
  same classifier.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  model = FeatureClassifier(cfg)
  params = model.init(jax.random.key(cfg.seed), images[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps), weight_decay=cfg.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(cfg.seed)
  for _ in range(cfg.steps):
    rows = rng.integers(0, len(images), min(cfg.batch_size, len(images)))
    params, opt_state = step(params, opt_state, images[rows], labels[rows])
  return params


class SampleQuality:
  """A trained FeatureClassifier and the features of the reference (training) images.

  `measure(images)` -> sample_metrics of images [n, H, W, C] in [0, 1].
  """

  def __init__(self, cfg: ClassifierConfig, params, reference_images, batch_size: int = 256):
    self.cfg, self.params, self.batch_size = cfg, params, batch_size
    model = FeatureClassifier(cfg)
    self._apply = jax.jit(lambda p, x: (lambda lf: (jax.nn.softmax(lf[0]), lf[1]))(
        model.apply({"params": p}, x)))
    self.reference_features = self.predict(reference_images)[1]

  def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, K], features [n, feature_dim]) in float64."""
    images = np.asarray(images, np.float32)
    probs, feats = [], []
    for i in range(0, len(images), self.batch_size):
      chunk = images[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)  # one compiled shape
      p, f = self._apply(self.params, np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]),
                                                                      np.float32)]))
      probs.append(np.asarray(p, np.float64)[:len(chunk)])
      feats.append(np.asarray(f, np.float64)[:len(chunk)])
    return np.concatenate(probs), np.concatenate(feats)

  def accuracy(self, images, labels) -> float:
    return float(np.mean(np.argmax(self.predict(images)[0], 1) == np.asarray(labels)))

  def measure(self, images, min_share: float = 0.2) -> dict:
    probs, feats = self.predict(images)
    return sample_metrics(feats, probs, self.reference_features, min_share)


def save_classifier(path: str, cfg: ClassifierConfig, params, info: dict):
  """Writes params (npz, flattened names) and `path`.json (config + info) atomically."""
  flat = {"/".join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(jax.device_get(params)).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
  with open(path + ".json.tmp", "w") as f:
    json.dump({"config": dataclasses.asdict(cfg), **info}, f, indent=2, sort_keys=True)
  os.replace(path + ".json.tmp", path + ".json")


def load_classifier(path: str, cfg: ClassifierConfig):
  """Params saved by save_classifier, or None when absent or saved with another config."""
  if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
    return None
  with open(path + ".json") as f:
    saved = json.load(f)
  if saved.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))):
    return None
  with np.load(path) as data:
    flat = {tuple(k.split("/")): jnp.asarray(data[k]) for k in data.files}
  return flax.traverse_util.unflatten_dict(flat)



# ------------------------------------------------------------ the evaluator


def unit_images(source, prep, limit: int | None = None) -> np.ndarray:
  """The first `limit` images of `source` at the model's size, in [0, 1]: [n, S, S, C]."""
  n = len(source) if limit is None else min(limit, len(source))
  mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
  return np.stack([prep.eval(source[i]["image"], source[i].get("id", "")) * std + mean
                   for i in range(n)]).astype(np.float32)


class GeneratorEvaluation:
  """At every eval of a generator: FID, Inception Score, class coverage and
  confidence of its samples, beside the same numbers for two references
  computed once, and a PNG grid of samples in workdir/samples/.

  `sample(params, z) -> images in [0, 1]` is jitted over the run's mesh; its
  params are the objective's whole tree, `which` names the weights to sample
  from ({"": params["ema"], "generator_": params["generator"]}: the metric
  prefix and the subtree). Metrics (N = evaluation.num_samples, default the
  number of held-out images, the same N for every set):
    fid, inception_score, class_coverage, confidence      the EMA generator
    generator_fid, ...                                    the raw generator
    real_fid, ...                                         held-out real images (the floor)
    gaussian_fid, ...                                     a full-covariance Gaussian fit
                                                          to the training pixels
    classifier_accuracy                                   the classifier on held-out images
  FID is against the classifier features of every training image. Without
  labels on the training images there is no classifier and only the grid
  is made. The classifier is trained once and kept in
  workdir/sample_quality/classifier.npz (+ .json with its config and
  held-out accuracy); the references in workdir/sample_quality/references.json.
  """

  def __init__(self, config, sample, latent_dim: int, prep, train_src, eval_src,
               which: dict[str, str], classifier: ClassifierConfig):
    self.config, self.sample, self.latent_dim, self.prep = config, sample, latent_dim, prep
    self.train_src, self.eval_src, self.which = train_src, eval_src, which
    self.classifier_cfg = classifier
    ev = config.evaluation
    self.num_samples = int(ev.num_samples) or len(eval_src)
    self.min_share = float(ev.coverage_min_share)
    self.grid_count = int(ev.grid_samples)
    self.seed = int(config.train.seed)
    self._quality, self._references, self._jitted, self._train_x = None, None, None, None

  # --- pieces computed once ------------------------------------------------------

  def _sampler(self):
    if self._jitted is None:
      from tx_jax import parallel  # pylint: disable=g-import-not-at-top
      self._mesh = parallel.make_mesh(self.config.mesh)
      self._jitted = jax.jit(self.sample, out_shardings=parallel.replicated(self._mesh))
    return self._jitted

  def _on_mesh(self, params):
    """params as they are when already on the run's mesh (training), else replicated
    onto it (`tx-jax eval` loads them onto one device)."""
    from tx_jax import parallel  # pylint: disable=g-import-not-at-top
    leaf = jax.tree_util.tree_leaves(params)[0]
    if getattr(leaf, "sharding", None) is not None and (
        leaf.sharding.device_set == set(self._mesh.devices.flat)):
      return params
    return jax.device_put(params, parallel.replicated(self._mesh))

  def generate(self, params, n: int, seed: int) -> np.ndarray:
    """n samples [n, S, S, C] in [0, 1] of the weights `params` (one generator's tree)."""
    sample = self._sampler()
    params = self._on_mesh(params)
    z = np.asarray(jax.random.normal(jax.random.key(seed), (n, self.latent_dim)), np.float32)
    return np.asarray(jax.device_get(sample(params, z)), np.float32)

  def _train_images(self) -> np.ndarray:
    if self._train_x is None:
      self._train_x = unit_images(self.train_src, self.prep)
    return self._train_x

  def quality(self, workdir: str | None) -> "SampleQuality | None":
    """The trained classifier (loaded from, or trained and saved into, workdir)."""
    if self._quality is None and self.train_src.has_labels:
      path = os.path.join(workdir, "sample_quality", "classifier.npz") if workdir else None
      cfg = self.classifier_cfg
      train_x = self._train_images()
      train_y = np.array([self.train_src[i]["label"] for i in range(len(self.train_src))])
      params = load_classifier(path, cfg) if path else None
      if params is None:
        params = train_classifier(train_x, train_y, cfg)
        quality = SampleQuality(cfg, params, train_x)
        info = {"train_images": len(train_x)}
        if self.eval_src.has_labels:
          eval_y = [self.eval_src[i]["label"] for i in range(len(self.eval_src))]
          info["heldout_accuracy"] = quality.accuracy(unit_images(self.eval_src, self.prep),
                                                      eval_y)
        if path and jax.process_index() == 0:
          save_classifier(path, cfg, params, info)
      else:
        quality = SampleQuality(cfg, params, train_x)
      self._quality = quality
    return self._quality

  def references(self, workdir: str | None) -> dict[str, float]:
    """real_* (held-out images) and gaussian_* metrics, and classifier_accuracy."""
    if self._references is None:
      quality = self.quality(workdir)
      if quality is None:
        self._references = {}
        return self._references
      n = self.num_samples
      real = unit_images(images.image_subset(self.eval_src, n, self.seed), self.prep)
      train_x = self._train_images()
      mean, cov = fit_pixel_gaussian(train_x)
      gaussian = sample_pixel_gaussian(mean, cov, n, train_x.shape[1:], self.seed)
      refs = {f"real_{k}": v for k, v in quality.measure(real, self.min_share).items()}
      refs.update({f"gaussian_{k}": v
                   for k, v in quality.measure(gaussian, self.min_share).items()})
      if self.eval_src.has_labels:
        labels = [self.eval_src[i]["label"] for i in range(len(self.eval_src))]
        refs["classifier_accuracy"] = quality.accuracy(unit_images(self.eval_src, self.prep),
                                                       labels)
      if workdir and jax.process_index() == 0:
        path = os.path.join(workdir, "sample_quality", "references.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
          json.dump({"num_samples": n, **refs}, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
      self._references = refs
    return self._references

  # --- every eval ----------------------------------------------------------------

  def metrics(self, params, workdir: str | None = None) -> dict[str, float]:
    """Every metric above for `params` (read-only unless workdir is given)."""
    out = dict(self.references(workdir))
    quality = self.quality(workdir)
    if quality is None:
      return out
    for prefix, key in self.which.items():
      samples = self.generate(params[key], self.num_samples, self.seed + 1)
      out.update({f"{prefix}{k}": v for k, v in quality.measure(samples, self.min_share).items()})
    return out

  def __call__(self, params, step: int, workdir: str) -> dict[str, float]:
    metrics = self.metrics(params, workdir)
    if self.grid_count:
      self.save_grid(params, os.path.join(workdir, "samples", f"step_{step:06d}.png"), step)
    return metrics

  def save_grid(self, params, path: str, step: int):
    """One row per generator (the same noise every eval) and a row of held-out images."""
    from tx_jax.evaluation.image_grid import save_image_grid  # pylint: disable=g-import-not-at-top
    rows = {("EMA generator" if not prefix else prefix.rstrip("_")):
            self.generate(params[key], self.grid_count, self.seed + 2)
            for prefix, key in self.which.items()}
    rows["held-out"] = unit_images(self.eval_src, self.prep, self.grid_count)
    if jax.process_index() == 0:
      save_image_grid(path, rows, title=f"step {step}: samples from fixed noise")

