"""Topic hierarchy and reduction: average-linkage clustering of c-TF-IDF vectors.

Topics are joined by scipy's hierarchical clustering on the cosine distance of
their c-TF-IDF rows; merging down to N topics replays that tree's first
T - N joins, so the dendrogram shows exactly the merges reduction makes.
"""

import numpy as np

from tx_jax.errors import UserError


def topic_linkage(scores):
  """c-TF-IDF rows [T, V] (one per topic) -> scipy linkage matrix [T - 1, 4]."""
  from scipy.cluster import hierarchy
  from sklearn.preprocessing import normalize
  rows = normalize(np.asarray(scores.todense() if hasattr(scores, "todense") else scores,
                              np.float64))
  distance = np.clip(1.0 - rows @ rows.T, 0.0, 2.0)  # Cosine; clip rounding below 0.
  condensed = distance[np.triu_indices(len(rows), 1)]
  return hierarchy.linkage(condensed, method="average")


def merge_map(linkage, n_topics, n_target):
  """Group of each of n_topics after the first n_topics - n_target joins -> [T] in [0, N)."""
  if not 1 <= n_target <= n_topics:
    raise UserError(
        f"reduce_topics={n_target} but only {n_topics} topics were found; pick a number "
        f"from 1 to {n_topics} (or drop --reduce-topics)")
  group = list(range(n_topics))  # Cluster id in the linkage's numbering, per topic.
  members = {i: [i] for i in range(n_topics)}
  for step in range(n_topics - n_target):
    a, b = int(linkage[step, 0]), int(linkage[step, 1])
    members[n_topics + step] = members.pop(a) + members.pop(b)
  for new, (_, topics) in enumerate(sorted(members.items(), key=lambda kv: min(kv[1]))):
    for t in topics:
      group[t] = new
  return np.asarray(group, np.int64)


def plot_dendrogram(path, linkage, names):
  """Dendrogram PNG of the topics (leaves named by names[i]), cosine distance on x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from scipy.cluster import hierarchy
  height = max(3.0, 0.3 * (len(names) + 2))
  fig, ax = plt.subplots(figsize=(10, height), dpi=100, layout="constrained")
  try:
    hierarchy.dendrogram(linkage, orientation="left", labels=[n[:50] for n in names], ax=ax,
                         color_threshold=0.7 * linkage[:, 2].max() if len(linkage) else 0)
    ax.set_xlabel("cosine distance of c-TF-IDF (average linkage)")
    ax.set_title("topic hierarchy")
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
