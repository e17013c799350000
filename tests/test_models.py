"""Model numerics against naive numpy references, and masking invariants."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tx_jax.generate import filter_logits, init_cache
from tx_jax.models import (DECODER_SIZES, Attention, DecoderLM, Encoder, TransformerConfig,
                           attention_mask, count_params, make_config, param_shapes)

SMALL = TransformerConfig(vocab_size=50, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                          max_len=24)


def np_attention(x, params, mask, n_heads, kv_heads):
  """softmax(QK^T / sqrt(d)) V per head, with a boolean mask, in float64 numpy."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
  rep = n_heads // kv_heads
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  b, t, n, h = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for ni in range(n):
      s = q[bi, :, ni] @ k[bi, :, ni].T / np.sqrt(h)
      s = np.where(mask[bi], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, ni] = w @ v[bi, :, ni]
  return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"]) + p["out"]["bias"]


def naive_mask(segments, causal):
  seg = np.asarray(segments)
  t = seg.shape[1]
  m = seg[:, :, None] == seg[:, None, :]
  if causal:
    m &= np.tril(np.ones((t, t), bool))[None]
  return m


@pytest.mark.parametrize("merge_rows", [True, False], ids=["rows_merged", "einsum_form"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_numpy(causal, kv_heads, merge_rows, monkeypatch):
  # Both lowerings of the projections (CPU targets merge rows, TPU ones do not).
  from tx_jax.models import layers
  monkeypatch.setattr(layers, "merge_rows", lambda: merge_rows)
  cfg = dataclasses.replace(SMALL, num_kv_heads=kv_heads)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 10, 32)).astype(np.float32)
  segments = np.array([[1] * 4 + [2] * 4 + [0] * 2, [1] * 10], np.int32)
  attn = Attention(cfg, causal=causal)
  mask = attention_mask(jnp.asarray(segments), jnp.asarray(segments), causal)
  params = nn.unbox(attn.init(jax.random.key(1), x, mask)["params"])
  params = jax.tree_util.tree_map(  # non-zero biases so they are tested too
      lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  got = attn.apply({"params": params}, x, mask)
  want = np_attention(x, params, naive_mask(segments, causal), cfg.num_heads, kv_heads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_heads_first_attention_matches_numpy_with_bias_and_empty_rows(kv_heads, dtype):
  # The CPU targets' attention: per-head bias, a scale, grouped kv heads, and one query
  # row with every key masked (it averages all values, as JAX's attention does).
  from tx_jax.models.layers import heads_first_attention
  rng = np.random.default_rng(1)
  b, t, s, n, h = 2, 5, 7, 4, 8
  q = rng.normal(size=(b, t, n, h))
  k, v = rng.normal(size=(2, b, s, kv_heads, h))
  bias = rng.normal(size=(1, n, t, s))
  mask = rng.random((b, 1, t, s)) < 0.7
  mask[0, 0, 2] = False
  cast = lambda a: jnp.asarray(a, dtype)
  got = heads_first_attention(cast(q), cast(k), cast(v), jnp.asarray(bias, jnp.float32),
                              jnp.asarray(mask), scale=0.3)
  assert got.dtype == jnp.dtype(dtype) and got.shape == (b, t, n, h)
  f64 = lambda a: np.asarray(cast(a).astype(jnp.float32), np.float64)  # inputs as rounded
  kr, vr = (np.repeat(f64(a), n // kv_heads, axis=2) for a in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", f64(q), kr) * 0.3 + bias
  logits = np.where(mask, logits, -np.inf)
  logits[0, :, 2] = 0.0  # the empty row: uniform weights
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  want = np.einsum("bnts,bsnh->btnh", w, vr)
  tol = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("t,bias_rows", [(8, 8), (8, 1), (6, 6)])  # 6: one block; 1: broadcast
def test_heads_first_causal_blocks_match_jax_attention_and_its_gradients(t, bias_rows):
  # Causal self-attention in query blocks (each sees only the keys up to its end) gives
  # what JAX's own attention gives over the whole causal mask, values and gradients.
  from tx_jax.models.layers import attention_mask, heads_first_attention
  rng = np.random.default_rng(2)
  b, n, h = 2, 4, 8
  q, k, v = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(3, b, t, n, h)))
  bias = jnp.asarray(rng.normal(size=(1, n, bias_rows, t)), jnp.float32)
  segments = jnp.asarray([[1] * (t - 2) + [2, 2], [1] * t])      # two packed documents
  mask = attention_mask(segments, segments, causal=True)
  ours = lambda q, k, v, bias: heads_first_attention(q, k, v, bias, mask, causal=True)
  ref = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                           implementation="xla")
  np.testing.assert_allclose(ours(q, k, v, bias), ref(q, k, v, bias), rtol=1e-5, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  grads = [jax.grad(lambda *a, f=f: (f(*a) * w).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias)
           for f in (ours, ref)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def np_mlp_and_grads(x, p, dy, activation, gated):
  """The MLP's output and its backward pass written out by hand, in float64 numpy."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  pre = x @ p["wi"]["kernel"] + p["wi"]["bias"]
  if activation == "gelu":  # tanh approximation and its derivative
    c = np.sqrt(2 / np.pi)
    th = np.tanh(c * (pre + 0.044715 * pre ** 3))
    act = 0.5 * pre * (1 + th)
    dact = 0.5 * (1 + th) + 0.5 * pre * (1 - th ** 2) * c * (1 + 3 * 0.044715 * pre ** 2)
  elif activation == "silu":
    sig = 1 / (1 + np.exp(-pre))
    act, dact = pre * sig, sig * (1 + pre * (1 - sig))
  else:  # relu
    act, dact = np.maximum(pre, 0), (pre > 0).astype(np.float64)
  h, gate = act, None
  if gated:
    gate = x @ p["wi_gate"]["kernel"] + p["wi_gate"]["bias"]
    h = act * gate
  y = h @ p["wo"]["kernel"] + p["wo"]["bias"]
  dh = dy @ p["wo"]["kernel"].T
  dpre = dh * (gate if gated else 1) * dact
  grads = {"wo": {"kernel": h.T @ dy, "bias": dy.sum(0)},
           "wi": {"kernel": x.T @ dpre, "bias": dpre.sum(0)}}
  dx = dpre @ p["wi"]["kernel"].T
  if gated:
    dgate = dh * act
    grads["wi_gate"] = {"kernel": x.T @ dgate, "bias": dgate.sum(0)}
    dx = dx + dgate @ p["wi_gate"]["kernel"].T
  return y, grads, dx


@pytest.mark.parametrize("merge_rows", [True, False], ids=["cpu_lowering", "einsum_form"])
@pytest.mark.parametrize("activation,gated", [("gelu", False), ("silu", True), ("relu", False)])
def test_mlp_values_and_gradients_match_numpy(activation, gated, merge_rows, monkeypatch):
  # CPU targets recompute the activation in the backward pass; the other lowering keeps it.
  from tx_jax.models import layers
  monkeypatch.setattr(layers, "merge_rows", lambda: merge_rows)
  cfg = dataclasses.replace(SMALL, activation=activation, gated_mlp=gated)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  mlp = layers.Mlp(cfg)
  params = nn.unbox(mlp.init(jax.random.key(0), x)["params"])
  params = jax.tree_util.tree_map(  # weights large enough to reach GELU's curved part
      lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32), params)
  y, pullback = jax.vjp(lambda p, x: mlp.apply({"params": p}, x), params, x)
  grads, dx = pullback(dy)
  want_y, want_grads, want_dx = np_mlp_and_grads(x.reshape(10, 32), params,
                                                 dy.reshape(10, 32), activation, gated)
  np.testing.assert_allclose(np.asarray(y).reshape(10, 32), want_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(10, 32), want_dx, rtol=1e-4, atol=1e-5)
  assert set(grads) == set(want_grads)
  for name in want_grads:
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(grads[name][leaf], want_grads[name][leaf], rtol=1e-4,
                                 atol=1e-4, err_msg=f"{name}/{leaf}")


def test_rotary_matches_complex_rotation():
  from tx_jax.models import rotary
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.arange(5)[None] + 3
  got = np.asarray(rotary(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
  # Reference: pairs (i, i + H/2) as complex numbers rotated by pos * base^(-i/(H/2)).
  z = x[..., :4] + 1j * x[..., 4:]
  theta = pos[..., None, None] * 10_000.0 ** (-np.arange(4) / 4)
  zr = z * np.exp(1j * theta)
  np.testing.assert_allclose(got, np.concatenate([zr.real, zr.imag], -1), rtol=1e-5, atol=1e-5)


def _init(model, tokens, **kw):
  return nn.unbox(model.init(jax.random.key(0), tokens, **kw)["params"])


@pytest.mark.parametrize("overrides", [
    {}, {"positions": "rope", "norm": "rmsnorm", "gated_mlp": True, "activation": "silu"},
    {"pre_norm": False, "tie_embeddings": False}, {"positions": "relative", "num_kv_heads": 2},
    {"scan_layers": True, "remat": "full"}])
def test_decoder_is_causal(overrides):
  cfg = dataclasses.replace(SMALL, **overrides)
  model = DecoderLM(cfg)
  tokens = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int32)
  params = _init(model, tokens)
  base, _ = model.apply({"params": params}, tokens)
  changed = tokens.copy()
  changed[:, 9:] = (changed[:, 9:] + 7) % 50
  after, _ = model.apply({"params": params}, changed)
  np.testing.assert_allclose(np.asarray(base[:, :9]), np.asarray(after[:, :9]), atol=1e-5)
  assert not np.allclose(base[:, 9:], after[:, 9:], atol=1e-3)


@pytest.mark.parametrize("positions", ["learned", "rope", "relative"])
def test_kv_cache_decoding_equals_full_forward(positions):
  cfg = dataclasses.replace(SMALL, positions=positions, num_kv_heads=2)
  model = DecoderLM(cfg)
  tokens = np.random.default_rng(1).integers(0, 50, (2, 12)).astype(np.int32)
  params = _init(model, tokens)
  full, _ = model.apply({"params": params}, tokens)
  cache = init_cache(model, 2, cfg.max_len)
  (logits, _), mutated = model.apply({"params": params, "cache": cache}, tokens[:, :5],
                                positions=jnp.broadcast_to(jnp.arange(5), (2, 5)), decode=True,
                                mutable=["cache"])
  steps = [logits]
  cache = mutated["cache"]
  for i in range(5, 12):
    (logits, _), mutated = model.apply({"params": params, "cache": cache}, tokens[:, i:i + 1],
                                  positions=jnp.full((2, 1), i), decode=True, mutable=["cache"])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_packed_segments_do_not_attend_across_documents():
  model = DecoderLM(SMALL)
  rng = np.random.default_rng(2)
  doc_a, doc_b = rng.integers(0, 50, 7), rng.integers(0, 50, 9)
  packed = np.concatenate([doc_a, doc_b])[None].astype(np.int32)
  segments = np.array([[1] * 7 + [2] * 9], np.int32)
  positions = np.array([list(range(7)) + list(range(9))], np.int32)
  params = _init(model, packed)
  logits, _ = model.apply({"params": params}, packed, positions=positions, segment_ids=segments)
  alone_a, _ = model.apply({"params": params}, doc_a[None].astype(np.int32))
  alone_b, _ = model.apply({"params": params}, doc_b[None].astype(np.int32))
  np.testing.assert_allclose(np.asarray(logits[0, :7]), np.asarray(alone_a[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 7:]), np.asarray(alone_b[0]), atol=1e-5)


def test_encoder_padding_does_not_change_real_tokens():
  cfg = dataclasses.replace(SMALL, pre_norm=False, type_vocab_size=2)
  model = Encoder(cfg)
  rng = np.random.default_rng(3)
  real = rng.integers(0, 50, (1, 8)).astype(np.int32)
  padded = np.concatenate([real, rng.integers(0, 50, (1, 6)).astype(np.int32)], 1)
  seg = np.array([[1] * 8 + [0] * 6], np.int32)
  params = _init(model, padded)
  a, _ = model.apply({"params": params}, real)
  b, _ = model.apply({"params": params}, padded, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0, :8]), atol=1e-5)


def test_scan_and_loop_compute_the_same_function():
  tokens = np.random.default_rng(4).integers(0, 50, (2, 10)).astype(np.int32)
  loop_model = DecoderLM(SMALL)
  scan_model = DecoderLM(dataclasses.replace(SMALL, scan_layers=True))
  p_loop = _init(loop_model, tokens)
  p_scan = _init(scan_model, tokens)
  # Stack the per-layer params of the loop model along a leading "layers" axis.
  blocks = [p_loop["decoder"][f"block_{i:02d}"] for i in range(SMALL.num_layers)]
  p_scan = dict(p_scan)
  p_scan["decoder"] = {"layers": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *blocks)}
  for k in p_loop:
    if k != "decoder":
      p_scan[k] = p_loop[k]
  a, _ = loop_model.apply({"params": p_loop}, tokens)
  b, _ = scan_model.apply({"params": p_scan}, tokens)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_param_names_match_kernel_shapes():
  cfg = make_config(DECODER_SIZES, "tiny", num_kv_heads=2, gated_mlp=True)
  boxed = param_shapes(DecoderLM(cfg), 8)
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  sizes = {"embed": cfg.d_model, "heads": None, "kv": cfg.dim_per_head, "mlp": cfg.mlp_dim,
           "vocab": cfg.vocab_size, "positions": cfg.max_len}
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
    for name, dim in zip(leaf.names, leaf.value.shape):
      if sizes.get(name):
        assert dim == sizes[name], (path, name, dim)
      if name == "heads":
        assert dim in (cfg.num_heads, cfg.kv_heads), path


def test_gpt2_small_parameter_count():
  # GPT-2 small with tied embeddings: 124,439,808 (Radford et al. 2019; HF gpt2).
  cfg = make_config(DECODER_SIZES, "124m")
  assert count_params(param_shapes(DecoderLM(cfg), 16)) == 124_439_808


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = dataclasses.replace(SMALL, dtype="bfloat16")
  model = DecoderLM(cfg)
  tokens = np.zeros((1, 8), np.int32)
  params = _init(model, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  logits, out = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and out["block_00"].dtype == jnp.bfloat16


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  k2 = np.asarray(filter_logits(logits, 1.0, 2, 1.0))
  assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e30).all()
  p = np.asarray(filter_logits(logits, 1.0, 0, 0.8))  # 0.5 + 0.2 + 0.15 >= 0.8
  assert (p[0, :3] > -1e30).all() and (p[0, 3:] < -1e30).all()
