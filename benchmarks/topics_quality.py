"""Topic quality on the standard library's docstrings: TF-IDF + k-means vs the topic pipeline.

  python benchmarks/topics_quality.py [--embeddings E.npz] [--seeds 0 1 2]

The 2,154 docstrings of `embedded:stdlib-docstrings` come from 18 top-level
packages; the labels are held back and only score the topics (NMI, ARI).
Beside NMI every row gives the topics' own quality, which needs no labels:
NPMI coherence of the top-10 c-TF-IDF terms over the docstrings themselves,
and topic diversity (share of unique top terms).

Rows: the plain baseline (`report.tfidf_kmeans_nmi`: sparse TF-IDF + k-means,
k = 18), then `analysis.topic_model.fit_topics` on TF-IDF features (LSA-100)
with k-means k = 18, UMAP -> k-means, UMAP -> HDBSCAN (min_topic_size 10,
outliers to the nearest centroid) and that reduced to 18 topics. With
--embeddings (a `tx-jax embed` .npz of embedded:stdlib-docstrings) the same
rows run on the model's embeddings and on `both` views.

Writes benchmarks/results/topics_quality.{json,md}.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLUSTERINGS = {
    "k-means k=18": dict(method="kmeans", k=18, umap=False),
    "UMAP -> k-means k=18": dict(method="kmeans", k=18, umap=True),
    "UMAP -> HDBSCAN": dict(method="hdbscan", min_topic_size=10),
    "UMAP -> HDBSCAN, reduced to 18": dict(method="hdbscan", min_topic_size=10, reduce_topics=18),
}


def _summary(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
          "max": round(float(np.max(values)), 4)}


def run_row(name, features, settings, embeddings, texts, labels, seeds):
  from tx_jax.analysis import topic_model
  from tx_jax.errors import UserError
  runs, t0 = [], time.perf_counter()
  for seed in seeds:
    try:
      r = topic_model.fit_topics(embeddings, texts, labels=labels, features=features,
                                 baseline=False, seed=seed, **settings)
    except UserError as e:  # e.g. HDBSCAN found fewer than 18 topics to reduce.
      print(json.dumps({"row": name, "features": features, "seed": seed, "skipped": str(e)}))
      continue
    runs.append(r.fit.metrics)
  if not runs:
    return None
  row = {"row": name, "features": features, "settings": settings, "seeds": list(seeds),
         "seconds_per_seed": round((time.perf_counter() - t0) / len(seeds), 1)}
  for key in ("nmi", "ari", "npmi", "diversity", "topics", "silhouette",
              "noise_fraction_before_outliers"):
    row[key] = _summary([m.get(key) for m in runs])
  print(json.dumps(row), flush=True)
  return row


def baseline_row(texts, labels, seeds):
  """The plain TF-IDF + k-means baseline; its NPMI / diversity from c-TF-IDF of its clusters."""
  from sklearn.cluster import KMeans
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.metrics import adjusted_rand_score
  from tx_jax.analysis import coherence, ctfidf
  from tx_jax.analysis.report import TOKEN_PATTERN, tfidf_kmeans_nmi
  doc_terms, vocab, _ = ctfidf.count_terms(texts)
  feats = TfidfVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN,
                          sublinear_tf=True).fit_transform(texts)
  nmi, ari, npmi, div = [], [], [], []
  for seed in seeds:
    nmi.append(tfidf_kmeans_nmi(texts, labels, 18, seed))
    pred = KMeans(18, n_init=3, random_state=seed).fit_predict(feats)  # Same as above.
    ari.append(adjusted_rand_score(labels, pred))
    top = ctfidf.top_terms(ctfidf.class_tfidf(doc_terms, vocab, pred), 10, diversity=0.3)
    words = [[w for w, _ in top[c]] for c in sorted(top)]
    npmi.append(np.mean([coherence.topic_npmi(w, doc_terms, vocab) for w in words]))
    div.append(coherence.diversity(words))
  row = {"row": "TF-IDF (sparse) + k-means k=18 (report.tfidf_kmeans_nmi)", "features": "tfidf",
         "seeds": list(seeds),
         "nmi": _summary(nmi), "ari": _summary(ari), "npmi": _summary(npmi),
         "diversity": _summary(div), "topics": _summary([18] * len(seeds))}
  print(json.dumps(row), flush=True)
  return row


def _load_embeddings(path, n):
  data = np.load(path, allow_pickle=False)
  x, ids = data["embeddings"], data["ids"]
  if len(x) != n or not np.issubdtype(ids.dtype, np.integer) or (ids != np.arange(n)).any():
    raise SystemExit(f"{path} must embed all {n} docstrings in order (tx-jax embed --data "
                     "embedded:stdlib-docstrings, no --sample)")
  meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
  return x.astype(np.float32), meta


def markdown(result):
  lines = [
      "# Topic quality on stdlib docstrings: TF-IDF + k-means vs the topic pipeline", "",
      f"{result['n']} docstrings of `embedded:stdlib-docstrings`, 18 packages (labels held "
      f"back; they only score). Mean [min, max] over seeds {result['seeds']}. NPMI: mean "
      "coherence of each topic's top-10 c-TF-IDF terms (1-2-grams, MMR diversity 0.3) over "
      "the docstrings; diversity: share of unique top terms. Outliers (HDBSCAN noise) are "
      f"joined to the nearest topic centroid. Python {result['python']}; {result['machine']}.",
      "", f"Command: `{result['command']}`", "",
      "| features | clustering | topics | NMI | ARI | NPMI | diversity | s / seed |",
      "|---|---|---|---|---|---|---|---|"]
  fmt = lambda s: "n/a" if s is None else f"{s['mean']} [{s['min']}, {s['max']}]"
  for r in result["rows"]:
    seeds = f" (seeds {r['seeds']})" if r.get("seeds") not in (None, result["seeds"]) else ""
    lines.append(f"| {r['features']} | {r['row']}{seeds} | {fmt(r['topics'])} | {fmt(r['nmi'])} | "
                 f"{fmt(r['ari'])} | {fmt(r['npmi'])} | {fmt(r['diversity'])} | "
                 f"{r.get('seconds_per_seed', '')} |")
  if result.get("embeddings"):
    lines += ["", f"Model embeddings: `{result['embeddings']}` ({json.dumps(result['meta'])})."]
  lines += [""] + [f"- {n}" for n in result.get("notes", [])] + [""]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--embeddings", help="tx-jax embed .npz of embedded:stdlib-docstrings")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--features", nargs="+", choices=("tfidf", "model", "both"),
                      help="feature rows to run (default: tfidf, and model / both with "
                           "--embeddings)")
  parser.add_argument("--add", action="store_true",
                      help="keep the rows of the existing --out file and add these")
  parser.add_argument("--note", action="append", default=[])
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "topics_quality.json"))
  args = parser.parse_args()
  from tx_jax.data import sources
  source = sources.open_source("embedded:stdlib-docstrings")
  texts = [source[i]["text"] for i in range(len(source))]
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  embeddings, meta = (None, {}) if not args.embeddings else _load_embeddings(
      args.embeddings, len(texts))
  features_rows = args.features or ["tfidf"] + (["model", "both"] if embeddings is not None
                                                else [])
  old = {}
  if args.add:
    with open(args.out) as f:
      old = json.load(f)
  rows = [r for r in old.get("rows", []) if r["features"] not in features_rows]
  if not rows:
    rows.append(baseline_row(texts, labels, args.seeds))
  for features in features_rows:
    for name, settings in CLUSTERINGS.items():
      row = run_row(name, features, settings, embeddings, texts, labels, args.seeds)
      if row is not None:
        rows.append(row)
  command = " ".join(["python", "benchmarks/topics_quality.py", *sys.argv[1:]])
  result = {"n": len(texts), "seeds": sorted(set(old.get("seeds", [])) | set(args.seeds)),
            "python": sys.version.split()[0], "rows": rows,
            "embeddings": args.embeddings or old.get("embeddings"),
            "meta": meta or old.get("meta", {}), "notes": old.get("notes", []) + args.note,
            "command": "; ".join(([old["command"]] if old else []) + [command]),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "machine": f"shared {os.cpu_count()}-core CPU (other jobs running)"}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
