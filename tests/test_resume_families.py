"""Every model family resumes like the GPT: a run stopped after step 2 (as by SIGTERM) and
started again ends bit-identical to one that never stopped, through the same loop and
checkpoints (the GPT's own SIGKILL/SIGTERM chain is in test_reliability.py)."""

import os

import jax
import numpy as np
import pytest

from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import loop, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
        "model.max_len=32", "data.seq_len=32", "train.batch_size=8", "train.steps=4",
        "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=2",
        "train.async_checkpoints=false", "data.eval_batches=1", "optim.warmup_steps=1"]
FAMILIES = {"bert": ["model.dropout_rate=0.1"],                     # dropout: rng per step
            "t5": ["model.num_encoder_layers=1", "model.dropout_rate=0.1"]}


def config(name):
  base = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
  return config_lib.apply_overrides(base, TINY + FAMILIES[name])


def final_state(workdir):
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    step, _ = c.newest_good_step()
    state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"]
  return step, jax.tree_util.tree_leaves(state)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stopped_and_resumed_run_is_bit_identical(name, tmp_path, monkeypatch):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  loop.train(config(name), straight)

  calls = []
  real_agreed = preemption.StopRequest.agreed

  def agreed_after_two_steps(self):  # asked once before every step
    calls.append(1)
    return len(calls) > 2 or real_agreed(self)
  monkeypatch.setattr(preemption.StopRequest, "agreed", agreed_after_two_steps)
  loop.train(config(name), stopped)
  assert final_state(stopped)[0] == 2
  monkeypatch.setattr(preemption.StopRequest, "agreed", real_agreed)
  loop.train(config(name), stopped)

  (step_a, a), (step_b, b) = final_state(straight), final_state(stopped)
  assert step_a == step_b == 4 and len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The two halves really trained: step 4's parameters differ from step 2's.
  with ckpt_lib.Checkpointer(os.path.join(stopped, "checkpoints"), read_only=True) as c:
    mid = jax.tree_util.tree_leaves(c.manager.restore(2, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"])
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(mid, b))
