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

