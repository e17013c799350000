"""Sharding on 8 fake CPU devices: a train step on any mesh equals the 1-device step,
parameters are split as the rules say (measured bytes per device), and bad meshes /
rules are user errors."""

import functools
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

from tx_jax import cli, parallel
from tx_jax.errors import UserError
from tx_jax.models import TransformerConfig
from tx_jax.models.vit import vit_configs
from tx_jax.objectives.causal_lm import CausalLM
from tx_jax.objectives.classification import Classification
from tx_jax.objectives.mae import MAEObjective
from tx_jax.objectives.masked_lm import MaskedLM
from tx_jax.objectives.span_corruption import SpanCorruption
from tx_jax.train import optim, step as step_lib
from tx_jax.train.state import init_state, state_shapes

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
B, T, V = 8, 16, 64
# Adam's first update is lr * g / (|g| + eps) per entry, so it turns a rounding
# error d of a gradient entry into a parameter change of up to lr * d / eps: with
# the usual eps = 1e-8 an entry whose terms nearly cancel (|g| ~ 1e-7 next to
# terms ~ 1e-3) moves by ~lr * 1e-2 on one mesh and not on another. eps = 1e-3
# makes the update a smooth function of the gradient, so the updated parameters
# can be held to the same fp32-rounding tolerance as the gradients.
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0,
    accumulate_steps=1, b1=0.9, b2=0.95, eps=1e-3))


def mesh_of(shape):
  return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape))))


# --- Mesh and rules -------------------------------------------------------------------

def test_mesh_shape_fills_and_checks():
  assert parallel.mesh_shape([-1, 1, 1], 8) == (8, 1, 1)
  assert parallel.mesh_shape([1, -1, 4], 8) == (1, 2, 4)
  assert parallel.mesh_shape([2, 2, 2], 8) == (2, 2, 2)
  for bad in ([3, 1, 1], [-1, 3, 1], [-1, -1, 1], [0, 8, 1], [2, 2, 1]):
    with pytest.raises(UserError, match="mesh"):
      parallel.mesh_shape(bad, 8)


def test_rules_presets_text_and_errors():
  assert dict(parallel.resolve_rules("fsdp"))["embed"] == "fsdp"
  text = '[["act_batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", null]]'
  want = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))
  assert parallel.resolve_rules(text) == want                          # JSON
  assert parallel.resolve_rules(text.replace("null", "None")) == want  # Python
  with pytest.raises(UserError, match="pairs"):
    parallel.resolve_rules('[["embed", "fsdp"')
  with pytest.raises(UserError, match="pair"):
    parallel.resolve_rules([["embed", "fsdp", "tensor"]])
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    parallel.resolve_rules([["embed", "model"]])
  with pytest.raises(UserError, match="not a preset"):
    parallel.resolve_rules("zero3")


# --- One train step on every mesh equals the 1-device step ---------------------------------

def lm_batch(rng):
  tokens = rng.integers(1, V, (B, T + 1)).astype(np.int32)
  segments = np.ones((B, T), np.int32)
  segments[::2, T // 2:] = 2  # two packed documents in every other row
  segments[1, -3:] = 0        # and some padding
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  positions[::2, T // 2:] -= T // 2  # positions restart in the second document
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
          "positions": positions, "weights": (segments > 0).astype(np.float32)}


def mlm_batch(rng):
  tokens = rng.integers(2, V, (B, T)).astype(np.int32)
  masked = rng.random((B, T)) < 0.25
  segments = np.ones((B, T), np.int32)
  segments[3, -4:] = 0
  masked &= segments > 0
  return {"inputs": np.where(masked, 1, tokens), "targets": tokens, "segment_ids": segments,
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          "weights": masked.astype(np.float32)}


def span_batch(objective):
  batch = objective.synthetic_batch(B, T, V, seed=0)
  batch["inputs_segment_ids"][2, -5:] = 0     # a padded encoder row
  batch["targets_segment_ids"][5, -3:] = 0    # and a padded target row
  batch["weights"][5, -3:] = 0
  return batch


FAMILIES = ["decoder", "encoder", "encoder_decoder", "mae", "classifier"]
# MAE's first gradient is dominated by the pixel readout: the encoder's query biases
# get ~3e-7 of its norm (real signal; the key biases' ~1e-13 is rounding noise), and
# Adam (eps 1e-3) moves the encoder's kernels by ~1e-3 relative.
NOISE_BELOW = {"mae": 1e-9}
MOVED_ABOVE = {"mae": 1e-4}


def family(name):
  """(objective, batch) of a model family, tiny, with the objective it trains with."""
  rng = np.random.default_rng(0)
  tiny = dict(vocab_size=V, num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=T)
  if name == "decoder":
    return CausalLM(TransformerConfig(**tiny), np.ones(V, np.float32)), lm_batch(rng)
  if name == "encoder":  # BERT-style: post-LN, separate readout
    cfg = TransformerConfig(**tiny, pre_norm=False, tie_embeddings=False)
    return MaskedLM(cfg, np.ones(V, np.float32)), mlm_batch(rng)
  if name == "classifier":  # a BERT-style body, mean-pooled, 5 classes; padded rows
    cfg = TransformerConfig(**tiny, pre_norm=False)
    objective = Classification("encoder", cfg, [f"c{i}" for i in range(5)], seq_len=T)
    batch = objective.synthetic_batch(B, T, V, seed=0)
    batch["segment_ids"][2, -5:] = 0
    batch["tokens"][2, -5:] = 0
    batch["valid"][7] = 0
    return objective, batch
  if name == "mae":  # ViT on 8x8 images, 2x2 patches, 75% masked per example; 16-wide decoder
    enc, vit, dec = vit_configs(dict(
        image_size=8, patch_size=2, channels=1, num_layers=1, d_model=32, num_heads=4,
        mlp_dim=64, decoder_num_layers=1, decoder_d_model=16, decoder_num_heads=2,
        decoder_mlp_dim=32))
    images = rng.normal(size=(B, 8, 8, 1)).astype(np.float32)
    return (MAEObjective(enc, vit=vit, decoder=dec),
            {"image": images, "valid": np.ones(B, np.float32)})
  # T5-style: relative position bias, RMSNorm, no biases, shared embeddings
  cfg = TransformerConfig(**{**tiny, "max_len": 0}, num_encoder_layers=1, positions="relative",
                          norm="rmsnorm", use_bias=False)
  objective = SpanCorruption(cfg, np.ones(V, np.float32))
  return objective, span_batch(objective)


def sharding_setup(abstract_boxed, shape, rules="fsdp_tp"):
  """Mesh, rules, shardings of a boxed abstract tree, batch sharding: as the train loop."""
  mesh, rules = mesh_of(shape), parallel.resolve_rules(rules)
  return (mesh, rules, parallel.logical_shardings(abstract_boxed, mesh, rules),
          parallel.batch_sharding(mesh, rules))


@functools.lru_cache(maxsize=None)
def train_step(name, shape=None):
  """(initial state, state after one train step, metrics, init memory stats).

  shape None: one device, no mesh. Otherwise exactly the train loop's path:
  init compiled straight into the shardings, then the sharded step.
  """
  objective, batch = family(name)
  tx = optim.make_optimizer(OPTIM, 10)
  step = step_lib.make_train_step(objective, tx)
  init = lambda: init_state(objective, tx, T, seed=0)
  if shape is None:
    with jax.default_device(jax.devices()[0]):
      state = jax.jit(init)()
      return (state, *jax.jit(step)(state, batch), None)
  mesh, rules, shardings, batch_sharding = sharding_setup(
      state_shapes(objective, tx, T, 0), shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled_init = jax.jit(init, out_shardings=shardings).lower().compile()
    state = compiled_init()
    new, metrics = jax.jit(step, in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, parallel.replicated(mesh)))(
                               state, parallel.global_batch(batch, batch_sharding))
  return state, new, metrics, compiled_init.memory_analysis()


def gpt_step(shape=None):
  return train_step("decoder", shape)


def adam_mu(state):
  """First Adam moment after one step = (1 - b1) * clipped gradient."""
  leaves = jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  return next(x for x in leaves if isinstance(x, optax.ScaleByAdamState)).mu


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close_trees(new_grads, ref_grads, new_params=None, ref_params=None,
                       noise_below=1e-6):
  """Each gradient (and updated parameter) tensor within 1e-5 relative error.

  A gradient that is exactly zero in real arithmetic (the attention key bias:
  softmax ignores a constant added to every score) is pure rounding noise,
  which Adam scales up to +-lr on any device count; it must stay noise
  (below noise_below x the global gradient norm).
  """
  g_norm = float(optax.tree.norm(ref_grads))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref_grads)]
  leaves = lambda t: jax.tree_util.tree_leaves(t) if t is not None else [None] * len(paths)
  noise = []
  for key, gn, gr, pn, pr in zip(paths, leaves(new_grads), leaves(ref_grads),
                                 leaves(new_params), leaves(ref_params)):
    if np.linalg.norm(gr) < noise_below * g_norm:
      assert np.linalg.norm(gn) < noise_below * g_norm, key
      noise.append(key)
      continue
    assert rel(gn, gr) <= 1e-5, key
    if pn is not None:
      assert rel(pn, pr) <= 1e-5, key
  assert all(k.endswith("['key']['bias']") for k in noise), noise


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", FAMILIES)
def test_train_step_on_mesh_equals_single_device(name, shape):
  start, ref, ref_m, _ = train_step(name)
  _, new, m, _ = train_step(name, shape)
  assert rel(m["train/loss"], ref_m["train/loss"]) <= 1e-5
  assert rel(m["grad_norm"], ref_m["grad_norm"]) <= 1e-5
  assert_close_trees(adam_mu(new), adam_mu(ref), new.params, ref.params,
                     NOISE_BELOW.get(name, 1e-6))
  assert int(new.step) == 1 and int(new.skipped) == 0
  # The update really moved every large parameter (so the comparison means something).
  for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(start.params)):
    if a.size >= 512:
      assert rel(a, b) > MOVED_ABOVE.get(name, 1e-3)


# --- Parameters are split as the rules say (measured on the devices) ------------------------

# How many ways each array is split, by the kernels' logical names: under fsdp_tp on
# (1,2,4) `embed` is split 2 ways and heads / mlp / vocab 4 ways; `positions` never.
SPLIT_1x2x4 = {"query/kernel": 8, "key/kernel": 8, "out/kernel": 8, "wi/kernel": 8,
               "wo/kernel": 8, "tokens/embedding": 8, "pos/embedding": 2, "wi/bias": 4,
               "wo/bias": 2, "query/bias": 4, "mlp_norm/scale": 2}


def leaf_name(path):
  keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  return "/".join(str(k) for k in keys[-2:])


def nbytes(x):
  return int(np.prod(x.shape)) * x.dtype.itemsize


def test_fsdp8_device_holds_an_eighth_of_every_kernel():
  state, _, _, init_memory = gpt_step((1, 8, 1))
  leaves = jax.tree_util.tree_leaves(state)  # params and both Adam moments
  kernels = [x for x in leaves if x.size >= 512]  # all on `embed`; biases are smaller
  assert len(kernels) == 3 * 8  # 8 kernels / embeddings, each with mu and nu
  for x in kernels:
    per_device = parallel.bytes_per_device(x)
    assert len(per_device) == 8 and set(per_device.values()) == {nbytes(x) // 8}
  # All that is not an eighth: biases / norms not on `embed`, and scalars.
  rest = sum(nbytes(x) for x in leaves if x.size < 512)
  total = sum(map(nbytes, leaves))
  per_device = parallel.bytes_per_device(state)
  assert max(per_device.values()) <= sum(map(nbytes, kernels)) // 8 + rest < total / 6
  # The compiled init never holds the whole state on a device: its per-device
  # outputs are the shards, and its scratch stays far below a full copy.
  assert init_memory.output_size_in_bytes <= max(per_device.values()) * 1.05
  assert init_memory.temp_size_in_bytes < total / 4
  # And it makes the same values as the 1-device init.
  ref = gpt_step()[0]
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_fsdp_tp_and_dp_bytes_per_device_follow_the_rules():
  state = gpt_step((1, 2, 4))[0]
  seen = set()
  for tree in (state.params, adam_mu(state)):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      name = leaf_name(path)
      if name in SPLIT_1x2x4:
        per_device = parallel.bytes_per_device(x)
        assert set(per_device.values()) == {nbytes(x) // SPLIT_1x2x4[name]}, (name, per_device)
        seen.add(name)
  assert seen == set(SPLIT_1x2x4)
  # Data parallel (8,1,1): every device holds the whole state.
  state = gpt_step((8, 1, 1))[0]
  total = sum(map(nbytes, jax.tree_util.tree_leaves(state)))
  assert set(parallel.bytes_per_device(state).values()) == {total}


# (A checkpoint written with FSDP on 8 devices restoring onto (2,1,1) and 1 device
# is tested in test_multihost.py, on the checkpoints of its end-to-end runs.)


# --- Bad meshes and rules are user errors (exit 2, one line) --------------------------------

def run_cli(args, devices=1, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(devices)}
  return subprocess.run([sys.executable, "-m", "tx_jax", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


def test_mesh_that_does_not_fit_exits_2(tmp_path):
  wd = tmp_path / "run"
  out = run_cli(["train", "--config", "configs/gpt.py", "--workdir", str(wd),
                 "--config.mesh.data=3"], devices=8)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "needs 3 devices but 8 are available" in lines[0], lines
  assert not wd.exists()


def test_rule_with_unknown_mesh_axis_exits_2(tmp_path, capsys):
  wd = tmp_path / "run"
  code = cli.main(["train", "--config", os.path.join(ROOT, "configs/gpt.py"), "--workdir",
                   str(wd), '--config.mesh.rules=[["embed", "model"]]'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "unknown mesh axis 'model'" in err[0]
  assert not wd.exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2"], "needs all of --coordinator-address, --num-processes"),
    (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id=2 must be in 0..1"),
])
def test_incomplete_multihost_flags_exit_2(tmp_path, capsys, flags, message):
  wd = tmp_path / "run"
  code = cli.main(["train", "--config", os.path.join(ROOT, "configs/gpt.py"), "--workdir",
                   str(wd), *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
  assert not wd.exists()
