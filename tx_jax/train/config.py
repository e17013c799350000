"""Loading `configs/*.py` files, applying `--config.a.b=value` overrides, checking them."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os

import ml_collections

from tx_jax.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py[:arg]` -> get_config(arg), locked against unknown keys."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found; pass e.g. --config configs/gpt.py")
  module_spec = importlib.util.spec_from_file_location(
      f"_tx_config_{abs(hash(os.path.abspath(path)))}", path)
  if module_spec is None:  # not a .py file, e.g. a workdir's config.json
    raise UserError(f"config file {path!r} is not a Python file with get_config(arg); pass e.g. "
                    "--config configs/gpt.py (a workdir resumes with its own config.json)")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report, don't trace
    raise UserError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path!r} has no get_config(arg) function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise UserError(f"config {spec!r}: {e}") from None
  except Exception as e:  # the user's code again
    raise UserError(f"config {spec!r}: get_config failed: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"config {spec!r}: get_config returned a {type(config).__name__}, "
                    "not an ml_collections.ConfigDict")
  config.lock()
  return config


def _parse_value(text: str, current):
  """Parses an override string into the type of the value it replaces."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if isinstance(current, str) or current is None:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if type(value) is not type(current):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies ["a.b=value", ...] (the text after `--config.`) in order."""
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise UserError(f"override --config.{item} needs a value: --config.{key}=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise UserError(f"unknown config key {'.'.join(parents[:i + 1])!r} in --config.{key}; "
                        f"known: {sorted(node.keys()) if hasattr(node, 'keys') else []}")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise UserError(f"unknown config key {key!r}; keys here are {known}")
    try:
      with node.unlocked():
        node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, TypeError) as e:
      raise UserError(f"--config.{key}: {e}") from None
  return config


def check_config(config):
  """Cross-field checks that would otherwise fail deep inside JAX."""
  t = config.train
  for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
              "keep_checkpoints"):
    if not isinstance(t[key], int) or isinstance(t[key], bool):
      raise UserError(f"train.{key} must be an integer, got {t[key]!r}")
    if t[key] <= 0:
      raise UserError(f"train.{key} must be positive, got {t[key]}")
    if t[key] > _MAX_SIZE:
      raise UserError(f"train.{key}={t[key]} is out of range; it must be at most {_MAX_SIZE}")
  if config.optim.accumulate_steps <= 0 or t.batch_size % config.optim.accumulate_steps:
    raise UserError(f"train.batch_size={t.batch_size} must be a multiple of "
                    f"optim.accumulate_steps={config.optim.accumulate_steps}")
  if "seq_len" in config.data and config.data.seq_len > config.model.max_len:
    raise UserError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                    f"{config.model.max_len}; lower data.seq_len or raise model.max_len")
  if not isinstance(config.optim.lr, (int, float)) or isinstance(config.optim.lr, bool):
    raise UserError(f"optim.lr must be a number, got {config.optim.lr!r}")
  if not (math.isfinite(config.optim.lr) and config.optim.lr > 0):
    raise UserError(f"optim.lr must be a positive finite number, got {config.optim.lr}")
  _check_choice(t, "train", "nonfinite", ("skip", "stop"))
  if t.get("max_consecutive_skips", 1) < 1:
    raise UserError(f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
  if not 0 <= t.get("seed", 0) < 2**32:
    raise UserError(f"train.seed must be in [0, 2**32), got {t.seed}")
  _check_ranges(config)
  _check_choice(config.data, "data", "over_length", ("chunk", "truncate"))
  _check_choice(config.data, "data", "invalid_utf8", ("error", "replace", "skip"))
  if config.data.get("max_doc_len", 0) < 0:
    raise UserError(f"data.max_doc_len must be >= 0 (0: no limit), got {config.data.max_doc_len}")


# Range checks for sizes and coefficients, so a hostile value (0, -1, 2**64, NaN)
# is named here instead of failing as a shape or overflow error inside JAX.
_MAX_SIZE = 2**31 - 1
_INT_RANGES = {  # key: smallest allowed value (the largest is _MAX_SIZE)
    "model.num_layers": 1, "model.d_model": 1, "model.num_heads": 1, "model.mlp_dim": 1,
    "model.max_len": 1, "model.vocab_size": 1, "model.head_dim": 0, "model.num_kv_heads": 0,
    "model.num_encoder_layers": 0, "model.type_vocab_size": 0, "model.relative_buckets": 1,
    "model.relative_max_distance": 1, "model.image_size": 1, "model.patch_size": 1,
    "model.channels": 1, "data.seq_len": 1, "data.eval_batches": 0, "data.shards": 0,
    "optim.warmup_steps": 0, "optim.accumulate_steps": 1, "train.seed": 0,
    "train.max_consecutive_skips": 1}
_FLOAT_RANGES = {  # key: (low, high, low inclusive, high inclusive)
    "optim.b1": (0.0, 1.0, True, False), "optim.b2": (0.0, 1.0, True, False),
    "optim.eps": (0.0, math.inf, False, False), "optim.clip_norm": (0.0, math.inf, True, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.min_lr_ratio": (0.0, 1.0, True, True), "model.norm_eps": (0.0, math.inf, False, False),
    "model.rope_base": (0.0, math.inf, False, False),
    "model.dropout_rate": (0.0, 1.0, True, False)}


def _lookup(config, key: str):
  node = config
  for name in key.split("."):
    if not hasattr(node, "keys") or name not in node:
      return None
    node = node[name]
  return node


def _check_ranges(config):
  for key, low in _INT_RANGES.items():
    value = _lookup(config, key)
    if value is None or isinstance(value, bool) or not isinstance(value, int):
      continue
    if not low <= value <= _MAX_SIZE:
      raise UserError(f"{key}={value} is out of range; it must be in [{low}, {_MAX_SIZE}]")
  for key, (low, high, low_in, high_in) in _FLOAT_RANGES.items():
    value = _lookup(config, key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    ok = (math.isfinite(value) and (value >= low if low_in else value > low)
          and (value <= high if high_in else value < high))
    if not ok:
      raise UserError(f"{key}={value} is out of range; it must be a finite number in "
                      f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}")


def _check_choice(section, name: str, key: str, choices: tuple[str, ...]):
  if key in section and section[key] not in choices:
    raise UserError(f"{name}.{key}={section[key]!r} is not one of {list(choices)}")


def save_json(config, path: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir!r} holds no config.json: is it a tx-jax train workdir?")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (ValueError, TypeError) as e:
    raise UserError(f"{path!r} is not a valid config ({type(e).__name__}); the workdir is "
                    "damaged: restore config.json or train in a new --workdir") from None


def workdir_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was written with (config.json), locked like a config file's."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise UserError(f"--workdir {workdir!r} holds no config.json; start a new run with "
                    "--config configs/NAME.py")
  config = load_workdir_config(workdir)
  config.lock()
  return config
