"""EncoderDecoder (T5): masking invariants, KV-cache decoding, greedy and beam search.

Compiles dominate the cost on CPU, so every test of a variant reuses one jitted
forward of fixed shapes, and parameters are drawn from `param_shapes` (no
init compile).
"""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax import parallel
from tx_jax.generate import beam_search, greedy_decode, init_encdec_cache, length_penalty
from tx_jax.models import (ENC_DEC_SIZES, EncoderDecoder, TransformerConfig, count_params,
                           make_config, param_shapes)

B, S, T = 3, 12, 10   # batch, encoder and decoder lengths of every forward here
T5ISH = TransformerConfig(vocab_size=13, num_layers=2, num_encoder_layers=1, d_model=32,
                          num_heads=4, mlp_dim=64, max_len=16, positions="relative",
                          norm="rmsnorm", activation="relu", use_bias=False)
VARIANTS = {
    "t5": {},
    "bert_style": {"positions": "learned", "pre_norm": False, "norm": "layernorm",
                   "use_bias": True, "share_embeddings": False, "tie_embeddings": False},
    "rope_gqa_scan": {"positions": "rope", "num_kv_heads": 2, "scan_layers": True},
}


def _random_params(cfg, scale=0.1, seed=0):
  """Parameters of the right shapes, drawn directly (norm scales stay 1)."""
  shapes = nn.unbox(param_shapes(EncoderDecoder(cfg), 8))
  rng = np.random.default_rng(seed)
  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(scale=scale, size=x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _model(name):
  model = EncoderDecoder(dataclasses.replace(T5ISH, **VARIANTS[name]))
  return model, jax.jit(lambda p, a, b, **kw: model.apply({"params": p}, a, b, **kw)[0])


def variant(name, scale=0.1):
  """(model, random params, jitted forward); one compile per variant and shape."""
  model, forward = _model(name)
  return model, _random_params(model.cfg, scale), forward


def _tokens(rng, shape, vocab=13):
  return rng.integers(2, vocab, shape).astype(np.int32)


def test_t5_base_parameter_count():
  cfg = make_config(ENC_DEC_SIZES, "base")
  got = count_params(param_shapes(EncoderDecoder(cfg), 8))
  # By hand: shared 32128 x 768 embedding (also the readout); per encoder layer
  # 4 attention matrices d x d, MLP d x f + f x d, 2 RMSNorm scales; decoder
  # layers add cross-attention (4 d x d) and a third scale; one 32 x 12
  # relative-bias table and one final scale per stack. No biases.
  d, f, v, h = 768, 3072, 32128, 12
  enc_layer = 4 * d * d + 2 * d * f + 2 * d
  dec_layer = 8 * d * d + 2 * d * f + 3 * d
  want = v * d + 12 * enc_layer + 12 * dec_layer + 2 * (32 * h + d)
  assert want == 222_903_552   # HF t5-base (T5ForConditionalGeneration), Raffel et al.
  assert got == want


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_never_sees_future_targets(name):
  _, params, forward = variant(name)
  rng = np.random.default_rng(0)
  inputs, dec = _tokens(rng, (B, S)), _tokens(rng, (B, T))
  base = forward(params, inputs, dec)
  changed = dec.copy()
  changed[:, 4:] = (changed[:, 4:] + 5) % 13
  after = forward(params, inputs, changed)
  np.testing.assert_allclose(np.asarray(base[:, :4]), np.asarray(after[:, :4]), atol=1e-5)
  assert not np.allclose(base[:, 4:], after[:, 4:], atol=1e-3)
  # The encoder side is fully visible to every decoder position.
  other = inputs.copy()
  other[:, -1] = (other[:, -1] + 3) % 13
  assert not np.allclose(base[:, 0], forward(params, other, dec)[:, 0], atol=1e-4)


@pytest.mark.parametrize("name", ["t5", "bert_style"])
def test_packed_examples_are_independent_and_padding_is_inert(name):
  _, params, forward = variant(name)
  rng = np.random.default_rng(1)
  ea, eb, da, db = (_tokens(rng, (n,)) for n in (5, 4, 3, 4))
  # Row 0 packs examples a and b, then padding; rows 1 and 2 hold a alone,
  # followed by different padding tokens.
  inputs = np.stack([np.concatenate([ea, eb, _tokens(rng, (3,))]),
                     np.concatenate([ea, _tokens(rng, (7,))]),
                     np.concatenate([ea, _tokens(rng, (7,))])])
  dec = np.stack([np.concatenate([da, db, _tokens(rng, (3,))]),
                  np.concatenate([da, _tokens(rng, (7,))]),
                  np.concatenate([da, _tokens(rng, (7,))])])
  seg_e = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 5 + [0] * 7, [1] * 5 + [0] * 7])
  seg_d = np.array([[1] * 3 + [2] * 4 + [0] * 3, [1] * 3 + [0] * 7, [1] * 3 + [0] * 7])
  pos_e = np.array([list(range(5)) + list(range(4)) + [0] * 3] + [list(range(S))] * 2)
  pos_d = np.array([list(range(3)) + list(range(4)) + [0] * 3] + [list(range(T))] * 2)
  out = np.asarray(forward(params, inputs, dec, inputs_positions=pos_e,
                           inputs_segment_ids=seg_e, decoder_positions=pos_d,
                           decoder_segment_ids=seg_d))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[0, :3], out[1, :3], atol=1e-5)
  np.testing.assert_allclose(out[1, :3], out[2, :3], atol=1e-5)
  # Example b packed at offset 3 equals b alone at the start of a row.
  alone_b = forward(params, np.concatenate([eb, inputs[0, 4:12]])[None].repeat(B, 0),
                    np.concatenate([db, dec[0, 4:10]])[None].repeat(B, 0),
                    inputs_segment_ids=np.array([[1] * 4 + [0] * 8] * B),
                    decoder_segment_ids=np.array([[1] * 4 + [0] * 6] * B))
  np.testing.assert_allclose(out[0, 3:7], np.asarray(alone_b[0, :4]), atol=1e-5)


@pytest.mark.parametrize("name", ["t5", "rope_gqa_scan"])
def test_kv_cache_decoding_equals_full_forward(name):
  model, params, forward = variant(name)
  rng = np.random.default_rng(2)
  inputs, dec = _tokens(rng, (B, S)), _tokens(rng, (B, T))
  seg = np.array([[1] * S, [1] * 6 + [0] * 6, [1] * 2 + [0] * 10])
  full = forward(params, inputs, dec, inputs_segment_ids=seg)

  @jax.jit
  def step(cache, token, i):
    encoded = model.apply({"params": params}, inputs, segment_ids=seg, method="encode")
    (logits, _), mutated = model.apply(
        {"params": params, "cache": cache}, encoded, token, encoder_segment_ids=seg,
        positions=jnp.full(token.shape, i), decode=True, method="decode", mutable=["cache"])
    return mutated["cache"], logits

  cache = init_encdec_cache(model, B, S)
  steps = []
  for i in range(T):
    cache, logits = step(cache, dec[:, i:i + 1], i)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), rtol=1e-4, atol=1e-4)


def _naive_greedy(forward, params, inputs, seg, max_len, start, eos):
  """Argmax decoding by re-running the whole (uncached) model for every token.

  The decoder row is padded to the fixed length T; by causality (tested above)
  what follows the current position does not change its logits.
  """
  dec = np.full((len(inputs), T), start, np.int32)
  out = np.full((len(inputs), max_len), eos, np.int32)
  done = np.zeros(len(inputs), bool)
  for i in range(max_len):
    logits = np.asarray(forward(params, inputs, dec, inputs_segment_ids=seg))
    out[:, i] = np.where(done, eos, logits[:, i].argmax(-1))
    if i + 1 < T:
      dec[:, i + 1] = out[:, i]
    done |= out[:, i] == eos
  return out


def test_greedy_and_beam_one_match_naive_decoding():
  model, params, forward = variant("t5", scale=0.5)
  rng = np.random.default_rng(3)
  inputs = _tokens(rng, (B, S))
  seg = np.array([[1] * S, [1] * 5 + [0] * 7, [1] * 2 + [0] * 10], np.int32)
  # EOS := row 0's third greedy token, so row 0 stops at step 2 (others may run on).
  eos = int(_naive_greedy(forward, params, inputs, seg, 9, 0, -1)[0, 2])
  want = _naive_greedy(forward, params, inputs, seg, 9, 0, eos)
  assert list(want[0, 2:]) == [eos] * 7
  kw = dict(max_len=9, start_id=0, eos_id=eos)
  got = np.asarray(greedy_decode(model, params, inputs, seg, **kw))
  np.testing.assert_array_equal(got, want)
  for alpha in (0.0, 0.6, 2.0):
    beam1, _ = beam_search(model, params, inputs, seg, beam_size=1, alpha=alpha, **kw)
    np.testing.assert_array_equal(np.asarray(beam1), want)
  # A wider beam's score is the log-probability of the sequence it returns.
  wide, wide_score = beam_search(model, params, inputs, seg, beam_size=4, alpha=0.0, **kw)
  wide = np.asarray(wide)
  dec = np.concatenate([np.zeros((B, 1), np.int32), wide[:, :T - 1]], 1)
  logp = np.asarray(jax.nn.log_softmax(forward(params, inputs, dec, inputs_segment_ids=seg)))
  for r in range(B):
    n = list(wide[r]).index(eos) + 1 if eos in wide[r] else 9
    np.testing.assert_allclose(sum(logp[r, i, wide[r, i]] for i in range(n)),
                               float(wide_score[r]), rtol=1e-4)


@pytest.fixture(scope="module")
def five_token_model():
  cfg = dataclasses.replace(T5ISH, vocab_size=5)
  model = EncoderDecoder(cfg)
  forward = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b)[0])
  return model, _random_params(cfg, scale=0.7, seed=4), forward


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exhaustive_beam_search_finds_the_best_finished_sequence(five_token_model, alpha):
  # 5 tokens, sequences of <= 3: beam 128 keeps every candidate, so the result
  # must be the best of all sequences, enumerated here: EOS-terminated ones and
  # the unfinished ones of length 3, scored log p / length_penalty(length).
  model, params, forward = five_token_model
  eos, start = 1, 0
  inputs = np.array([[2, 3, 4, 2, 3]], np.int32)
  seqs = [list(body) + [eos] for n in range(1, 4)
          for body in itertools.product([0, 2, 3, 4], repeat=n - 1)]
  seqs += [list(s) for s in itertools.product([0, 2, 3, 4], repeat=3)]
  dec = np.array([[start] + (s + [eos] * 3)[:2] for s in seqs], np.int32)   # (85, 3)
  logits = forward(params, np.repeat(inputs, len(seqs), 0), dec)
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
  scored = sorted(((sum(logp[r, i, t] for i, t in enumerate(s)) / length_penalty(len(s), alpha),
                    s) for r, s in enumerate(seqs)), reverse=True)
  assert scored[0][0] - scored[1][0] > 1e-3    # a clear winner
  best, score = beam_search(model, params, inputs, np.ones_like(inputs), max_len=3,
                            start_id=start, eos_id=eos, beam_size=128, alpha=alpha)
  want = scored[0][1] + [eos] * (3 - len(scored[0][1]))
  np.testing.assert_array_equal(np.asarray(best)[0], want)
  np.testing.assert_allclose(float(score[0]), scored[0][0], rtol=1e-4)


def test_sharded_forward_matches_single_device():
  # Params placed by their logical names over data x fsdp x tensor; same logits.
  model, params, forward = variant("t5")
  boxed = param_shapes(model, 8)
  mesh = parallel.make_mesh(type("M", (), {"data": 2, "fsdp": 2, "tensor": 2})())
  rules = parallel.resolve_rules("fsdp_tp")
  sharded_params = jax.device_put(params, parallel.logical_shardings(boxed, mesh, rules))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(sharded_params))
  rng = np.random.default_rng(6)
  inputs, dec = _tokens(rng, (4, S)), _tokens(rng, (4, T))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = parallel.batch_sharding(mesh, rules)
    sharded = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b)[0])(
        sharded_params, jax.device_put(inputs, batch), jax.device_put(dec, batch))
  want = jnp.concatenate([forward(params, inputs[:B], dec[:B]),
                          forward(params, inputs[1:], dec[1:])[-1:]])
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_generate_seq2seq_default_length_fills_the_decoder_context():
  # `tx-jax generate` on a T5 workdir passes max_new_tokens=None: decode cfg.max_len tokens.
  import types
  from tx_jax.data import span_corruption, tokenizers
  from tx_jax.generate import _decode_with_specials, generate_seq2seq
  tok = tokenizers.ByteTokenizer(span_corruption.t5_specials(2))
  cfg = dataclasses.replace(T5ISH, vocab_size=tok.vocab_size)
  model, params = EncoderDecoder(cfg), _random_params(cfg, scale=0.5, seed=1)
  trained = types.SimpleNamespace(
      tokenizer=tok, params=params, objective=types.SimpleNamespace(cfg=cfg, model=model),
      config=types.SimpleNamespace(data=types.SimpleNamespace(seq_len=S)))
  prompt = "a <extra_id_0> b"
  ids = [ord("a"), ord(" "), tok.special_ids["<extra_id_0>"], ord(" "), ord("b"), 257]
  inputs = np.zeros((1, S), np.int32)
  inputs[0, :len(ids)] = ids
  seg = (np.arange(S) < len(ids)).astype(np.int32)[None]
  kw = dict(max_len=cfg.max_len, start_id=256, eos_id=257)
  for beam_size in (1, 4):
    if beam_size == 1:
      want = greedy_decode(model, params, inputs, seg, **kw)
    else:
      want, _ = beam_search(model, params, inputs, seg, beam_size=beam_size, alpha=0.6, **kw)
    want = np.asarray(want)[0]
    got = generate_seq2seq(trained, prompt, beam_size=beam_size)
    assert got == _decode_with_specials(tok, want)
