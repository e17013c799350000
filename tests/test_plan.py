"""`tx-jax plan`: the loop's train step compiled by libtpu for TPU slices, on this CPU."""

import json
import math

import jax
import numpy as np
import pytest

from tx_jax import cli, parallel, plan as plan_lib
from tx_jax.train import config as config_lib
from tx_jax.train.experiment import build_objective, make_tx

TOPOLOGY = "v5e:2x2"


def _config(spec, *overrides):
  return config_lib.apply_overrides(config_lib.load_config_file(spec), list(overrides))


_PLANS = {}


def _plan(spec, *overrides):
  """Plans are compiled once per module (each is a libtpu compile of a whole step)."""
  key = (spec, overrides)
  if key not in _PLANS:
    _PLANS[key] = plan_lib.plan(_config(spec, *overrides), TOPOLOGY)
  return _PLANS[key]


def _state_bytes(spec, *overrides):
  """(params, optimizer state) bytes of the whole state, from jax.eval_shape alone."""
  config = _config(spec, *overrides)
  objective = build_objective(config)
  params = parallel.strip_boxes(jax.eval_shape(
      lambda: objective.init_params(jax.random.key(0), objective.init_len(config))))
  opt = jax.eval_shape(make_tx(objective, config).init, params)
  size = lambda t: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(t))
  return size(params), size(opt)


@pytest.mark.parametrize("spec", ["configs/gpt.py", "configs/bert.py", "configs/t5.py",
                                  "configs/mae.py"])
def test_tiny_configs_plan_on_v5e(spec):
  p = _plan(spec)
  assert p["topology"] == TOPOLOGY and p["chips"] == 4 and p["fits"] is True
  assert p["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert p["hbm_bytes_per_chip"] == 16 * 2**30
  # Data parallel: every chip holds the whole state, and the compiler's arguments are
  # that state plus a quarter of the batch (within TPU layout padding).
  params, opt = _state_bytes(spec)
  assert p["params_bytes_per_chip"] == params and p["optimizer_bytes_per_chip"] == opt
  args = p["argument_bytes_per_chip"]
  state = params + opt + p["batch_bytes_per_chip"]
  assert state <= args <= 2 * state
  assert p["bytes_per_chip"] >= args + p["temp_bytes_per_chip"] - p["donated_bytes_per_chip"]
  assert p["flops_per_step"] > 0 and p["est_step_s"] > 0 and 0 < p["est_mfu"] < 1
  unit = "images" if spec.endswith("mae.py") else "tokens"
  assert p[f"{unit}_per_step"] > 0
  assert p["est_units_per_s"] == pytest.approx(p[f"{unit}_per_step"] / p["est_step_s"])


def test_fsdp_over_four_chips_holds_a_quarter_of_the_state():
  p = _plan("configs/gpt.py", "mesh.data=1", "mesh.fsdp=4")
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and p["fits"]
  params, opt = _state_bytes("configs/gpt.py")
  # Within padding: only the few 1-D leaves without an `embed` axis (biases) stay whole.
  assert p["params_bytes_per_chip"] == pytest.approx(params / 4, rel=0.03)
  assert p["optimizer_bytes_per_chip"] == pytest.approx(opt / 4, rel=0.03)
  # The compiled program takes those shards as its arguments: more than a quarter (TPU
  # layouts pad the 32-wide shards to 128 lanes), far less than the whole state.
  state = p["params_bytes_per_chip"] + p["optimizer_bytes_per_chip"]
  assert state + p["batch_bytes_per_chip"] <= p["argument_bytes_per_chip"] < 0.6 * (params + opt)


def _formula_flops(spec, p, *overrides):
  """6N + 12·L·d·T per token (PaLM appendix B), times tokens per step."""
  c = _config(spec, *overrides)
  m, t = c.model, c.data.seq_len
  return (6 * p["params"] + 12 * m.num_layers * m.d_model * t) * p["tokens_per_step"]


@pytest.mark.parametrize("overrides,low,high", [
    ((), 0.95, 1.15),
    # Scanned, fully rematerialised: one more forward pass (8N instead of 6N), and the
    # scan's cost extrapolated from unrolled twins.
    (("model.scan_layers=true", "model.remat=full"), 1.2, 1.45),
])
def test_xla_flops_match_the_6n_formula(overrides, low, high):
  p = _plan("configs/gpt.py", *overrides)
  ratio = p["flops_per_step"] / _formula_flops("configs/gpt.py", p, *overrides)
  print(f"XLA FLOPs / (6N + 12LdT) x tokens = {ratio:.3f} with {overrides or 'defaults'}")
  assert low <= ratio <= high
  assert p["model_flops_per_step"] == pytest.approx(_formula_flops("configs/gpt.py", p))


def test_fsdp_step_flops_match_the_formula_on_a_sixteen_chip_slice():
  # Large enough that libtpu turns FSDP's all-gathered matmuls into windowed-einsum
  # loops, whose body cost analysis counts once (0.76 of the formula for this step).
  overrides = ("mesh.data=1", "mesh.fsdp=16", "model.d_model=768", "model.mlp_dim=3072",
               "model.num_heads=12", "model.num_layers=1", "train.batch_size=1024")
  p = plan_lib.plan(_config("configs/gpt.py", *overrides), "v5e:4x4")
  assert p["chips"] == 16 and p["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
  ratio = p["flops_per_step"] / _formula_flops("configs/gpt.py", p, *overrides)
  print(f"FSDP-16: XLA FLOPs / (6N + 12LdT) x tokens = {ratio:.3f}")
  assert 0.95 <= ratio <= 1.15


@pytest.mark.parametrize("spec", ["configs/gpt.py", "configs/t5.py", "configs/mae.py"])
def test_scanned_stack_costs_what_the_unrolled_one_does(spec):
  # The scanned cost comes from twins without layers (an encoder keeps one) and a layer
  # deeper per stack: T5's encoder and decoder, MAE's encoder and decoder (the VAE's
  # two stacks have T5's depth keys, so they are twinned the same way).
  unrolled = _plan(spec, "model.remat=full")
  scanned = _plan(spec, "model.scan_layers=true", "model.remat=full")
  assert scanned["cost_source"].startswith("unrolled twins")
  assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"], rel=0.02)


def test_accumulated_step_costs_what_the_whole_batch_does():
  whole = _plan("configs/gpt.py")
  micro = _plan("configs/gpt.py", "optim.accumulate_steps=4")
  assert micro["cost_source"] == "twin without loops" and micro["accumulate_steps"] == 4
  # The twin's optimizer update is counted once per micro-batch: 3% of this tiny step
  # (2,048 tokens), nothing at real batch sizes.
  assert micro["flops_per_step"] == pytest.approx(whole["flops_per_step"], rel=0.05)
  # One micro-batch's activations live at a time.
  assert micro["temp_bytes_per_chip"] < whole["temp_bytes_per_chip"]


def _cli(capsys, *args):
  code = cli.main(["plan", *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_prints_one_json_line_and_a_config_that_does_not_fit_is_not_an_error(capsys):
  # 2^16 rows of 128 tokens: the float32 logits alone are 8 GiB per chip, twice over.
  code, out, err = _cli(capsys, "--config", "configs/gpt.py", "--topology", TOPOLOGY,
                        "--config.train.batch_size=65536")
  assert code == 0
  lines = out.strip().splitlines()
  assert len(lines) == 1
  p = json.loads(lines[0])
  assert p["fits"] is False and p["shortfall_bytes"] > 0
  assert "GiB/chip" in err and "estimates" in err


def test_mesh_that_does_not_divide_the_topology_exits_2(capsys):
  code, out, err = _cli(capsys, "--config", "configs/gpt.py", "--topology", TOPOLOGY,
                        "--config.mesh.data=3")
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and "mesh" in err and "4" in err


def test_unknown_topology_exits_2(capsys):
  code, _, err = _cli(capsys, "--config", "configs/gpt.py", "--topology", "v9x:4x4")
  assert code == 2 and len(err.strip().splitlines()) == 1 and "v5e:4x4" in err


def test_without_libtpu_exits_2_saying_what_to_install(capsys, monkeypatch):
  real = plan_lib.importlib.util.find_spec
  monkeypatch.setattr(plan_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  code, out, err = _cli(capsys, "--config", "configs/gpt.py", "--topology", TOPOLOGY)
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and 'pip install "tx_jax[tpu]"' in err


def test_topologies_have_the_published_chip_counts():
  for name, chips in (("v4:2x2x2", 8), ("v5e:4x4", 16), ("v5p:2x2x2", 8), ("v6e:8x8", 64)):
    chip, devices = plan_lib.topology_devices(name)
    assert len(devices) == chips, name
    assert chip.generation == name.split(":")[0]


def test_oom_message_is_read():
  needed, available = plan_lib._oom(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (24.00G) exceeds available HBM (15.75G).")
  assert needed == 24 * 2**30 and available == int(15.75 * 2**30)


def test_mesh_candidates_split_every_chip():
  cands = plan_lib.mesh_candidates(16, num_heads=12, batch_size=32)
  assert all(np.prod(c) == 16 for c in cands) and len(set(cands)) == len(cands)
  assert {c[2] for c in cands} == {1, 2, 4}       # 8 does not divide 12 heads
  assert (16, 1, 1) in cands and (1, 16, 1) in cands and (1, 4, 4) in cands


def test_1b_size_has_1_3b_parameters():
  # 24 x (4d² + 2·d·4d + biases and norms) + tied 50257 x d tokens + 2048 x d positions.
  d, layers = 2048, 24
  per_layer = 4 * d * d + 4 * d + 2 * d * 4 * d + 4 * d + d + 4 * d
  expected = layers * per_layer + 50257 * d + 2048 * d + 2 * d
  params, _ = _state_bytes("configs/gpt.py:1b")
  assert params == 4 * expected == 4 * 1_315_723_264


@pytest.mark.slow
def test_sweep_ranks_the_splits_that_fit_by_estimated_step_time(capsys, monkeypatch):
  monkeypatch.setattr(plan_lib, "mesh_candidates", lambda chips, heads, batch: [
      (4, 1, 1), (1, 1, 4)])
  monkeypatch.setattr(plan_lib, "REMAT_POLICIES", ("none", "full"))
  result = plan_lib.run(_config("configs/gpt.py"), TOPOLOGY, do_sweep=True)
  out, err = capsys.readouterr()
  assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
  ranked = result["sweep"]
  assert len(ranked) == 4 and all(r["fits"] for r in ranked)
  times = [r["est_step_s"] for r in ranked]
  assert times == sorted(times) and result["est_step_s"] == times[0]
  # Full remat recomputes the forward pass: never faster than no remat on the same mesh.
  by = {(r["mesh"]["tensor"], r["remat"]): r["est_step_s"] for r in ranked}
  assert by[(1, "full")] >= by[(1, "none")] and by[(4, "full")] >= by[(4, "none")]
  # Each row's overrides rebuild that plan.
  best = result["overrides"].split()
  again = plan_lib.plan(_config("configs/gpt.py", *[o[len("--config."):] for o in best]), TOPOLOGY)
  assert again["est_step_s"] == pytest.approx(result["est_step_s"])
  assert err.count("\n") >= 6
