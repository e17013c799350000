"""Train-step throughput on synthetic batches: tokens/s, FLOPs per token, MFU, compile s."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.objectives import get_objective
from tx_jax.train import config as config_lib
from tx_jax.train import metrics as metrics_lib
from tx_jax.train import optim, step as step_lib
from tx_jax.train.setup import init_state, state_shapes


def synthetic_lm_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
  ones = np.ones((batch_size, seq_len), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ones.shape).copy(),
          "weights": ones.astype(np.float32)}


def benchmark(config, steps: int = 20) -> dict:
  """Times `steps` jitted train steps after one compile; returns one JSON-able dict."""
  config_lib.check_config(config)
  cfg = config_lib.model_config(config)
  objective = get_objective(config.objective)(cfg, np.ones(cfg.vocab_size, np.float32))
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.resolve_rules(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, max(config.train.steps, steps + 1))
  shardings = parallel.logical_shardings(state_shapes(objective, tx, seq_len, 0), mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda: init_state(objective, tx, seq_len, 0), out_shardings=shardings)()
    step = jax.jit(step_lib.make_train_step(objective, tx, config.optim.accumulate_steps),
                   in_shardings=(shardings, batch_sharding), donate_argnums=0)
    make_batch = getattr(objective, "synthetic_batch", synthetic_lm_batch)  # objective's own keys
    batch = parallel.global_batch(make_batch(batch_size, seq_len, cfg.vocab_size),
                                  batch_sharding)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens_per_s = batch_size * seq_len / step_s
  flops_per_token = objective.flops_per_token(state.params, seq_len)
  peak = metrics_lib.measure_peak_flops(cfg.dtype) * jax.device_count()
  return {"tokens_per_s": tokens_per_s, "step_ms": step_s * 1e3,
          "flops_per_token": flops_per_token, "mfu": tokens_per_s * flops_per_token / peak,
          "peak_flops": peak, "compile_s": compile_s, "devices": jax.device_count(),
          "platform": jax.devices()[0].platform, "dtype": cfg.dtype, "batch_size": batch_size,
          "seq_len": seq_len, "params": int(sum(x.size for x in
                                                jax.tree_util.tree_leaves(state.params)))}
