"""Reliability end to end: SIGKILL, SIGTERM, a corrupt newest checkpoint, NaNs, hostile data.

The kill/SIGTERM tests share one chain of CLI runs on a tiny model (1 layer,
d_model 32) with a persistent XLA compilation cache, and compare the result
bit for bit with one uninterrupted run. Checkpoint integrity in isolation and
the golden checkpoint: test_checkpoints.py; bad input: test_bad_inputs.py.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tx_jax.data import sources
from tx_jax.data.doc_policy import DocPolicy, apply_policy
from tx_jax.errors import UserError
from tx_jax.train import checkpoint as ckpt_lib
from tx_jax.train import config as config_lib
from tx_jax.train import loop, optim, preemption, step as step_lib
from tx_jax.train.trained import load_trained
from tx_jax.train.state import TrainState

from test_checkpoints import flip_byte, largest_file
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.data.seq_len=32",
        "--config.train.batch_size=4", "--config.data.eval_batches=2",
        "--config.data.tokenizer=byte", "--config.model.vocab_size=256"]
STEPS, EVERY = 60, 6
CHAIN = ["train", "--config", "configs/gpt.py", *TINY, f"--config.train.steps={STEPS}",
         f"--config.train.checkpoint_every={EVERY}", f"--config.train.eval_every={STEPS}",
         "--config.train.log_every=2"]


# --- Helpers ----------------------------------------------------------------------------

def cli_env(cache_dir):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(),
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class Run:
  """One `python -m tx_jax ...` subprocess with stdout/stderr in files."""

  def __init__(self, args, workdir, cache_dir, log_dir, name):
    self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen([sys.executable, "-m", "tx_jax", *args, "--workdir",
                                    str(workdir)], cwd=ROOT, env=cli_env(cache_dir),
                                   stdout=out, stderr=err)

  def wait_for(self, condition, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
      assert self.proc.poll() is None, f"run ended before {what}: {self.stderr()[-2000:]}"
      assert time.time() < deadline, f"timed out waiting for {what}"
      time.sleep(0.002)

  def finish(self, timeout=300):
    self.proc.wait(timeout=timeout)
    return self.proc.returncode

  def stdout(self):
    return self.out.read_text()

  def stderr(self):
    return self.err.read_text()


def sealed_steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                and (d / n / ckpt_lib.MANIFEST).exists()) if d.exists() else []


def in_progress_save(workdir, step):
  """True while step is being written: orbax's temporary directory, or renamed but unsealed."""
  d = workdir / "checkpoints"
  names = os.listdir(d) if d.exists() else []
  return (any(n.startswith(f"{step}.orbax-checkpoint-tmp") for n in names)
          or (str(step) in names and not (d / str(step) / ckpt_lib.MANIFEST).exists()))


def read(path):
  return path.read_text() if path.exists() else ""


def train_log_steps(workdir):
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  return ([l["step"] for l in lines if "train/loss" in l],
          [l["step"] for l in lines if "eval/loss" in l])


def final_state(workdir):
  """Every leaf of the newest checkpoint (params, optimizer state, counters), as numpy."""
  with ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True) as c:
    step = c.latest_step()
    state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"]
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def assert_bit_identical(a, b):
  step_a, leaves_a = final_state(a)
  step_b, leaves_b = final_state(b)
  assert step_a == step_b == STEPS
  assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 20
  for name in leaves_a:
    np.testing.assert_array_equal(leaves_a[name], leaves_b[name], err_msg=name)


# --- The chain: 3 SIGKILLs and a SIGTERM against one uninterrupted run -------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  base = tmp_path_factory.mktemp("chain")
  cache, logs = base / "xla_cache", base / "logs"
  logs.mkdir()
  # The reference saves synchronously, the interrupted runs asynchronously: same bits.
  straight = Run([*CHAIN, "--config.train.async_checkpoints=false"], base / "straight", cache,
                 logs, "straight")
  assert straight.finish() == 0, straight.stderr()[-2000:]

  rng = random.Random(20261)
  wd, events = base / "interrupted", []

  # 1. SIGKILL between saves: right after a randomly chosen checkpoint is sealed.
  target = rng.choice([6, 12, 18])
  run = Run(CHAIN, wd, cache, logs, "kill1")
  run.wait_for(lambda: target in sealed_steps(wd), f"checkpoint {target}")
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  events.append(("kill_between", target, sealed_steps(wd)))

  # 2. SIGKILL during a save: as soon as a save is seen in progress, from a random one on
  #    (a save that finishes unseen between two polls moves the target to the next one).
  target = max(sealed_steps(wd)) + EVERY * rng.randint(1, 2)
  run = Run(CHAIN, wd, cache, logs, "kill2")
  while True:
    run.wait_for(lambda: in_progress_save(wd, target) or target in sealed_steps(wd),
                 f"save of {target}")
    if in_progress_save(wd, target):
      run.proc.send_signal(signal.SIGKILL)
      break
    target += EVERY
    assert target < STEPS, "never saw a save in progress"
  run.finish()
  events.append(("kill_during", target, sealed_steps(wd), run.stdout()))

  # 3. SIGTERM a few log steps after resuming.
  resume_from = max(sealed_steps(wd))
  after = resume_from + 2 * rng.randint(1, 3)
  run = Run(CHAIN, wd, cache, logs, "term")
  run.wait_for(lambda: "resuming from step" in run.stdout(), "resume")  # old lines are gone
  run.wait_for(lambda: f'{{"step": {after}, "train/loss"' in read(wd / "metrics.jsonl"),
               f"log line {after}")
  t0 = time.time()
  run.proc.send_signal(signal.SIGTERM)
  rc = run.finish(timeout=60)
  events.append(("term", rc, time.time() - t0, run.stdout(), run.stderr(), sealed_steps(wd),
                 resume_from))

  # 4. SIGKILL at a random moment after the resumed run has started.
  run = Run(CHAIN, wd, cache, logs, "kill3")
  run.wait_for(lambda: "resuming from step" in run.stdout(), "resume")
  time.sleep(rng.uniform(0.0, 1.5))
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  events.append(("kill_random", None, sealed_steps(wd), run.stdout()))

  # 5. Run to the end.
  run = Run(CHAIN, wd, cache, logs, "last")
  assert run.finish() == 0, run.stderr()[-2000:]
  events.append(("last", None, sealed_steps(wd), run.stdout()))
  return {"straight": base / "straight", "interrupted": wd, "events": events, "cache": cache,
          "logs": logs, "base": base}


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_bit_identically(chain):
  events = {e[0]: e for e in chain["events"]}
  # Each resumed run started from the newest sealed checkpoint the kill left behind.
  assert f"resuming from step {max(events['kill_between'][2])}" in events["kill_during"][3]
  assert events["kill_during"][1] not in events["kill_during"][2], "kill missed the save"
  assert f"resuming from step {max(events['kill_random'][2])}" in events["last"][3]
  assert_bit_identical(chain["straight"], chain["interrupted"])
  train_steps, eval_steps = train_log_steps(chain["interrupted"])
  assert train_steps == list(range(2, STEPS + 1, 2))  # none missing, none twice
  assert eval_steps == [STEPS]
  checkpoints = chain["interrupted"] / "checkpoints"
  assert not [n for n in os.listdir(checkpoints) if not n.isdigit()]  # no temporary dirs


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(chain):
  _, rc, seconds, stdout, stderr, sealed, resumed_from = next(
      e for e in chain["events"] if e[0] == "term")
  assert rc == 0, stderr[-2000:]
  assert seconds < 30
  assert "SIGTERM received" in stderr and "Traceback" not in stderr
  stopped_at = int(stdout.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert stopped_at > resumed_from and max(sealed) == stopped_at
  following = next(e for e in chain["events"] if e[0] == "kill_random")
  assert f"resuming from step {stopped_at}" in following[3]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_stays_bit_identical(chain):
  wd = chain["base"] / "corrupted"
  shutil.copytree(chain["interrupted"], wd)
  flip_byte(largest_file(wd / "checkpoints" / str(STEPS)))
  run = Run(CHAIN, wd, chain["cache"], chain["logs"], "corrupt")
  assert run.finish() == 0, run.stderr()[-2000:]
  warnings = [l for l in run.stderr().splitlines() if "warning" in l]
  assert len(warnings) == 1 and f"step {STEPS}" in warnings[0] and "sha256" in warnings[0]
  assert f"resuming from step {STEPS - EVERY}" in run.stdout()
  assert (wd / "checkpoints_rejected" / str(STEPS)).is_dir()
  assert_bit_identical(chain["straight"], wd)
  assert train_log_steps(wd)[0] == list(range(2, STEPS + 1, 2))


# --- Non-finite steps ----------------------------------------------------------------------

class Quadratic:
  """A toy objective: weighted mean of (w - x)^2; enough for the step's bookkeeping."""

  def loss_fn(self, params, batch, rng, train):
    del rng, train
    err = (params["w"][None] - batch["x"]) ** 2 * batch["weights"][:, None]
    weight = jnp.sum(batch["weights"])
    return jnp.sum(err) / weight, {"weight": weight}


def quad_batch(nan=False):
  return {"x": jnp.arange(8.0).reshape(2, 4),
          "weights": jnp.ones(2) * (jnp.nan if nan else 1.0)}


def test_skips_latch_after_n_in_a_row_and_a_nan_lr_is_caught():
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-1)  # lr lives in the state
  step = jax.jit(step_lib.make_train_step(Quadratic(), tx, 1, halt_after=2))
  params = {"w": jnp.zeros(4)}
  zero = jnp.zeros((), jnp.int32)
  fresh = TrainState(step=zero, params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)), skipped=zero, skip_run=zero)
  state, _ = step(fresh, quad_batch())
  runs, unchanged = [], []
  # skip, good, skip, skip (2 in a row: halted), then a good batch that must change nothing
  for nan in (True, False, True, True, False):
    before = state
    state, metrics = step(state, quad_batch(nan))
    runs.append((int(state.step), int(state.skip_run), int(state.skipped)))
    unchanged.append(all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves((before.params, before.opt_state)),
        jax.tree_util.tree_leaves((state.params, state.opt_state)))))
  assert runs == [(2, 1, 1), (3, 0, 1), (4, 1, 2), (5, 2, 3), (5, 2, 3)]
  assert unchanged == [True, False, True, True, True]
  # A NaN learning rate gives finite loss and gradients but a non-finite update: skipped.
  fresh.opt_state.hyperparams["learning_rate"] = jnp.float32(np.nan)
  after, metrics = step(fresh, quad_batch())
  assert np.isfinite(float(metrics["train/loss"])) and not bool(metrics["finite"])
  assert (int(after.skipped), int(after.skip_run)) == (1, 1)
  np.testing.assert_array_equal(after.params["w"], np.zeros(4))


def inprocess_config(**overrides):
  """The tiny config for in-process runs on the 8 fake devices (batch 8: one row each)."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "gpt.py"))
  flags = [f[len("--config."):] for f in TINY] + [
      "train.batch_size=8", "train.steps=8", "train.checkpoint_every=2", "train.log_every=1",
      "train.eval_every=8", "train.async_checkpoints=true"]
  flags += [f"{k}={v}" for k, v in overrides.items()]
  return config_lib.apply_overrides(config, flags)


def nan_batches_at(monkeypatch, bad_steps):
  """Makes the training iterator put NaN loss weights into the batches of `bad_steps`."""
  real_build = loop.build_experiment

  class Poisoned(grain.DatasetIterator):
    def __init__(self, parent):
      super().__init__(parent)
      self.n = 0

    def __next__(self):
      batch, self.n = next(self._parent), self.n + 1
      if self.n in bad_steps:
        batch = {**batch, "weights": batch["weights"] * np.nan}
      return batch

    def get_state(self):
      return self._parent.get_state()

    def set_state(self, state):
      self._parent.set_state(state)

  def build(*args, **kw):
    exp = real_build(*args, **kw)
    make = exp.train_iterator
    exp.train_iterator = lambda: Poisoned(make())
    return exp
  monkeypatch.setattr(loop, "build_experiment", build)


def checkpoint_params(workdir, step):
  with ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True) as c:
    state = c.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))["state"]
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state["params"])]


@pytest.mark.slow
def test_nan_batch_under_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  nan_batches_at(monkeypatch, {5})
  workdir = tmp_path / "stop"
  with pytest.raises(UserError, match=r"non-finite loss or gradients at step 5 .*newest "
                                      r"checkpoint, step 4, is intact"):
    loop.train(inprocess_config(**{"train.nonfinite": "stop"}), str(workdir))
  assert sealed_steps(workdir) == [2, 4]  # 6 would hold a halted state: never written
  assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]
  trained = load_trained(str(workdir))
  assert trained.step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(trained.params))


@pytest.mark.slow
def test_nan_under_skip_is_counted_and_n_in_a_row_stop_the_run(tmp_path, monkeypatch):
  # Step 2 gets a NaN batch: skipped and counted, training goes on. The learning
  # rate is NaN at schedule count 3; the count only advances on applied updates
  # (1, 3, 4), so steps 5, 6, 7 all skip and the third in a row halts the run.
  nan_batches_at(monkeypatch, {2})
  real_schedule = optim.lr_schedule
  monkeypatch.setattr(optim, "lr_schedule", lambda cfg, total: (
      lambda count: jnp.where(count == 3, jnp.nan, real_schedule(cfg, total)(count))))
  workdir = tmp_path / "skip"
  with pytest.raises(UserError, match=r"3 steps in a row up to step 7 .*newest checkpoint, "
                                      r"step 6, is intact"):
    loop.train(inprocess_config(**{"train.max_consecutive_skips": "3"}), str(workdir))
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl") if "train/loss" in l]
  assert [l["skipped_updates"] for l in lines] == [0, 1, 1, 1, 2, 3]  # step 7 halted
  assert sealed_steps(workdir) == [2, 4, 6]
  params = {step: checkpoint_params(workdir, step) for step in (2, 4, 6)}
  assert any(not np.array_equal(a, b) for a, b in zip(params[2], params[4]))  # 3, 4 applied
  for a, b in zip(params[4], params[6]):
    np.testing.assert_array_equal(a, b)  # 5 and 6 were skipped: nothing applied
    assert np.isfinite(a).all()
  assert load_trained(str(workdir)).step == 6
  stats = json.loads((workdir / "data_stats.json").read_text())
  assert stats["train"]["documents"] == stats["train"]["documents_read"] > 0


# --- Signals -----------------------------------------------------------------------------------

def test_first_sigint_is_recorded_and_a_second_interrupts():
  # A background job of a non-interactive shell starts with SIGINT ignored; the
  # test relies on Python's default handler being the one StopRequest restores.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.StopRequest() as stop:
      assert not stop.agreed()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # the handler runs between bytecodes
      assert stop.agreed() and stop.signal_name == "SIGINT"
      with pytest.raises(KeyboardInterrupt):  # the previous handler is back
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, inherited)


# --- Multi-host: every process stops after the same step -------------------------------------

AGREE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
    from tx_jax.train.preemption import StopRequest
    with StopRequest() as stop:
      for step in range(200):
        if stop.agreed():
          break
        if sys.argv[1] == "1" and step == 7:
          os.kill(os.getpid(), signal.SIGTERM)  # only this process is told
        time.sleep(0.01)
    print("stopped before step", step, "own signal", stop.signal_name, flush=True)
    """)


@pytest.mark.slow
def test_processes_agree_on_the_stop_step(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "agree.py"
  script.write_text(AGREE_SCRIPT.format(root=ROOT, port=port))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(2)}
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
  lines = [o[0].strip().splitlines()[-1] for o in outs]
  steps = [int(l.split("before step ")[1].split()[0]) for l in lines]
  assert steps[0] == steps[1] and 7 < steps[0] < 200, lines
  assert lines[0].endswith("own signal None") and lines[1].endswith("own signal SIGTERM")


# --- Data policy: invalid UTF-8 and over-long documents --------------------------------------

def test_doc_policy_counts_what_it_changes():
  texts = ["ok", "bad\udcff byte", "x" * 25, "lone \ud800 surrogate"]
  labels = ["a", "b", "c", "d"]
  out, out_labels, stats = apply_policy(texts, labels, DocPolicy(10, "chunk", "replace"), "t")
  # 9, 25 and 16 characters: the last two are cut into pieces of 10.
  assert out == ["ok", "bad\ufffd byte", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxx",
                 "lone \ufffd sur", "rogate"]
  assert out_labels == ["a", "b", "c", "c", "c", "d", "d"]
  assert stats == {"documents_read": 4, "documents": 7, "invalid_utf8_replaced": 2,
                   "invalid_utf8_skipped": 0, "over_length_truncated": 0,
                   "over_length_chunked": 2}
  out, _, stats = apply_policy(texts, None, DocPolicy(10, "truncate", "skip"), "t")
  assert out == ["ok", "xxxxxxxxxx"]  # the two with bad characters are skipped
  assert stats["invalid_utf8_skipped"] == 2 and stats["over_length_truncated"] == 1
  with pytest.raises(UserError, match="document 2 holds invalid Unicode"):
    apply_policy(texts, None, DocPolicy(), "t")


def test_file_with_invalid_bytes_under_each_policy(tmp_path):
  path = tmp_path / "docs.txt"
  path.write_bytes(b"caf\xe9 latin-1 line\nfine line\nanother \xff\xfe one\n")
  with pytest.raises(UserError, match=r"not UTF-8 .*line 1.*data.invalid_utf8"):
    sources.open_source(f"file:{path}")
  replaced = sources.open_source(f"file:{path}", DocPolicy(invalid_utf8="replace"))
  assert [replaced[i]["text"] for i in range(3)] == [
      "caf\ufffd latin-1 line", "fine line", "another \ufffd\ufffd one"]
  assert replaced.stats["invalid_utf8_replaced"] == 2
  skipped = sources.open_source(f"file:{path}", DocPolicy(invalid_utf8="skip"))
  assert len(skipped) == 1 and skipped[0]["text"] == "fine line"
  assert skipped.stats["invalid_utf8_skipped"] == 2
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text('{"text": "escaped \\udc80 surrogate"}\n{"text": "fine"}\n')
  with pytest.raises(UserError, match="document 1 holds invalid Unicode"):
    sources.open_source(f"file:{jsonl}")


def test_data_policy_counts_reach_the_experiment(tmp_path):
  data = tmp_path / "docs.txt"
  data.write_bytes(b"\n".join([b"abc " * 40, b"bad \xff byte " * 10] + [b"plain text line"] * 6))
  config = inprocess_config(**{"data.source": f"file:{data}", "data.eval_source": "",
                               "data.max_doc_len": "50", "data.invalid_utf8": "replace"})
  from tx_jax.train.experiment import build_experiment
  exp = build_experiment(config, str(tmp_path / "wd"), create_tokenizer=True)
  assert exp.data_stats["train"]["over_length_chunked"] == 2
  assert exp.data_stats["train"]["invalid_utf8_replaced"] == 1
  assert exp.data_stats["train"]["documents"] == 4 + 3 + 6
