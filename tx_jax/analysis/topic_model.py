"""Topics of a set of posts: features -> (UMAP ->) clusters -> c-TF-IDF terms -> quality.

`fit_topics` is the library entry point (the `tx-jax topics` report calls it):

  result = fit_topics(embeddings, texts, method="hdbscan", min_topic_size=10,
                      features="both", time_values=created_at, seed=0)
  write_topic_report(result, out_dir)   # tx_jax.analysis.topic_report

Exact reposts are collapsed first (clustered once, counted in the topic
sizes). Every fit also scores TF-IDF features with the same clustering on the
same posts (`result.baseline`), so a report always shows whether the model's
embeddings beat the bag of words.
"""

import dataclasses
import warnings

import numpy as np

from tx_jax.analysis import cluster as cluster_lib
from tx_jax.analysis import coherence
from tx_jax.analysis import ctfidf
from tx_jax.analysis import hierarchy
from tx_jax.analysis import over_time
from tx_jax.analysis import posts as posts_lib
from tx_jax.analysis import reduce as reduce_lib
from tx_jax.errors import UserError

METHODS = ("hdbscan", "kmeans", "spectral", "agglomerative")
FEATURES = ("model", "tfidf", "both")
OUTLIERS = ("none", "embeddings", "ctfidf")
SVD_DIMS = 100
NOISE = cluster_lib.NOISE


@dataclasses.dataclass
class Settings:
  """How topics were found; every field is recorded in report.json."""
  method: str = "hdbscan"
  k: int | None = None            # kmeans / spectral / agglomerative; None: by silhouette
  min_topic_size: int = 10        # HDBSCAN min_cluster_size
  umap: bool | None = None        # None: UMAP before HDBSCAN only
  umap_components: int = 5
  umap_neighbors: int = 15
  outliers: str = "embeddings"    # none | embeddings (nearest centroid) | ctfidf
  reduce_topics: int | None = None
  features: str = "model"         # model | tfidf | both
  normalize: str | None = None    # of the model's embeddings: None | l2 | standardize
  time_bin: str = "week"
  urls: str = "remove"
  mentions: str = "token"
  ngram_range: tuple = (1, 2)
  min_df: int = 2
  n_terms: int = 10
  diversity: float = 0.3          # MMR weight for the top terms; 0: plain c-TF-IDF ranking
  n_examples: int = 5
  seed: int = 0

  def check(self, has_embeddings):
    """UserError naming the first setting that is unknown or out of range."""
    for name, value, allowed in (("method", self.method, METHODS),
                                 ("features", self.features, FEATURES),
                                 ("outliers", self.outliers, OUTLIERS),
                                 ("time_bin", self.time_bin, over_time.TIME_BINS),
                                 ("normalize", self.normalize, reduce_lib.NORMALIZE)):
      if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; use one of "
                        f"{', '.join(str(a) for a in allowed if a)}")
    if self.features != "tfidf" and not has_embeddings:
      raise UserError(f"features={self.features!r} needs the model's embeddings; pass them "
                      "or use features='tfidf'")
    if int(self.min_topic_size) < 2:
      raise UserError(f"min_topic_size must be >= 2, got {self.min_topic_size}")
    if self.k is not None and (self.method == "hdbscan" or int(self.k) < 2):
      raise UserError(f"k={self.k} is invalid: k >= 2 applies to kmeans, spectral and "
                      "agglomerative only (HDBSCAN sizes topics by min_topic_size)")
    if self.reduce_topics is not None and int(self.reduce_topics) < 1:
      raise UserError(f"reduce_topics must be >= 1, got {self.reduce_topics}")
    if not 0 <= self.diversity <= 1:
      raise UserError(f"diversity must be in [0, 1], got {self.diversity}")


@dataclasses.dataclass
class Fit:
  """One clustering of the distinct posts, described."""
  features: str
  assign: np.ndarray      # [U] topic per distinct post, -1 outliers
  topics: list            # [{id, size, reposts, label, top_terms, term_weights, npmi, posts}]
  metrics: dict
  k: int


@dataclasses.dataclass
class TopicResult:
  """What `fit_topics` found; `write_topic_report` turns it into files."""
  settings: Settings
  topics: np.ndarray      # [N] topic of every post (reposts included), -1 outliers
  fit: Fit                # on the chosen features
  baseline: Fit | None    # TF-IDF features, same clustering; None if features == "tfidf"
  texts: list             # [N] as given
  ids: np.ndarray         # [N]
  labels: np.ndarray | None
  label_names: list | None
  reposts: posts_lib.Reposts
  features: np.ndarray    # [U, D] features of the distinct posts (for the map)
  over_time: tuple | None = None   # (periods [P], topic ids [T], counts [P, T])
  linkage: np.ndarray | None = None   # hierarchy of the topics before reduction
  linkage_names: list | None = None
  merged: dict | None = None       # {final topic id: [topic ids before reduction]}

  @property
  def names(self):
    """{topic id: its label (from its top terms)}."""
    return {t["id"]: t["label"] for t in self.fit.topics}


# Features.


def tfidf_features(bag_texts, seed=0, dims=SVD_DIMS):
  """Sublinear word TF-IDF -> TruncatedSVD(dims) -> rows l2-normalised (LSA) [U, dims]."""
  from sklearn.decomposition import TruncatedSVD
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.preprocessing import normalize
  vec = TfidfVectorizer(token_pattern=posts_lib.TOKEN_PATTERN, stop_words="english",
                        sublinear_tf=True)
  try:
    x = vec.fit_transform(bag_texts)
  except ValueError:
    raise UserError("the posts have no words left after stop words; pass real text") from None
  dims = min(dims, x.shape[1] - 1, x.shape[0] - 1)
  if dims < 2:
    return normalize(x.toarray()).astype(np.float32)
  z = TruncatedSVD(dims, random_state=seed).fit_transform(x)
  return normalize(z).astype(np.float32)


def _standardized_block(x):
  """Each column to mean 0 / std 1, then the block scaled to total variance 1."""
  x = reduce_lib.normalize(x, "standardize")
  return x / np.sqrt(x.shape[1])


def features_for(kind, embeddings, bag_texts, settings):
  """model | tfidf | both -> [U, D] float32; both: the two standardized blocks side by side,
  each scaled to the same total variance so neither view outweighs the other by its width."""
  if kind == "tfidf":
    return tfidf_features(bag_texts, settings.seed)
  model = reduce_lib.normalize(embeddings, settings.normalize)
  if kind == "model":
    return model
  return np.concatenate([_standardized_block(tfidf_features(bag_texts, settings.seed)),
                         _standardized_block(model)], axis=1).astype(np.float32)


# Clustering.


def _umap(x, settings):
  import umap
  n = len(x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # n_jobs=1 forced by random_state; spectral init notes.
    reducer = umap.UMAP(n_neighbors=max(2, min(settings.umap_neighbors, n - 1)),
                        n_components=max(2, min(settings.umap_components, n - 2)),
                        min_dist=0.0, metric="cosine", random_state=settings.seed)
    return reducer.fit_transform(x).astype(np.float32)


def cluster_posts(x, settings):
  """Features [U, D] -> (topics [U] with -1 for HDBSCAN noise, k used)."""
  use_umap = settings.umap if settings.umap is not None else settings.method == "hdbscan"
  z = _umap(x, settings) if use_umap else x
  if settings.method == "hdbscan":
    from sklearn.cluster import HDBSCAN
    size = int(settings.min_topic_size)
    if size > len(x):
      raise UserError(f"min_topic_size={size} exceeds the {len(x)} distinct posts; lower it")
    assign = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(z).astype(np.int64)
    if assign.max() < 0:
      raise UserError(f"HDBSCAN found no topic of {size}+ posts in {len(x)} distinct posts; "
                      "lower --min-topic-size or use --method kmeans")
    return assign, int(assign.max()) + 1
  k = settings.k
  if k is None:
    k, _ = cluster_lib.choose_k(z, range(2, min(20, len(z) - 1) + 1), settings.seed)
  if k > len(z):
    raise UserError(f"k={k} exceeds the {len(z)} distinct posts; use a smaller k")
  if settings.method == "kmeans":
    return cluster_lib.kmeans(z, k, settings.seed)[0], int(k)
  if settings.method == "spectral":
    return cluster_lib.spectral(z, k, settings.seed), int(k)
  return cluster_lib.agglomerative(z, k, settings.seed), int(k)


def _unit(x):
  from sklearn.preprocessing import normalize
  return normalize(np.asarray(x, np.float64))


def reduce_outliers(assign, x, doc_terms, vocab, how):
  """Noise posts (-1) joined to their nearest topic -> new assignment [U].

  embeddings: cosine to each topic's mean feature vector. ctfidf: cosine of the
  post's c-TF-IDF vector to each topic's c-TF-IDF row; a post with no known
  term keeps -1 there.
  """
  assign = np.asarray(assign).copy()
  noise = assign == NOISE
  if how == "none" or not noise.any() or noise.all():
    return assign
  ids = np.unique(assign[~noise])
  if how == "embeddings":
    centers = np.stack([x[assign == t].mean(axis=0) for t in ids])
    sim = _unit(x[noise]) @ _unit(centers).T
    assign[noise] = ids[np.argmax(sim, axis=1)]
    return assign
  terms = ctfidf.class_tfidf(doc_terms[~noise], vocab, assign[~noise])
  sim = (terms.transform(doc_terms[noise]) @ _unit(terms.scores.toarray()).T)
  sim = np.asarray(sim)
  best = ids[np.argmax(sim, axis=1)]
  assign[noise] = np.where(sim.max(axis=1) > 0, best, NOISE)
  return assign


def renumber_by_size(assign, weights):
  """Topic ids 0, 1, ... by decreasing size (weights: posts per distinct post); -1 stays."""
  assign = np.asarray(assign)
  ids = [t for t in np.unique(assign) if t != NOISE]
  size = {t: weights[assign == t].sum() for t in ids}
  first = {t: int(np.argmax(assign == t)) for t in ids}
  order = sorted(ids, key=lambda t: (-size[t], first[t]))
  table = {old: new for new, old in enumerate(order)}
  table[NOISE] = NOISE
  return np.asarray([table[t] for t in assign], np.int64)


# Description.


def describe(assign, x, doc_terms, vocab, counts, settings):
  """Per topic: size, top terms (MMR), label, NPMI and its posts nearest the centre first."""
  terms = ctfidf.class_tfidf(doc_terms, vocab, assign)
  top = ctfidf.top_terms(terms, settings.n_terms, settings.diversity)
  out = []
  for t in terms.topic_ids:
    members = np.flatnonzero(assign == t)
    words = [w for w, _ in top[int(t)]]
    center = x[members].mean(axis=0, keepdims=True)
    closeness = (_unit(x[members]) @ _unit(center).T).ravel()
    out.append({
        "id": int(t), "size": int(counts[members].sum()),
        "distinct": int(len(members)),
        "label": "outliers" if t == NOISE else (", ".join(words[:3]) or f"topic {t}"),
        "top_terms": words, "term_weights": [round(v, 6) for _, v in top[int(t)]],
        "npmi": coherence.topic_npmi(words, doc_terms, vocab),
        "posts": members[np.argsort(-closeness, kind="stable")].tolist()})
  out.sort(key=lambda e: (e["id"] == NOISE, e["id"]))  # Outliers last.
  return out, terms


def quality(topics, x, assign, labels, counts_inverse, seed):
  """Internal, coherence and (with labels) external metrics of one clustering."""
  real = [t for t in topics if t["id"] != NOISE]
  metrics = cluster_lib.internal_metrics(x, assign, seed)
  npmis = [t["npmi"] for t in real if t["npmi"] is not None]
  metrics["npmi"] = float(np.mean(npmis)) if npmis else None
  metrics["diversity"] = coherence.diversity([t["top_terms"] for t in real])
  metrics["topics"] = len(real)
  if labels is not None:
    metrics.update(cluster_lib.external_metrics(labels, assign[counts_inverse]))
  return metrics


def _fit_one(kind, embeddings, bag, doc_terms, vocab, reposts, labels, settings,
             is_baseline=False):
  x = features_for(kind, embeddings, bag, settings)
  assign, k = cluster_posts(x, settings)
  noise_before = float(reposts.counts[assign == NOISE].sum() / reposts.counts.sum())
  assign = reduce_outliers(assign, x, doc_terms, vocab, settings.outliers)
  assign = renumber_by_size(assign, reposts.counts)
  extra = {"linkage": None, "linkage_names": None, "merged": None}
  real = [t for t in np.unique(assign) if t != NOISE]
  if len(real) >= 2:
    topics, terms = describe(assign, x, doc_terms, vocab, reposts.counts, settings)
    rows = [terms.row(t) for t in real]
    extra["linkage"] = hierarchy.topic_linkage(terms.scores[rows])
    extra["linkage_names"] = [f"{t['id']}: {t['label']}" for t in topics if t["id"] != NOISE]
  n_target = settings.reduce_topics
  if n_target is not None and is_baseline and n_target > len(real):
    n_target = None  # The baseline found fewer topics: it is scored as it is.
  if n_target is not None:
    if n_target > len(real):
      raise UserError(
          f"reduce_topics={n_target} but {kind} features gave only {len(real)} topics; pick "
          f"a number from 1 to {len(real)} (or drop --reduce-topics)")
    if n_target < len(real):
      group = hierarchy.merge_map(extra["linkage"], len(real), n_target)
      before = assign.copy()
      assign = np.where(assign == NOISE, NOISE, group[np.maximum(assign, 0)])
      assign = renumber_by_size(assign, reposts.counts)
      extra["merged"] = {int(t): sorted({int(b) for b in before[assign == t]})
                         for t in np.unique(assign) if t != NOISE}
  topics, _ = describe(assign, x, doc_terms, vocab, reposts.counts, settings)
  metrics = quality(topics, x, assign, labels, reposts.inverse, settings.seed)
  metrics["noise_fraction_before_outliers"] = noise_before
  return Fit(kind, assign, topics, metrics, k), x, extra


def fit_topics(embeddings, texts, *, labels=None, label_names=None, ids=None, time_values=None,
               time_column="created_at", baseline=True, **settings):
  """Topics of posts -> TopicResult. See `Settings` for the keyword options.

  embeddings [N, D] (None with features="tfidf"), texts [N] str, labels [N]
  (ints indexing label_names, or names) to score against, ids [N] to name
  posts, time_values [N] (ISO 8601 or epoch seconds; time_column names them in
  errors) for topics over time. baseline=False skips the TF-IDF comparison fit.
  """
  settings = Settings(**settings)
  settings.check(embeddings is not None)
  texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
  n = len(texts)
  if embeddings is not None:
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) != n:
      raise UserError(f"{len(embeddings)} embeddings for {n} posts; pass one [D] row per post")
  for name, values in (("labels", labels), ("ids", ids), ("time values", time_values)):
    if values is not None and len(values) != n:
      raise UserError(f"{len(values)} {name} for {n} posts; pass one per post")
  ids = np.arange(n) if ids is None else np.asarray(ids)
  times = None if time_values is None else over_time.parse_times(time_values, ids, time_column)
  reposts = posts_lib.collapse_reposts(texts)
  bag = [posts_lib.clean_text(texts[i], settings.urls, settings.mentions) for i in reposts.unique]
  doc_terms, vocab, _ = ctfidf.count_terms(bag, settings.ngram_range, settings.min_df)
  emb_u = None if embeddings is None else embeddings[reposts.unique]
  labels = None if labels is None else np.asarray(labels)

  fit, x, extra = _fit_one(settings.features, emb_u, bag, doc_terms, vocab, reposts, labels,
                           settings)
  base = None
  if baseline and settings.features != "tfidf":
    base, _, _ = _fit_one("tfidf", emb_u, bag, doc_terms, vocab, reposts, labels, settings,
                          is_baseline=True)
  topics = fit.assign[reposts.inverse]
  result = TopicResult(settings, topics, fit, base, texts, ids, labels, label_names, reposts,
                       x, **extra)
  if times is not None:
    result.over_time = over_time.topics_over_time(topics, times, settings.time_bin)
  return result
