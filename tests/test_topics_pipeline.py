"""Tests for the topic pipeline (tx_jax.analysis.topic_model and its parts) on small sets
whose answers are known, against naive numpy / python references."""

import itertools
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
from scipy import sparse
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from tx_jax.analysis import coherence
from tx_jax.analysis import ctfidf
from tx_jax.analysis import hierarchy
from tx_jax.analysis import over_time
from tx_jax.analysis import posts
from tx_jax.analysis import topic_model
from tx_jax.analysis import topic_report
from tx_jax.data import sources
from tx_jax.errors import UserError

WORDS = {
    0: "apple banana cherry orchard harvest fruit juicy",
    1: "rocket orbit launch satellite astronaut spacecraft",
    2: "python compiler function variable debugger syntax",
    3: "goalkeeper football match stadium striker referee",
}


def _posts(n_per=30, k=4, seed=0, d=8):
  """Blobs [n, d] and posts drawn from each blob's own words (plus filler)."""
  x, y = make_blobs(n_per * k, d, centers=k, cluster_std=1.0, center_box=(-10, 10),
                    random_state=seed)
  rng = np.random.default_rng(seed)
  texts = [f"the {' '.join(rng.choice(WORDS[int(c)].split(), 4, replace=False))} and {i}"
           for i, c in enumerate(y)]
  return x.astype(np.float32), y, texts


# Posts as they come.


def test_token_pattern_keeps_hashtags_mentions_emoji_and_cleaning_options():
  counts, vocab, _ = ctfidf.count_terms(
      ["Loving #JAX today \U0001F680 see https://example.com/x @alice", "#jax \U0001F680 2024"],
      ngram_range=(1, 1), min_df=1)
  assert {"#jax", "\U0001F680", "loving", "today"} <= set(vocab)
  assert "2024" not in vocab and "see" not in vocab  # A number, a stop word.
  text = "hi @bob look https://t.co/abc and www.x.org/y"
  assert posts.clean_text(text, urls="remove", mentions="token").split() == [
      "hi", "@user", "look", "and"]
  assert posts.clean_text(text, urls="token", mentions="remove").split() == [
      "hi", "look", "URL", "and", "URL"]
  assert posts.clean_text(text, urls="keep", mentions="keep") == text
  with pytest.raises(UserError):
    posts.clean_text(text, urls="hide")


def test_collapse_reposts_counts_and_all_duplicates_is_a_user_error():
  r = posts.collapse_reposts(["a b", "c", "a  b", "a b ", "d"])
  np.testing.assert_array_equal(r.unique, [0, 1, 4])
  np.testing.assert_array_equal(r.inverse, [0, 1, 0, 0, 2])
  np.testing.assert_array_equal(r.counts, [3, 1, 1])
  with pytest.raises(UserError, match="all 3 posts are the same text"):
    posts.collapse_reposts(["same post", "same post", " same  post"])
  x, _, _ = _posts()
  with pytest.raises(UserError, match="same text"):
    topic_model.fit_topics(x[:5], ["repost"] * 5, features="model", method="kmeans", k=2)


def test_file_posts_keep_id_created_at_author(tmp_path):
  path = tmp_path / "posts.csv"
  path.write_text("id,author,text,created_at,label\n"
                  "p1,ann,first post,2024-01-02,news\np2,bob,,2024-01-03,news\n"
                  "p3,cy,third post,1704412800,sport\n")
  got = posts.load_posts(f"file:{path}")
  assert got.texts == ["first post", "third post"]
  np.testing.assert_array_equal(got.ids, ["p1", "p3"])
  assert got.created_at == ["2024-01-02", "1704412800"] and got.authors == ["ann", "cy"]
  assert [got.label_names[i] for i in got.labels] == ["news", "sport"]
  jsonl = tmp_path / "posts.jsonl"
  jsonl.write_text('{"text": "a", "created_at": 5}\n{"text": "b", "author": "z"}\n')
  src = sources.open_source(f"file:{jsonl}")
  assert src[0] == {"text": "a", "created_at": 5, "author": None}
  assert src[1] == {"text": "b", "created_at": None, "author": "z"}
  (tmp_path / "bad.csv").write_text("body,label\nhello,x\n")
  with pytest.raises(UserError, match="no 'text' column"):
    posts.load_posts(f"file:{tmp_path / 'bad.csv'}")


# c-TF-IDF and MMR.


def test_class_tfidf_equals_naive_formula_and_finds_each_topics_words():
  texts = ["apple apple banana", "banana cherry", "rocket orbit", "orbit launch rocket", "apple"]
  topics = np.array([0, 0, 1, 1, 0])
  counts, vocab, _ = ctfidf.count_terms(texts, ngram_range=(1, 1), min_df=1)
  terms = ctfidf.class_tfidf(counts, vocab, topics)
  # Naive: per class term counts, tf / words * log(1 + mean words per class / total tf).
  tf = {c: {} for c in (0, 1)}
  for text, c in zip(texts, topics):
    for w in text.split():
      tf[c][w] = tf[c].get(w, 0) + 1
  words = {c: sum(v.values()) for c, v in tf.items()}
  mean_words = sum(words.values()) / 2
  for c in (0, 1):
    for j, w in enumerate(vocab):
      total = tf[0].get(w, 0) + tf[1].get(w, 0)
      want = tf[c].get(w, 0) / words[c] * math.log(1 + mean_words / total)
      assert terms.scores[c, j] == pytest.approx(want, rel=1e-12)
  top = ctfidf.top_terms(terms, n=3)
  assert [w for w, _ in top[0]] == ["apple", "banana", "cherry"]
  assert [w for w, _ in top[1]] == ["orbit", "rocket", "launch"]


def test_mmr_picks_diverse_terms():
  relevance = np.array([1.0, 0.99, 0.5])
  similarity = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], float)  # 0 and 1 are one idea.
  assert ctfidf.mmr(relevance, similarity, 3, 0.0) == [0, 1, 2]
  assert ctfidf.mmr(relevance, similarity, 3, 0.5) == [0, 2, 1]
  # In posts: "new york" always comes as a pair; diversity keeps one of the three terms.
  texts = [f"new york {w}" for w in ("pizza", "subway", "pizza", "bagel", "subway", "pizza")]
  counts, vocab, _ = ctfidf.count_terms(texts, min_df=1)
  terms = ctfidf.class_tfidf(counts, vocab, np.zeros(len(texts), int))
  plain = [w for w, _ in ctfidf.top_terms(terms, 3)[0]]
  diverse = [w for w, _ in ctfidf.top_terms(terms, 3, diversity=0.7)[0]]
  pair = {"new", "york", "new york"}
  assert len(pair & set(plain)) == 3
  assert len(pair & set(diverse)) == 1 and diverse[0] == plain[0]
  assert set(diverse[1:]) <= {"pizza", "subway", "bagel"}


# Coherence and diversity.


def test_npmi_equals_hand_computed_reference():
  rng = np.random.default_rng(0)
  occurs = (rng.random((40, 6)) < 0.4).astype(int)
  occurs[:, 5] = occurs[:, 4]           # Always together.
  occurs[:, 3] = 1 - occurs[:, 2]        # Never together.
  vocab = np.array(list("abcdef"))
  got = coherence.npmi_pairs(sparse.csr_matrix(occurs))
  n = len(occurs)
  for i, j in itertools.combinations(range(6), 2):
    p_i, p_j = occurs[:, i].sum() / n, occurs[:, j].sum() / n
    p_ij = (occurs[:, i] * occurs[:, j]).sum() / n
    want = -1.0 if p_ij == 0 else math.log(p_ij / (p_i * p_j)) / -math.log(p_ij)
    assert got[i, j] == pytest.approx(want, abs=1e-12), (i, j)
  assert got[4, 5] == pytest.approx(1.0) and got[2, 3] == -1.0
  pairs = [got[i, j] for i, j in itertools.combinations(range(3), 2)]
  assert coherence.topic_npmi(["a", "b", "c"], occurs, vocab) == pytest.approx(np.mean(pairs))
  assert coherence.topic_npmi(["a"], occurs, vocab) is None


def test_topic_diversity():
  assert coherence.diversity([["a", "b"], ["c", "d"]]) == 1.0
  assert coherence.diversity([["a", "b"], ["a", "c"]]) == 0.75
  assert coherence.diversity([]) is None


# Clustering and outliers.


def test_outlier_reduction_by_centroid_and_by_ctfidf():
  x = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0.9, 0.2], [0.2, 0.8]], np.float32)
  assign = np.array([0, 0, 1, 1, -1, -1])
  texts = ["apple fruit", "apple cherry", "rocket orbit", "rocket launch", "launch today",
           "nothing here"]
  counts, vocab, _ = ctfidf.count_terms(texts, ngram_range=(1, 1), min_df=1)
  by_centroid = topic_model.reduce_outliers(assign, x, counts, vocab, "embeddings")
  np.testing.assert_array_equal(by_centroid, [0, 0, 1, 1, 0, 1])
  by_terms = topic_model.reduce_outliers(assign, x, counts, vocab, "ctfidf")
  np.testing.assert_array_equal(by_terms, [0, 0, 1, 1, 1, -1])  # No known term: stays out.
  np.testing.assert_array_equal(topic_model.reduce_outliers(assign, x, counts, vocab, "none"),
                                assign)


def test_hdbscan_topics_recover_blobs_with_outliers_assigned():
  x, y, texts = _posts()
  far = np.random.default_rng(1).normal(0, 30, (6, x.shape[1])).astype(np.float32)
  xs = np.concatenate([x, far])
  ts = texts + [f"stray remark number {i}" for i in range(6)]
  # Without UMAP (whose neighbour graph ties every point to some cluster) the far
  # points are HDBSCAN noise; outlier reduction then gives each one a topic.
  kept = topic_model.fit_topics(xs, ts, umap=False, min_topic_size=10, outliers="none",
                                baseline=False)
  assert kept.fit.metrics["topics"] == 4 and (kept.topics[-6:] == -1).sum() >= 4
  assert kept.fit.topics[-1]["id"] == -1 and kept.fit.topics[-1]["label"] == "outliers"
  joined = topic_model.fit_topics(xs, ts, umap=False, min_topic_size=10, baseline=False)
  assert (joined.topics >= 0).all() and joined.fit.metrics["noise_fraction_before_outliers"] > 0
  core = kept.topics >= 0  # Joining outliers moves no other post (ids may be renumbered by size).
  assert skm.adjusted_rand_score(joined.topics[core], kept.topics[core]) == 1.0
  r = topic_model.fit_topics(x, texts, labels=y, min_topic_size=10)  # UMAP -> HDBSCAN.
  assert (r.topics >= 0).all() and r.fit.metrics["topics"] == 4
  assert skm.normalized_mutual_info_score(y, r.topics) > 0.95
  for t in r.fit.topics:
    words = set(WORDS[int(np.bincount(y[r.topics == t["id"]]).argmax())].split())
    assert set(t["top_terms"][:3]) <= words and t["label"] == ", ".join(t["top_terms"][:3])
    assert t["npmi"] is not None
  assert r.baseline.features == "tfidf" and "nmi" in r.baseline.metrics
  sizes = [t["size"] for t in r.fit.topics]
  assert sizes == sorted(sizes, reverse=True) and sum(sizes) == len(texts)


def test_same_seed_same_topics():
  x, y, texts = _posts(seed=3)
  a = topic_model.fit_topics(x, texts, min_topic_size=8, features="both", seed=5)
  b = topic_model.fit_topics(x, texts, min_topic_size=8, features="both", seed=5)
  np.testing.assert_array_equal(a.topics, b.topics)
  assert [t["top_terms"] for t in a.fit.topics] == [t["top_terms"] for t in b.fit.topics]
  assert a.fit.metrics == b.fit.metrics


def test_features_both_gives_each_view_equal_weight():
  x, _, texts = _posts()
  settings = topic_model.Settings(features="both")
  both = topic_model.features_for("both", x * 100.0, texts, settings)
  tfidf = topic_model.tfidf_features(texts)
  assert both.shape == (len(x), tfidf.shape[1] + x.shape[1])
  left, right = both[:, :tfidf.shape[1]], both[:, tfidf.shape[1]:]
  assert left.var(axis=0).sum() == pytest.approx(1.0, rel=1e-3)
  assert right.var(axis=0).sum() == pytest.approx(1.0, rel=1e-3)  # The scale of x is gone.
  with pytest.raises(UserError, match="needs the model's embeddings"):
    topic_model.fit_topics(None, texts, features="both")


# Reduction and hierarchy.


def test_reduce_topics_merges_the_most_similar_pair(tmp_path):
  x, y, _ = _posts(n_per=20)
  rng = np.random.default_rng(0)
  # Topics 0 and 1 share most of their words; 2 and 3 have their own.
  vocab = {0: "apple banana cherry orchard plum", 1: "apple banana cherry orchard pear",
           2: WORDS[1], 3: WORDS[2]}
  texts = [" ".join(rng.choice(vocab[int(c)].split(), 4, replace=False)) + f" {i}"
           for i, c in enumerate(y)]
  full = topic_model.fit_topics(x, texts, method="kmeans", k=4, baseline=False)
  assert full.fit.metrics["topics"] == 4 and full.linkage.shape == (3, 4)
  r = topic_model.fit_topics(x, texts, method="kmeans", k=4, reduce_topics=3, baseline=False)
  assert r.fit.metrics["topics"] == 3
  merged_pair = [ids for ids in r.merged.values() if len(ids) == 2]
  assert len(merged_pair) == 1
  fruit = {int(np.bincount(full.topics[y == c]).argmax()) for c in (0, 1)}
  assert set(merged_pair[0]) == fruit
  assert skm.normalized_mutual_info_score(np.where(y <= 1, 0, y - 1), r.topics) > 0.95
  rep = topic_report.write_topic_report(r, str(tmp_path / "rep"), map_reduce="pca")
  assert (tmp_path / "rep" / "hierarchy.png").stat().st_size > 5000 and "merged" in rep
  with pytest.raises(UserError, match="reduce_topics=9 but"):
    topic_model.fit_topics(x, texts, method="kmeans", k=4, reduce_topics=9)


def test_merge_map_replays_the_linkage():
  rows = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], float)
  link = hierarchy.topic_linkage(rows)
  np.testing.assert_array_equal(hierarchy.merge_map(link, 4, 3), [0, 0, 1, 2])
  np.testing.assert_array_equal(hierarchy.merge_map(link, 4, 4), [0, 1, 2, 3])
  with pytest.raises(UserError, match="only 4 topics"):
    hierarchy.merge_map(link, 4, 5)


# Over time.


def test_topics_over_time_counts_per_day_week_month():
  times = over_time.parse_times(
      ["2024-01-01T10:00:00Z", "2024-01-03", 1704412800, "2024-01-15T23:30:00-02:00",
       "1706745600", "2024-02-01 00:00:00+00:00"])
  # 2024-01-05 00:00 UTC, 2024-01-16 01:30 UTC, 2024-02-01 00:00 UTC.
  assert str(times[2]) == "2024-01-05T00:00:00" and str(times[3]) == "2024-01-16T01:30:00"
  topics = np.array([0, 1, 0, 0, 1, 1])
  periods, ids, counts = over_time.topics_over_time(topics, times, "week")
  assert [str(p) for p in periods] == ["2024-01-01", "2024-01-08", "2024-01-15", "2024-01-22",
                                      "2024-01-29"]
  np.testing.assert_array_equal(ids, [0, 1])
  np.testing.assert_array_equal(counts, [[2, 1], [0, 0], [1, 0], [0, 0], [0, 2]])
  periods, _, counts = over_time.topics_over_time(topics, times, "month")
  assert [str(p) for p in periods] == ["2024-01-01", "2024-02-01"]
  np.testing.assert_array_equal(counts, [[3, 1], [0, 2]])
  periods, _, counts = over_time.topics_over_time(topics, times, "day")
  assert len(periods) == 32 and counts.sum() == 6 and counts[0].tolist() == [1, 0]


def test_unparseable_time_names_the_row():
  with pytest.raises(UserError, match=r"'yesterday' in row 3 \(id p3\)"):
    over_time.parse_times(["2024-01-01", 5, "yesterday"], ids=["p1", "p2", "p3"])
  x, _, texts = _posts()
  times = ["2024-01-01"] * len(texts)
  times[7] = "32/13/2024"
  with pytest.raises(UserError, match="row 8"):
    topic_model.fit_topics(x, texts, time_values=times)
  with pytest.raises(UserError, match="unknown time_bin"):
    topic_model.fit_topics(x, texts, time_bin="year")


# The report.


@pytest.fixture(scope="module")
def topic_report_dir(tmp_path_factory):
  x, y, texts = _posts()
  texts[0] = texts[1]  # One repost.
  times = [f"2024-03-{1 + i % 20:02d}T08:00:00Z" for i in range(len(texts))]
  r = topic_model.fit_topics(x, texts, labels=y, label_names=["fruit", "space", "code", "sport"],
                             ids=[f"p{i}" for i in range(len(texts))], time_values=times,
                             min_topic_size=10, time_bin="week")
  out = tmp_path_factory.mktemp("topics")
  captured = {}
  save_map = topic_report.save_map

  def spy(path, coords, clusters, labels=None, title=""):
    captured["labels"] = labels
    save_map(path, coords, clusters, labels, title)

  topic_report.save_map = spy
  try:
    rep = topic_report.write_topic_report(r, str(out), map_reduce="pca")
  finally:
    topic_report.save_map = save_map
  return r, rep, out, captured


def test_report_files_and_json(topic_report_dir):
  r, rep, out, captured = topic_report_dir
  for name in ("report.json", "topics.csv", "clusters.csv", "map.png", "over_time.png", "over_time.csv",
               "hierarchy.png", "report.html"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "report.json").read_text()) == rep
  assert rep["n"] == 120 and rep["distinct"] == 119 and rep["reposts"] == 1
  assert rep["metrics"]["nmi"] > 0.95 and "nmi" in rep["baseline"]["metrics"]
  for key in ("npmi", "diversity", "silhouette", "ari", "purity"):
    assert rep["metrics"][key] is not None
  assert sum(sum(c) for c in rep["over_time"]["counts"].values()) == 120
  header = (out / "over_time.csv").read_text().splitlines()[0]
  assert header == "period," + ",".join(f"topic_{t['id']}" for t in rep["topics"])
  assert set(captured["labels"]) == {"fruit", "space", "code", "sport"}  # Legend: names.
  rows = (out / "topics.csv").read_text().splitlines()
  assert rows[0] == "id,topic,label" and rows[1].startswith("p0,") and len(rows) == 121
  clusters = (out / "clusters.csv").read_text().splitlines()
  assert clusters[0] == "id,cluster" and [c.split(",")[1] for c in clusters[1:]] == [
      str(t) for t in r.topics]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs `apt-get install -y chromium`")
def test_topic_report_renders_and_filters_in_chromium(topic_report_dir, tmp_path):
  r, rep, out, _ = topic_report_dir
  common = [shutil.which("chromium"),
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
            "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000"]
  url = (out / "report.html").as_uri()
  dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert f'data-posts-shown="{rep["distinct"]}"' in dom, dom[-1500:]
  assert dom.count('<tr class="topic"') == len(rep["topics"])
  for t in rep["topics"]:
    assert ", ".join(t["top_terms"][:3]) in dom
  # The search box filters: #search=rocket leaves the distinct posts that say rocket.
  want = sum("rocket" in r.texts[i] for i in r.reposts.unique)
  dom = subprocess.run(common + ["--dump-dom", url + "#search=rocket"], capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert 0 < want < rep["distinct"] and f'data-posts-shown="{want}"' in dom
  shot = tmp_path / "shot.png"
  subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2400", url],
                 capture_output=True, timeout=120, check=True)
  import matplotlib.image
  img = matplotlib.image.imread(shot)
  assert img.shape[:2] == (2400, 1280)
  assert (img[..., :3].std(axis=-1) > 0.1).mean() > 0.002  # The coloured plots are drawn.


def test_topics_report_from_npz_and_posts_file(tmp_path):
  x, y, texts = _posts(n_per=15)
  names = ["fruit", "space", "code", "sport"]
  rows = ["id,text,label,date,author"]
  for i, (t, c) in enumerate(zip(texts, y)):
    long = t + " extra" * 60 if i == 0 else t  # Longer than the .npz keeps.
    rows.append(f"p{i},{long},{names[c]},{1709251200 + 86400 * (i % 10)},user{i % 3}")
  (tmp_path / "posts.csv").write_text("\n".join(rows) + "\n")
  order = np.random.default_rng(0).permutation(len(texts))  # .npz rows in another order.
  np.savez(tmp_path / "e.npz", embeddings=x[order], ids=np.asarray([f"p{i}" for i in order]),
           texts=np.asarray([t[:40] for t in np.asarray(texts)[order]]))
  rep = topic_report.topics_report(str(tmp_path / "e.npz"), str(tmp_path / "out"),
                                   data=f"file:{tmp_path / 'posts.csv'}", method="kmeans", k=4,
                                   time_bin="day", map_reduce="pca")
  assert rep["metrics"]["nmi"] > 0.95 and len(rep["over_time"]["periods"]) == 10
  _, loaded = posts.load_embedded_posts(str(tmp_path / "e.npz"), f"file:{tmp_path / 'posts.csv'}")
  p0 = list(loaded.ids).index("p0")
  assert loaded.texts[p0] == texts[0] + " extra" * 60 and loaded.time_column == "date"
  assert loaded.rows[p0] == 0 and loaded.authors[p0] == "user0"
  by_id = dict(zip((f"p{i}" for i in range(len(texts))), texts))
  for t in rep["topics"]:
    for pid, e in zip(t["example_ids"], t["examples"]):
      assert e.startswith(by_id[pid])  # Each example is its own post's full text.
  no_text = topic_report.topics_report  # Same call on a .npz without texts and no data.
  np.savez(tmp_path / "bare.npz", embeddings=x)
  with pytest.raises(UserError, match="has no texts"):
    no_text(str(tmp_path / "bare.npz"), str(tmp_path / "o2"), method="kmeans", k=4)
  rows[5] = rows[5].replace(rows[5].split(",")[3], "not-a-date")
  (tmp_path / "posts.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(UserError, match=r"date value 'not-a-date' in row 5 \(id p4\)"):
    topic_report.topics_report(str(tmp_path / "e.npz"), str(tmp_path / "o3"),
                               data=f"file:{tmp_path / 'posts.csv'}", method="kmeans", k=4)
