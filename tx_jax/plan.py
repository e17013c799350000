"""`tx-jax plan`: compile a config's train step for a TPU slice, from any machine.

The step is the one the training loop runs (same state and batch shardings,
scan, remat, dtype, accumulation), lowered on abstract inputs only
(ShapeDtypeStructs carrying NamedShardings over the slice's devices, so
nothing is allocated) and compiled by libtpu's XLA for the named topology
(`v5e:4x4`, `v4:2x2x2`, `v5p:4x4x4`, `v6e:8x8`, ...). No TPU is needed or
touched: JAX itself stays on the CPU and the devices come from
`jax.experimental.topologies`.

What comes out, per chip: the compiler's memory analysis (arguments, outputs,
donated buffers, temporaries), split into parameters / optimizer state / batch
from the shardings; XLA's FLOP count and its own step-time estimate
(`optimal_seconds` of the cost analysis) or, where it gives none, the roofline
max(FLOPs / peak, bytes accessed / HBM bandwidth); and the MFU those imply.
They are compiler estimates, not measurements: collectives, input pipelines and
host overheads are not in them.

Needs libtpu (`pip install "tx_jax[tpu]"`); without it the command exits 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

from tx_jax.errors import UserError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: peaks per chip from Google's Cloud TPU system-architecture pages."""
  generation: str         # the topology name's prefix: v4, v5e, v5p, v6e
  peak_flops: float       # bf16 FLOP/s per chip
  hbm_bytes: int          # HBM per chip
  hbm_bandwidth: float    # bytes/s per chip
  megacore: bool          # two TensorCores compiled as one device per chip
  slice_name: str         # accelerator type of an N-chip slice, e.g. "v5litepod-{n}"
  source: str


# Values as published (2026-11) on docs.cloud.google.com/tpu/docs/<generation>:
# v4 "275 teraflops (bf16 or int8)", "32 GiB, 1200 GBps"; v5e "197 TFLOPs", "16 GB,
# 819 GBps"; v5p "459" TFLOPs, "HBM capacity per chip (GiB) 95", "2765 GBps"; v6e
# "918 TFLOPs", "32 GB", "1638 GBps". HBM sizes are taken as GiB (the compiler's own
# limit for v5e is 15.75 GiB: 16 GiB less its reservations).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, True, "v4-{cores}",
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, False, "v5litepod-{chips}",
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, True, "v5p-{cores}",
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9, False, "v6e-{chips}",
                "https://cloud.google.com/tpu/docs/v6e"),
}

LIBTPU_HINT = ('tx-jax plan compiles with libtpu, which is not installed: '
               'pip install "tx_jax[tpu]" (or pip install "jax[tpu]==<your jax version>")')


# --- the topology ----------------------------------------------------------------

def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """"v5e:4x4" -> (its Chip, (4, 4)); a UserError naming the choices otherwise."""
  generation, _, shape = name.partition(":")
  dims = tuple(int(d) for d in shape.split("x")) if re.fullmatch(r"\d+(x\d+)*", shape) else ()
  if generation not in CHIPS or not dims or min(dims) < 1:
    raise UserError(f"--topology {name!r} is not GENERATION:SHAPE with GENERATION one of "
                    f"{sorted(CHIPS)}, e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:8x8")
  return CHIPS[generation], dims


def _stay_on_cpu():
  """JAX's own computations (eval_shape, tracing) run on the CPU, never on a local TPU."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_PLATFORMS"):
    try:
      jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # backends already up (e.g. inside a larger program): keep them
      pass


def topology_devices(name: str):
  """(Chip, the slice's devices) from libtpu's topology description; no TPU needed."""
  chip, dims = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(LIBTPU_HINT)
  chips = math.prod(dims)
  # Without a TPU VM's metadata server libtpu would guess these (and warn). Planning
  # never drives a TPU, so it need not hold libtpu's one-process lock (/tmp/libtpu_lockfile):
  # plans run beside each other and beside a training job on the same VM.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        chip.slice_name.format(chips=chips, cores=2 * chips))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  _stay_on_cpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology_name = f"{'v5' if chip.generation == 'v5p' else chip.generation}:{'x'.join(map(str, dims))}"
  kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
  try:
    devices = topologies.get_topology_desc(topology_name=topology_name, platform="tpu",
                                           **kwargs).devices
  except Exception as e:  # libtpu rejects a shape it does not build (e.g. v5e:3x3)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"--topology {name!r}: libtpu has no such slice ({first})") from None
  return chip, devices


# --- the loop's step, abstractly -----------------------------------------------------

def _synthetic_rows(objective, config, rows: int) -> dict:
  return objective.synthetic_batch(rows, config.data.get("seq_len", 0),
                                   config.model.get("vocab_size", 0))


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree))


def _oom(message: str) -> tuple[int | None, int | None]:
  """(bytes required, bytes available) from XLA's out-of-HBM message, if it says."""
  units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}
  size = r"([\d.]+)\s*([KMGT]?)i?B?"
  for pattern in (rf"required[^(]*\({size}\) exceeds available HBM \({size}\)",
                  rf"Used {size} of {size} hbm"):
    m = re.search(pattern, message)
    if m:
      return (int(float(m.group(1)) * units[m.group(2)]),
              int(float(m.group(3)) * units[m.group(4)]))
  return None, None


def _abstract_step(config, devices, check: bool = True):
  """(objective, mesh, rules, the loop's jitted train step, abstract state, abstract batch).

  check=False skips the config's range checks (the cost twins may have no layers).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tx_jax import parallel  # pylint: disable=g-import-not-at-top
  from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from tx_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from tx_jax.train.experiment import (build_objective, completed_config,  # pylint: disable=g-import-not-at-top
                                       make_tx)
  from tx_jax.train.state import state_shapes  # pylint: disable=g-import-not-at-top
  if check:
    config_lib.check_config(config)
  config = completed_config(config)
  objective = build_objective(config)
  tx = make_tx(objective, config)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  rules = parallel.resolve_rules(config.mesh.rules)
  batch_size, accumulate = config.train.batch_size, config.optim.accumulate_steps
  batch_sharding = parallel.batch_sharding(mesh, rules)
  split = parallel.batch_axis_size(mesh, rules)
  if batch_size % (split * accumulate):
    raise UserError(f"train.batch_size={batch_size} does not split over the {split} batch shards "
                    f"of mesh {dict(mesh.shape)} x optim.accumulate_steps={accumulate}; use a "
                    f"multiple of {split * accumulate}")
  boxed = state_shapes(objective, tx, objective.init_len(config), config.train.seed)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      parallel.strip_boxes(boxed), shardings)
  # One synthetic row names the batch's keys, shapes and dtypes; nothing batch-sized is made.
  batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=batch_sharding)
           for k, v in _synthetic_rows(objective, config, 1).items()}
  train_step = step_lib.jit_train_step(objective, tx, config, mesh, shardings, batch_sharding)
  return objective, mesh, rules, train_step, state, batch


def _lower(train_step, mesh, rules, state, batch):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return train_step.lower(state, batch)


def _is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "ut of memory" in str(e)


COST_KEYS = ("flops", "bytes accessed", "optimal_seconds")
# Stack depths in `config.model`: decoder (or only) stack, T5 / VAE encoder, MAE decoder.
DEPTH_KEYS = ("num_layers", "num_encoder_layers", "decoder_num_layers")


def least_depths(model) -> dict[str, int]:
  """The least depth each stack of `model` can be compiled at without changing what the
  others compute: none for an only stack and MAE's two, one for an encoder (depth 0
  would mean "as deep as num_layers") and for a decoder beside it (its cross-attention
  is what reads the encoder: without layers the encoder would be compiled away)."""
  encoder = bool(model.get("num_encoder_layers", 0))
  return {"num_layers": 1 if encoder else 0, "num_encoder_layers": 1, "decoder_num_layers": 0}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {k: float(cost.get(k, 0.0)) for k in COST_KEYS}


# The cost twins are compiled without SPMD windowed einsums: libtpu turns a matmul
# whose operand is all-gathered (or whose result is reduce-scattered), as under FSDP,
# into a while loop over the shards, and cost analysis counts a loop's body once.
# Measured on GPT 124m, FSDP over a v5e-16: 0.46 of the formula's FLOPs per layer
# with them, 1.00 without. What the step computes does not change.
COST_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _loop_free_cost(config, devices) -> dict | None:
  """Per-device cost of the step as if it had no loops; None where a twin runs out of HBM.

  XLA's cost analysis counts a while loop's body once, so a scanned layer
  stack, the micro-batch scan of accumulation and the windowed einsums of
  sharded matmuls would be undercounted. Twins of the step without them carry
  the cost: unrolled layers, one micro-batch (its cost times accumulate_steps;
  exact for the FLOPs up to the optimizer update, which runs once per step), no
  windowed einsums. For scanned stacks a twin is compiled with every stack at
  its least depth (no layers where that is possible, `least_depths`) and, per
  stack, one with that stack a layer deeper; the per-layer difference is
  extrapolated to the real depth (layers of a stack are identical, so this is
  exact up to XLA's fusion choices). Compile time grows with depth, so the
  shallowest pair is the cheapest to compile.
  """
  import copy  # pylint: disable=g-import-not-at-top
  model = config.model
  accumulate = config.optim.accumulate_steps
  depths = {k: model[k] for k in DEPTH_KEYS if model.get(k, 0)} if model.get("scan_layers") else {}
  least = {k: v for k, v in least_depths(model).items() if k in depths}

  def twin(**depth):
    c = copy.deepcopy(config)
    with c.unlocked():
      c.model.scan_layers = False
      c.model.update(depth)
      c.optim.accumulate_steps = 1
      c.train.batch_size = config.train.batch_size // accumulate
    _, mesh, rules, train_step, state, batch = _abstract_step(c, devices, check=False)
    try:
      compiled = _lower(train_step, mesh, rules, state, batch).compile(
          compiler_options=COST_OPTIONS)
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e):
        return None
      raise
    return {k: v * accumulate for k, v in _cost(compiled).items()}

  base = twin(**least)
  if base is None:
    return None
  total = dict(base)
  for key, depth in depths.items():
    deeper = twin(**{**least, key: least[key] + 1})
    if deeper is None:
      return None
    for k in COST_KEYS:
      total[k] += (depth - least[key]) * (deeper[k] - base[k])
  return total


def plan(config, topology: str, devices=None, chip=None) -> dict:
  """Compiles the loop's train step of `config` for `topology`; the plan as a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  if devices is None:
    chip, devices = topology_devices(topology)
  objective, mesh, rules, train_step, state, batch = _abstract_step(config, devices)
  chips, batch_size = len(devices), config.train.batch_size
  accumulate = config.optim.accumulate_steps
  units = objective.units_per_batch(config)
  model_flops = objective.flops_per_unit(state.params, config.data.get("seq_len", 0)) * units
  out = {"topology": topology, "chips": chips, "mesh": dict(mesh.shape),
         "rules": config.mesh.rules if isinstance(config.mesh.rules, str) else "custom",
         "remat": config.model.get("remat", "none"), "dtype": config.model.get("dtype"),
         "scan_layers": bool(config.model.get("scan_layers", False)),
         "batch_size": batch_size, "accumulate_steps": accumulate,
         "hbm_bytes_per_chip": chip.hbm_bytes,
         "params": int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))),
         "params_bytes_per_chip": _shard_bytes(state.params),
         "optimizer_bytes_per_chip": _shard_bytes(state.opt_state),
         "batch_bytes_per_chip": _shard_bytes(batch),
         "unit": objective.unit, f"{objective.unit}_per_step": units,
         "model_flops_per_step": model_flops}
  t0 = time.perf_counter()
  lowered = _lower(train_step, mesh, rules, state, batch)
  try:
    step = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    message = str(e)
    needed, available = _oom(message)
    out.update(fits=False, compile_s=time.perf_counter() - t0, bytes_per_chip=needed,
               shortfall_bytes=None if needed is None else needed - (available or chip.hbm_bytes),
               compiler_hbm_limit_bytes=available,
               error=message.strip().splitlines()[0][:300])
    return out
  mem = step.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  loop_free = _loop_free_cost(config, devices)
  if loop_free is not None:
    cost = loop_free
    cost_source = ("unrolled twins, per-layer extrapolation" if config.model.get("scan_layers")
                   else "twin without loops")
  else:
    cost, cost_source = _cost(step), "compiled step (loops counted once: an undercount)"
  out["compile_s"] = time.perf_counter() - t0
  flops = cost["flops"] * chips            # the analysis is per device
  accessed = cost["bytes accessed"]
  roofline = max(flops / chips / chip.peak_flops, accessed / chip.hbm_bandwidth)
  if cost["optimal_seconds"] > 0:
    est_step_s, source = cost["optimal_seconds"], "xla optimal_seconds"
  else:
    est_step_s, source = roofline, "roofline max(flops / peak, bytes accessed / HBM bandwidth)"
  out.update(
      fits=total <= chip.hbm_bytes, bytes_per_chip=total,
      shortfall_bytes=max(0, total - chip.hbm_bytes),
      temp_bytes_per_chip=mem.temp_size_in_bytes,
      argument_bytes_per_chip=mem.argument_size_in_bytes,
      output_bytes_per_chip=mem.output_size_in_bytes,
      donated_bytes_per_chip=mem.alias_size_in_bytes,
      flops_per_step=flops, bytes_accessed_per_chip=accessed, cost_source=cost_source,
      est_step_s=est_step_s, est_step_source=source, roofline_step_s=roofline,
      est_units_per_s=units / est_step_s if est_step_s else None,
      est_mfu=model_flops / (est_step_s * chips * chip.peak_flops) if est_step_s else None,
      peak_flops_per_chip=chip.peak_flops)
  return out


# --- sweep -----------------------------------------------------------------------

REMAT_POLICIES = ("none", "dots", "full")


def mesh_candidates(chips: int, num_heads: int, batch_size: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) splits of `chips`: tensor divides the heads (at most 8), and
  data x fsdp divides the batch."""
  out = []
  for tensor in (t for t in (1, 2, 4, 8) if chips % t == 0 and num_heads % t == 0):
    rest = chips // tensor
    for fsdp in (f for f in range(1, rest + 1) if rest % f == 0):
      data = rest // fsdp
      if batch_size % (data * fsdp) == 0:
        out.append((data, fsdp, tensor))
  return out


def sweep(config, topology: str, remats=None, log=None) -> list[dict]:
  """Plans every mesh split x remat policy (rules fsdp_tp); fits first, fastest first."""
  import copy  # pylint: disable=g-import-not-at-top
  chip, devices = topology_devices(topology)
  plans = []
  remats = REMAT_POLICIES if remats is None else remats
  for data, fsdp, tensor in mesh_candidates(len(devices), config.model.num_heads,
                                            config.train.batch_size):
    for remat in remats:
      c = copy.deepcopy(config)
      with c.unlocked():
        c.mesh.update(data=data, fsdp=fsdp, tensor=tensor, rules="fsdp_tp")
        c.model.remat = remat
      overrides = (f"--config.mesh.data={data} --config.mesh.fsdp={fsdp} "
                   f"--config.mesh.tensor={tensor} --config.mesh.rules=fsdp_tp "
                   f"--config.model.remat={remat}")
      try:
        p = plan(c, topology, devices, chip)
      except UserError as e:
        p = {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "remat": remat,
             "fits": False, "error": str(e)}
      p["overrides"] = overrides
      plans.append(p)
      if log:
        log(_row(p))
  return sorted(plans, key=lambda p: (not p["fits"], p.get("est_step_s") or math.inf,
                                      p.get("bytes_per_chip") or math.inf))


# --- output ----------------------------------------------------------------------

def _gib(n) -> str:
  return "?" if n is None else f"{n / GiB:.2f}"


def _row(p: dict) -> str:
  m = p["mesh"]
  step_s = p.get("est_step_s")
  mfu = p.get("est_mfu")
  return (f"{m['data']:>4} {m['fsdp']:>4} {m['tensor']:>6}  {p['remat']:<5} "
          f"{'yes' if p['fits'] else 'NO':<4} {_gib(p.get('bytes_per_chip')):>8} "
          f"{_gib(p.get('params_bytes_per_chip')):>7} {_gib(p.get('optimizer_bytes_per_chip')):>7} "
          f"{_gib(p.get('temp_bytes_per_chip')):>7} "
          f"{'-' if step_s is None else f'{step_s * 1e3:.1f}':>9} "
          f"{'-' if mfu is None else f'{mfu:.2f}':>5}")


TABLE_HEAD = ("data fsdp tensor  remat fits GiB/chip  params   optim    temp   step ms   mfu")


def table(plans: list[dict]) -> str:
  """A short human table of plans (sizes per chip in GiB; times are XLA estimates)."""
  p0 = plans[0]
  lines = [f"plan: {p0['topology']} ({p0['chips']} chips, "
           f"{_gib(p0['hbm_bytes_per_chip'])} GiB HBM each)", TABLE_HEAD]
  lines += [_row(p) for p in plans]
  lines.append("step ms and mfu are XLA's compile-time estimates, not measurements")
  return "\n".join(lines)


def run(config, topology: str, do_sweep: bool = False, out=None, err=None) -> dict:
  """`tx-jax plan`: the JSON line on stdout (its only line), the table on stderr.

  With do_sweep the line is the fastest plan that fits (or the smallest that
  does not) plus `sweep`, every candidate's summary in rank order.
  """
  import json  # pylint: disable=g-import-not-at-top
  out, err = out or sys.stdout, err or sys.stderr   # looked up now: they may be redirected
  if do_sweep:
    err.write(f"plan: sweeping {topology}\n{TABLE_HEAD}\n")
    plans = sweep(config, topology, log=lambda line: err.write(line + "\n"))
    result = dict(plans[0])
    keys = ("mesh", "remat", "fits", "bytes_per_chip", "est_step_s", "est_mfu", "overrides",
            "error")
    result["sweep"] = [{k: p[k] for k in keys if k in p} for p in plans]
    shown = [p for p in plans if "chips" in p]
  else:
    result = plan(config, topology)
    shown = [result]
  if shown:
    err.write(table(shown) + "\n")
  out.write(json.dumps(result) + "\n")
  out.flush()
  return result
