"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded.

The prompt is run once through the model in decode mode (prefill writes its
keys/values into the cache), then one token per step; each step attends to
the cache instead of recomputing the prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def init_cache(model, batch_size: int, length: int):
  """Zeroed KV cache for `length` positions (from shapes only, no compute)."""
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: model.init(jax.random.key(0), t, decode=True), tokens)["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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
  prompt_arr = jnp.asarray(np.tile(np.asarray(ids, np.int32), (num_samples, 1)))
  out = sample(trained.objective.model, trained.params, prompt_arr, jax.random.key(seed),
               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  return [tok.decode(row[len(ids):].tolist()) for row in np.asarray(out)]
