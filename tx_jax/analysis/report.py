"""Cluster reports: top terms (c-TF-IDF), representative points, map and HTML.

`analyze` is the body of `tx-jax analyze`: it reads the `.npz` written by
`tx-jax embed`, clusters it, and writes report.json, clusters.csv, map.png and a
self-contained report.html into out_dir.
"""

import base64
import csv
import html
import json
import os
import zipfile

import numpy as np

from tx_jax.analysis import cluster as cluster_lib
from tx_jax.analysis import reduce as reduce_lib
from tx_jax.errors import UserError

METHODS = ("kmeans", "dbscan", "spectral", "agglomerative")
REDUCERS = ("tsne", "pca")
# Words of 2+ characters that are not pure numbers ("2024", "10" carry no topic).
TOKEN_PATTERN = r"(?u)\b(?!\d+\b)\w\w+\b"
HTML_TEXT_CHARS = 300


def _as_str(v):
  return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _py(v):
  """A numpy scalar as a plain JSON-able Python value."""
  v = v.item() if isinstance(v, np.generic) else v
  return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def top_terms(texts, clusters, n=10):
  """Top n terms of each cluster by class-based TF-IDF -> {cluster id: [terms]}.

  c-TF-IDF treats each cluster as one document (its texts concatenated; summing
  per-text counts is the same thing for single words): the weight of term t in
  class c is tf(t, c) / words(c) * log(1 + mean words per class / tf(t, all)).
  English stop words, numbers and 1-character tokens are dropped. Ties are
  broken alphabetically so the result is deterministic.
  """
  from scipy import sparse
  from sklearn.feature_extraction.text import CountVectorizer
  texts = [_as_str(t) for t in texts]
  clusters = np.asarray(clusters)
  if len(texts) != len(clusters):
    raise UserError(f"{len(texts)} texts for {len(clusters)} cluster labels; pass one per point")
  ids, inv = np.unique(clusters, return_inverse=True)
  out = {_py(c): [] for c in ids}
  if not texts:
    return out
  vec = CountVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN)
  try:
    counts = vec.fit_transform(texts)  # [N, V]
  except ValueError:  # No words at all after stop words: nothing to show.
    return out
  vocab = vec.get_feature_names_out().astype(str)
  member = sparse.csr_matrix(
      (np.ones(len(texts)), (inv, np.arange(len(texts)))), shape=(len(ids), len(texts)))
  class_counts = (member @ counts).tocsr().astype(np.float64)  # [C, V]
  words = np.asarray(class_counts.sum(axis=1)).ravel()  # [C]
  term_total = np.asarray(class_counts.sum(axis=0)).ravel()  # [V], all > 0
  idf = np.log1p(words.mean() / term_total)
  tf = sparse.diags(1.0 / np.maximum(words, 1.0)) @ class_counts
  scores = tf.multiply(idf[None, :]).tocsr()
  for row, c in enumerate(ids):
    lo, hi = scores.indptr[row], scores.indptr[row + 1]
    terms, vals = scores.indices[lo:hi], scores.data[lo:hi]
    order = np.lexsort((vocab[terms], -vals))[:n]
    out[_py(c)] = [str(vocab[t]) for t in terms[order]]
  return out


def representatives(x, clusters, centers, n=5):
  """Indices of the n members of each cluster j nearest centers[j], nearest first.

  Returns a list with one int array per row of centers (empty for an empty
  cluster). Distances are Euclidean in the space of x [N, D].
  """
  x = np.asarray(x, dtype=np.float32)
  clusters = np.asarray(clusters)
  out = []
  for j, center in enumerate(np.asarray(centers, dtype=np.float32)):
    members = np.flatnonzero(clusters == j)
    d = ((x[members] - center) ** 2).sum(axis=1)
    out.append(members[np.argsort(d, kind="stable")[:n]])
  return out


def tfidf_kmeans_nmi(texts, labels, k, seed=0):
  """Baseline without a model: NMI of k-means on TF-IDF vectors of the texts."""
  from sklearn.cluster import KMeans
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.metrics import normalized_mutual_info_score
  texts = [_as_str(t) for t in texts]
  vec = TfidfVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN, sublinear_tf=True)
  try:
    feats = vec.fit_transform(texts)  # [N, V] sparse, rows l2-normalised
  except ValueError:
    raise UserError("texts have no words left after stop words; pass real text") from None
  pred = KMeans(k, n_init=3, random_state=seed).fit_predict(feats)
  return float(normalized_mutual_info_score(np.asarray(labels), pred))


def _load(npz_path):
  """Reads and validates the embed .npz -> (x, ids, labels or None, texts or None)."""
  fix = "pass the .npz written by `tx-jax embed --out FILE.npz`"
  if not os.path.isfile(npz_path):
    raise UserError(f"embeddings file not found: {npz_path}; {fix}")
  try:
    data = np.load(npz_path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile):
    raise UserError(f"{npz_path} is not an .npz file; {fix}") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise UserError(
        f"{npz_path} holds a single array, not an .npz archive; save it with "
        "np.savez(path, embeddings=x, ids=ids)")
  with data:
    if "embeddings" not in data.files:
      found = ", ".join(data.files) or "nothing"
      raise UserError(
          f"{npz_path} has no 'embeddings' array (found: {found}); save it with "
          "np.savez(path, embeddings=x, ids=ids)")
    try:
      arrays = {key: data[key] for key in ("embeddings", "ids", "labels", "texts")
                if key in data.files}
    except ValueError as e:  # Object arrays need pickle, which we never load.
      raise UserError(
          f"{npz_path} has an object array ({e}); save ids/labels/texts as plain "
          "string or int arrays, e.g. np.asarray(texts, dtype=str)") from None
    except (OSError, EOFError, zipfile.BadZipFile):
      raise UserError(f"{npz_path} is a corrupt .npz file; {fix}") from None
  x = arrays["embeddings"]
  if x.ndim != 2:
    raise UserError(f"embeddings in {npz_path} must be 2-D [N, D], got shape {x.shape}; {fix}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise UserError(f"embeddings in {npz_path} have dtype {x.dtype}, not numbers; {fix}")
  n = x.shape[0]
  if n == 0 or x.shape[1] == 0:
    raise UserError(
        f"embeddings in {npz_path} are empty (shape {x.shape}); embed a non-empty dataset")
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise UserError(
        f"embeddings in {npz_path} contain NaN/inf in {int(bad.sum())} of {n} rows "
        f"(first: row {int(np.argmax(bad))}); re-embed with a healthy checkpoint or drop "
        "those rows")
  for key in ("ids", "labels", "texts"):
    if key in arrays and arrays[key].shape != (n,):
      raise UserError(
          f"'{key}' in {npz_path} has shape {arrays[key].shape} but there are {n} "
          f"embeddings; save one {key[:-1]} per row")
  ids = arrays.get("ids", np.arange(n))
  return x.astype(np.float32), ids, arrays.get("labels"), arrays.get("texts")


def _palette(n):
  """n distinct RGBA colours: tab10, then tab20's lighter shades, else spaced turbo."""
  import matplotlib
  if n <= 10:
    return matplotlib.colormaps["tab10"](np.arange(n))
  if n <= 20:  # tab20 pairs a dark and a light shade; dark ones first, for ids 0-9.
    return matplotlib.colormaps["tab20"](np.r_[0:20:2, 1:20:2][:n])
  return matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))


def save_map(path, coords, clusters, labels=None, title="2-D map"):
  """Scatter of coords [N, 2] coloured by cluster (and a second panel by label) -> PNG.

  800x800 px per panel at dpi 100. Noise (-1) is grey. Legends only for <= 20
  groups; with more, cluster ids are written at each cluster's median position.
  """
  import matplotlib
  matplotlib.use("Agg")  # Headless: no display on TPU VMs or in CI.
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  coords = np.asarray(coords, dtype=np.float32)
  panels = [("cluster", np.asarray(clusters))]
  if labels is not None:
    panels.append(("label", np.asarray(labels)))
  size = float(np.clip(60000 / len(coords), 1.0, 30))  # Keeps 50k points readable.
  # Constrained layout makes room for legends outside the axes at a fixed pixel size.
  fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 8), dpi=100,
                           squeeze=False, layout="constrained")
  try:
    for ax, (name, values) in zip(axes[0], panels):
      groups, inv = np.unique(values, return_inverse=True)
      colors = _palette(len(groups))
      if name == "cluster" and groups[0] == cluster_lib.NOISE:
        colors[0] = (0.7, 0.7, 0.7, 1.0)
      ax.scatter(coords[:, 0], coords[:, 1], c=colors[inv], s=size, alpha=0.7,
                 linewidths=0, rasterized=True)
      ax.set_title(f"{title}, coloured by {name} ({len(groups)})")
      ax.set_xticks([])
      ax.set_yticks([])
      if name == "cluster" and len(groups) <= 50:
        for g in groups:
          if g != cluster_lib.NOISE:
            cx, cy = np.median(coords[values == g], axis=0)
            ax.annotate(str(g), (cx, cy), ha="center", va="center", fontsize=9,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0))
      if len(groups) <= 20:
        handles = [Line2D([], [], ls="", marker="o", color=colors[i],
                          label=("noise" if name == "cluster" and g == cluster_lib.NOISE
                                 else _as_str(_py(g))[:30]))
                   for i, g in enumerate(groups)]
        # Outside the axes so it hides no points (loc="best" is also slow at 50k).
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                  frameon=False)
    fig.savefig(path, dpi=100)  # No bbox_inches="tight": it would change the pixel size.
  finally:
    plt.close(fig)


_CSS = """
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em;
       max-width: 1700px; color: #222; }
h1 { font-size: 1.6em; } .meta { color: #666; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { white-space: nowrap; } td.posts { overflow-wrap: anywhere; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.clusters td ol { margin: 0; padding-left: 1.3em; } table.clusters li { margin-bottom: 0.3em; }
img.map { max-width: 100%; height: auto; border: 1px solid #ddd; }
.terms { font-family: ui-monospace, monospace; font-size: 0.92em; min-width: 14em; }
"""


def _short(text, limit=HTML_TEXT_CHARS):
  text = " ".join(_as_str(text).split())
  return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def write_html(path, report, png_bytes, source=""):
  """Self-contained HTML report: inline CSS, the map as a base64 data URI."""
  esc = html.escape
  rows = []
  for name, value in report["metrics"].items():
    shown = "n/a" if value is None else f"{value:.4g}"
    rows.append(f"<tr><th>{esc(name)}</th><td class=num>{esc(shown)}</td></tr>")
  clusters = []
  for c in report["clusters"]:
    examples = "".join(f"<li>{esc(_short(e))}</li>" for e in c["examples"])
    name = "noise" if c["id"] == cluster_lib.NOISE else str(c["id"])
    clusters.append(
        f"<tr class=cluster data-cluster=\"{esc(str(c['id']))}\"><td class=num>{esc(name)}</td>"
        f"<td class=num>{c['size']}</td><td class=terms>{esc(', '.join(c['top_terms']))}</td>"
        f"<td class=posts><ol>{examples}</ol></td></tr>")
  png = base64.b64encode(png_bytes).decode("ascii")
  title = f"Clusters of {os.path.basename(source)}" if source else "Cluster report"
  doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class=meta>method <b>{esc(report['method'])}</b>, k = {report['k']}, n = {report['n']},
map by {esc(report.get('reduce', ''))}, seed {report.get('seed', '')}</p>
<h2>Summary metrics</h2>
<table class=metrics>{''.join(rows)}</table>
<h2>Map</h2>
<img class=map id=map alt="2-D map of the embeddings coloured by cluster"
 src="data:image/png;base64,{png}">
<h2>Clusters</h2>
<table class=clusters>
<thead><tr><th>cluster</th><th>size</th><th>top terms</th><th>representative posts</th></tr></thead>
<tbody>
{chr(10).join(clusters)}
</tbody></table>
</body></html>
"""
  with open(path, "w", encoding="utf-8") as f:
    f.write(doc)


def analyze(npz_path, out_dir, *, method="kmeans", k=None, k_min=2, k_max=20,
            reduce="tsne", seed=0, eps=None, min_samples=5, max_examples=5,
            normalize=None):
  """Clusters the embeddings in npz_path and writes the four report files to out_dir.

  method: kmeans | dbscan | spectral | agglomerative. k=None picks k in
  k_min..k_max by silhouette (k-means); dbscan takes eps/min_samples instead.
  reduce: tsne | pca, for map.png only. normalize: None | standardize | l2,
  applied before clustering (l2 clusters by cosine similarity). Returns the
  report.json dict.
  """
  # Arguments first: a typo should not cost a load of a large file.
  if method not in METHODS:
    raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
  if reduce not in REDUCERS:
    raise UserError(f"unknown reduce {reduce!r}; use one of {', '.join(REDUCERS)}")
  if normalize not in reduce_lib.NORMALIZE:
    raise UserError(f"unknown normalize {normalize!r}; use one of standardize, l2 or none")
  if method == "dbscan" and k is not None:
    raise UserError("k does not apply to method dbscan; drop --k and set --eps/--min-samples")
  if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2):
    raise UserError(
        f"k={k!r} is invalid; use an integer k >= 2, or omit k to choose it by silhouette")
  if k is None and method != "dbscan" and not 2 <= k_min <= k_max:
    raise UserError(f"bad k range {k_min}..{k_max}; use 2 <= k-min <= k-max")
  if eps is not None and not eps > 0:
    raise UserError(f"eps={eps!r} is invalid; use eps > 0, or omit it to estimate it")
  if int(min_samples) < 1 or int(max_examples) < 0:
    raise UserError("min_samples must be >= 1 and max_examples >= 0; fix the flag values")

  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"output path {out_dir} is a file, not a directory; pass a directory for --out")

  x, ids, labels, texts = _load(npz_path)
  n = len(x)
  if n < 2:
    raise UserError(f"{npz_path} holds a single embedding; clustering needs at least 2 points")
  if k is not None and k > n:
    raise UserError(f"k={k} exceeds the {n} points in {npz_path}; use k <= {n}")

  # Cluster.
  xc = reduce_lib.normalize(x, normalize)
  extra = {}  # Settings worth recording beyond the contract keys.
  if method == "dbscan":
    eps = float(eps) if eps is not None else cluster_lib.estimate_eps(xc, min_samples, seed)
    pred = cluster_lib.dbscan(xc, eps, min_samples, seed)
    k = int(pred.max()) + 1  # Clusters found, noise excluded.
    extra.update(eps=eps, min_samples=int(min_samples))
  else:
    if k is None:
      hi = min(k_max, n - 1)  # Silhouette needs at most n - 1 clusters.
      if k_min > hi:
        raise UserError(
            f"cannot choose k in {k_min}..{k_max} for {n} points; pass k or lower k-min")
      k, scores = cluster_lib.choose_k(xc, range(k_min, hi + 1), seed)
      extra["k_scores"] = {str(kk): s for kk, s in scores.items()}  # Silhouettes.
    k = int(k)
    if method == "kmeans":
      pred, _ = cluster_lib.kmeans(xc, k, seed)
    elif method == "spectral":
      pred = cluster_lib.spectral(xc, k, seed)
    else:
      pred = cluster_lib.agglomerative(xc, k, seed)

  # Metrics.
  metrics = cluster_lib.internal_metrics(xc, pred, seed)
  if labels is not None:
    metrics.update(cluster_lib.external_metrics(labels, pred))

  # Describe each cluster. Centres are member means (k-means' own centres are
  # those means at convergence) so every method is described the same way.
  terms = top_terms(texts, pred) if texts is not None else {}
  centers = cluster_lib.cluster_means(xc, pred, k)
  reps = representatives(xc, pred, centers, max_examples)
  shown = texts if texts is not None else ids
  entries = []
  for c in range(k):
    size = int((pred == c).sum())
    if size:
      entries.append({"id": c, "size": size, "top_terms": terms.get(c, []),
                      "examples": [_py(shown[i]) for i in reps[c]]})
  noise = np.flatnonzero(pred == cluster_lib.NOISE)
  if len(noise):  # Noise has no centre: show a seeded random sample.
    sample = np.random.default_rng(seed).permutation(noise)[:max_examples]
    entries.append({"id": cluster_lib.NOISE, "size": int(len(noise)),
                    "top_terms": terms.get(cluster_lib.NOISE, []),
                    "examples": [_py(shown[i]) for i in sample]})
  report = {"method": method, "k": k, "n": n, "metrics": metrics, "clusters": entries,
            "reduce": reduce, "seed": int(seed), "normalize": normalize, **extra}

  # Write.
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, ensure_ascii=False, allow_nan=False)
  with open(os.path.join(out_dir, "clusters.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "cluster"])
    w.writerows(zip((_as_str(_py(i)) for i in ids), pred.tolist()))
  if reduce == "tsne":
    coords = reduce_lib.tsne(xc, seed)
  else:
    coords = reduce_lib.pca(xc, 2, seed)
  map_path = os.path.join(out_dir, "map.png")
  save_map(map_path, coords, pred, labels, title=f"{reduce} map")
  with open(map_path, "rb") as f:
    write_html(os.path.join(out_dir, "report.html"), report, f.read(), source=npz_path)
  return report
