"""Clustering of embeddings and its quality metrics, via scikit-learn.

Every function takes x [N, D] and returns integer cluster labels [N] (or
metrics), reproducible for a fixed seed. Noise (DBSCAN) is the label -1.

Methods that are quadratic in N (spectral, Ward) are fit on a seeded subsample
of at most `max_fit` points and the other points are assigned afterwards, which
keeps N = 50k within seconds and a few hundred MB.
"""

import numpy as np
from sklearn import metrics as sk_metrics

from tx_jax.errors import UserError

NOISE = -1
SILHOUETTE_SAMPLE = 5000  # Silhouette is O(N^2); this many points is ~1 s.


def _subsample(n, max_n, seed):
  """Sorted indices of a seeded subsample of range(n) of size min(n, max_n)."""
  if n <= max_n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))


def kmeans(x, k, seed=0, n_init=10):
  """k-means++ with n_init restarts -> (labels [N] int, centers [k, D] float32).

  n_init=10: on 50k x 128 blobs with k=20, 3 restarts still merged two blobs
  for one seed (ARI 0.94 vs 1.0); 10 cost ~45 CPU-s there.
  """
  from sklearn.cluster import KMeans
  x = np.asarray(x, dtype=np.float32)
  km = KMeans(k, n_init=n_init, random_state=seed).fit(x)
  return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)


def choose_k(x, k_range, seed=0, sample_size=SILHOUETTE_SAMPLE):
  """Picks the k-means k in k_range with the best silhouette -> (k, {k: silhouette}).

  Each k is fit on all points (one k-means++ init, to keep the sweep cheap);
  the silhouette is scored on the same seeded subsample of sample_size points
  for every k so the scores are comparable. Ties go to the smaller k.
  """
  x = np.asarray(x, dtype=np.float32)
  ks = [int(k) for k in k_range]
  if not ks or min(ks) < 2 or max(ks) > len(x) - 1:
    raise UserError(
        f"cannot choose k from {ks} for {len(x)} points; the range must lie within "
        f"2..{len(x) - 1} (lower --k-max or give more points)")
  scores = {}
  for k in ks:
    labels, _ = kmeans(x, k, seed, n_init=1)
    scores[k] = _silhouette(x, labels, seed, sample_size)
  valid = {k: s for k, s in scores.items() if s is not None}
  best = max(valid, key=lambda k: (valid[k], -k)) if valid else ks[0]
  return best, scores


def estimate_eps(x, min_samples=5, seed=0, sample_size=SILHOUETTE_SAMPLE):
  """DBSCAN eps at the knee of the sorted k-distance curve (k = min_samples).

  The k-distance of a point is its distance to its (min_samples - 1)-th other
  neighbour, i.e. the smallest eps that makes it a core point. Sorted, the curve
  is flat inside clusters and rises steeply for outliers; the knee is the point
  farthest below the chord from its first to its last value (both axes scaled to
  [0, 1]). For large N the curve is taken over a seeded subsample of queries
  against all points, which keeps the density (and so the scale) of the full
  data. Falls back to the 90th percentile when the curve has no knee.
  """
  from sklearn.neighbors import NearestNeighbors
  x = np.asarray(x, dtype=np.float32)
  k = min(min_samples, len(x))
  query = x[_subsample(len(x), sample_size, seed)]
  # Queries are members of x, so column 0 is the point itself at distance 0.
  dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(query)
  d = np.sort(dist[:, -1]).astype(np.float64)
  span = d[-1] - d[0]
  eps = 0.0
  if span > 0 and len(d) > 2:
    t = np.linspace(0.0, 1.0, len(d))
    eps = d[np.argmax(t - (d - d[0]) / span)]
  if eps <= 0:
    eps = np.percentile(d, 90)
  if eps <= 0:  # All points duplicate their neighbours; any radius > 0 works.
    eps = 1e-6
  return float(eps)


def dbscan(x, eps=None, min_samples=5, seed=0):
  """DBSCAN -> labels [N] with -1 for noise; eps from `estimate_eps` when None.

  Memory is O(N * neighbours within eps): a large eps on a large N is costly.
  """
  from sklearn.cluster import DBSCAN
  x = np.asarray(x, dtype=np.float32)
  if eps is None:
    eps = estimate_eps(x, min_samples, seed)
  if eps <= 0:
    raise UserError(f"eps must be > 0, got {eps}; pass a positive --eps or omit it")
  return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x).astype(np.int64)


def spectral(x, k, seed=0, n_neighbors=10, max_fit=5000):
  """Spectral clustering on a k-nearest-neighbours affinity graph -> labels [N].

  N > max_fit: fit on a seeded subsample, then each other point takes the
  majority cluster of its n_neighbors nearest fitted points (the same graph
  notion the affinity used, so non-convex clusters are kept).
  """
  from sklearn.cluster import SpectralClustering
  from sklearn.neighbors import KNeighborsClassifier
  x = np.asarray(x, dtype=np.float32)
  idx = _subsample(len(x), max_fit, seed)
  n_neighbors = max(1, min(n_neighbors, len(idx) - 1))
  fit_labels = SpectralClustering(
      k, affinity="nearest_neighbors", n_neighbors=n_neighbors,
      assign_labels="cluster_qr", random_state=seed).fit_predict(x[idx])
  if len(idx) == len(x):
    return fit_labels.astype(np.int64)
  knn = KNeighborsClassifier(n_neighbors=n_neighbors).fit(x[idx], fit_labels)
  return knn.predict(x).astype(np.int64)


def agglomerative(x, k, seed=0, max_fit=5000):
  """Ward agglomerative clustering -> labels [N].

  Ward needs O(N^2) memory, so N > max_fit is fit on a seeded subsample and
  each other point joins the nearest cluster mean (the criterion Ward minimises).
  """
  from sklearn.cluster import AgglomerativeClustering
  x = np.asarray(x, dtype=np.float32)
  idx = _subsample(len(x), max_fit, seed)
  fit_labels = AgglomerativeClustering(k, linkage="ward").fit_predict(x[idx])
  if len(idx) == len(x):
    return fit_labels.astype(np.int64)
  means = cluster_means(x[idx], fit_labels, k)
  return sk_metrics.pairwise_distances_argmin(x, means).astype(np.int64)


def cluster_means(x, labels, k):
  """Mean of each cluster 0..k-1 -> [k, D] float32 (zeros for an empty cluster)."""
  x = np.asarray(x, dtype=np.float32)
  labels = np.asarray(labels)
  sums = np.zeros((k, x.shape[1]), np.float64)
  keep = labels >= 0  # Noise belongs to no cluster.
  np.add.at(sums, labels[keep], x[keep])
  counts = np.bincount(labels[keep], minlength=k)[:k]
  return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def _silhouette(x, labels, seed, sample_size):
  """Silhouette on a seeded subsample (sklearn's own sampling); None if undefined."""
  n_labels = len(np.unique(labels))
  if not 2 <= n_labels <= len(x) - 1:
    return None
  size = sample_size if len(x) > sample_size else None
  try:
    s = sk_metrics.silhouette_score(x, labels, sample_size=size, random_state=seed)
  except ValueError:  # The subsample holds a single cluster.
    return None
  return float(s) if np.isfinite(s) else None


def internal_metrics(x, labels, seed=0, sample_size=SILHOUETTE_SAMPLE):
  """silhouette, calinski_harabasz, davies_bouldin of a clustering (None if undefined).

  DBSCAN noise (-1) is left out: it is not a cluster, and scoring it as one
  would reward or punish the metric for points the method declined to cluster.
  `noise_fraction` is added whenever there is noise, so a good score on few
  clustered points stays visible. Silhouette uses a seeded subsample of
  sample_size points when there are more (it is O(N^2)); the others use all.
  """
  x = np.asarray(x, dtype=np.float32)
  labels = np.asarray(labels)
  out = {"silhouette": None, "calinski_harabasz": None, "davies_bouldin": None}
  keep = labels != NOISE
  if not keep.all():
    out["noise_fraction"] = float((~keep).mean())
  x, labels = x[keep], labels[keep]
  if not 2 <= len(np.unique(labels)) <= len(x) - 1:
    return out  # All three metrics need 2..n-1 clusters.
  out["silhouette"] = _silhouette(x, labels, seed, sample_size)
  out["calinski_harabasz"] = float(sk_metrics.calinski_harabasz_score(x, labels))
  out["davies_bouldin"] = float(sk_metrics.davies_bouldin_score(x, labels))
  return {k: (v if v is None or np.isfinite(v) else None) for k, v in out.items()}


def purity(true, pred):
  """Sum over predicted clusters of their largest true-class count, over N."""
  c = sk_metrics.cluster.contingency_matrix(true, pred)  # [classes, clusters]
  return float(c.max(axis=0).sum() / c.sum())


def external_metrics(true, pred):
  """nmi, ari, purity of predicted clusters against true labels (ints or strings).

  DBSCAN noise (-1) counts as one more predicted group: dropping it would let a
  method score well by refusing to cluster the hard points.
  """
  true, pred = np.asarray(true), np.asarray(pred)
  if len(true) != len(pred):
    raise UserError(f"{len(true)} labels for {len(pred)} points; pass one label per point")
  return {
      "nmi": float(sk_metrics.normalized_mutual_info_score(true, pred)),
      "ari": float(sk_metrics.adjusted_rand_score(true, pred)),
      "purity": purity(true, pred),
  }
