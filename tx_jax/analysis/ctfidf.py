"""Class-based TF-IDF (c-TF-IDF) terms of topics, with MMR-diversified top terms.

Each topic is one document (its posts' term counts summed); the weight of term
t in topic c is tf(t, c) / terms(c) * log(1 + mean terms per topic / tf(t, all)),
as in BERTopic. Counting is scikit-learn's CountVectorizer with English stop
words, 1-2-grams, a minimum document frequency and `posts.TOKEN_PATTERN`
(hashtags, mentions and emoji are terms).
"""

import dataclasses

import numpy as np
from scipy import sparse

from tx_jax.analysis.posts import TOKEN_PATTERN
from tx_jax.errors import UserError


@dataclasses.dataclass
class TopicTerms:
  """c-TF-IDF of a topic assignment over a set of posts."""
  topic_ids: np.ndarray  # [T] the topics, sorted (-1, outliers, first when present)
  vocab: np.ndarray      # [V] str
  scores: sparse.csr_matrix     # [T, V] c-TF-IDF weights, row j for topic_ids[j]
  doc_terms: sparse.csr_matrix  # [N, V] term counts of each post
  idf: np.ndarray        # [V] log(1 + mean terms per topic / tf(t, all))

  def row(self, topic):
    """The row of `topic` in the per-topic arrays."""
    return int(np.searchsorted(self.topic_ids, topic))

  def transform(self, doc_terms):
    """Posts' term counts [M, V] -> their c-TF-IDF vectors [M, V], rows l2-normalised."""
    from sklearn.preprocessing import normalize
    return normalize(sparse.csr_matrix(doc_terms, dtype=np.float64) @ sparse.diags(self.idf))


def count_terms(texts, ngram_range=(1, 2), min_df=2, stop_words="english"):
  """Fits the term counter on texts -> (counts [N, V] csr, vocab [V], vectorizer).

  min_df larger than the posts allow (a tiny set) falls back to 1, so a small
  sample still gets terms; no terms at all is a UserError.
  """
  from sklearn.feature_extraction.text import CountVectorizer
  for df in dict.fromkeys((min_df, 1)):
    vec = CountVectorizer(token_pattern=TOKEN_PATTERN, ngram_range=tuple(ngram_range),
                          min_df=df, stop_words=stop_words)
    try:
      counts = vec.fit_transform(texts)
      return counts.tocsr(), vec.get_feature_names_out().astype(str), vec
    except ValueError:  # Empty vocabulary or min_df over the number of posts.
      continue
  raise UserError("the posts have no words left after stop words; pass real text")


def class_tfidf(doc_terms, vocab, topics):
  """c-TF-IDF of posts' term counts [N, V] grouped by topics [N] -> TopicTerms."""
  topics = np.asarray(topics)
  doc_terms = sparse.csr_matrix(doc_terms)
  if doc_terms.shape[0] != len(topics):
    raise UserError(f"{doc_terms.shape[0]} posts for {len(topics)} topic labels")
  ids, inv = np.unique(topics, return_inverse=True)
  member = sparse.csr_matrix((np.ones(len(topics)), (inv, np.arange(len(topics)))),
                             shape=(len(ids), len(topics)))
  counts = (member @ doc_terms).tocsr().astype(np.float64)  # [T, V]
  words = np.asarray(counts.sum(axis=1)).ravel()
  term_total = np.maximum(np.asarray(counts.sum(axis=0)).ravel(), 1.0)
  idf = np.log1p(words.mean() / term_total)
  scores = (sparse.diags(1.0 / np.maximum(words, 1.0)) @ counts @ sparse.diags(idf)).tocsr()
  return TopicTerms(ids, np.asarray(vocab), scores, doc_terms, idf)


def mmr(relevance, similarity, n, diversity):
  """Maximal marginal relevance: n indices picked greedily from the candidates.

  relevance [C] (higher is better), similarity [C, C]; each step takes the
  argmax of (1 - diversity) * relevance - diversity * (max similarity to the
  ones already picked). diversity=0 is the plain ranking.
  """
  relevance = np.asarray(relevance, np.float64)
  picked = [int(np.argmax(relevance))] if len(relevance) else []
  left = [i for i in range(len(relevance)) if i not in picked]
  while left and len(picked) < n:
    redundancy = similarity[np.ix_(left, picked)].max(axis=1)
    score = (1 - diversity) * relevance[left] - diversity * redundancy
    best = left[int(np.argmax(score))]  # argmax: ties go to the better-ranked candidate.
    picked.append(best)
    left.remove(best)
  return picked


def top_terms(terms, n=10, diversity=0.0, candidates=30):
  """{topic id: [(term, c-TF-IDF weight)]}, best first, for every topic.

  diversity > 0 re-ranks the `candidates` best terms of each topic by MMR, the
  similarity of two terms being the cosine of their post-occurrence vectors:
  terms that always come together ("new", "york", "new york") count as one.
  """
  from sklearn.preprocessing import normalize
  occurrence = None
  if diversity > 0:
    occurrence = normalize((terms.doc_terms > 0).astype(np.float64).T.tocsr())  # [V, N]
  out = {}
  for row, topic in enumerate(terms.topic_ids):
    lo, hi = terms.scores.indptr[row], terms.scores.indptr[row + 1]
    idx, vals = terms.scores.indices[lo:hi], terms.scores.data[lo:hi]
    order = np.lexsort((terms.vocab[idx], -vals))  # Ties alphabetical: deterministic.
    idx, vals = idx[order], vals[order]
    if diversity > 0 and len(idx) > 1:
      idx, vals = idx[:max(candidates, n)], vals[:max(candidates, n)]
      sub = occurrence[idx]
      picked = mmr(vals / vals[0], (sub @ sub.T).toarray(), n, diversity)
      idx, vals = idx[picked], vals[picked]
    out[int(topic)] = [(str(terms.vocab[i]), float(v)) for i, v in zip(idx[:n], vals[:n])]
  return out
