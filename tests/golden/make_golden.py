"""Writes tests/golden/gpt_tiny: a tiny trained workdir that every later version must read.

  JAX_PLATFORMS=cpu XLA_FLAGS= python tests/golden/make_golden.py

Trains configs/gpt.py shrunk to 1 layer, d_model 8, for 2 steps on one CPU
device, keeps what `tx-jax eval/generate` need (config.json, tokenizer/,
checkpoints/2/ with its manifest) and prints the per-leaf sha256 of the
restored params, which tests/test_reliability.py stores as its expectation.
Only regenerate on purpose: a format change that breaks old workdirs should
fail that test, not be papered over.
"""

import hashlib
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "tests", "golden", "gpt_tiny")

FLAGS = ["model.num_layers=1", "model.d_model=8", "model.num_heads=1", "model.mlp_dim=16",
         "model.max_len=16", "data.seq_len=16", "train.batch_size=2", "train.steps=2",
         "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1",
         "data.eval_batches=1", "train.async_checkpoints=false", "train.keep_checkpoints=1",
         "data.tokenizer=byte", "model.vocab_size=256", "model.positions=learned"]


def leaf_digests(params) -> dict[str, str]:
  import jax
  import numpy as np
  return {jax.tree_util.keystr(path): hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest()
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def main():
  from tx_jax.train import config as config_lib
  from tx_jax.train.loop import train
  from tx_jax.train.setup import load_trained
  shutil.rmtree(OUT, ignore_errors=True)
  config = config_lib.apply_overrides(
      config_lib.load_config_file(os.path.join(ROOT, "configs", "gpt.py")), FLAGS)
  train(config, OUT)
  for name in ("metrics.jsonl", "tensorboard", "data_stats.json"):
    path = os.path.join(OUT, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  trained = load_trained(OUT)
  print("step", trained.step)
  for name, digest in leaf_digests(trained.params).items():
    print(f"    {name!r}: {digest!r},")


if __name__ == "__main__":
  main()
