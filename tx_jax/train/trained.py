"""A trained workdir loaded for inference: config, tokenizer, objective, params.

Read-only (no lock, nothing written): used by `tx-jax eval`, `embed`,
`generate`, `topics` and by other programs; the training loop does not need it.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from tx_jax import parallel
from tx_jax.errors import UserError
from tx_jax.objectives import get_objective
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train.experiment import build_objective, checkpoint_meta, get_tokenizer, make_tx
from tx_jax.train.state import state_shapes


@dataclasses.dataclass
class Trained:
  config: object
  tokenizer: object
  objective: object
  params: object
  step: int
  workdir: str = ""


def single_device_mesh():
  return parallel.make_mesh(type("M", (), {"data": 1, "fsdp": 1, "tensor": 1})(),
                            devices=jax.devices()[:1])


def load_trained(workdir: str, mesh=None, step: int | None = None) -> Trained:
  """Config, tokenizer, objective and newest intact params of a workdir, for inference
  (or those of checkpoint `step`, which must be intact).

  A corrupt newest checkpoint is reported and the one before it used.
  """
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} does not exist; train first with tx-jax train")
  config = config_lib.load_workdir_config(workdir)
  uses_tokenizer = get_objective(config.objective).needs_tokenizer(config)
  tok = get_tokenizer(config, workdir, create=False) if uses_tokenizer else None
  objective = build_objective(config, tok)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"{workdir!r} has no checkpoint yet; train first with tx-jax train")
  with ckpt_lib.Checkpointer(directory, async_save=False, read_only=True) as checkpointer:
    if step is None:
      step, _ = checkpointer.newest_good_step()
      if step is None:
        raise UserError(f"{workdir!r} has no checkpoint yet; train first with tx-jax train")
    elif step not in checkpointer.steps() or checkpointer.verify(step) is not None:
      raise UserError(f"{workdir!r} has no intact checkpoint {step} (it has "
                      f"{checkpointer.steps()}); pick one of those steps")
    mesh = mesh or single_device_mesh()
    rules = parallel.resolve_rules(config.mesh.rules)
    boxed = state_shapes(objective, make_tx(objective, config), objective.init_len(config),
                         config.train.seed)
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = ckpt_lib.abstract_with_shardings(parallel.strip_boxes(boxed), shardings)
    checkpointer.check_compatible(step, abstract, checkpoint_meta(config, tok))
    state, _ = checkpointer.restore(step, abstract)
  return Trained(config, tok, objective, state.params, step, workdir)
