"""Attention on XLA's CPU backend: `jax.nn.dot_product_attention` against the
heads-first form tx_jax uses there (`layers.heads_first_attention`, causal queries in
blocks) and that form in one block, alone and in the whole GPT bench train step.

  python benchmarks/attention_cpu.py [--config configs/gpt.py:bench] [--rounds 6]
      [--name attention_cpu]

Alone: one causal self-attention of the config's shape (batch, length, heads, head
dim), forward and forward + backward, medians of 30 calls each. In the step: the
loop's jitted train step traced in one process once with each attention, then
timed in alternating blocks of 5 steps (`--rounds` blocks each), so drift in the
machine's speed hits all. Writes benchmarks/results/NAME.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from tx_jax.models import layers
from tx_jax.train import config as config_lib
from tx_jax.train.benchmark import synthetic_setup

from profile_step import median_ms  # a sibling script: this folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def jax_attention(q, k, v, bias, mask, scale=0.0, causal=False):
  del causal  # the mask holds it
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale or None)


def heads_first_one_block(q, k, v, bias, mask, scale=0.0, causal=False):
  del causal  # every query against every key, as before causal attention went in blocks
  return layers.heads_first_attention(q, k, v, bias, mask, scale)


VARIANTS = {"jax.nn.dot_product_attention": jax_attention,
            "heads_first_attention, one block": heads_first_one_block,
            "heads_first_attention": layers.heads_first_attention}


def alone(b, t, n, h) -> dict:
  q, k, v = jax.random.normal(jax.random.key(0), (3, b, t, n, h))
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  out = {}
  for name, attend in VARIANTS.items():
    fwd = jax.jit(lambda q, k, v: attend(q, k, v, None, mask, causal=True))
    loss = lambda q, k, v, attend=attend: (attend(q, k, v, None, mask, causal=True) * q).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out[name] = {"forward_ms": median_ms(lambda: fwd(q, k, v), n=30),
                 "forward_backward_ms": median_ms(lambda: grad(q, k, v), n=30)}
  return out


def alternate(compiled: dict, rounds: int) -> dict:
  """Times compiled train steps {name: [step, state, batch, mesh]} in alternating blocks
  of 5 steps, `rounds` blocks each -> {name: step ms median and min}."""
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, entry in compiled.items():
      fn, state, batch, mesh = entry
      with mesh:
        for _ in range(5):
          t0 = time.perf_counter()
          state, _ = fn(state, batch)
          jax.block_until_ready(state)
          times[name].append(time.perf_counter() - t0)
      entry[1] = state
  return {name: {"step_ms_median": statistics.median(ts) * 1e3,
                 "step_ms_min": min(ts) * 1e3} for name, ts in times.items()}


def compile_step(spec: str, steps: int) -> list:
  """[compiled step, state after one step, batch, mesh] of the loop's train step."""
  config, _, mesh, _, state, batch, step = synthetic_setup(
      config_lib.load_config_file(spec), steps + 1)
  with mesh:
    fn = step.lower(state, batch).compile()
    state, _ = fn(state, batch)
  return [fn, state, batch, mesh]


def in_step(spec: str, rounds: int) -> dict:
  compiled = {}
  for name, attend in VARIANTS.items():
    layers.heads_first_attention = attend  # read when the step is traced
    try:
      compiled[name] = compile_step(spec, 5 * rounds)
    finally:
      layers.heads_first_attention = VARIANTS["heads_first_attention"]
  return alternate(compiled, rounds)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/gpt.py:bench")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--name", default="attention_cpu",
                 help="results/NAME.{json,md} (another machine: another name)")
  args = p.parse_args()
  config = config_lib.load_config_file(args.config)
  m = config.model
  shape = (config.train.batch_size, config.data.seq_len, m.num_heads,
           m.get("head_dim") or m.d_model // m.num_heads)
  load0 = os.getloadavg()[0]
  result = {"config": args.config, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "jax": jax.__version__, "shape_btnh": shape, "alone": alone(*shape),
            "in_step": in_step(args.config, args.rounds)}
  result["load_average_1m"] = [load0, os.getloadavg()[0]]
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", args.name + ".json"), "w") as f:
    json.dump(result, f, indent=2)
  rows = "".join(
      f"| `{name}` | {a['forward_ms']:.1f} | {a['forward_backward_ms']:.1f} | "
      f"{result['in_step'][name]['step_ms_median']:.0f} "
      f"({result['in_step'][name]['step_ms_min']:.0f}) |\n"
      for name, a in result["alone"].items())
  md = (f"# Attention on the CPU: `{args.config}` ({result['machine']}, jax "
        f"{jax.__version__})\n\n"
        f"| attention | alone: forward ms | alone: forward + backward ms | "
        f"train step ms, median (min) of {5 * args.rounds} |\n|---|---|---|---|\n{rows}\n"
        f"Alone: causal self-attention of (B, T, N, H) = {tuple(shape)}. Load average "
        f"{load0:.1f} before, {result['load_average_1m'][1]:.1f} after.\n")
  with open(os.path.join(HERE, "results", args.name + ".md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
