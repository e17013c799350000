"""Transformer building blocks: attention, MLP, norms, positions.

Every parameter is created with logical axis names that describe its real
shape (`embed`, `heads`, `kv`, `mlp`, `vocab`, ...); `tx_jax.parallel` maps
those names to mesh axes. Activations are annotated with `act_*` names.
Shape letters: B batch, T query length, S key length, D model width,
N heads, K kv heads, H head dim, F mlp width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
P = nn.with_logical_partitioning
DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
# "gelu" is the tanh approximation (GPT-2's "gelu_new"); "gelu_exact" the erf form (BERT, ViT).
ACTIVATIONS = {"gelu": nn.gelu, "gelu_exact": lambda x: nn.gelu(x, approximate=False),
               "relu": nn.relu, "silu": nn.silu}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of a Transformer stack (encoder, decoder or both)."""
  vocab_size: int = 256
  num_layers: int = 4            # decoder layers (or encoder layers for Encoder)
  num_encoder_layers: int = 0    # EncoderDecoder only; 0 = same as num_layers
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0          # 0 = num_heads; fewer = grouped-query attention
  head_dim: int = 0              # 0 = d_model // num_heads
  mlp_dim: int = 1024
  max_len: int = 256
  dropout_rate: float = 0.0
  positions: str = "learned"     # learned | rope | relative | none
  rope_base: float = 10_000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  norm: str = "layernorm"        # layernorm | rmsnorm
  norm_eps: float = 1e-6
  pre_norm: bool = True          # False: post-LN (original Transformer / BERT)
  activation: str = "gelu"       # gelu (tanh approximation) | gelu_exact (erf) | relu | silu
  gated_mlp: bool = False        # GLU-style MLP (e.g. SwiGLU with silu)
  use_bias: bool = True
  tie_embeddings: bool = True
  share_embeddings: bool = True  # EncoderDecoder: one token table for encoder and decoder
  type_vocab_size: int = 0       # Encoder token-type (segment A/B) embeddings
  dtype: str = "float32"         # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"            # none | full | dots (save matmul outputs)
  attention_impl: str = ""       # "" (let JAX choose) | xla | cudnn
  attention_scale: float = 0.0   # logit scale; 0 = 1/sqrt(head dim); T5 uses 1 (folded into init)
  scale_tied_readout: bool = False  # T5 v1.0: hidden states * d_model**-0.5 before a tied readout

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when 0."""
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    """Width H of each head: head_dim, or d_model // num_heads when 0."""
    return self.head_dim or self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    """The activation dtype (`dtype` as a jnp.dtype)."""
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    """The parameter dtype (`param_dtype` as a jnp.dtype)."""
    return jnp.dtype(self.param_dtype)

  def validate(self) -> "TransformerConfig":
    """Raises ValueError naming the first inconsistent field."""
    if self.num_heads % self.kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.kv_heads}")
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by "
                       f"model.num_heads={self.num_heads} (or set model.head_dim)")
    if self.positions == "rope" and self.dim_per_head % 2:
      raise ValueError("rotary positions need an even head dimension")
    choices = dict(positions=("learned", "rope", "relative", "none"),
                   norm=("layernorm", "rmsnorm"), activation=tuple(ACTIVATIONS),
                   remat=("none", "full", "dots"), dtype=("float32", "bfloat16"),
                   param_dtype=("float32", "bfloat16"),
                   attention_impl=("", "xla", "cudnn"))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    return self


def constrain(x: Array, names: tuple[str, ...]) -> Array:
  """Sharding hint for an activation; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, names)


def make_norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """LayerNorm or RMSNorm (cfg.norm) over the last axis; parameters named `embed`."""
  kw = dict(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            scale_init=P(nn.initializers.ones, ("embed",)), name=name)
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(**kw)
  return nn.LayerNorm(use_bias=True, bias_init=P(nn.initializers.zeros, ("embed",)), **kw)


def rotary(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding on x [B, T, N, H] at integer positions [B, T]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)            # (H/2,)
  angle = positions[..., None].astype(jnp.float32) * freq                   # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def relative_bucket(relative: Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> Array:
  """T5's bucketing of key-minus-query offsets: exact when near, log-spaced far."""
  bucket = jnp.zeros_like(relative)
  n = -relative
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  far = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                     / np.log(max_distance / max_exact) * (num_buckets - max_exact))
  far = jnp.minimum(far.astype(jnp.int32), num_buckets - 1)
  return bucket + jnp.where(is_small, n, far)


class RelativePositionBias(nn.Module):
  """T5 relative position bias, shared by all layers of a stack: (1, N, T, S)."""
  cfg: TransformerConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos: Array, k_pos: Array) -> Array:
    """Query positions (B, T), key positions (B, S) -> bias (B, N, T, S)."""
    cfg = self.cfg
    table = self.param("rel_embedding", P(DEFAULT_KERNEL_INIT, ("relpos_buckets", "heads")),
                       (cfg.relative_buckets, cfg.num_heads), cfg.params_dtype)
    rel = k_pos[:, None, :] - q_pos[:, :, None]                              # (B, T, S)
    buckets = relative_bucket(rel, self.bidirectional, cfg.relative_buckets,
                              cfg.relative_max_distance)
    bias = jnp.take(table, buckets, axis=0)                                  # (B, T, S, N)
    return jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)


def attention_mask(q_segments: Array, k_segments: Array, causal: bool) -> Array:
  """Boolean mask (B, 1, T, S): same segment (0 = padding) and, if causal, k <= q.

  Causality is by index in the row: packed documents are contiguous, so within
  a segment index order is token order.

  Padding queries (segment 0) attend to padding keys so no row is empty; their
  outputs are ignored by every loss.
  """
  mask = q_segments[:, :, None] == k_segments[:, None, :]
  if causal:
    t, s = q_segments.shape[1], k_segments.shape[1]
    mask &= jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None]
  return mask[:, None, :, :]


def merge_rows() -> bool:
  """Whether a projection merges the leading axes of its input into one row axis first.

  A lowering choice, not a change in the math: on XLA's CPU backend it spares the
  transposes materialized for a weight gradient that contracts over batch *and*
  length (1.7x faster MLP forward and backward, 1.2x the whole GPT bench step), but
  on TPUs it costs relayouts (1.5x the bytes a GPT-124M step moves on a v5e-16). The
  target is the mesh being traced for (`tx-jax plan` traces for TPUs on a CPU host).
  """
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return (device.platform if device is not None else jax.default_backend()) == "cpu"


# Query blocks of causal self-attention on CPU targets (see heads_first_attention).
CAUSAL_BLOCKS = 4


def heads_first_attention(q: Array, k: Array, v: Array, bias: Array | None,
                          mask: Array | None, scale: float = 0.0, causal: bool = False) -> Array:
  """Softmax attention as `jax.nn.dot_product_attention`'s XLA form computes it, with
  the heads moved ahead of the positions before the two batched matmuls.

  q (B, T, N, H), k and v (B, S, K, H) with N a multiple of K, bias (B or 1, N, T, S),
  boolean mask (B or 1, 1 or N, T, S) -> (B, T, N, H). Logits and softmax in float32;
  masked logits get the same large negative value (a fully masked row averages every
  value). On XLA's CPU backend this form's forward and backward take about half the
  time of JAX's (whose logits are a five-D grouped contraction there); other backends
  keep JAX's.

  `causal` (the mask already holds causality; T == S, no cache): the queries go in
  `CAUSAL_BLOCKS` blocks, each against the keys up to its own end only, which skips
  3/8 of the logits (all masked) with 4 blocks; the GPT bench train step on a 2-core
  CPU is 2-3% faster. Only a row with every key masked would differ (it would average
  the values up to its block's end); the masks `attention_mask` builds leave none.
  """
  n, kv = q.shape[2], k.shape[2]
  if kv != n:  # grouped-query: each kv head serves n // kv query heads
    k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
  qh, kh, vh = (jnp.swapaxes(z, 1, 2) for z in (q, k, v))                   # (B, N, ., H)
  scale = jnp.float32(scale or 1.0 / np.sqrt(q.shape[-1]))

  def attend(qh, kh, vh, bias, mask):
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32)
    logits = logits * scale
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.float32(-0.7 * np.finfo(np.float32).max))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsh->bnth", probs, vh)

  t = q.shape[1]
  nb = CAUSAL_BLOCKS if causal and t == k.shape[1] and t % CAUSAL_BLOCKS == 0 else 1
  if nb == 1:
    return jnp.swapaxes(attend(qh, kh, vh, bias, mask), 1, 2)
  c = t // nb

  def cut(a, i):  # a mask or bias block; a broadcast (size-1) axis stays whole
    if a is None:
      return None
    rows = slice(i * c, (i + 1) * c) if a.shape[-2] != 1 else slice(None)
    cols = slice(0, (i + 1) * c) if a.shape[-1] != 1 else slice(None)
    return a[..., rows, cols]

  outs = [attend(qh[:, :, i * c:(i + 1) * c], kh[:, :, :(i + 1) * c], vh[:, :, :(i + 1) * c],
                 cut(bias, i), cut(mask, i)) for i in range(nb)]
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


class Projection(nn.Module):
  """x (..., *in_shape) @ kernel (*in_shape, *features) -> (..., *features).

  The kernel is created in its true shape with its logical names (a flat 2-D
  kernel reshaped afterwards would make the axis names lie).
  """
  cfg: TransformerConfig
  features: tuple[int, ...]
  names: tuple[str, ...]     # logical names of the kernel's axes, input axes first
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (..., *in_shape) -> (..., *features): the trailing axes of x contract with the
    kernel's leading ones (merged rows first where `merge_rows()` says so)."""
    cfg = self.cfg
    n_in = len(self.names) - len(self.features)
    in_shape, lead = x.shape[x.ndim - n_in:], x.shape[:x.ndim - n_in]
    kernel = self.param("kernel", P(DEFAULT_KERNEL_INIT, self.names),
                        (*in_shape, *self.features), cfg.params_dtype)
    if merge_rows():
      x = x.reshape(-1, *in_shape)
    y = jax.lax.dot_general(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype),
                            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                             ((), ())))
    if cfg.use_bias:
      bias = self.param("bias", P(self.bias_init, self.names[n_in:]), self.features,
                        cfg.params_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y.reshape(*lead, *self.features)


class Attention(nn.Module):
  """Multi-head (optionally grouped-query) attention with an optional KV cache.

  Self-attention when `kv_input` is None, cross-attention otherwise. In decode
  mode the keys/values of the new tokens are written into the `cache`
  collection at `cache_index`, so prefill (many tokens) and one-token steps use
  the same code; the mask then comes from absolute positions.
  """
  cfg: TransformerConfig
  causal: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, *, kv_input: Array | None = None,
               positions: Array | None = None, bias: Array | None = None) -> Array:
    """x (B, T, D), boolean mask (B, 1, T, S) or None -> (B, T, D).

    kv_input (B, S, D): cross-attention source. positions (B, T): for rotary
    positions and the decode-mode mask. bias (B or 1, N, T, S): added to the logits.
    """
    cfg = self.cfg
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    is_cross = kv_input is not None
    kv_input = x if kv_input is None else kv_input
    q = Projection(cfg, (n, h), ("embed", "heads", "kv"), name="query")(x)
    key = Projection(cfg, (k, h), ("embed", "heads", "kv"), name="key")(kv_input)
    value = Projection(cfg, (k, h), ("embed", "heads", "kv"),
                       name="value")(kv_input)
    if cfg.positions == "rope" and not is_cross:
      q = rotary(q, positions, cfg.rope_base)
      key = rotary(key, positions, cfg.rope_base)
    q = constrain(q, ("act_batch", "act_len", "act_heads", "act_kv"))

    if self.decode and not is_cross:
      key, value, mask, bias = self._update_cache(key, value, mask, bias)

    if merge_rows() and not cfg.attention_impl:  # see heads_first_attention
      out = heads_first_attention(q, key, value, bias, mask, cfg.attention_scale,
                                  causal=self.causal and not self.decode)
    else:
      out = jax.nn.dot_product_attention(
          q, key, value, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
          scale=cfg.attention_scale or None,
          implementation=cfg.attention_impl or None)                         # (B, T, N, H)
    out = constrain(out, ("act_batch", "act_len", "act_heads", "act_kv"))
    return Projection(cfg, (cfg.d_model,), ("heads", "kv", "embed"),
                      name="out")(out)

  def _update_cache(self, key, value, mask, bias):
    """Writes new K/V at cache_index; returns the full cache and its mask."""
    initialized = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # init call: the input length is the cache length
      return key, value, mask, bias
    t, s = key.shape[1], ck.value.shape[1]
    start = idx.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, key, (0, start, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, value, (0, start, 0, 0))
    idx.value = start + t
    # Query i (absolute start + i) sees cached keys 0..start + i.
    q_abs = start + jnp.arange(t)
    cache_mask = (jnp.arange(s)[None, :] <= q_abs[:, None])[None, None]     # (1, 1, T, S)
    if mask is not None:  # a (B, 1, 1, S) key-padding mask from the caller
      cache_mask = cache_mask & mask
    return ck.value, cv.value, cache_mask, bias


class Mlp(nn.Module):
  """Position-wise feed-forward: D -> F -> D, optionally gated.

  On XLA's CPU targets (`merge_rows()`) the activation is recomputed in the backward
  pass from its input instead of kept: the tanh GELU's autodiff otherwise writes and
  keeps a second (B, T, F) array (the tanh) beside the pre-activation. The gradients
  are the same; the GPT bench train step on a 2-core CPU is 2-5% faster.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """(B, T, D) -> (B, T, D)."""
    cfg = self.cfg
    act = ACTIVATIONS[cfg.activation]
    if merge_rows():
      act = jax.checkpoint(act)
    dense = lambda feats, names, name: Projection(cfg, (feats,), names,
                                                  name=name)
    h = act(dense(cfg.mlp_dim, ("embed", "mlp"), "wi")(x))                  # (B, T, F)
    if cfg.gated_mlp:
      h = h * dense(cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(x)
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


class Block(nn.Module):
  """One Transformer layer: self-attention, optional cross-attention, MLP.

  Pre-LN: x + f(norm(x)). Post-LN (original Transformer, BERT): norm(x + f(x)).
  Signature (carry, _) -> (carry, None) so the same module works under nn.scan.
  """
  cfg: TransformerConfig
  causal: bool = False
  cross: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, inputs: dict[str, Any]):
    """x (B, T, D) and `inputs` (mask, positions, bias, encoded, cross_mask)
    -> ((B, T, D), None).
    """
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

    def sublayer(x, fn, name):
      if cfg.pre_norm:
        return x + drop(fn(make_norm(cfg, f"{name}_norm")(x)))
      return make_norm(cfg, f"{name}_norm")(x + drop(fn(x)))

    x = sublayer(x, lambda y: Attention(cfg, self.causal, self.decode, name="self_attn")(
        y, inputs["mask"], positions=inputs.get("positions"), bias=inputs.get("bias")), "self_attn")
    if self.cross:
      x = sublayer(x, lambda y: Attention(cfg, name="cross_attn")(
          y, inputs["cross_mask"], kv_input=inputs["encoded"]), "cross_attn")
    x = sublayer(x, lambda y: Mlp(cfg, name="mlp")(y, self.deterministic), "mlp")
    return constrain(x, ("act_batch", "act_len", "act_embed")), None


class Stack(nn.Module):
  """`num_layers` Blocks, looped in Python or with nn.scan (+ optional remat).

  Returns the final hidden states (before the final norm) and, when not
  scanned, each block's output by name ("block_00", ...).
  """
  cfg: TransformerConfig
  num_layers: int
  causal: bool = False
  cross: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, inputs: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
    """x (B, T, D), shared `inputs` -> (hidden (B, T, D), {"block_NN": (B, T, D)})."""
    cfg = self.cfg
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, causal=self.causal, cross=self.cross, decode=self.decode,
              deterministic=self.deterministic)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, name="layers")(x, inputs)
      return x, {}
    outs = {}
    for i in range(self.num_layers):
      x, _ = block(**kw, name=f"block_{i:02d}")(x, inputs)
      outs[f"block_{i:02d}"] = x
    return x, outs


class Embedder(nn.Module):
  """Token (+ learned position, + token type) embeddings, and the tied readout."""
  cfg: TransformerConfig

  def setup(self):
    """Token table (vocab, embed); learned position and token-type tables if used."""
    cfg = self.cfg
    self.tokens = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype,
                           embedding_init=P(DEFAULT_KERNEL_INIT, ("vocab", "embed")))
    if cfg.positions == "learned":
      self.pos = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype,
                          embedding_init=P(DEFAULT_KERNEL_INIT, ("positions", "embed")))
    if cfg.type_vocab_size:
      self.types = nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype,
                            embedding_init=P(DEFAULT_KERNEL_INIT, ("types", "embed")))

  def __call__(self, tokens: Array, positions: Array, token_types: Array | None = None):
    """tokens (B, T), positions (B, T), token_types (B, T) or None -> (B, T, D)."""
    x = self.tokens(tokens)                                                  # (B, T, D)
    if self.cfg.positions == "learned":
      x = x + self.pos(positions)
    if self.cfg.type_vocab_size and token_types is not None:
      x = x + self.types(token_types)
    return constrain(x, ("act_batch", "act_len", "act_embed"))

  def attend(self, x: Array) -> Array:
    """Logits against the token embedding (tied readout): (B, T, V)."""
    if self.cfg.scale_tied_readout:
      x = x * self.cfg.d_model ** -0.5
    if merge_rows():  # see merge_rows
      return self.tokens.attend(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return self.tokens.attend(x)


class Readout(nn.Module):
  """Untied output projection D -> V."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, T, D) -> logits (B, T, V)."""
    cfg = self.cfg
    return Projection(dataclasses.replace(cfg, use_bias=False), (cfg.vocab_size,),
                      ("embed", "vocab"), name="unembed")(x)


def default_positions(tokens: Array) -> Array:
  """0, 1, ..., T - 1 for every row of tokens (B, T) -> (B, T) int32."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

