"""Unsupervised analysis of embeddings: maps, clusters, metrics and reports.

Imports only numpy, scipy, scikit-learn and (lazily) umap-learn and matplotlib,
so it runs on any machine that holds an `.npz` from `tx-jax embed`. Topics:
`fit_topics` (topic_model.py) -> `write_topic_report` (topic_report.py).
"""

from tx_jax.analysis.cluster import agglomerative
from tx_jax.analysis.cluster import choose_k
from tx_jax.analysis.cluster import cluster_means
from tx_jax.analysis.cluster import dbscan
from tx_jax.analysis.cluster import estimate_eps
from tx_jax.analysis.cluster import external_metrics
from tx_jax.analysis.cluster import internal_metrics
from tx_jax.analysis.cluster import kmeans
from tx_jax.analysis.cluster import purity
from tx_jax.analysis.cluster import spectral
from tx_jax.analysis.reduce import normalize
from tx_jax.analysis.reduce import pca
from tx_jax.analysis.reduce import tsne
from tx_jax.analysis.report import analyze
from tx_jax.analysis.report import representatives
from tx_jax.analysis.report import save_map
from tx_jax.analysis.report import tfidf_kmeans_nmi
from tx_jax.analysis.report import top_terms
from tx_jax.analysis.topic_model import fit_topics
from tx_jax.analysis.topic_report import topics_report
from tx_jax.analysis.topic_report import write_topic_report
