"""Span-contrastive objective and its span-pair pipeline, against naive numpy."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from tx_jax.data import sources, spans, tokenizers
from tx_jax.errors import UserError
from tx_jax.models import TransformerConfig
from tx_jax.objectives.contrastive import SpanContrastive

CFG = TransformerConfig(vocab_size=64, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                        max_len=8)


def _batch(rng, b=6, t=8, pad_rows=2):
  batch = {}
  for side in ("a", "b"):
    lengths = rng.integers(1, t + 1, b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    batch[f"inputs_{side}"] = (rng.integers(1, 64, (b, t)) * seg).astype(np.int32)
    batch[f"segment_ids_{side}"] = seg
  batch["weights"] = np.r_[np.ones(b - pad_rows), np.zeros(pad_rows)].astype(np.float32)
  return batch


def test_loss_is_symmetric_infonce_over_real_pairs():
  obj = SpanContrastive(CFG, temperature=0.1)
  params = nn.unbox(obj.init_params(jax.random.key(0), 8))
  batch = _batch(np.random.default_rng(0))
  loss, sums = jax.jit(obj.loss_fn, static_argnums=3)(params, batch, jax.random.key(1), False)

  def embed(side):
    _, out = obj.model.apply({"params": params}, batch[f"inputs_{side}"],
                             segment_ids=batch[f"segment_ids_{side}"])
    h = np.asarray(out["pre_logits"], np.float64)
    seg = batch[f"segment_ids_{side}"]
    z = np.stack([h[i, seg[i] > 0].mean(0) for i in range(len(h))])
    return z / np.linalg.norm(z, axis=1, keepdims=True)
  real = batch["weights"] > 0
  za, zb = embed("a")[real], embed("b")[real]  # Padding rows are no negatives.
  s = za @ zb.T / 0.1
  log_ab = s - np.log(np.exp(s).sum(1, keepdims=True))
  log_ba = s.T - np.log(np.exp(s.T).sum(1, keepdims=True))
  nll = -(np.diag(log_ab) + np.diag(log_ba)) / 2
  correct = ((s.argmax(1) == np.arange(len(s))) + (s.argmax(0) == np.arange(len(s)))) / 2
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(sums["nll"]), nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(sums["correct"]), correct.sum())
  assert float(sums["weight"]) == real.sum() == 4
  assert obj.summarize(sums)["loss"] == pytest.approx(nll.mean(), rel=1e-5)


def test_training_loss_has_gradients_and_dropout():
  obj = SpanContrastive(TransformerConfig(**{**CFG.__dict__, "dropout_rate": 0.3}))
  params = nn.unbox(obj.init_params(jax.random.key(0), 8))
  batch = _batch(np.random.default_rng(1))
  loss = jax.jit(lambda p, key: obj.loss_fn(p, batch, key, True)[0])
  grads = jax.jit(jax.grad(loss))(params, jax.random.key(2))
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  assert float(np.abs(grads["embedder"]["tokens"]["embedding"]).sum()) > 0
  a, b = loss(params, jax.random.key(2)), loss(params, jax.random.key(3))
  assert float(a) != float(b)  # Dropout is on in training.


def test_random_span_bounds():
  rng = np.random.default_rng(0)
  tokens = np.arange(100, 130)
  for n, seq_len, min_len in [(30, 8, 4), (30, 64, 8), (3, 8, 4), (1, 8, 4)]:
    lengths = set()
    for _ in range(200):
      span = spans.random_span(tokens[:n], rng, seq_len, min_len)
      lo = span[0] - 100
      np.testing.assert_array_equal(span, np.arange(100 + lo, 100 + lo + len(span)))
      assert min(min_len, n, seq_len) <= len(span) <= min(seq_len, n)
      lengths.add(len(span))
    assert lengths == set(range(min(min_len, n, seq_len), min(seq_len, n) + 1))


def _docs(n=40):
  rng = np.random.default_rng(0)
  return sources.ListSource(["".join(chr(97 + rng.integers(26)) for _ in range(
      rng.integers(1, 30))) for _ in range(n)])


def test_span_batches_are_spans_of_one_document_and_resume():
  src, tok = _docs(), tokenizers.ByteTokenizer()
  docs = {src[i]["text"] for i in range(len(src))}
  it = spans.span_train_iterator(src, tok, seq_len=12, batch_size=8, seed=3, min_len=4)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  for batch in first + after:
    assert batch["inputs_a"].shape == (8, 12) and batch["weights"].tolist() == [1.0] * 8
    for i in range(8):
      a = bytes(batch["inputs_a"][i][batch["segment_ids_a"][i] > 0].tolist()).decode()
      b = bytes(batch["inputs_b"][i][batch["segment_ids_b"][i] > 0].tolist()).decode()
      assert any(a in d and b in d for d in docs), (a, b)  # Both from one document.
      assert 1 <= len(a) <= 12 and 1 <= len(b) <= 12
  fresh = spans.span_train_iterator(src, tok, seq_len=12, batch_size=8, seed=3, min_len=4)
  fresh.set_state(state)
  for want in after:
    got = next(fresh)
    for k in spans.SPAN_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(UserError, match="data settings changed"):
    spans.span_train_iterator(src, tok, 16, 8, 3, 4).set_state(state)


def test_span_eval_is_one_pair_per_document_with_padding():
  src, tok = _docs(19), tokenizers.ByteTokenizer()
  batches = list(spans.span_eval_batches(src, tok, seq_len=12, batch_size=8))
  assert len(batches) == 3
  assert [b["weights"].sum() for b in batches] == [8, 8, 3]
  assert batches[2]["segment_ids_a"][3:].sum() == 0
  again = list(spans.span_eval_batches(src, tok, seq_len=12, batch_size=8))
  np.testing.assert_array_equal(batches[1]["inputs_b"], again[1]["inputs_b"])
  with pytest.raises(UserError, match="at least 16"):
    spans.span_train_iterator(_docs(10), tok, 12, 8, 0, shard_count=2)
