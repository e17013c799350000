"""Device mesh, logical-axis rules and shardings.

Models name their axes logically (`embed`, `heads`, `mlp`, `act_batch`, ...);
this module maps those names onto a ("data", "fsdp", "tensor") mesh through a
rules table that lives in the config (`mesh.rules`). Nothing here knows a model
beyond those names.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tx_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Axes of size 1 cost nothing, so one table serves
# data parallel (8,1,1), FSDP (1,8,1) and FSDP + tensor parallel (1,2,4).
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # Parameters replicated, batch split over every axis.
    "dp": (("act_batch", ("data", "fsdp", "tensor")),),
    # Parameters sharded along `embed` over fsdp (ZeRO-3 style), batch over data+fsdp.
    "fsdp": (("act_batch", ("data", "fsdp")), ("embed", "fsdp")),
    # FSDP plus Megatron-style tensor parallelism over heads / mlp / vocab.
    "fsdp_tp": (("act_batch", ("data", "fsdp")), ("embed", "fsdp"),
                ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                ("act_heads", "tensor"), ("act_mlp", "tensor")),
}


def resolve_rules(rules: str | Sequence) -> tuple[tuple[str, Any], ...]:
  """A preset name or a list of [logical, mesh axes] pairs, checked.

  The list may also come as JSON or Python text (e.g. from
  `--config.mesh.rules='[["embed", "fsdp"]]'`); a mesh axis of None (null) or []
  leaves that logical axis replicated.
  """
  if isinstance(rules, str):
    if rules in RULE_PRESETS:
      return RULE_PRESETS[rules]
    if not rules.lstrip().startswith(("[", "(")):
      raise UserError(f"mesh.rules={rules!r} is not a preset; choose one of "
                      f"{sorted(RULE_PRESETS)} or give a list of [logical, mesh_axis] pairs")
    try:
      rules = json.loads(rules)
    except ValueError:
      pass
    try:
      rules = ast.literal_eval(rules) if isinstance(rules, str) else rules
    except (ValueError, SyntaxError):
      raise UserError(f"mesh.rules={rules!r} is not a list of [logical, mesh_axis] pairs, "
                      'e.g. [["act_batch", ["data", "fsdp"]], ["embed", "fsdp"]]') from None
  out = []
  for pair in rules:
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not isinstance(pair[0], str)):
      raise UserError(f"mesh rule {pair!r} is not a [logical_name, mesh_axis] pair")
    logical, axes = pair
    names = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
    for axis in names:
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"mesh rule for {logical!r} names unknown mesh axis {axis!r}; "
                        f"mesh axes are {MESH_AXES}")
    names = tuple(a for a in names if a is not None)
    out.append((logical, names[0] if len(names) == 1 else names or None))
  return tuple(out)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so the product equals num_devices; checks the fit."""
  sizes = [int(s) for s in sizes]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid: use positive "
                    "sizes and at most one -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} "
                      f"devices: {known} does not divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                    f"but {num_devices} are available; set mesh.data/fsdp/tensor so their "
                    "product matches (-1 fills)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh from config sizes over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor], len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _fit(shape: Sequence[int], spec: PartitionSpec, mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (replicates that dim instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    keep = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in keep) * mesh.shape[name]) == 0:
        keep.append(name)
    fitted.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return PartitionSpec(*fitted)


def logical_shardings(abstract_tree, mesh, rules):
  """NamedShardings for a boxed (nn.Partitioned) abstract pytree, e.g. from eval_shape."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(abstract_tree)
  return jax.tree_util.tree_map(
      lambda s, x: NamedSharding(mesh, _fit(x.shape, s, mesh)), mesh_specs, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the axes `act_batch` maps to."""
  spec = nn.logical_to_mesh_axes(("act_batch",), rules)
  return NamedSharding(mesh, spec)


# XLA options for what tx_jax compiles to run on CPUs. By default XLA's CPU backend hands
# dots and reductions to YNNPACK, a path it marks experimental. With YNNPACK's dots off
# (XLA's own dot kernels instead) the GPT bench train step ran 1.05-1.16x as fast on 2-core
# x86 machines, in one process alternating with the default; with YNNPACK off entirely,
# reductions fall back to XLA's tree of reduce-windows (9 ms per MLP bias gradient in the
# step's profile) and half the gain goes. So YNNPACK keeps the reductions only.
# `benchmarks/cpu_options.py` measures the three.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str) -> dict:
  """The XLA options tx_jax compiles with for devices of `platform` ("cpu", "tpu", ...)."""
  return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def mesh_compiler_options(mesh) -> dict:
  """`compiler_options` for the devices of `mesh` (a TPU mesh traced on a CPU host gets none)."""
  return compiler_options(mesh.devices.flat[0].platform)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_axis_size(mesh, rules) -> int:
  spec = batch_sharding(mesh, rules).spec[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[n] for n in names)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles per-host numpy batches into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_process_rows(sharding: NamedSharding, batch_size: int):
  """Each process must hold its own 1/process_count of the batch rows.

  Every host reads a different slice of the data, so a mesh that replicates
  the batch across processes (e.g. `tensor` spanning hosts while the batch is
  split only over `data`) would mix different rows into one "replicated" array.
  """
  n = jax.process_count()
  if n == 1:
    return
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(*index[0].indices(batch_size)))
  if len(rows) != batch_size // n:
    raise UserError(f"with mesh {dict(sharding.mesh.shape)} and act_batch -> "
                    f"{sharding.spec[0]}, process {jax.process_index()} would hold {len(rows)} "
                    f"of {batch_size} batch rows instead of its own {batch_size // n}: split the "
                    f"batch over axes that span all {n} processes (e.g. raise mesh.data or "
                    f"mesh.fsdp, keep mesh.tensor within one host)")


def bytes_per_device(tree) -> dict[int, int]:
  """Measured bytes held on each device by a pytree of jax.Arrays."""
  out: dict[int, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def strip_boxes(tree):
  """Removes nn.Partitioned boxes without applying sharding constraints."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


# --- Multi-process jobs ----------------------------------------------------------

def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection should run (TPU VM, SLURM, Open MPI, GKE)."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  # A Cloud TPU VM: Google's PCI vendor id on an accelerator (what libtpu looks for).
  # jax.distributed then reads the slice's workers from the VM metadata.
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, heartbeat_timeout_s: int = 60,
                           init_timeout_s: int = 300) -> bool:
  """Joins a multi-process job through `jax.distributed.initialize`; True if it did.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID) must come together. Without them JAX's auto-detection runs
  on Cloud TPU VMs, under SLURM / Open MPI and on GKE TPU; elsewhere nothing
  happens (one process). A process that stops sending heartbeats for
  heartbeat_timeout_s is declared dead and the others fail instead of hanging.
  Must run before anything touches a JAX device.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise UserError("multi-host needs all of --coordinator-address, --num-processes and "
                      "--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                      "JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process-id={process_id} must be in 0..{num_processes - 1}")
  elif not _cluster_detected():
    return False
  if heartbeat_timeout_s <= 0:
    raise UserError(f"--heartbeat-timeout must be positive, got {heartbeat_timeout_s}")
  # Cross-process collectives on the CPU backend need gloo (no effect on TPU/GPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"could not join the multi-process job (coordinator "
                    f"{coordinator_address or 'auto-detected'}): {first}; start every process "
                    "with the same --coordinator-address and --num-processes") from None
  return True
