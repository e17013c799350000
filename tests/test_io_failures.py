"""A full disk while training, tokenizing or writing reports: exit 3, one line, resumable.

Each test mounts its own small tmpfs (we run as root in CI); where mounting is
refused the test is skipped with that reason.
"""

import os
import subprocess
import threading
import time

import jax
import numpy as np
import pytest

from tx_jax import cli
from tx_jax.train import checkpoint as ckpt_lib

from test_bad_inputs import GPT, TINY, run_main

STEPS = 24
TRAIN = ["train", "--config", GPT, *[f for f in TINY if "train.steps" not in f and
                                     "checkpoint_every" not in f and "eval_every" not in f],
         f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
         f"--config.train.eval_every={STEPS}", "--config.train.keep_checkpoints=20"]


@pytest.fixture
def small_disk(tmp_path):
  """mount(size) -> a directory on a fresh tmpfs of that size; unmounted afterwards."""
  mounted = []

  def mount(size):
    d = tmp_path / f"disk{len(mounted)}"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    mounted.append(d)
    return d
  yield mount
  for d in mounted:
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def leaves(workdir):
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as c:
    step = c.latest_step()
    state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"]
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def one_error_line(capsys):
  err = capsys.readouterr().err
  lines = [l for l in err.replace("\r", "\n").splitlines()
           if l.strip() and not l.startswith("train:")]
  assert "Traceback" not in err, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("tx-jax: error: "), lines
  return lines[0]


@pytest.mark.slow
def test_disk_full_mid_training_exits_3_and_resumes_bit_identically(small_disk, tmp_path,
                                                                    capsys):
  straight = str(tmp_path / "straight")
  assert run_main([*TRAIN, "--workdir", straight]) == 0
  # How many bytes a checkpoint takes varies from run to run (the number of data files
  # the writer's threads produce), so the disk is not sized to fill at a given step:
  # another writer fills it once the run has sealed its first checkpoint.
  disk = small_disk("64m")
  workdir = str(disk / "wd")
  checkpoints = os.path.join(workdir, "checkpoints")
  done = threading.Event()
  filler = threading.Thread(target=fill, args=(disk, os.path.join(checkpoints, "2"), done))
  filler.start()
  capsys.readouterr()
  try:
    code = run_main([*TRAIN, "--workdir", workdir])
  finally:
    done.set()
    filler.join()
  assert code == 3
  line = one_error_line(capsys)
  assert "No space left on device" in line and "free some space" in line, line
  sealed = [s for s in ckpt_lib.Checkpointer(checkpoints, read_only=True).steps()]
  assert sealed and max(sealed) < STEPS
  with ckpt_lib.Checkpointer(checkpoints, read_only=True) as c:
    assert all(c.verify(s) is None for s in c.steps())  # nothing partial, newest intact
  if line.startswith("tx-jax: error: saving checkpoint step"):
    assert f"step {max(sealed)}, is intact" in line and "it needs about" in line
  assert not [n for n in os.listdir(checkpoints) if not n.isdigit()]
  assert not os.path.exists(os.path.join(workdir, ".lock"))

  os.remove(disk / "filler")
  capsys.readouterr()
  assert run_main([*TRAIN, "--workdir", workdir]) == 0
  assert f"resuming from step {max(sealed)}" in capsys.readouterr().out
  step_a, a = leaves(straight)
  step_b, b = leaves(workdir)
  assert step_a == step_b == STEPS and len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def fill(disk, once=None, stop=None):
  """Fills the tmpfs to its last page; with `once`, first waits for that path to appear
  (giving up when `stop` is set)."""
  while once is not None and not os.path.exists(once):
    if stop.is_set():
      return
    time.sleep(0.005)
  fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
  try:
    for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
      try:
        while True:
          os.write(fd, chunk)
      except OSError:
        pass
  finally:
    os.close(fd)


def test_full_disk_for_tokenizer_and_report_exits_3(small_disk, tmp_path, capsys):
  data = tmp_path / "docs.txt"
  data.write_text("\n".join(f"document number {i} about topic {i % 5}" for i in range(200)))
  rng = np.random.default_rng(0)
  npz = tmp_path / "e.npz"
  np.savez(npz, embeddings=rng.normal(size=(30, 4)).astype(np.float32))
  disk = small_disk("256k")
  fill(disk)
  capsys.readouterr()
  assert run_main(["tokenizer", "--data", f"file:{data}", "--vocab-size", "300",
                   "--out", str(disk / "tok" / "spm")]) == 3
  assert "No space left on device" in one_error_line(capsys)
  assert run_main(["analyze", "--embeddings", str(npz), "--out", str(disk / "rep"),
                   "--k", "2", "--reduce", "pca"]) == 3
  assert "No space left on device" in one_error_line(capsys)


def test_metrics_log_on_a_full_disk_is_one_io_failure(small_disk):
  from tx_jax.errors import IOFailure
  from tx_jax.train.metrics import MetricWriter
  disk = small_disk("64k")
  writer = MetricWriter(str(disk), resume_step=0)
  writer.write(1, {"train/loss": 1.0})
  fill(disk)
  with pytest.raises(IOFailure, match=r"appending step 2 to the metrics log .*metrics\.jsonl' "
                                      r"failed: No space left on device.*free some space"):
    for _ in range(100):  # the page holding the file's tail fills up first
      writer.write(2, {"train/loss": 2.0, "note": "x" * 4096})
  os.remove(disk / "filler")
  writer.close()
  # On resume the torn line (if any) is dropped and step 1 kept.
  MetricWriter(str(disk), resume_step=1).close()
  lines = (disk / "metrics.jsonl").read_text().splitlines()
  assert [__import__("json").loads(l)["step"] for l in lines] == [1]
