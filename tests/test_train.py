"""Training: optimizer math, gradient accumulation, CLI runs (kills and resume: test_reliability)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tx_jax.models import TransformerConfig
from tx_jax.objectives.causal_lm import CausalLM
from tx_jax.train import optim, step as step_lib
from tx_jax.train.state import init_state

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--config.model.num_layers=1", "--config.model.d_model=32",
              "--config.data.tokenizer=byte", "--config.model.vocab_size=256",
              "--config.model.num_heads=2", "--config.model.mlp_dim=64",
              "--config.model.max_len=32", "--config.data.seq_len=32",
              "--config.train.batch_size=4", "--config.train.log_every=2",
              "--config.data.eval_batches=2"]


def optim_cfg(**kw):
  base = dict(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
              accumulate_steps=1, b1=0.9, b2=0.95, eps=1e-8)
  return ml_collections.ConfigDict({**base, **kw})


def test_schedule_is_linear_warmup_then_cosine():
  cfg = optim_cfg(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  sched = optim.lr_schedule(cfg, 110)
  for s in [0, 5, 10, 35, 60, 109]:
    if s <= 10:
      want = s / 10
    else:
      frac = (s - 10) / 100
      want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    assert abs(float(sched(s)) - want) < 1e-6, s


def test_weight_decay_skips_norms_and_biases():
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3), "scale": jnp.ones(3)}
  tx = optim.make_optimizer(optim_cfg(lr=0.1, warmup_steps=0, clip_norm=0.0,
                                      weight_decay=0.5), 100)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient: Adam's step is 0, so only decoupled decay (-lr * wd * p) remains.
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)
  np.testing.assert_allclose(updates["scale"], 0.0)


def _batch(rng, b=8, t=16, v=64):
  tokens = rng.integers(0, v, (b, t + 1)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.2).astype(np.float32)  # uneven weights per row
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "weights": weights}


def test_gradient_accumulation_equals_one_big_batch():
  cfg = TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                          max_len=16)
  objective = CausalLM(cfg, np.ones(64, np.float32))
  tx = optim.make_optimizer(optim_cfg(), 10)
  state = init_state(objective, tx, 16, seed=0)
  batch = _batch(np.random.default_rng(0))
  one, m1 = jax.jit(step_lib.make_train_step(objective, tx, 1))(state, batch)
  four, m4 = jax.jit(step_lib.make_train_step(objective, tx, 4))(state, batch)
  np.testing.assert_allclose(m1["train/loss"], m4["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # And the loss is the token-weighted mean cross-entropy, computed naively.
  logits, _ = objective.model.apply({"params": state.params}, batch["inputs"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  want = (nll * batch["weights"]).sum() / batch["weights"].sum()
  np.testing.assert_allclose(float(m1["train/loss"]), want, rtol=1e-5)


def test_nonfinite_gradients_leave_state_unchanged():
  cfg = TransformerConfig(vocab_size=64, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                          max_len=16)
  objective = CausalLM(cfg, np.ones(64, np.float32))
  tx = optim.make_optimizer(optim_cfg(), 10)
  state = init_state(objective, tx, 16, seed=0)
  batch = _batch(np.random.default_rng(1))
  batch["weights"] = batch["weights"] * np.nan
  new, metrics = jax.jit(step_lib.make_train_step(objective, tx, 1))(state, batch)
  assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
    np.testing.assert_array_equal(a, b)


# --- End to end through the CLI (subprocesses) --------------------------------------

def run_cli(args, timeout=600, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


@pytest.mark.slow
def test_train_eval_generate_end_to_end(tmp_path):
  wd = str(tmp_path / "run")
  out = run_cli(["train", "--config", "configs/gpt.py", "--workdir", wd, *TINY_FLAGS,
                 "--config.train.steps=6", "--config.train.eval_every=6",
                 "--config.train.checkpoint_every=6"])
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  for key in ("lr", "tokens_per_s", "mfu"):
    assert key in train_lines[0]
  assert any("eval/bits_per_byte" in l for l in lines)
  assert os.listdir(os.path.join(wd, "tensorboard"))
  ev = run_cli(["eval", "--workdir", wd])
  assert ev.returncode == 0, ev.stderr[-2000:]
  record = json.loads(ev.stdout.strip().splitlines()[-1])
  assert record["step"] == 6 and record["eval/bits_per_byte"] > 0
  # The same checkpoint on the same held-out split: the loop's own evaluation at step 6.
  loop_eval = [l for l in lines if "eval/bits_per_byte" in l and l["step"] == 6][-1]
  assert record["eval/bits_per_byte"] == pytest.approx(loop_eval["eval/bits_per_byte"],
                                                       rel=1e-6)
  gen = run_cli(["generate", "--workdir", wd, "--prompt", "The list", "--max-new-tokens", "10"])
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert gen.stdout.startswith("The list")


@pytest.mark.slow
def test_benchmark_and_tokenizer_commands(tmp_path):
  bench = run_cli(["benchmark", "--config", "configs/gpt.py", *TINY_FLAGS, "--steps", "2"])
  assert bench.returncode == 0, bench.stderr[-2000:]
  record = json.loads(bench.stdout.strip().splitlines()[-1])
  # FLOPs per token = 6N + 12 L d T for the 1-layer, d=32 model with a byte vocabulary.
  n = record["params"]
  assert record["flops_per_token"] == 6 * n + 12 * 1 * 32 * 32
  assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["compile_s"] > 0
  docs = tmp_path / "docs.txt"
  docs.write_text("\n".join(f"post number {i} about topic {i % 7} and more words" for i in
                            range(300)))
  tok = run_cli(["tokenizer", "--data", f"file:{docs}", "--vocab-size", "300",
                 "--out", str(tmp_path / "spm")])
  assert tok.returncode == 0, tok.stderr[-2000:]
  assert (tmp_path / "spm.model").exists()
  assert json.loads(tok.stdout.strip().splitlines()[-1])["vocab_size"] == 300


def _short_run(tmp_path, name, steps, log_every):
  from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from tx_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_overrides(config_lib.load_config_file("configs/gpt.py"), [
      f"train.steps={steps}", f"train.log_every={log_every}", f"train.eval_every={steps}",
      f"train.checkpoint_every={steps}", "data.tokenizer=byte", "model.vocab_size=256",
      "data.eval_batches=2"])
  train(config, str(tmp_path / name))


def test_the_loop_reads_from_devices_only_at_log_eval_and_checkpoint_steps(tmp_path,
                                                                           monkeypatch):
  # No implicit device-to-host transfer anywhere in a run (float() of a device array,
  # np.asarray of one): JAX's guard raises on the first.
  with jax.transfer_guard_device_to_host("disallow"):
    _short_run(tmp_path, "guarded", steps=4, log_every=2)
  # The explicit ones: as many in 12 steps as in 4 when both log, evaluate and
  # checkpoint once, at the end; none belongs to the steps in between.
  calls = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
  counts = []
  for steps in (4, 12):
    calls.clear()
    _short_run(tmp_path, f"run{steps}", steps=steps, log_every=steps)
    counts.append(len(calls))
  assert counts[0] == counts[1] > 0, counts
