"""Topic quality from the posts alone: NPMI coherence and topic diversity.

NPMI of two terms over documents (here: the posts themselves):
  p(w) = posts containing w / N,  p(a, b) = posts containing both / N,
  npmi(a, b) = log(p(a, b) / (p(a) p(b))) / -log p(a, b)
in [-1, 1]: 1 when the two always come together, 0 when independent, and -1
(by convention) when they never share a post. A topic's coherence is the mean
over all pairs of its top terms.
"""

import itertools

import numpy as np
from scipy import sparse


def npmi_pairs(occurs):
  """NPMI of every pair of columns of a binary occurrence matrix [N, n] -> [n, n]."""
  occurs = sparse.csr_matrix(occurs, dtype=np.float64)
  occurs.data[:] = 1.0
  n_docs = occurs.shape[0]
  joint = (occurs.T @ occurs).toarray() / n_docs  # [n, n]
  single = np.diag(joint).copy()
  with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(joint / np.outer(single, single))
    out = pmi / -np.log(joint)
  out[joint == 0] = -1.0
  out[joint == 1] = 1.0  # Both in every post: 0 / 0 by the formula, perfectly together.
  return out


def topic_npmi(terms, doc_terms, vocab):
  """Mean NPMI of the pairs of `terms` (strings in vocab) over posts' term counts [N, V].

  None for fewer than two terms (no pair to score).
  """
  index = {str(t): i for i, t in enumerate(vocab)}
  cols = [index[t] for t in terms]
  if len(cols) < 2:
    return None
  pairs = npmi_pairs(sparse.csr_matrix(doc_terms)[:, cols])
  return float(np.mean([pairs[i, j] for i, j in itertools.combinations(range(len(cols)), 2)]))


def diversity(top_terms):
  """Share of unique terms among all the topics' top terms: 1 when no topic repeats another's."""
  lists = [list(t) for t in top_terms]
  total = sum(len(t) for t in lists)
  if not total:
    return None
  return len(set(itertools.chain.from_iterable(lists))) / total
