"""Evaluation passes: exact metrics over a whole eval set, in the loop and for
`tx-jax eval` on a trained workdir."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tx_jax import parallel
from tx_jax.errors import UserError
from tx_jax.train.experiment import build_experiment
from tx_jax.train.step import jit_eval_step
from tx_jax.train.trained import load_trained, single_device_mesh


def evaluate(eval_step, params, batches, batch_sharding, summarize) -> dict[str, float]:
  """Sums eval sums over all batches, then summarizes (exact over the whole set)."""
  total = None
  for local in batches:
    sums = eval_step(params, parallel.global_batch(local, batch_sharding))
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  if total is None:
    raise UserError("the eval data yielded no batches; give a larger data.eval_source")
  return summarize(jax.device_get(total))


def evaluate_workdir(workdir: str, data: str | None = None) -> dict:
  """`tx-jax eval`: {"step", "eval/...": ...} of the newest checkpoint on the
  held-out split (or on data spec `data`), plus the objective's extra metrics."""
  trained = load_trained(workdir)
  config = trained.config
  if data:
    config.data.eval_source = data
  exp = build_experiment(config, workdir, create_tokenizer=False)
  mesh = single_device_mesh()
  sharding = parallel.batch_sharding(mesh, parallel.resolve_rules(config.mesh.rules))
  metrics = evaluate(jit_eval_step(exp.objective, mesh), trained.params,
                     exp.eval_batches(), sharding, exp.objective.summarize)
  if exp.extra_eval is not None:  # e.g. frozen-encoder probes
    metrics.update(exp.extra_eval.metrics(trained.params))
  return {"step": trained.step, **{f"eval/{k}": v for k, v in metrics.items()}}
