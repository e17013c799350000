"""Data: embedded corpora, tokenizers, data specs and grain pipelines.

Imports neither tx_jax.models nor tx_jax.train, and never TensorFlow.
"""

from tx_jax.data.corpora import digits
from tx_jax.data.corpora import python_docs
from tx_jax.data.corpora import stdlib_docstrings
from tx_jax.data.doc_policy import DocPolicy
from tx_jax.data.pipeline import LM_KEYS
from tx_jax.data.pipeline import LMIterator
from tx_jax.data.pipeline import lm_eval_batches
from tx_jax.data.pipeline import lm_train_iterator
from tx_jax.data.sources import holdout_split
from tx_jax.data.sources import ListSource
from tx_jax.data.sources import open_source
from tx_jax.data.sources import TextSource
from tx_jax.data.sources import train_eval_sources
from tx_jax.data.tokenizers import ByteTokenizer
from tx_jax.data.tokenizers import load_tokenizer
from tx_jax.data.tokenizers import make_tokenizer
from tx_jax.data.tokenizers import SentencePieceTokenizer
from tx_jax.data.tokenizers import Tokenizer
from tx_jax.data.tokenizers import train_sentencepiece
