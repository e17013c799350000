"""Tests for tx_jax.analysis against independent references (sklearn, naive numpy)."""

import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.datasets import make_blobs
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from tx_jax.analysis import cluster
from tx_jax.analysis import reduce
from tx_jax.analysis import report
from tx_jax.errors import UserError

TOPICS = {
    0: "apple banana cherry orchard harvest fruit juicy",
    1: "rocket orbit launch satellite astronaut spacecraft",
    2: "python compiler function variable debugger syntax",
    3: "goalkeeper football match stadium striker referee",
}


def _blobs(n=400, d=16, k=4, seed=0, std=1.0):
  x, y = make_blobs(n, d, centers=k, cluster_std=std, center_box=(-20, 20), random_state=seed)
  return x.astype(np.float32), y


def _texts(y, seed=0):
  """Posts whose words come from their topic, plus shared filler, stop words and numbers."""
  rng = np.random.default_rng(seed)
  out = []
  for i, c in enumerate(y):
    words = rng.choice(TOPICS[int(c)].split(), size=4).tolist()
    out.append(f"The {' '.join(words)} and the post {i} today 2024 x")
  return np.asarray(out)


def _write_npz(path, x, y=None, texts=None, **extra):
  arrays = {"embeddings": x, "ids": np.arange(1000, 1000 + len(x))}
  if y is not None:
    arrays["labels"] = y
  if texts is not None:
    arrays["texts"] = texts
  arrays.update(extra)
  np.savez(path, **arrays)
  return str(path)


# Metrics.


def test_internal_metrics_equal_sklearn():
  x, y = _blobs(300)
  pred = np.random.default_rng(1).integers(0, 3, len(x))  # Arbitrary labels: not just easy ones.
  got = cluster.internal_metrics(x, pred, seed=0)
  assert got["silhouette"] == pytest.approx(skm.silhouette_score(x, pred), rel=1e-6)
  assert got["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(x, pred), rel=1e-6)
  assert got["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(x, pred), rel=1e-6)
  assert "noise_fraction" not in got


def test_silhouette_uses_seeded_subsample_for_large_n():
  x, y = _blobs(6000, d=8, k=3, std=4.0)
  got = cluster.internal_metrics(x, y, seed=3)["silhouette"]
  want = skm.silhouette_score(x, y, sample_size=5000, random_state=3)
  assert got == pytest.approx(want, rel=1e-6)
  assert cluster.internal_metrics(x, y, seed=3)["silhouette"] == got


def test_internal_metrics_leave_out_noise():
  x, y = _blobs(300)
  pred = y.copy()
  pred[::10] = -1
  got = cluster.internal_metrics(x, pred)
  keep = pred != -1
  assert got["silhouette"] == pytest.approx(skm.silhouette_score(x[keep], pred[keep]), rel=1e-6)
  assert got["davies_bouldin"] == pytest.approx(
      skm.davies_bouldin_score(x[keep], pred[keep]), rel=1e-6)
  assert got["noise_fraction"] == pytest.approx(0.1)
  one = np.zeros(len(x), int)
  assert cluster.internal_metrics(x, one)["silhouette"] is None  # Undefined, not NaN.


@pytest.mark.parametrize("as_str", [False, True])
def test_external_metrics_equal_sklearn_and_naive_purity(as_str):
  rng = np.random.default_rng(0)
  true = rng.integers(0, 5, 500)
  pred = np.where(rng.random(500) < 0.7, true, rng.integers(-1, 7, 500))
  if as_str:
    true = np.asarray([f"class_{t}" for t in true])
  got = cluster.external_metrics(true, pred)
  assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(true, pred), rel=1e-9)
  assert got["ari"] == pytest.approx(skm.adjusted_rand_score(true, pred), rel=1e-9)
  naive = 0
  for c in set(pred.tolist()):
    members = [t for t, p in zip(true.tolist(), pred.tolist()) if p == c]
    naive += max(collections.Counter(members).values())
  assert got["purity"] == pytest.approx(naive / len(true), rel=1e-12)
  assert 0.5 < got["purity"] < 1.0


# Clustering.


def test_kmeans_recovers_blobs_and_is_reproducible():
  x, y = _blobs(500, k=5)
  pred, centers = cluster.kmeans(x, 5, seed=0)
  assert skm.adjusted_rand_score(y, pred) > 0.99
  assert centers.shape == (5, x.shape[1])
  again, _ = cluster.kmeans(x, 5, seed=0)
  np.testing.assert_array_equal(pred, again)


def test_choose_k_finds_true_k():
  x, _ = _blobs(500, k=5)
  k, scores = cluster.choose_k(x, range(2, 9), seed=0)
  assert k == 5
  assert set(scores) == set(range(2, 9))
  assert scores[5] == max(scores.values())


@pytest.mark.parametrize("method", ["spectral", "agglomerative"])
@pytest.mark.parametrize("max_fit", [5000, 150])  # Full fit, and subsample-then-assign.
def test_graph_and_ward_recover_blobs(method, max_fit):
  x, y = _blobs(600, k=4)
  fn = getattr(cluster, method)
  pred = fn(x, 4, seed=0, max_fit=max_fit)
  assert pred.shape == (600,)
  assert skm.adjusted_rand_score(y, pred) > 0.99
  np.testing.assert_array_equal(pred, fn(x, 4, seed=0, max_fit=max_fit))


def test_dbscan_estimated_eps_finds_blobs_and_noise():
  x, y = _blobs(600, d=4, k=3, std=0.5)
  outliers = np.random.default_rng(0).uniform(-60, 60, (12, 4)).astype(np.float32)
  xa = np.concatenate([x, outliers])
  pred = cluster.dbscan(xa, eps=None, min_samples=5, seed=0)
  assert skm.adjusted_rand_score(y, pred[:600]) > 0.99
  assert (pred[600:] == -1).mean() > 0.9
  assert (pred[:600] == -1).mean() < 0.02
  np.testing.assert_array_equal(pred, cluster.dbscan(xa, eps=None, min_samples=5, seed=0))


# Reduction.


def test_pca_and_normalize():
  x, _ = _blobs(200)
  got = reduce.pca(x, 2, seed=0)
  xc = x - x.mean(0)
  _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
  want = xc @ vt[:2].T
  np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-3, atol=1e-3)  # Up to sign.
  assert reduce.pca(x[:, :1], 2).shape == (200, 2)  # D < 2 is padded, not an error.
  np.testing.assert_allclose(np.linalg.norm(reduce.normalize(x, "l2"), axis=1), 1.0, rtol=1e-5)
  z = reduce.normalize(x, "standardize")
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)
  with pytest.raises(UserError, match="normalize"):
    reduce.normalize(x, "cosine")


def test_tsne_subsample_keeps_clusters():
  x, y = _blobs(400, d=64, k=3)  # D > 50: goes through PCA-50 first.
  coords = reduce.tsne(x, seed=0, max_fit=200)  # 200 points placed by neighbours.
  assert coords.shape == (400, 2) and np.isfinite(coords).all()
  pred, _ = cluster.kmeans(coords, 3, seed=0)
  assert skm.adjusted_rand_score(y, pred) > 0.99
  np.testing.assert_array_equal(coords, reduce.tsne(x, seed=0, max_fit=200))


# Reports.


def _naive_ctfidf(texts, clusters, n):
  """c-TF-IDF by hand: counts per class, tf / words(class) * log(1 + avg words / tf(all))."""
  per_class = collections.defaultdict(collections.Counter)
  for text, c in zip(texts, clusters):
    for tok in re.findall(r"\b\w\w+\b", text.lower()):
      if not tok.isdigit() and tok not in ENGLISH_STOP_WORDS:
        per_class[c][tok] += 1
  total = collections.Counter()
  for counts in per_class.values():
    total.update(counts)
  avg = sum(sum(c.values()) for c in per_class.values()) / len(per_class)
  out = {}
  for c, counts in per_class.items():
    words = sum(counts.values())
    score = {t: v / words * math.log(1 + avg / total[t]) for t, v in counts.items()}
    out[c] = sorted(score, key=lambda t: (-score[t], t))[:n]
  return out


def test_top_terms_ctfidf():
  y = np.repeat(np.arange(4), 50)
  texts = _texts(y)
  got = report.top_terms(texts, y, n=5)
  assert set(got) == {0, 1, 2, 3}
  for c, terms in got.items():
    assert len(terms) == 5
    assert set(terms) <= set(TOPICS[c].split()), (c, terms)  # Not "post", "today", "2024".
  assert got == _naive_ctfidf(texts.tolist(), y.tolist(), 5)
  # Overlapping vocabularies and unequal sizes, where the exact weighting decides the order.
  rng = np.random.default_rng(0)
  vocab = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(80)]
  y3 = rng.integers(0, 5, 300) ** 2  # Cluster ids 0, 1, 4, 9, 16 of unequal sizes.
  probs = {c: rng.dirichlet(np.full(80, 0.3)) for c in np.unique(y3)}
  texts3 = [" ".join(rng.choice(vocab, size=rng.integers(3, 30), p=probs[c])) for c in y3]
  assert report.top_terms(texts3, y3, n=10) == _naive_ctfidf(texts3, y3.tolist(), 10)
  # A 10-post cluster beside a 150-post one still gets its own words, not shared ones.
  y2 = np.array([0] * 150 + [1] * 10)
  got2 = report.top_terms(_texts(y2), y2, n=3)
  assert set(got2[1]) <= set(TOPICS[1].split())


def test_representatives_are_nearest_to_centre():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  labels = rng.integers(0, 4, 300)
  centers = rng.normal(size=(4, 8)).astype(np.float32)
  got = report.representatives(x, labels, centers, n=3)
  for j in range(4):
    members = np.flatnonzero(labels == j)
    d = np.linalg.norm(x[members] - centers[j], axis=1)
    assert got[j][0] == members[np.argmin(d)]
    np.testing.assert_array_equal(np.sort(got[j]), np.sort(members[np.argsort(d)[:3]]))


def test_tfidf_kmeans_baseline():
  y = np.repeat(np.arange(4), 40)
  assert report.tfidf_kmeans_nmi(_texts(y), y, 4, seed=0) > 0.99
  shuffled = np.random.default_rng(0).permutation(y)
  assert report.tfidf_kmeans_nmi(_texts(y), shuffled, 4, seed=0) < 0.2


@pytest.fixture(scope="module")
def labelled_report(tmp_path_factory):
  d = tmp_path_factory.mktemp("analyze")
  x, y = _blobs(400, d=32, k=4)
  # Markup must be escaped and long posts truncated in HTML; numbers are no terms.
  texts = np.asarray([f"<script>alert('x')</script> {t}" + " 0123456789" * 40 for t in _texts(y)])
  path = _write_npz(d / "emb.npz", x, np.asarray([f"topic{v}" for v in y]), texts)
  out = d / "out"
  rep = report.analyze(path, str(out), method="kmeans", k=None, k_max=8, reduce="tsne", seed=0)
  return rep, out, y


def test_analyze_writes_report(labelled_report):
  rep, out, y = labelled_report
  assert sorted(os.listdir(out)) == ["clusters.csv", "map.png", "report.html", "report.json"]
  on_disk = json.loads((out / "report.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
  assert on_disk == rep
  assert {"method", "k", "n", "metrics", "clusters"} <= set(rep)
  assert rep["method"] == "kmeans" and rep["k"] == 4 and rep["n"] == 400
  assert set(rep["metrics"]) == {"silhouette", "calinski_harabasz", "davies_bouldin",
                                 "nmi", "ari", "purity"}
  assert rep["metrics"]["ari"] > 0.99 and rep["metrics"]["purity"] == 1.0
  assert sum(c["size"] for c in rep["clusters"]) == 400
  for c in rep["clusters"]:
    assert set(c) == {"id", "size", "top_terms", "examples"}
    assert len(c["examples"]) == 5 and all(isinstance(e, str) for e in c["examples"])
    assert 5 <= len(c["top_terms"]) <= 10  # Only words the cluster uses: ~6 topic words + 2 shared.
    topic = collections.Counter(y[np.asarray(_cluster_column(out)) == c["id"]]).most_common(1)[0][0]
    assert set(c["top_terms"][:5]) <= set(TOPICS[topic].split())
  rows = (out / "clusters.csv").read_text().splitlines()
  assert rows[0] == "id,cluster" and len(rows) == 401
  assert rows[1].split(",")[0] == "1000"  # The ids from the file, not row numbers.


def _cluster_column(out):
  return [int(r.split(",")[1]) for r in (out / "clusters.csv").read_text().splitlines()[1:]]


def test_map_png_size(labelled_report, tmp_path):
  import matplotlib.image
  _, out, _ = labelled_report
  data = (out / "map.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(out / "map.png").shape[:2] == (800, 1600)  # Two panels.
  # Without labels: one 800x800 panel, examples fall back to ids.
  x, _ = _blobs(120, d=8, k=3)
  path = _write_npz(tmp_path / "e.npz", x)
  rep = report.analyze(path, str(tmp_path / "o"), k=3, reduce="pca")
  assert matplotlib.image.imread(tmp_path / "o" / "map.png").shape[:2] == (800, 800)
  assert set(rep["metrics"]) == {"silhouette", "calinski_harabasz", "davies_bouldin"}
  assert all(isinstance(e, int) and e >= 1000 for c in rep["clusters"] for e in c["examples"])


def test_report_html_is_self_contained(labelled_report):
  rep, out, _ = labelled_report
  page = (out / "report.html").read_text()
  assert 'src="data:image/png;base64,' in page
  assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # No external requests.
  assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
  assert " 0123456789" * 30 not in page and " 0123456789" * 10 + "\u2026" in page  # ~300 chars.
  assert page.count("<tr class=cluster") == len(rep["clusters"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs `apt-get install -y chromium`")
def test_report_html_renders_in_chromium(labelled_report, tmp_path):
  rep, out, _ = labelled_report
  # Probe: after load, copy the map's decoded width into the DOM so --dump-dom shows it.
  probe = ("<script>window.addEventListener('load', () => {"
           "const img = document.getElementById('map');"
           "document.body.setAttribute('data-img-width', img.naturalWidth);});</script>")
  page = (out / "report.html").read_text().replace("</body>", probe + "</body>")
  (tmp_path / "page.html").write_text(page)
  shot = tmp_path / "shot.png"
  common = [shutil.which("chromium"),
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
            "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000"]
  url = (tmp_path / "page.html").as_uri()
  dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert 'data-img-width="1600"' in dom, dom[-2000:]
  assert dom.count('<tr class="cluster"') == len(rep["clusters"])
  for c in rep["clusters"]:
    assert f'data-cluster="{c["id"]}"' in dom
    assert ", ".join(c["top_terms"][:3]) in dom
  subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2000", url],
                 capture_output=True, timeout=120, check=True)
  import matplotlib.image
  img = matplotlib.image.imread(shot)
  assert img.shape[:2] == (2000, 1280)
  # Only the map has coloured (non-grey) pixels; a page without it has none.
  assert (img[..., :3].std(axis=-1) > 0.1).mean() > 0.002


def test_analyze_dbscan_spectral_agglomerative(tmp_path):
  x, y = _blobs(300, d=8, k=3, std=0.5)
  path = _write_npz(tmp_path / "e.npz", x, y)
  for method in ("spectral", "agglomerative"):
    rep = report.analyze(path, str(tmp_path / method), method=method, k=3, reduce="pca")
    assert rep["metrics"]["ari"] > 0.99
  rep = report.analyze(path, str(tmp_path / "db"), method="dbscan", reduce="pca")
  assert rep["k"] == 3 and rep["metrics"]["noise_fraction"] < 0.1
  pred = np.asarray(_cluster_column(tmp_path / "db"))
  assert skm.adjusted_rand_score(y[pred >= 0], pred[pred >= 0]) > 0.99
  assert sum(c["size"] for c in rep["clusters"]) == 300  # Noise, if any, is listed (id -1).
  json.dumps(rep, allow_nan=False)


def test_analyze_is_reproducible(tmp_path):
  x, _ = _blobs(300, d=8, k=6, std=3.0)
  path = _write_npz(tmp_path / "e.npz", x)
  a = report.analyze(path, str(tmp_path / "a"), k=6, reduce="pca", seed=7)
  b = report.analyze(path, str(tmp_path / "b"), k=6, reduce="pca", seed=7)
  assert a == b
  csv_a, csv_b = (tmp_path / "a" / "clusters.csv"), (tmp_path / "b" / "clusters.csv")
  assert csv_a.read_text() == csv_b.read_text()


def test_analyze_degenerate_inputs(tmp_path):
  # Identical rows crash sklearn's Barnes-Hut t-SNE (segfault) unless guarded.
  path = _write_npz(tmp_path / "same.npz", np.ones((20, 4), np.float32))
  rep = report.analyze(path, str(tmp_path / "same"), k=3, reduce="tsne")
  assert rep["metrics"]["silhouette"] is None and rep["clusters"][0]["size"] == 20
  # Two points, k = 2; and all-noise DBSCAN: metrics undefined, files still written.
  x, _ = _blobs(30, d=3, k=2)
  rep = report.analyze(_write_npz(tmp_path / "two.npz", x[:2]), str(tmp_path / "two"), k=2)
  assert [c["size"] for c in rep["clusters"]] == [1, 1]
  rep = report.analyze(_write_npz(tmp_path / "db.npz", x), str(tmp_path / "db"),
                       method="dbscan", eps=1e-6, reduce="pca")
  assert rep["k"] == 0 and rep["metrics"]["noise_fraction"] == 1.0
  assert rep["clusters"] == [{"id": -1, "size": 30, "top_terms": [],
                              "examples": rep["clusters"][0]["examples"]}]
  assert len(os.listdir(tmp_path / "db")) == 4


def _bad_inputs(tmp_path):
  x, _ = _blobs(50, d=4, k=2)
  (tmp_path / "notes.txt").write_text("not an archive")
  np.save(tmp_path / "arr.npy", x)
  np.savez(tmp_path / "nokey.npz", vectors=x)
  np.savez(tmp_path / "empty.npz", embeddings=np.zeros((0, 8), np.float32))
  nan = x.copy()
  nan[7, 1] = np.nan
  np.savez(tmp_path / "nan.npz", embeddings=nan)
  inf = x.copy()
  inf[3, 0] = np.inf
  np.savez(tmp_path / "inf.npz", embeddings=inf)
  np.savez(tmp_path / "ok.npz", embeddings=x)
  np.savez(tmp_path / "badids.npz", embeddings=x, ids=np.arange(3))
  return {
      "missing": (tmp_path / "nope.npz", {}, "not found"),
      "not_npz": (tmp_path / "notes.txt", {}, "not an .npz"),
      "npy": (tmp_path / "arr.npy", {}, "not an .npz"),
      "no_key": (tmp_path / "nokey.npz", {}, "no 'embeddings'.*vectors"),
      "empty": (tmp_path / "empty.npz", {}, "empty"),
      "nan": (tmp_path / "nan.npz", {}, "NaN/inf in 1 of 50 rows.*row 7"),
      "inf": (tmp_path / "inf.npz", {}, "NaN/inf.*row 3"),
      "k_too_big": (tmp_path / "ok.npz", {"k": 51}, "k=51 exceeds the 50 points"),
      "k_too_small": (tmp_path / "ok.npz", {"k": 1}, "k=1 is invalid.*k >= 2"),
      "method": (tmp_path / "ok.npz", {"method": "hdbscan"}, "unknown method 'hdbscan'.*kmeans"),
      "reduce": (tmp_path / "ok.npz", {"reduce": "umap"}, "unknown reduce 'umap'"),
      "ids_length": (tmp_path / "badids.npz", {}, "'ids'.*shape \\(3,\\).*50 embeddings"),
  }


@pytest.mark.parametrize("case", ["missing", "not_npz", "npy", "no_key", "empty", "nan", "inf",
                                  "k_too_big", "k_too_small", "method", "reduce", "ids_length"])
def test_bad_input_raises_user_error(case, tmp_path):
  path, kwargs, message = _bad_inputs(tmp_path)[case]
  with pytest.raises(UserError, match=message) as e:
    report.analyze(str(path), str(tmp_path / "out"), **{"reduce": "pca", **kwargs})
  assert "\n" not in str(e.value) and ";" in str(e.value)  # One line: problem; fix.
  assert not (tmp_path / "out").exists()  # Nothing written on bad input.


def test_import_pulls_no_jax_or_pyplot():
  code = ("import sys, tx_jax.analysis; "
          "bad = [m for m in ('jax', 'flax', 'tx_jax.train', 'matplotlib.pyplot') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
