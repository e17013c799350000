"""Feature scaling and 2-D maps (PCA, t-SNE) of embeddings, via scikit-learn.

t-SNE has no `transform` and costs O(N log N) per iteration with a large
constant (about 30 s for 5k points on one core), so for N > `max_fit` it is
fit on a seeded subsample and every other point is placed at the mean map
position of its nearest fitted neighbours (in the PCA-50 space t-SNE saw).
That keeps a 50k-point map to well under two minutes on 2 cores and shows the
same local structure; use `pca` when exact global geometry matters.
"""

import numpy as np

from tx_jax.errors import UserError

NORMALIZE = (None, "none", "standardize", "l2")


def normalize(x, how=None):
  """Returns x [N, D] as float32: unchanged, `standardize`d per feature, or `l2` per row."""
  if how not in NORMALIZE:
    raise UserError(f"unknown normalize={how!r}; use one of none, standardize, l2")
  x = np.asarray(x, dtype=np.float32)
  if how == "standardize":
    from sklearn.preprocessing import StandardScaler
    return StandardScaler().fit_transform(x).astype(np.float32)
  if how == "l2":
    from sklearn.preprocessing import normalize as sk_normalize
    return sk_normalize(x, norm="l2").astype(np.float32)  # Zero rows stay zero.
  return x


def pca(x, n_components=2, seed=0):
  """Projects x [N, D] onto its top principal components -> [N, n_components] float32.

  When N or D is smaller than n_components the missing columns are zeros, so
  callers can always plot two coordinates.
  """
  from sklearn.decomposition import PCA
  x = np.asarray(x, dtype=np.float32)
  n, d = x.shape
  out = np.zeros((n, n_components), np.float32)
  m = min(n_components, n, d)
  if m > 0 and np.ptp(x, axis=0).max() > 0:  # Identical rows have no components.
    out[:, :m] = PCA(m, random_state=seed).fit_transform(x)
  return out


def tsne(x, seed=0, perplexity=30.0, max_fit=5000, pca_dims=50, max_iter=750,
         n_threads=1):
  """2-D t-SNE map of x [N, D] -> [N, 2] float32, reproducible for a fixed seed.

  D > pca_dims is first reduced with PCA (denoises and speeds up the neighbour
  search). N > max_fit: fit on a seeded subsample of max_fit points and place
  the rest by their nearest fitted neighbours (see module docstring).
  max_iter=750 is openTSNE's default schedule (250 early-exaggeration steps +
  500); sklearn's 1000 costs a third more. n_threads=1 by default: see below.
  """
  from sklearn.manifold import TSNE
  from sklearn.neighbors import NearestNeighbors
  from threadpoolctl import threadpool_limits
  x = np.asarray(x, dtype=np.float32)
  n, d = x.shape
  # t-SNE needs a few neighbours per point, and sklearn's Barnes-Hut code
  # segfaults when all points are identical (its PCA init is 0/0).
  if n < 5 or d < 2 or np.ptp(x, axis=0).max() == 0:
    return pca(x, 2, seed)
  if d > pca_dims:
    x = pca(x, pca_dims, seed)
  fit_idx = np.arange(n)
  if n > max_fit:
    fit_idx = np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))
  fit_x = x[fit_idx]
  # sklearn requires perplexity < n_samples; ~3 * perplexity neighbours are used.
  perplexity = float(min(perplexity, max(1.0, (len(fit_x) - 1) / 3)))
  # Barnes-Hut t-SNE opens several short OpenMP regions per iteration; on a
  # shared machine one descheduled thread stalls each barrier (2k points on a
  # loaded 2-core box: 34 s with 2 threads, 12 s with 1). n_threads=None lets
  # OpenMP pick, which pays off on a many-core machine with nothing else running.
  with threadpool_limits(n_threads, user_api="openmp"):
    fit_y = TSNE(
        2, perplexity=perplexity, init="pca", learning_rate="auto",
        max_iter=max_iter, random_state=seed).fit_transform(fit_x).astype(np.float32)
  if len(fit_idx) == n:
    return fit_y
  out = np.empty((n, 2), np.float32)
  out[fit_idx] = fit_y
  rest = np.setdiff1d(np.arange(n), fit_idx)
  nn = NearestNeighbors(n_neighbors=5).fit(fit_x)
  _, nbrs = nn.kneighbors(x[rest])  # [N - max_fit, 5] indices into fit_x.
  out[rest] = fit_y[nbrs].mean(axis=1)
  return out
