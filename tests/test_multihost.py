"""Multi-process training: two local processes x 4 CPU devices (jax.distributed +
gloo) train like one process with 8 devices, their FSDP checkpoints restore onto
other meshes, and a dead peer stops the job instead of hanging it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.model.max_len=32", "--config.data.seq_len=32",
        "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.data.eval_batches=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args, devices, log):
  """`python -m tx_jax ARGS` on `devices` CPU devices; output to files (no pipe stalls)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(devices)}
  out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
  return subprocess.Popen([sys.executable, "-m", "tx_jax", *args], cwd=ROOT, env=env,
                          stdout=out, stderr=err)


def tail(log):
  return "".join(open(f"{log}.{s}").read()[-1500:] for s in ("out", "err"))


def wait_all(procs, logs, timeout):
  """Waits for every process; on a failure or the deadline, kills the rest and fails."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      for p, log in zip(procs, logs):
        if p.poll() not in (None, 0):
          pytest.fail(f"{log} exited with {p.returncode}:\n{tail(log)}")
      if time.time() > deadline:
        pytest.fail(f"processes still running after {timeout}s")
      time.sleep(0.2)
    for p, log in zip(procs, logs):
      assert p.returncode == 0, tail(log)
  finally:
    kill_all(procs)


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def train_args(workdir, *extra):
  return ["train", "--config", "configs/gpt.py", "--workdir", str(workdir), *TINY, *extra]


def two_processes(workdir, logs, *extra, heartbeat=20):
  address = f"127.0.0.1:{free_port()}"
  return [launch([*train_args(workdir, *extra), "--coordinator-address", address,
                  "--num-processes", "2", "--process-id", str(i),
                  "--heartbeat-timeout", str(heartbeat)], 4, logs[i]) for i in range(2)]


def read_metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """5 steps as 2 processes x 4 devices ("two") and as 1 process x 8 devices ("one"),
  both FSDP over all 8 devices, run side by side; returns (root dir, log prefixes)."""
  root = tmp_path_factory.mktemp("multihost")
  steps = ["--config.train.steps=5", "--config.train.eval_every=5",
           "--config.train.checkpoint_every=5", "--config.train.async_checkpoints=false"]
  logs = [str(root / f"proc{i}") for i in range(2)] + [str(root / "single")]
  # Two processes read one data shard each (data.shards defaults to the process
  # count); the single process reads the same two shards side by side.
  procs = two_processes(root / "two", logs, *steps)
  procs.append(launch(train_args(root / "one", *steps, "--config.data.shards=2"), 8, logs[2]))
  wait_all(procs, logs, timeout=600)
  return root, logs


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_8_devices(runs):
  root, logs = runs
  two, one = read_metrics(root / "two"), read_metrics(root / "one")
  loss = lambda lines: [(l["step"], l["train/loss"]) for l in lines if "train/loss" in l]
  assert [s for s, _ in loss(two)] == [1, 2, 3, 4, 5]  # each step logged once: process 0 only
  for (_, a), (_, b) in zip(loss(two), loss(one)):
    assert abs(a - b) <= 1e-5 * abs(b), (loss(two), loss(one))
  assert len({round(l, 4) for _, l in loss(one)}) > 1  # the runs really trained
  # Eval: every process builds the same global eval batches and keeps its rows.
  eval_two = [l["eval/loss"] for l in two if "eval/loss" in l]
  eval_one = [l["eval/loss"] for l in one if "eval/loss" in l]
  assert len(eval_two) == 1 and abs(eval_two[0] - eval_one[0]) <= 1e-5 * eval_one[0]

  # Only process 0 printed and drew the progress bar.
  assert "starting at step 0" in open(logs[0] + ".out").read()
  assert "starting at step" not in open(logs[1] + ".out").read()
  assert "train:" in open(logs[0] + ".err").read()
  assert "train:" not in open(logs[1] + ".err").read()
  # The checkpoint was written by both processes together: array shards from each,
  # and each process's own data-iterator position (its own shard of the documents).
  ckpt = root / "two" / "checkpoints" / "5"
  assert (ckpt / "state" / "ocdbt.process_0").is_dir()
  assert (ckpt / "state" / "ocdbt.process_1").is_dir()
  for i in range(2):
    data = json.loads((ckpt / "data" / f"process_{i}-of-2.json").read_text())
    assert data["config"]["shard_index"] == i and data["config"]["shard_count"] == 2


def eval_cli(workdir):
  """`tx-jax eval` in a fresh single-device process: restores the checkpoint onto 1 device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  out = subprocess.run([sys.executable, "-m", "tx_jax", "eval", "--workdir", str(workdir)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fsdp8_checkpoints_restore_on_other_meshes(runs):
  import flax.linen as nn
  import jax
  import ml_collections
  from tx_jax import parallel
  from tx_jax.train.evaluate import evaluate
  from tx_jax.train.experiment import build_experiment
  from tx_jax.train.trained import load_trained
  from tx_jax.train.step import make_eval_step

  root, _ = runs
  trained_loss = [l["eval/loss"] for l in read_metrics(root / "one") if "eval/loss" in l][0]
  close = lambda a: abs(a - trained_loss) <= 1e-5 * trained_loss
  # Onto 1 device through `tx-jax eval`: the FSDP-8 checkpoint two processes wrote together.
  record = eval_cli(root / "two")
  assert record["step"] == 5 and close(record["eval/loss"]), (record, trained_loss)

  # Onto a (2, 1, 1) data-parallel mesh of this process's devices, through the same
  # restore code (target shardings carried by the abstract state).
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1)),
                            devices=jax.devices()[:2])
  trained = load_trained(str(root / "one"), mesh=mesh)
  kernel = trained.params["decoder"]["block_00"]["mlp"]["wi"]["kernel"]
  assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  assert {d.id for d in kernel.sharding.device_set} == {0, 1}
  rules = parallel.resolve_rules(trained.config.mesh.rules)
  exp = build_experiment(trained.config, str(root / "one"), create_tokenizer=False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    metrics = evaluate(jax.jit(make_eval_step(exp.objective)), trained.params,
                            exp.eval_batches(), parallel.batch_sharding(mesh, rules),
                            exp.objective.summarize)
  assert close(metrics["loss"]), (metrics, trained_loss)
  # And the 1-process FSDP-8 checkpoint onto a single device, in this process.
  single = load_trained(str(root / "one"))
  kernel = single.params["decoder"]["block_00"]["mlp"]["wi"]["kernel"]
  assert len(kernel.sharding.device_set) == 1
  one_device = parallel.batch_sharding(kernel.sharding.mesh, rules)
  metrics = evaluate(jax.jit(make_eval_step(exp.objective)), single.params,
                          exp.eval_batches(), one_device, exp.objective.summarize)
  assert close(metrics["loss"]), (metrics, trained_loss)


@pytest.mark.slow
def test_dead_peer_stops_the_other_process(tmp_path):
  logs = [str(tmp_path / f"proc{i}") for i in range(2)]
  workdir = tmp_path / "run"
  procs = two_processes(workdir, logs, "--config.train.steps=100000",
                        "--config.train.eval_every=100000",
                        "--config.train.checkpoint_every=100000", heartbeat=10)
  try:
    deadline = time.time() + 400
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and '"step": 2,' in metrics.read_text()):
      for p, log in zip(procs, logs):
        assert p.poll() is None, f"{log} exited early:\n{tail(log)}"
      assert time.time() < deadline, "the job never reached step 2"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    try:
      code = procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
      pytest.fail("process 0 kept running 90 s after its peer died")
    assert code != 0
    print(f"process 0 stopped {time.time() - start:.1f} s after its peer was killed")
  finally:
    kill_all(procs)
