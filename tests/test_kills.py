"""SIGKILL at every stage: tokenizer training, the first checkpoint, eval, an async save.

After each kill the same command is run again and must resume (or start clean)
without tripping over what the killed process left: its lock, orbax temporary
directories, an unsealed step, a half-made tokenizer.
"""

import os
import signal
import time

import pytest

from test_reliability import TINY, Run, in_progress_save, sealed_steps
from tx_jax.train import checkpoint as ckpt_lib

TRAIN = ["train", "--config", "configs/gpt.py", *TINY, "--config.train.steps=12",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=12",
         "--config.train.log_every=2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp("kills")
  (base / "logs").mkdir()
  return base, base / "xla_cache", base / "logs"


def kill_when(run, condition, what):
  run.wait_for(condition, what)
  run.proc.send_signal(signal.SIGKILL)
  run.finish()


def finish_ok(args, workdir, cache, logs, name):
  run = Run(args, workdir, cache, logs, name)
  code = run.finish()
  assert code == 0, run.stderr()[-3000:]
  assert "Traceback" not in run.stderr()
  return run


@pytest.mark.slow
def test_kill_during_tokenizer_training_then_rerun(dirs):
  base, cache, logs = dirs
  wd = base / "spm"
  args = [a for a in TRAIN if "tokenizer" not in a and "vocab_size" not in a] + [
      "--config.data.tokenizer=spm-train:1500", "--config.model.vocab_size=1500",
      "--config.data.source=embedded:python-docs"]
  run = Run(args, wd, cache, logs, "spm_kill")
  # The lock is taken before the tokenizer is trained; the tokenizer is saved after.
  kill_when(run, lambda: (wd / ".lock").exists(), "the lock")
  assert not (wd / "tokenizer").exists(), "killed too late: the tokenizer was saved"
  rerun = finish_ok(args, wd, cache, logs, "spm_rerun")
  assert "starting at step 0" in rerun.stdout()
  assert max(sealed_steps(wd)) == 12 and not (wd / ".lock").exists()


@pytest.mark.slow
def test_kill_during_the_first_checkpoint_then_rerun(dirs):
  base, cache, logs = dirs
  for attempt in range(4):  # a save that finishes between two polls is missed: try again
    wd = base / f"first{attempt}"
    run = Run(TRAIN, wd, cache, logs, f"first_kill{attempt}")
    run.wait_for(lambda: in_progress_save(wd, 2) or 2 in sealed_steps(wd), "first save")
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    if not sealed_steps(wd):
      break
  else:
    pytest.fail("never caught the first save in progress")
  rerun = finish_ok(TRAIN, wd, cache, logs, "first_rerun")
  warnings = [l for l in rerun.stderr().splitlines() if "warning" in l]
  assert "starting at step 0" in rerun.stdout()
  assert any("taking over the workdir lock" in w for w in warnings), warnings
  assert max(sealed_steps(wd)) == 12
  assert not [n for n in os.listdir(wd / "checkpoints") if not n.isdigit()]


@pytest.mark.slow
def test_kill_during_an_async_save_and_during_eval(dirs):
  base, cache, logs = dirs
  wd = base / "async"
  run = Run(TRAIN, wd, cache, logs, "async_kill")
  target = 4
  while True:
    run.wait_for(lambda: in_progress_save(wd, target) or target in sealed_steps(wd),
                 f"save of {target}")
    if in_progress_save(wd, target):
      run.proc.send_signal(signal.SIGKILL)
      break
    target += 2
    assert target < 12, "never saw a save in progress"
  run.finish()
  resume_from = max(sealed_steps(wd))
  assert resume_from < target
  rerun = finish_ok(TRAIN, wd, cache, logs, "async_rerun")
  assert f"resuming from step {resume_from}" in rerun.stdout()
  assert max(sealed_steps(wd)) == 12

  # eval only reads: a kill at any moment leaves the workdir as it was.
  with ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True) as c:
    assert c.verify(12) is None
  before = sorted(os.listdir(wd))
  for delay in (0.5, 2.0):
    run = Run(["eval"], wd, cache, logs, f"eval_kill{delay}")
    time.sleep(delay)
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    assert sorted(os.listdir(wd)) == before
  out = finish_ok(["eval"], wd, cache, logs, "eval_rerun")
  assert '"step": 12' in out.stdout()
