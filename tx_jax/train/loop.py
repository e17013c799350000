"""The training loop: one linear function in labelled sections.

config/mesh checks -> workdir -> data/model -> restore (verified, compatible)
-> run records -> jitted steps -> loop (log, eval, checkpoint, graceful stop).

What a run survives (details in checkpoint.py, preemption.py, step.py and
workdir_lock.py):
- A second run on the same workdir: process 0 locks it first; the second run
  exits 2 naming the holder, and a dead holder's lock is taken over.
- Bad input: everything a user can get wrong is checked before the workdir
  changes, and a fresh workdir whose first run fails before its first
  checkpoint is removed again, so the next run starts clean.
- A full disk or failing filesystem: an IOFailure (exit 3) names the operation
  and path (for a checkpoint, the room it needs); a failed save leaves no
  partial step, the newest sealed checkpoint stays, and the same command
  resumes from it once there is space.
- Kills and crashes: checkpoints are sealed with a manifest and verified on
  restore; a run resumes from the newest intact one and loses only the steps
  after it, bit-identically (data-iterator state is checkpointed too).
- SIGTERM / SIGINT: the current step finishes, a checkpoint is written and
  waited for, logs are flushed and the process exits 0; every process of a
  multi-host job stops after the same step.
- Non-finite loss or gradients: the jitted step skips the update and counts
  it; after train.max_consecutive_skips skips in a row (the first one under
  train.nonfinite="stop") the state halts. The host reads one scalar of it
  only at log and checkpoint steps, stops with an error naming the step, and
  never checkpoints a halted or non-finite state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.errors import UserError, io_operation
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import metrics as metrics_lib
from tx_jax.train import preemption, step as step_lib, workdir_lock
from tx_jax.train.evaluate import evaluate
from tx_jax.train.experiment import build_experiment
from tx_jax.train.state import init_state, state_shapes
from tx_jax.train.trained import load_trained


def _is_main() -> bool:
  return jax.process_index() == 0


def train(config, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last eval metrics."""
  # --- Config, mesh and batch (checked before the workdir is touched) -----------
  config_lib.check_config(config)
  t, total_steps = config.train, config.train.steps
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.resolve_rules(config.mesh.rules)
  dp = parallel.batch_axis_size(mesh, rules)
  if t.batch_size % (dp * config.optim.accumulate_steps):
    raise UserError(f"train.batch_size={t.batch_size} must divide evenly over {dp} data-parallel "
                    f"shards x {config.optim.accumulate_steps} accumulation steps")
  if t.batch_size % jax.process_count():
    raise UserError(f"train.batch_size={t.batch_size} must be a multiple of the "
                    f"{jax.process_count()} processes")
  parallel.check_process_rows(parallel.batch_sharding(mesh, rules), t.batch_size)
  if "://" in workdir:  # os / open() would write to a local directory named "gs:"
    raise UserError(f"--workdir {workdir!r}: URLs are not supported; give a directory all "
                    "hosts share (NFS, or the bucket mounted with gcsfuse)")
  halt_after = step_lib.halt_after(t)

  with contextlib.ExitStack() as stack:  # closed in reverse: logs, signals, checkpoints
    # --- Workdir, data and model ---------------------------------------------------
    stack.enter_context(_locked_workdir(workdir))
    checkpointer = stack.enter_context(ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
        async_save=t.async_checkpoints))
    exp = build_experiment(config, workdir, create_tokenizer=True, init_from=True)
    config = exp.config  # completed by the objective (e.g. init_from's architecture, labels)
    if checkpointer.steps():
      _check_same_tokenizer_spec(config, workdir)
    tx = exp.tx
    boxed = state_shapes(exp.objective, tx, exp.init_len, t.seed)
    state_shardings = parallel.logical_shardings(boxed, mesh, rules)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    peak = metrics_lib.measure_peak_flops(config.model.dtype) * jax.device_count()  # 1 device
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))

    # --- Restore the newest intact checkpoint, or initialise (directly sharded) ----
    train_iter = exp.train_iterator()
    start, rejected = checkpointer.newest_good_step()
    init_report = None
    if start is None:
      state = jax.jit(lambda: init_state(exp.objective, tx, exp.init_len, t.seed),
                      out_shardings=state_shardings)()
      start = 0
      if exp.init_from is not None:  # a fresh fine-tuning run: graft the pretrained weights
        state, init_report = _load_pretrained(exp, state, state_shardings)
    else:
      abstract = ckpt_lib.abstract_with_shardings(parallel.strip_boxes(boxed), state_shardings)
      relaxed = checkpointer.check_compatible(start, abstract, exp.meta())
      # A step-0 checkpoint (an imported model) holds no data position.
      state, _ = checkpointer.restore(start, abstract, train_iter if start else None)
      if relaxed:
        print_main(f"resuming with changed {', '.join(relaxed)}")

    # --- Run records (written only now that every input checked out) --------------
    checkpointer.set_aside(rejected)  # so those steps can be written again
    if _is_main():
      with io_operation("writing the run's config", os.path.join(workdir, "config.json")):
        config_lib.save_json(config, os.path.join(workdir, "config.json"))
      with io_operation("writing data statistics", os.path.join(workdir, "data_stats.json")):
        _write_json(os.path.join(workdir, "data_stats.json"), exp.data_stats)
      if init_report is not None:
        with io_operation("writing the init_from report",
                          os.path.join(workdir, "init_from.json")):
          _write_json(os.path.join(workdir, "init_from.json"), init_report)
    _report_data_stats(exp.data_stats)
    if init_report is not None:
      _print_init_report(init_report)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, enabled=_is_main())
    stack.callback(writer.close)
    print_main(f"{'resuming from' if start else 'starting at'} step {start}; "
               f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,} parameters; "
               f"mesh {dict(mesh.shape)}")

    # --- Steps ------------------------------------------------------------------
    train_step = step_lib.jit_train_step(exp.objective, tx, config, mesh, state_shardings,
                                         batch_sharding)
    eval_step = step_lib.jit_eval_step(exp.objective, mesh, state_shardings.params,
                                       batch_sharding)
    health = jax.jit(_health, out_shardings=parallel.replicated(mesh))
    flops_per_unit = None

    def save_checkpoint(done: int):
      """Checkpoints step `done`, unless the state halted or holds a non-finite value."""
      skip_run, halted_step, finite = (int(x) for x in jax.device_get(health(state)))
      _raise_if_halted(skip_run, halted_step, halt_after, t, checkpointer)
      if not finite:
        raise UserError(f"the state at step {done} holds non-finite values; refusing to "
                        f"checkpoint it (the newest checkpoint is {checkpointer.latest_step()})")
      checkpointer.save(done, state, train_iter, exp.meta(), force=True)

    # --- Loop ---------------------------------------------------------------------
    stop = stack.enter_context(preemption.StopRequest())
    progress = _progress(start, total_steps)
    stack.callback(progress.close)
    last_eval: dict = {}
    done, saved, stopped = start, start, False
    t0, units, compile_s, waited = time.perf_counter(), 0, None, 0.0
    for step in range(start, total_steps):
      if stop.agreed():  # a signal reached some process: leave after the same step everywhere
        stopped = True
        break
      t_wait = time.perf_counter()  # the step's wait for its batch (host side)
      batch = parallel.global_batch(next(train_iter), batch_sharding)
      waited += time.perf_counter() - t_wait
      state, metrics = train_step(state, batch)
      units += exp.units_per_batch
      if compile_s is None:
        jax.block_until_ready(state.step)
        compile_s = time.perf_counter() - t0
        t0, units, waited = time.perf_counter(), 0, 0.0
      done = step + 1
      if done % t.log_every == 0 or done == total_steps:
        # The step's only transfer to the host, explicit and at log steps only.
        metrics, skip_run, halted_step, skipped, lr = jax.device_get(
            (metrics, state.skip_run, state.step, state.skipped, exp.lr(done - 1)))
        _raise_if_halted(int(skip_run), int(halted_step), halt_after, t, checkpointer)
        elapsed = time.perf_counter() - t0
        if flops_per_unit is None:
          flops_per_unit = exp.objective.flops_per_unit(state.params, exp.init_len)
        rate = units / max(elapsed, 1e-9)
        record = {"train/loss": float(metrics["train/loss"]), "lr": float(lr),
                  f"{exp.objective.unit}_per_s": rate, "mfu": rate * flops_per_unit / peak,
                  "grad_norm": float(metrics["grad_norm"]),
                  "param_norm": float(metrics["param_norm"]),
                  "skipped_updates": int(skipped),
                  # share of the interval spent waiting for batches: an upper bound on
                  # how input-bound the run is (the device keeps computing meanwhile)
                  "input_wait_frac": waited / max(elapsed, 1e-9)}
        if compile_s is not None and done == t.log_every:
          record["compile_s"] = compile_s
        writer.write(done, record)
        progress.set_postfix(loss=f"{record['train/loss']:.3f}")
        t0, units, waited = time.perf_counter(), 0, 0.0
      if done % t.eval_every == 0 or done == total_steps:
        last_eval = evaluate(eval_step, state.params, exp.eval_batches(), batch_sharding,
                             exp.objective.summarize)
        if exp.extra_eval is not None:
          last_eval.update(exp.extra_eval(state.params, done, workdir))
        writer.write(done, {f"eval/{k}": v for k, v in last_eval.items()})
        if _is_main():
          # Grouped metrics (precision/CLASS, ...) go to metrics.jsonl only.
          progress.write(f"step {done}: " + " ".join(f"eval/{k}={v:.4f}" for k, v in
                                                     last_eval.items() if "/" not in k))
        t0, units, waited = time.perf_counter(), 0, 0.0
      if done % t.checkpoint_every == 0 or done == total_steps:
        save_checkpoint(done)
        saved = done
      progress.update(1)

    # --- Graceful stop ------------------------------------------------------------
    if stopped:
      if saved != done:
        save_checkpoint(done)
      checkpointer.wait()
      writer.flush()
      cause = stop.signal_name or "a signal on another process"
      print_main(f"stopped by {cause} after step {done}; checkpoint {done} is saved; run the "
                 f"same command to resume" if done > start else
                 f"stopped by {cause} before the first step; nothing new to save")
  return last_eval


def _load_pretrained(exp, state, shardings):
  """The fresh state with `exp.init_from`'s weights grafted in by the objective
  (`transfer`), placed in the state's shardings, and a fresh optimizer state for them.
  -> (state, report for init_from.json)."""
  path, step = exp.init_from
  pretrained = load_trained(path, step=step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    fresh = multihost_utils.process_allgather(state.params, tiled=True)
  else:
    fresh = jax.device_get(state.params)
  params, report = exp.objective.transfer(fresh, pretrained)
  params = jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i, x=x: np.asarray(x)[i]),
      params, shardings.params)
  opt_state = jax.jit(exp.tx.init, out_shardings=shardings.opt_state)(params)
  report = {"init_from": path, "step": pretrained.step,
            "objective": pretrained.config.objective, **report}
  return state.replace(params=params, opt_state=opt_state), report


def _print_init_report(report: dict):
  def names(keys):
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
  print_main(f"init_from {report['init_from']} (step {report['step']}, {report['objective']}): "
             f"loaded {len(report['loaded'])} tensors ({report['loaded_params']:,} parameters); "
             f"new {len(report['new'])} ({report['new_params']:,}): {names(report['new'])}; "
             f"dropped {len(report['dropped'])} ({report['dropped_params']:,})"
             + (f": {names(report['dropped'])}" if report["dropped"] else "")
             + " (see init_from.json)")


def _health(state):
  """(skip_run, step, every float in params and optimizer state is finite): 3 scalars."""
  leaves = [x for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return state.skip_run, state.step, finite


def _raise_if_halted(skip_run: int, step: int, halt_after: int, t, checkpointer):
  if skip_run < halt_after:
    return
  newest = checkpointer.latest_step()
  if halt_after == 1:
    what = f"non-finite loss or gradients at step {step} (train.nonfinite={t.nonfinite!r})"
  else:
    what = (f"{skip_run} steps in a row up to step {step} had non-finite loss or gradients "
            f"(train.max_consecutive_skips={halt_after})")
  kept = (f"the newest checkpoint, step {newest}, is intact" if newest is not None
          else "no checkpoint had been written")
  raise UserError(f"{what}; no update from them was applied and {kept}. Lower optim.lr or "
                  f"check the data, then run again")


@contextlib.contextmanager
def _locked_workdir(workdir: str):
  """Creates and locks workdir; a failed first run (no checkpoint yet) leaves no trace.

  Process 0 holds the lock for the job (see workdir_lock.py); if the run fails
  while no checkpoint exists, what it created is removed before the lock goes.
  """
  existed = os.path.isdir(workdir)
  before = set(os.listdir(workdir)) if existed else set()
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir!r}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir!r} is not writable; pick another directory")
  lock, refused = workdir_lock.WorkdirLock(workdir), None
  if _is_main():
    try:
      lock.acquire()
    except UserError as e:
      refused = e
  if jax.process_count() > 1:  # every process learns process 0's answer
    from jax.experimental import multihost_utils
    if not int(multihost_utils.broadcast_one_to_all(np.int32(refused is None))):
      refused = refused or UserError(f"workdir {workdir!r} is in use (see process 0)")
  if refused is not None:
    raise refused
  try:
    yield
  except BaseException:
    if _is_main():
      _remove_new_entries_if_no_steps(workdir, before | {workdir_lock.LOCK_NAME})
    raise
  finally:
    lock.release()
    if _is_main() and not existed and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)


def _remove_new_entries_if_no_steps(workdir: str, keep: set[str]):
  """Removes workdir entries not in `keep`, unless a checkpoint step exists."""
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
    return
  for name in set(os.listdir(workdir)) - keep:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _check_same_tokenizer_spec(config, workdir: str):
  """A resumed run keeps the workdir's tokenizer; refuse a config that asks for another."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return
  old = config_lib.load_workdir_config(workdir).data.get("tokenizer")
  new = config.data.get("tokenizer")
  if old is not None and new != old:
    raise UserError(f"data.tokenizer={new!r}, but the checkpoints in {workdir!r} were trained "
                    f"with {old!r}; keep --config.data.tokenizer={old} or use a new --workdir")


def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _report_data_stats(stats: dict):
  changed = [f"{split}: {v} {k.replace('_', ' ')}" for split, counts in stats.items()
             for k, v in counts.items() if v and k not in ("documents", "documents_read")]
  if changed:
    print_main(f"data policy: {', '.join(changed)} (see data_stats.json)")


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
