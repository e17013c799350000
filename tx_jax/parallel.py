"""Device mesh, logical-axis rules and shardings.

Models name their axes logically (`embed`, `heads`, `mlp`, `act_batch`, ...);
this module maps those names onto a ("data", "fsdp", "tensor") mesh through a
rules table that lives in the config (`mesh.rules`). Nothing here knows a model
beyond those names.
"""

from __future__ import annotations

import math
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
  """A preset name or an explicit list of (logical, mesh axes) pairs, checked."""
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise UserError(f"mesh.rules={rules!r} is not a preset; choose one of "
                      f"{sorted(RULE_PRESETS)} or give a list of [logical, mesh_axis] pairs")
    return RULE_PRESETS[rules]
  out = []
  for pair in rules:
    logical, axes = pair
    for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"mesh rule for {logical!r} names unknown mesh axis {axis!r}; "
                        f"mesh axes are {MESH_AXES}")
    out.append((logical, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
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


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_axis_size(mesh, rules) -> int:
  spec = batch_sharding(mesh, rules).spec[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[n] for n in names)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles per-host numpy batches into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


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
