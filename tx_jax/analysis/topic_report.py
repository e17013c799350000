"""Topic reports: report.json, topics.csv, map / over-time / hierarchy PNGs and report.html.

`write_topic_report(result, out_dir)` writes what `fit_topics` found. The HTML
is self-contained (inline CSS, images as data URIs, a small inline script that
filters the posts by text and topic; nothing is fetched from the network).
"""

import base64
import csv
import html
import json
import os

import numpy as np

from tx_jax.analysis import over_time
from tx_jax.analysis import posts as posts_lib
from tx_jax.analysis import topic_model
from tx_jax.analysis import reduce as reduce_lib
from tx_jax.analysis.hierarchy import plot_dendrogram
from tx_jax.analysis.report import _CSS, _short, save_map
from tx_jax.errors import UserError

MAPS = ("umap", "pca", "tsne")
QUALITY_ROWS = ("topics", "npmi", "diversity", "silhouette", "noise_fraction_before_outliers",
                "nmi", "ari", "purity")
_TOPIC_CSS = """
input#post-search { font: inherit; padding: 4px 8px; width: 24em; }
select#topic-filter { font: inherit; padding: 3px; }
section.topic-posts h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
ul.posts { margin: 0; padding-left: 1.3em; } li.post { margin-bottom: 0.25em; }
.count { color: #666; margin-left: 1em; } details { margin: 0.5em 0; }
"""
_FILTER_JS = """
(function () {
  const q = document.getElementById('post-search');
  const sel = document.getElementById('topic-filter');
  const count = document.getElementById('post-count');
  function filter() {
    const needle = q.value.trim().toLowerCase(), topic = sel.value;
    let shown = 0;
    for (const li of document.querySelectorAll('li.post')) {
      const ok = (topic === 'all' || li.dataset.topic === topic) &&
                 li.textContent.toLowerCase().includes(needle);
      li.hidden = !ok;
      if (ok) shown++;
    }
    for (const sec of document.querySelectorAll('section.topic-posts')) {
      sec.hidden = !sec.querySelector('li.post:not([hidden])');
    }
    count.textContent = shown + ' posts shown';
    document.body.dataset.postsShown = shown;
  }
  // #search=WORDS in the address pre-fills the box, so a filtered view can be linked.
  const m = location.hash.match(/search=([^&]*)/);
  if (m) q.value = decodeURIComponent(m[1]);
  q.addEventListener('input', filter);
  sel.addEventListener('change', filter);
  filter();
})();
"""


def _json_value(v):
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, bytes):
    v = v.decode("utf-8", "replace")
  if isinstance(v, float) and not np.isfinite(v):
    return None
  return v


def _label_names(result, values):
  """Labels as the data's names (label_names[i] for int labels) -> str array."""
  names = result.label_names
  if names is not None and np.issubdtype(np.asarray(values).dtype, np.integer):
    return np.asarray([str(names[int(v)]) for v in values])
  return np.asarray([str(_json_value(v)) for v in values])


def _topic_entries(result, fit, with_posts):
  out = []
  for t in fit.topics:
    entry = {k: t[k] for k in ("id", "size", "distinct", "label", "top_terms", "term_weights",
                               "npmi")}
    if with_posts:
      first = result.reposts.unique[t["posts"][:result.settings.n_examples]]
      entry["examples"] = [result.texts[i] for i in first]
      entry["example_ids"] = [_json_value(result.ids[i]) for i in first]
    out.append(entry)
  return out


def report_dict(result):
  """The report.json content of a TopicResult."""
  s = result.settings
  rep = {"method": s.method, "features": s.features, "k": result.fit.metrics["topics"],
         "n": len(result.texts), "distinct": len(result.reposts.unique),
         "reposts": int(len(result.texts) - len(result.reposts.unique)),
         "metrics": result.fit.metrics, "topics": _topic_entries(result, result.fit, True),
         "settings": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in vars(s).items()}}
  rep["clusters"] = [{"id": t["id"], "size": t["size"], "top_terms": t["top_terms"],
                      "examples": t["examples"]} for t in rep["topics"]]
  if result.baseline is not None:
    rep["baseline"] = {"features": "tfidf", "method": s.method, "k": result.baseline.k,
                       "metrics": result.baseline.metrics,
                       "topics": _topic_entries(result, result.baseline, False)}
  if result.merged is not None:
    rep["merged"] = {str(k): v for k, v in result.merged.items()}
  if result.over_time is not None:
    periods, ids, counts = result.over_time
    rep["over_time"] = {"bin": s.time_bin, "periods": [str(p) for p in periods],
                        "counts": {str(int(t)): counts[:, j].tolist() for j, t in enumerate(ids)}}
  return json.loads(json.dumps(rep, default=_json_value, allow_nan=False))


def topic_map(result, how="umap"):
  """2-D coordinates [U, 2] of the distinct posts' features."""
  x, seed = result.features, result.settings.seed
  if how == "pca":
    return reduce_lib.pca(x, 2, seed)
  if how == "tsne":
    return reduce_lib.tsne(x, seed)
  import umap
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return umap.UMAP(n_neighbors=max(2, min(15, len(x) - 1)), n_components=2, min_dist=0.1,
                     metric="cosine", random_state=seed).fit_transform(x).astype(np.float32)


def _img(path, alt, cls="map", img_id=None):
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  ident = f" id={img_id}" if img_id else ""
  return f'<img class={cls}{ident} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v):
  return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def write_html(path, rep, result, images, max_posts):
  """The self-contained report.html: topic table, searchable posts, map, over-time chart."""
  esc = html.escape
  base = rep.get("baseline", {}).get("metrics", {})
  quality = "".join(
      f"<tr><th>{esc(k)}</th><td class=num>{esc(_num(rep['metrics'].get(k)))}</td>"
      f"<td class=num>{esc(_num(base.get(k)))}</td></tr>"
      for k in QUALITY_ROWS if k in rep["metrics"] or k in base)
  topic_rows = "".join(
      f"<tr class=topic data-topic=\"{t['id']}\"><td class=num>{t['id']}</td>"
      f"<td class=num>{t['size']}</td><td>{esc(t['label'])}</td>"
      f"<td class=terms>{esc(', '.join(t['top_terms']))}</td>"
      f"<td class=num>{esc(_num(t['npmi']))}</td></tr>" for t in rep["topics"])
  options = "".join(f"<option value=\"{t['id']}\">{t['id']}: {esc(t['label'])}</option>"
                    for t in rep["topics"])
  sections = []
  for t in result.fit.topics:
    shown = t["posts"][:max_posts]
    items = "".join(
        f"<li class=post data-topic=\"{t['id']}\">{esc(_short(result.texts[result.reposts.unique[j]]))}"
        + (f" <span class=count>\u00d7{result.reposts.counts[j]}</span>"
           if result.reposts.counts[j] > 1 else "") + "</li>" for j in shown)
    more = (f"<p class=meta>{len(t['posts']) - len(shown)} more distinct posts not shown</p>"
            if len(t["posts"]) > len(shown) else "")
    sections.append(f"<section class=topic-posts data-topic=\"{t['id']}\"><h3>{t['id']}: "
                    f"{esc(t['label'])} <span class=count>{t['size']} posts</span></h3>"
                    f"<ul class=posts>{items}</ul>{more}</section>")
  over = ""
  if "over_time" in images:
    ot = rep["over_time"]
    head = "".join(f"<th>{esc(k)}</th>" for k in ot["counts"])
    body = "".join(f"<tr><td>{p}</td>" + "".join(
        f"<td class=num>{c[i]}</td>" for c in ot["counts"].values()) + "</tr>"
                   for i, p in enumerate(ot["periods"]))
    over = (f"<h2>Topics over time (per {esc(ot['bin'])})</h2>"
            + _img(images["over_time"], "posts per topic over time", img_id="over-time")
            + f"<details><summary>table</summary><table class=over-time><thead><tr><th>period"
              f"</th>{head}</tr></thead><tbody>{body}</tbody></table></details>")
  tree = ""
  if "hierarchy" in images:
    tree = "<h2>Topic hierarchy</h2>" + _img(images["hierarchy"], "dendrogram of the topics",
                                              img_id="hierarchy")
  s = rep["settings"]
  title = "Topics"
  enc = rep.get("encoder")
  encoder_line = (f"<p class=meta>embeddings by <b>{esc(str(enc.get('objective')))}</b> model "
                  f"{esc(str(enc.get('workdir')))} (step {esc(str(enc.get('step')))}, layer "
                  f"{esc(str(enc.get('layer')))}, {esc(str(enc.get('pooling')))} pooling)</p>"
                  if enc else "")
  doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{_CSS}{_TOPIC_CSS}</style></head>
<body>
<h1>{title}</h1>
<p class=meta>{rep['n']} posts ({rep['distinct']} distinct, {rep['reposts']} reposts collapsed);
method <b>{esc(rep['method'])}</b> on <b>{esc(rep['features'])}</b> features,
min topic size {s['min_topic_size']}, outliers {esc(str(s['outliers']))}, seed {s['seed']}</p>
{encoder_line}
<h2>Quality</h2>
<table class=metrics><thead><tr><th></th><th>{esc(rep['features'])} features</th>
<th>TF-IDF baseline, same clustering</th></tr></thead><tbody>{quality}</tbody></table>
<h2>Topics</h2>
<table class=topics><thead><tr><th>topic</th><th>size</th><th>label</th><th>top terms</th>
<th>NPMI</th></tr></thead><tbody>{topic_rows}</tbody></table>
<h2>Map</h2>
{_img(images['map'], 'map of the posts coloured by topic', img_id='map')}
{over}
{tree}
<h2>Posts</h2>
<p><input id=post-search type=search placeholder="search posts" aria-label="search posts">
<select id=topic-filter aria-label="topic"><option value=all>all topics</option>{options}</select>
<span id=post-count class=count></span></p>
{''.join(sections)}
<script>{_FILTER_JS}</script>
</body></html>
"""
  with open(path, "w", encoding="utf-8") as f:
    f.write(doc)


def write_topic_report(result, out_dir, *, map_reduce="umap", max_posts=200, encoder=None):
  """Writes report.json, topics.csv, clusters.csv, map.png, [over_time.png/.csv],
  [hierarchy.png], report.html into out_dir -> the report.json dict.

  encoder: what made the embeddings (the .npz meta: workdir, objective, step,
  layer, pooling), stated in the report."""
  if map_reduce not in MAPS:
    raise UserError(f"unknown map {map_reduce!r}; use one of {', '.join(MAPS)}")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"output path {out_dir} is a file, not a directory; pass a directory")
  os.makedirs(out_dir, exist_ok=True)
  rep = report_dict(result)
  if encoder:
    rep["encoder"] = {k: encoder[k] for k in ("workdir", "objective", "step", "layer", "pooling",
                                               "normalized") if k in encoder}
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(rep, f, indent=2, ensure_ascii=False, allow_nan=False)
  names = result.names
  with open(os.path.join(out_dir, "topics.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "topic", "label"])
    w.writerows((_json_value(i), int(t), names[int(t)]) for i, t in zip(result.ids, result.topics))
  with open(os.path.join(out_dir, "clusters.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)  # The `tx-jax analyze` contract: id, cluster.
    w.writerow(["id", "cluster"])
    w.writerows((_json_value(i), int(t)) for i, t in zip(result.ids, result.topics))
  images = {"map": os.path.join(out_dir, "map.png")}
  labels = None
  if result.labels is not None:
    labels = _label_names(result, result.labels[result.reposts.unique])
  save_map(images["map"], topic_map(result, map_reduce), result.fit.assign, labels,
           title=f"{map_reduce} map")
  if result.over_time is not None:
    images["over_time"] = os.path.join(out_dir, "over_time.png")
    over_time.plot(images["over_time"], *result.over_time, names)
    over_time.write_csv(os.path.join(out_dir, "over_time.csv"), *result.over_time)
  if result.linkage is not None:
    images["hierarchy"] = os.path.join(out_dir, "hierarchy.png")
    plot_dendrogram(images["hierarchy"], result.linkage, result.linkage_names)
  write_html(os.path.join(out_dir, "report.html"), rep, result, images, max_posts)
  return rep


def topics_report(npz_path, out_dir, *, data=None, map_reduce="umap", max_posts=200, **settings):
  """The report step of `tx-jax topics`: embeddings .npz (+ the data spec) -> out_dir files.

  settings are `topic_model.Settings` fields (method, min_topic_size,
  reduce_topics, features, outliers, time_bin, seed, ...). With data, full texts,
  ids and the time column come from the source. Returns the report.json dict.
  """
  if map_reduce not in MAPS:  # Before the fit: a typo should not cost one.
    raise UserError(f"unknown map {map_reduce!r}; use one of {', '.join(MAPS)}")
  topic_model.Settings(**settings).check(True)
  x, posts = posts_lib.load_embedded_posts(npz_path, data)
  times = None
  if posts.created_at is not None:  # Parsed here so that errors name the row of the file.
    times = over_time.parse_times(posts.created_at, posts.ids, posts.time_column, posts.rows)
  result = topic_model.fit_topics(
      x, posts.texts, labels=posts.labels, label_names=posts.label_names, ids=posts.ids,
      time_values=times, **settings)
  with np.load(npz_path, allow_pickle=False) as f:
    encoder = json.loads(str(f["meta"])) if "meta" in f.files else None
  return write_topic_report(result, out_dir, map_reduce=map_reduce, max_posts=max_posts,
                            encoder=encoder)
