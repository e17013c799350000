"""Decoding at a 1k context: the KV cache (`tx_jax.generate.sample`) against
recomputing the whole forward pass for every new token.

  python benchmarks/decode_cache.py [--context 1024] [--new 64] [--batch 1] [--rounds 3]

The model is the bench GPT's widths (4 layers, d 256, 4 heads, byte vocabulary)
with max_len = --context, random weights. The prompt fills the context up to
--new tokens; both sides decode greedily to the end of the context.

- cached: `sample` (one jitted prefill of the prompt, then one token per step
  against the cache, inside a `fori_loop`); its time includes the prefill, so
  its rate is a lower bound on the decoding rate. (A run with 0 new tokens does
  not time the prefill: XLA drops the unused cache.)
- recompute: one jitted forward over the whole (B, context) buffer per new
  token (causal, so positions after the current one do not matter), greedy
  pick at the current position; the same tokens come out (checked).

Writes benchmarks/results/decode_cache.{json,md}.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax.generate import sample
from tx_jax.models import DecoderLM, TransformerConfig
from tx_jax.models.transformer import DECODER_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--context", type=int, default=1024)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "decode_cache.json"))
  args = parser.parse_args()
  cfg = TransformerConfig(**{**DECODER_SIZES["bench"], "max_len": args.context})
  model = DecoderLM(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  p = args.context - args.new
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                         (args.batch, p)), jnp.int32)
  rng = jax.random.key(1)

  def cached(n):
    return sample(model, params, prompt, rng, max_new_tokens=n, temperature=0.0)

  @jax.jit
  def full_logits(params, buf, t):
    logits, _ = model.apply({"params": params}, buf)
    return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False),
                      -1).astype(jnp.int32)

  def recompute():
    buf = jnp.zeros((args.batch, args.context), jnp.int32).at[:, :p].set(prompt)
    for i in range(args.new):
      token = full_logits(params, buf, p + i - 1)
      buf = buf.at[:, p + i].set(token)
    return buf

  # Compile both (and check they agree) before timing.
  a, b = np.asarray(cached(args.new)), np.asarray(recompute())
  same = float((a[:, p:] == b[:, p:]).mean())
  load0 = os.getloadavg()[0]
  times = {"cached": [], "recompute": []}
  for _ in range(args.rounds):
    for key, fn in (("cached", lambda: cached(args.new)), ("recompute", recompute)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - t0)
  load1 = os.getloadavg()[0]
  med = {k: statistics.median(v) for k, v in times.items()}
  tokens = args.new * args.batch
  result = {"context": args.context, "new_tokens": args.new, "batch": args.batch,
            "model": {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads",
                                                   "mlp_dim", "vocab_size", "max_len")},
            "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
            "load_avg_1m": [load0, load1], "seconds": times, "median_s": med,
            "cached_tokens_per_s": tokens / med["cached"],
            "recompute_tokens_per_s": tokens / med["recompute"],
            "same_tokens": same}
  result["speedup"] = result["cached_tokens_per_s"] / result["recompute_tokens_per_s"]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  md = "\n".join([
      f"# Decoding at a {args.context}-token context: KV cache vs recomputing", "",
      f"`python benchmarks/decode_cache.py --context {args.context} --new {args.new} "
      f"--batch {args.batch} --rounds {args.rounds}`: bench GPT widths (4 layers, d 256), "
      f"random weights, greedy, prompt {p} tokens, {args.new} new; medians of "
      f"{args.rounds}; {result['platform']} ({result['cpus']} cores), 1-minute load average "
      f"{load0:.2f} before, {load1:.2f} after.", "",
      "| | tokens/s | seconds |", "|---|---|---|",
      f"| KV cache (`sample`), prefill included | {result['cached_tokens_per_s']:.0f} | "
      f"{med['cached']:.3f} |",
      f"| full forward per token | {result['recompute_tokens_per_s']:.1f} | "
      f"{med['recompute']:.3f} |", "",
      f"Speed-up: **{result['speedup']:.0f}x**; both produce the same tokens "
      f"({same:.0%} agree).", ""])
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(md)
  print(json.dumps({k: result[k] for k in ("cached_tokens_per_s", "recompute_tokens_per_s",
                                           "speedup", "same_tokens")}))


if __name__ == "__main__":
  main()
