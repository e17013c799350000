"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded;
greedy and beam search for encoder-decoders; sentences from a text VAE's latents.

The prompt is run once through the model in decode mode (prefill writes its
keys/values into the cache), then one token per step; each step attends to
the cache instead of recomputing the prefix.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np


def zeroed_cache(init, *inputs: jax.ShapeDtypeStruct):
  """The "cache" collection of `init(*inputs)` (a decode-mode model.init), zeroed; from
  shapes only, no compute."""
  shapes = jax.eval_shape(init, *inputs)["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def init_cache(model, batch_size: int, length: int):
  """Zeroed KV cache for `length` positions."""
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  return zeroed_cache(lambda t: model.init(jax.random.key(0), t, decode=True), tokens)


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
  """Logits (B, V) scaled by temperature with tokens outside top-k / top-p removed."""
  logits = logits / temperature
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def sample(model, params, prompt, rng, *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0):
  """Prompt (B, P) int32 -> (B, P + max_new_tokens); temperature 0 = greedy."""
  b, p = prompt.shape
  cache = init_cache(model, b, model.cfg.max_len)

  def step(cache, tokens, start):
    positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    (logits, _), mutated = model.apply({"params": params, "cache": cache}, tokens,
                                  positions=positions, decode=True, mutable=["cache"])
    return mutated["cache"], logits[:, -1]

  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)
                                  ).astype(jnp.int32)

  cache, logits = step(cache, prompt, 0)
  out = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)

  def body(i, carry):
    cache, logits, out = carry
    token = pick(logits, jax.random.fold_in(rng, i))
    out = out.at[:, p + i].set(token)
    cache, logits = step(cache, token[:, None], p + i)
    return cache, logits, out

  _, _, out = jax.lax.fori_loop(0, max_new_tokens, body, (cache, logits, out))
  return out


MAX_CACHE_BYTES = 8 * 2**30  # one batch of samples' KV cache (float32 upper bound)


def generate_text(trained, prompt: str, *, max_new_tokens: int | None = None,
                  temperature: float = 0.8,
                  top_k: int = 0, top_p: float = 0.95, seed: int = 0, num_samples: int = 1):
  """Samples continuations of `prompt` from a loaded workdir (setup.load_trained)."""
  from tx_jax.errors import UserError
  tok, cfg = trained.tokenizer, trained.objective.cfg
  ids = tok.encode(prompt)
  if not ids:
    raise UserError("the prompt is empty; pass --prompt 'some text'")
  if max_new_tokens is None:  # fill the context
    max_new_tokens = cfg.max_len - len(ids)
  if max_new_tokens <= 0:
    raise UserError(f"the prompt ({len(ids)} tokens) fills the model context of {cfg.max_len} "
                    "tokens; shorten it")
  if len(ids) + max_new_tokens > cfg.max_len:
    raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                    f"model context of {cfg.max_len} tokens; shorten the prompt or ask for fewer "
                    f"tokens")
  cache_bytes = num_samples * cfg.max_len * cfg.d_model * cfg.num_layers * 2 * 4  # K and V
  if cache_bytes > MAX_CACHE_BYTES:
    raise UserError(f"--num-samples {num_samples} needs about {cache_bytes / 2**30:.1f} GiB of "
                    f"KV cache (at most {MAX_CACHE_BYTES / 2**30:.0f} GiB); ask for fewer samples")
  prompt_arr = jnp.asarray(np.tile(np.asarray(ids, np.int32), (num_samples, 1)))
  out = sample(trained.objective.model, trained.params, prompt_arr, jax.random.key(seed),
               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  return [tok.decode(row[len(ids):].tolist()) for row in np.asarray(out)]


# --- Encoder-decoder (T5): greedy and beam search over the decoder's KV cache ---------


def init_encdec_cache(model, batch_size: int, encoded_len: int):
  """Zeroed decoder KV cache for cfg.max_len target positions."""
  inputs = jax.ShapeDtypeStruct((batch_size, encoded_len), jnp.int32)
  targets = jax.ShapeDtypeStruct((batch_size, model.cfg.max_len), jnp.int32)
  return zeroed_cache(lambda i, t: model.init(jax.random.key(0), i, t, decode=True),
                      inputs, targets)


def _decode_step(model, params, cache, encoded, encoder_segments, tokens, step):
  """One decoder token per row (B, 1) at position `step` -> (cache, logits (B, V))."""
  positions = jnp.full(tokens.shape, step, jnp.int32)
  (logits, _), mutated = model.apply(
      {"params": params, "cache": cache}, encoded, tokens, encoder_segment_ids=encoder_segments,
      positions=positions, decode=True, method="decode", mutable=["cache"])
  return mutated["cache"], logits[:, -1]


def _check_max_len(model, max_len: int):
  if not 0 < max_len <= model.cfg.max_len:
    raise ValueError(f"max_len={max_len} must be in 1..{model.cfg.max_len}, the KV cache size")


def _encode(model, params, inputs, segments):
  return model.apply({"params": params}, inputs, segment_ids=segments, method="encode")


@functools.partial(jax.jit, static_argnames=("model", "max_len", "start_id", "eos_id"))
def greedy_decode(model, params, inputs, segments, *, max_len: int, start_id: int,
                  eos_id: int):
  """Encoder inputs (B, S) (segments: 1 real, 0 padding) -> (B, max_len) argmax outputs.

  Each row stops at its first EOS; positions after it repeat EOS.
  """
  _check_max_len(model, max_len)
  b = inputs.shape[0]
  encoded = _encode(model, params, inputs, segments)
  cache = init_encdec_cache(model, b, inputs.shape[1])

  def body(i, carry):
    cache, token, done, out = carry
    cache, logits = _decode_step(model, params, cache, encoded, segments, token[:, None], i)
    token = jnp.where(done, eos_id, jnp.argmax(logits, -1).astype(jnp.int32))
    return cache, token, done | (token == eos_id), out.at[:, i].set(token)

  init = (cache, jnp.full((b,), start_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.full((b, max_len), eos_id, jnp.int32))
  return jax.lax.fori_loop(0, max_len, body, init)[3]


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); scores are log p / penalty."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, beam_idx, batch: int, beam: int, batch_axis: int):
  """Reorders the (batch * beam) rows of every cache leaf by beam_idx (B, K)."""
  def gather(x):
    if x.ndim <= batch_axis:       # cache_index counters
      return x
    shape = x.shape
    x = x.reshape(shape[:batch_axis] + (batch, beam) + shape[batch_axis + 1:])
    idx = beam_idx.reshape((1,) * batch_axis + (batch, beam) + (1,) * (x.ndim - batch_axis - 2))
    return jnp.take_along_axis(x, idx, axis=batch_axis + 1).reshape(shape)
  return jax.tree_util.tree_map(gather, tree)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "start_id", "eos_id",
                                             "beam_size"))
def beam_search(model, params, inputs, segments, *, max_len: int, start_id: int, eos_id: int,
                beam_size: int, alpha: float = 0.6):
  """Beam search -> (best (B, max_len), score (B,)); score = log p / length_penalty.

  Each step extends the K live beams by every token and keeps the best 2K
  candidates: those ending in EOS among the best K become finished hypotheses
  (scored with the length penalty, length counting the EOS), the best K
  others stay live. A row is done once it holds K finished hypotheses (so
  beam_size=1 is greedy decoding); a row not done by max_len also offers its
  live beams, scored at length max_len (as Hugging Face's BeamSearchScorer
  with early stopping).
  """
  _check_max_len(model, max_len)
  b, k = inputs.shape[0], beam_size
  neg = jnp.float32(-1e9)
  encoded = jnp.repeat(_encode(model, params, inputs, segments), k, axis=0)   # (B*K, S, D)
  enc_segments = jnp.repeat(segments, k, axis=0)
  cache = init_encdec_cache(model, b * k, inputs.shape[1])
  batch_axis = 1 if model.cfg.scan_layers else 0

  def body(i, carry):
    cache, last, seqs, logp, fin_seqs, fin_scores, num_fin = carry
    cache, logits = _decode_step(model, params, cache, encoded, enc_segments,
                                 last.reshape(b * k, 1), i)
    v = logits.shape[-1]
    cand = (logp[:, :, None] + jax.nn.log_softmax(logits).reshape(b, k, v)).reshape(b, k * v)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)                         # (B, 2K)
    origin, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(seqs, origin[:, :, None], axis=1).at[:, :, i].set(token)
    valid = top_logp > neg / 2                   # not descended from an unused beam
    is_eos = token == eos_id
    # EOS among the best K candidates finishes a hypothesis (while the row still
    # has fewer than K); finished ones are merged with the earlier ones.
    finishing = is_eos & valid & (jnp.arange(2 * k) < k)[None] & (num_fin < k)[:, None]
    new_scores = jnp.where(finishing, top_logp / length_penalty(i + 1, alpha), neg)
    fin_scores, keep = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, top_seqs], axis=1),
                                   keep[:, :, None], axis=1)
    num_fin = num_fin + jnp.sum(finishing, axis=1)
    # Live: the best K candidates that did not end.
    logp, live = jax.lax.top_k(jnp.where(is_eos | ~valid, neg, top_logp), k)
    seqs = jnp.take_along_axis(top_seqs, live[:, :, None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(origin, live, axis=1), b, k, batch_axis)
    return cache, seqs[:, :, i], seqs, logp, fin_seqs, fin_scores, num_fin

  seqs = jnp.full((b, k, max_len), eos_id, jnp.int32)
  # Only beam 0 is live at the start, so the K beams do not repeat each other.
  logp = jnp.where(jnp.arange(k)[None] == 0, 0.0, neg) * jnp.ones((b, 1))
  init = (cache, jnp.full((b, k), start_id, jnp.int32), seqs, logp, seqs,
          jnp.full((b, k), neg), jnp.zeros((b,), jnp.int32))
  _, _, seqs, logp, fin_seqs, fin_scores, num_fin = jax.lax.fori_loop(0, max_len, body, init)
  # Rows not done also offer their live beams, scored at max_len.
  live_scores = jnp.where((num_fin < k)[:, None] & (logp > neg / 2),
                          logp / length_penalty(max_len, alpha), neg)
  scores = jnp.concatenate([fin_scores, live_scores], axis=1)               # (B, 2K)
  pick = jnp.argmax(scores, axis=1)
  best = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1),
                             pick[:, None, None], axis=1)[:, 0]
  score = jnp.take_along_axis(scores, pick[:, None], axis=1)[:, 0]
  # Positions after the first EOS repeat EOS, as in greedy_decode.
  after = jnp.cumsum(best == eos_id, axis=1) - (best == eos_id) > 0
  return jnp.where(after, eos_id, best), score


def _encode_with_specials(tok, text: str) -> list[int]:
  """Tokens of `text` where special names written in it (e.g. <extra_id_0>) become their ids."""
  names = sorted(tok.special_ids, key=len, reverse=True)
  if not names:
    return tok.encode(text)
  ids = []
  for part in re.split("(" + "|".join(map(re.escape, names)) + ")", text):
    ids += [tok.special_ids[part]] if part in tok.special_ids else tok.encode(part)
  return ids


def _decode_with_specials(tok, ids) -> str:
  """Text of `ids` up to the first </s>, specials written by name."""
  names = {i: n for n, i in tok.special_ids.items()}
  eos = tok.special_ids.get("</s>")
  pieces, run = [], []
  for i in ids:
    i = int(i)
    if i == eos:
      break
    if i in names:
      pieces += [tok.decode(run), names[i]]
      run = []
    else:
      run.append(i)
  return "".join(pieces + [tok.decode(run)])


def generate_seq2seq(trained, prompt: str, *, max_new_tokens: int | None = None,
                     beam_size: int = 1, alpha: float = 0.6) -> str:
  """Decodes the target for encoder input `prompt` from a loaded encoder-decoder
  workdir: greedy for beam_size 1, else beam search with length penalty alpha.

  max_new_tokens=None fills the decoder's context (model.max_len positions).
  """
  from tx_jax.errors import UserError
  tok, cfg = trained.tokenizer, trained.objective.cfg
  for name in ("<pad>", "</s>"):
    if name not in tok.special_ids:
      raise UserError(f"the workdir's tokenizer has no {name}; it was not trained by "
                      "configs/t5.py")
  ids = _encode_with_specials(tok, prompt) + [tok.special_ids["</s>"]]
  seq_len = trained.config.data.seq_len
  if len(ids) > seq_len:
    raise UserError(f"the prompt has {len(ids)} tokens (with </s>), more than the encoder's "
                    f"data.seq_len={seq_len}; shorten it")
  if max_new_tokens is None:
    max_new_tokens = cfg.max_len
  if not 0 < max_new_tokens <= cfg.max_len:
    raise UserError(f"--max-new-tokens must be in 1..{cfg.max_len} (the decoder's model.max_len)")
  inputs = np.zeros((1, seq_len), np.int32)
  inputs[0, :len(ids)] = ids
  segments = (np.arange(seq_len) < len(ids)).astype(np.int32)[None]
  kw = dict(max_len=max_new_tokens, start_id=tok.special_ids["<pad>"],
            eos_id=tok.special_ids["</s>"])
  if beam_size <= 1:
    out = greedy_decode(trained.objective.model, trained.params, inputs, segments, **kw)
  else:
    out, _ = beam_search(trained.objective.model, trained.params, inputs, segments,
                         beam_size=beam_size, alpha=alpha, **kw)
  return _decode_with_specials(tok, np.asarray(out)[0])


# --- Text VAE: sentences from latents z (prior samples, interpolation) ---------------


def init_latent_cache(model, batch_size: int):
  """Zeroed decoder KV cache of a TransformerVAE: model.cfg.max_len positions."""
  tokens = jax.ShapeDtypeStruct((batch_size, model.cfg.max_len), jnp.int32)
  z = jax.ShapeDtypeStruct((batch_size, model.vae.latent_dim), jnp.float32)
  return zeroed_cache(lambda t, z: model.init(jax.random.key(0), None, t, z=z, decode=True),
                      tokens, z)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id",
                                             "temperature", "top_k", "top_p"))
def decode_latents(model, params, z, rng, *, max_len: int, bos_id: int,
                   eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Sentences from a TransformerVAE's latents z (B, L): (B, max_len) token ids, eos_id
  after the end.

  One token per step from the decoder's KV cache, starting from <s>; temperature
  0 is greedy, else sampling with filter_logits' temperature / top-k / top-p.
  """
  _check_max_len(model, max_len)
  b = z.shape[0]

  def body(i, carry):
    cache, token, done, out = carry
    (logits, _), mutated = model.apply(
        {"params": params, "cache": cache}, None, token[:, None],
        decoder_positions=jnp.full((b, 1), i, jnp.int32), z=z, decode=True, mutable=["cache"])
    logits = logits[:, -1]
    if temperature == 0:
      new = jnp.argmax(logits, -1).astype(jnp.int32)
    else:
      new = jax.random.categorical(jax.random.fold_in(rng, i),
                                   filter_logits(logits, temperature, top_k, top_p)
                                   ).astype(jnp.int32)
    new = jnp.where(done, eos_id, new)
    return mutated["cache"], new, done | (new == eos_id), out.at[:, i].set(new)

  init = (init_latent_cache(model, b), jnp.full((b,), bos_id, jnp.int32),
          jnp.zeros((b,), bool), jnp.full((b, max_len), eos_id, jnp.int32))
  return jax.lax.fori_loop(0, max_len, body, init)[3]
