"""Train-step throughput on synthetic batches: tokens/s (or images/s), FLOPs per unit,
MFU, compile seconds (lowering, XLA's compile and the first step, apart), peak host
RSS. The step is the loop's own (`step.jit_train_step`)."""

from __future__ import annotations

import resource
import time

import flax.linen as nn
import jax
import numpy as np

from tx_jax import parallel
from tx_jax.train import config as config_lib
from tx_jax.train import metrics as metrics_lib
from tx_jax.train import step as step_lib
from tx_jax.train.experiment import build_objective, completed_config, make_tx
from tx_jax.train.state import init_state, state_shapes


def synthetic_setup(config, steps: int = 1):
  """The loop's jitted train step of `config` with a fresh state and one synthetic batch.

  -> (completed config, objective, mesh, rules, state, batch, jitted step); trace and
  run under `jax.set_mesh(mesh), nn.logical_axis_rules(rules)`. The schedule is long
  enough for `steps` timed steps.
  """
  config_lib.check_config(config)
  config = completed_config(config)
  objective = build_objective(config)
  seq_len, batch_size = config.data.get("seq_len", 0), config.train.batch_size
  init_len = objective.init_len(config)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.resolve_rules(config.mesh.rules)
  with config.unlocked():
    config.train.steps = max(config.train.steps, steps + 1)
  tx = make_tx(objective, config)
  shardings = parallel.logical_shardings(state_shapes(objective, tx, init_len, 0), mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda: init_state(objective, tx, init_len, 0), out_shardings=shardings)()
    step = step_lib.jit_train_step(objective, tx, config, mesh, shardings, batch_sharding)
    vocab = config.model.get("vocab_size", 0)
    batch = parallel.global_batch(objective.synthetic_batch(batch_size, seq_len, vocab),
                                  batch_sharding)
  return config, objective, mesh, rules, state, batch, step


def benchmark(config, steps: int = 20) -> dict:
  """Times `steps` jitted train steps after one compile; returns one JSON-able dict."""
  config, objective, mesh, rules, state, batch, step = synthetic_setup(config, steps)
  seq_len, batch_size = config.data.get("seq_len", 0), config.train.batch_size
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Tracing + lowering, XLA's compile, and the first execution, each on its own.
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    step = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t3 = time.perf_counter()
    lower_s, xla_compile_s, first_step_s = t1 - t0, t2 - t1, t3 - t2
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  unit = objective.unit                                   # "tokens" or "images"
  rate = objective.units_per_batch(config) / step_s
  flops = objective.flops_per_unit(state.params, seq_len)
  peak = metrics_lib.measure_peak_flops(config.model.dtype) * jax.device_count()
  return {f"{unit}_per_s": rate, "step_ms": step_s * 1e3, f"flops_per_{unit[:-1]}": flops,
          "mfu": rate * flops / peak, "peak_flops": peak,
          # compile_s: what the first step costs a user (lower + compile + one run).
          "compile_s": lower_s + xla_compile_s + first_step_s, "lower_s": lower_s,
          "xla_compile_s": xla_compile_s, "first_step_s": first_step_s,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          # accelerators report their own high-water mark; CPU devices report none
          "device_peak_mb": (jax.local_devices()[0].memory_stats() or {}).get(
              "peak_bytes_in_use", 0) / 2 ** 20 or None,
          "devices": jax.device_count(), "platform": jax.devices()[0].platform,
          "dtype": config.model.dtype, "batch_size": batch_size,
          **objective.benchmark_shape(config),
          "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))}
