"""The training loop: one linear function in labelled sections.

config -> tokenizer/data -> objective/model -> mesh/shardings -> restore ->
jitted step -> loop (log, eval, checkpoint) -> final checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.errors import UserError
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import metrics as metrics_lib
from tx_jax.train import optim, step as step_lib
from tx_jax.train.setup import build_experiment, init_state, state_shapes


def _is_main() -> bool:
  return jax.process_index() == 0


def evaluate(eval_step, params, batches, batch_sharding, summarize) -> dict[str, float]:
  """Sums eval sums over all batches, then summarizes (exact over the whole set)."""
  total = None
  for local in batches:
    sums = eval_step(params, parallel.global_batch(local, batch_sharding))
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  if total is None:
    raise UserError("the eval data yielded no batches; give a larger data.eval_source")
  return summarize(jax.device_get(total))


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last eval metrics."""
  # --- Config and workdir --------------------------------------------------
  config_lib.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  exp = build_experiment(config, workdir, create_tokenizer=True)
  if _is_main():
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
  t, total_steps = config.train, config.train.steps

  # --- Mesh and shardings ----------------------------------------------------
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.resolve_rules(config.mesh.rules)
  tx = optim.make_optimizer(config.optim, total_steps)
  boxed = state_shapes(exp.objective, tx, exp.init_len, t.seed)
  state_shardings = parallel.logical_shardings(boxed, mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  dp = parallel.batch_axis_size(mesh, rules)
  if t.batch_size % (dp * config.optim.accumulate_steps):
    raise UserError(f"train.batch_size={t.batch_size} must divide evenly over {dp} data-parallel "
                    f"shards x {config.optim.accumulate_steps} accumulation steps")
  if t.batch_size % jax.process_count():
    raise UserError(f"train.batch_size={t.batch_size} must be a multiple of the "
                    f"{jax.process_count()} processes")

  # --- Restore or initialise (directly sharded: no full copy on one host) ----
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  train_iter = exp.train_iterator()
  start = checkpointer.latest_step()
  # Measured on one local device, outside the mesh context (a plain single-device jit).
  peak = metrics_lib.measure_peak_flops(config.model.dtype) * jax.device_count()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start is None:
      state = jax.jit(lambda: init_state(exp.objective, tx, exp.init_len, t.seed),
                      out_shardings=state_shardings)()
      start = 0
    else:
      abstract = ckpt_lib.abstract_with_shardings(parallel.strip_boxes(boxed), state_shardings)
      state, data_state, _ = checkpointer.restore(start, abstract)
      train_iter.set_state(data_state)
    print_main(f"{'resuming from' if start else 'starting at'} step {start}; "
               f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,} parameters; "
               f"mesh {dict(mesh.shape)}")

    # --- Steps ---------------------------------------------------------------
    train_step = jax.jit(step_lib.make_train_step(exp.objective, tx, config.optim.accumulate_steps),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, parallel.replicated(mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(exp.objective),
                        in_shardings=(state_shardings.params, batch_sharding))
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, enabled=_is_main())
    flops_per_unit = None

    # --- Loop ------------------------------------------------------------------
    progress = _progress(start, total_steps)
    last_eval: dict = {}
    t0, units, compile_s = time.perf_counter(), 0, None
    for step in range(start, total_steps):
      batch = parallel.global_batch(next(train_iter), batch_sharding)
      state, metrics = train_step(state, batch)
      units += exp.units_per_batch
      if compile_s is None:
        jax.block_until_ready(state.step)
        compile_s = time.perf_counter() - t0
        t0, units = time.perf_counter(), 0
      done = step + 1
      if done % t.log_every == 0 or done == total_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        if flops_per_unit is None:
          flops_per_unit = exp.objective.flops_per_token(state.params, exp.init_len)
        rate = units / max(elapsed, 1e-9)
        if not bool(metrics["finite"]) and config.train.nonfinite == "stop":
          raise UserError(f"non-finite loss or gradients at step {done}; the state was not "
                          f"updated and the last good checkpoint is kept. Lower optim.lr or "
                          f"check the data")
        record = {"train/loss": float(metrics["train/loss"]), "lr": float(exp.lr(done - 1)),
                  f"{exp.objective.unit}_per_s": rate, "mfu": rate * flops_per_unit / peak,
                  "grad_norm": float(metrics["grad_norm"]),
                  "param_norm": float(metrics["param_norm"]),
                  "skipped_updates": int(jax.device_get(state.skipped))}
        if compile_s is not None and done == t.log_every:
          record["compile_s"] = compile_s
        writer.write(done, record)
        progress.set_postfix(loss=f"{record['train/loss']:.3f}")
        t0, units = time.perf_counter(), 0
      if done % t.eval_every == 0 or done == total_steps:
        last_eval = evaluate(eval_step, state.params, exp.eval_batches(), batch_sharding,
                             exp.objective.summarize)
        if exp.extra_eval is not None:
          last_eval.update(exp.extra_eval(state.params, done, workdir))
        writer.write(done, {f"eval/{k}": v for k, v in last_eval.items()})
        if _is_main():
          progress.write(f"step {done}: " + " ".join(f"eval/{k}={v:.4f}" for k, v in
                                                     last_eval.items()))
        t0, units = time.perf_counter(), 0
      if done % t.checkpoint_every == 0 or done == total_steps:
        checkpointer.save(done, state, train_iter.get_state(), exp.meta(), force=True)
      progress.update(1)
    progress.close()
    checkpointer.close()
    writer.close()
  return last_eval


class _NoProgress:
  def update(self, n): pass
  def set_postfix(self, **kw): pass
  def write(self, s): pass
  def close(self): pass


def _progress(start: int, total: int):
  if not _is_main():
    return _NoProgress()
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def print_main(msg: str):
  if _is_main():
    print(msg, flush=True)
