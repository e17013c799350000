"""`tx-jax benchmark` asks each objective for its batch and FLOPs: it runs for every
config in configs/, with no table of objectives anywhere."""

import glob
import math
import os

import pytest

from tx_jax.train import config as config_lib
from tx_jax.train.benchmark import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Small shapes, applied where a config has the key (8 rows: one per fake device).
SHRINK = {"train.batch_size": "8", "model.num_layers": "1", "model.num_encoder_layers": "1",
          "model.decoder_num_layers": "1", "data.seq_len": "16", "model.max_len": "32"}


def _shrunk(path):
  config = config_lib.load_config_file(path)
  overrides = []
  for key, value in SHRINK.items():
    section, name = key.split(".")
    if section in config and name in config[section]:
      if name == "max_len" and config.model[name] < int(value):
        continue
      overrides.append(f"{key}={value}")
  return config_lib.apply_overrides(config, overrides)


def test_every_config_is_found():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"gpt.py", "bert.py", "t5.py", "mae.py", "contrastive.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_benchmark_runs_for_every_family(path):
  config = _shrunk(path)
  record = benchmark(config, steps=1)
  unit = "images" if "images_per_s" in record else "tokens"
  rate, flops = record[f"{unit}_per_s"], record[f"flops_per_{unit[:-1]}"]
  assert rate > 0 and flops > 0 and math.isfinite(flops)
  assert 0 < record["mfu"] and record["compile_s"] > 0 and record["params"] > 0
  parts = [record[k] for k in ("lower_s", "xla_compile_s", "first_step_s")]
  assert min(parts) > 0 and record["compile_s"] == pytest.approx(sum(parts))
  assert record["peak_rss_mb"] > 100  # the process holds at least JAX itself
