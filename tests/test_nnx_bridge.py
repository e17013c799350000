"""tx_jax's Linen models inside Flax NNX through `flax.nnx.bridge.ToNNX`.

The wrapped model must compute what Linen's `apply` computes with the same
parameters, keep each parameter's logical axis names, and train under
`nnx.Optimizer`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import bridge

from tx_jax.models import DecoderLM, Encoder, TransformerConfig

CFG = TransformerConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=16,
                        vocab_size=50, positions="rope").validate()
B, T = 4, 16


def _inputs(seed=0):
  tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  # Row 1 ends in padding (segment 0), row 2 packs two documents.
  seg = np.ones((B, T), np.int32)
  seg[1, 10:] = 0
  seg[2, 7:] = 2
  return jnp.asarray(tokens), jnp.asarray(seg)


def _wrap(linen_model, tokens, **kw):
  # Flax 0.12 shards annotated variables eagerly when created; outside a mesh
  # the logical names stay as metadata only.
  with nnx.use_eager_sharding(False):
    return bridge.ToNNX(linen_model, rngs=nnx.Rngs(0)).lazy_init(tokens, **kw)


MODELS = {"decoder": lambda: DecoderLM(CFG),
          "encoder": lambda: Encoder(CFG, mlm_head=True, sentence_head=True)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_to_nnx_matches_linen_apply(name):
  linen_model = MODELS[name]()
  tokens, seg = _inputs()
  model = _wrap(linen_model, tokens, segment_ids=seg)
  state = nnx.state(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  got_logits, got = model(tokens, segment_ids=seg)
  want_logits, want = linen_model.apply({"params": params}, tokens, segment_ids=seg)
  assert got_logits.shape == (B, T, CFG.vocab_size)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-6, rtol=0)
  assert set(got) == set(want) and {"embedded", "block_00", "block_01", "pre_logits"} <= set(got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=key)
  # Same parameter tree as Linen's own init, with the same logical axis names.
  linen_params = jax.eval_shape(lambda: linen_model.init(jax.random.key(0), tokens,
                                                         segment_ids=seg))["params"]
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  want_names = jax.tree_util.tree_leaves(nn.get_partition_spec(linen_params), is_leaf=is_spec)
  got_vars = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert [tuple(v.out_sharding) for v in got_vars] == [tuple(s) for s in want_names]
  assert [v.shape for v in got_vars] == [x.shape for x in
                                         jax.tree_util.tree_leaves(nn.unbox(linen_params))]


@nnx.jit
def _lm_step(model, optimizer, tokens, seg, targets):
  def loss_fn(model):
    logits, _ = model(tokens, segment_ids=seg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nnx_optimizer_trains_the_wrapped_model(name):
  tokens, seg = _inputs(1)
  model = _wrap(MODELS[name](), tokens, segment_ids=seg)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  # Next-token targets for the decoder, the tokens themselves for the encoder:
  # either way a loss that must fall when trained on one batch.
  targets = jnp.roll(tokens, -1, axis=1) if name == "decoder" else tokens
  losses = [float(_lm_step(model, optimizer, tokens, seg, targets)) for _ in range(8)]
  assert losses[-1] < 0.8 * losses[0], losses
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, after)
  kernel = after["embedder"]["tokens"]["embedding"]
  assert not np.allclose(kernel, before["embedder"]["tokens"]["embedding"])
  # Every parameter that the loss reaches moved (the sentence head does not).
  moved = {jax.tree_util.keystr(p) for p, c in
           jax.tree_util.tree_leaves_with_path(changed) if c}
  still = {jax.tree_util.keystr(p) for p, c in
           jax.tree_util.tree_leaves_with_path(changed) if not c}
  assert all("pooler" in k or "sentence_classifier" in k for k in still), still
  assert any("block_01" in k for k in moved)
  assert int(optimizer.step[...]) == 8
