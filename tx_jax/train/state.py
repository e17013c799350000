"""The training state: one pytree that is jitted, sharded and checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tx_jax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data; per-step keys are fold_in(rng, step)
  skipped: jax.Array       # int32 scalar: updates skipped for non-finite loss/gradients
  skip_run: jax.Array      # int32 scalar: consecutive skips ending at the last step


def init_state(objective, tx, init_len: int, seed: int, boxed: bool = False) -> TrainState:
  """A fresh TrainState; with boxed=True leaves keep their logical-axis boxes."""
  rng = jax.random.key(seed)
  boxed_params = objective.init_params(rng, init_len)
  params = nn.unbox(boxed_params)
  opt_state = tx.init(params)
  if boxed:  # optimizer moments mirror the params' boxes so they shard like them
    params, opt_state = boxed_params, _box_like(opt_state, boxed_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32),
                    skip_run=jnp.zeros((), jnp.int32))


def state_shapes(objective, tx, init_len: int, seed: int):
  """Abstract TrainState with logical-partition boxes (no memory allocated)."""
  return jax.eval_shape(lambda: init_state(objective, tx, init_len, seed, boxed=True))


def _box_like(opt_state, boxed_params):
  """Re-attaches the params' logical names to every params-shaped subtree of opt_state,
  and, when the params are a dict of networks each with its own optimizer (a GAN), to
  every subtree shaped like one of those networks: optimizer moments shard like the
  weights they follow. A subtree counts as shaped like a tree when its structure and
  every leaf's shape match."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  trees = [boxed_params]
  if isinstance(boxed_params, dict):
    trees += [v for v in boxed_params.values() if isinstance(v, dict)]
  templates = []
  for tree in trees:
    stripped = parallel.strip_boxes(tree)
    templates.append((jax.tree_util.tree_structure(stripped),
                      [getattr(x, "shape", None) for x in jax.tree_util.tree_leaves(stripped)],
                      jax.tree_util.tree_leaves(tree, is_leaf=is_box)))

  # Under optax.masked / multi_transform (frozen parameters) some leaves of a
  # params-shaped subtree are MaskedNode (no state for that parameter) and stay so.
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def matching(node):
    structure = jax.tree_util.tree_structure(node, is_leaf=masked)
    leaves = jax.tree_util.tree_leaves(node, is_leaf=masked)
    for treedef, shapes, boxes in templates:
      if structure == treedef and all(masked(l) or getattr(l, "shape", None) == shape
                                      for l, shape in zip(leaves, shapes)):
        return treedef, boxes, leaves
    return None

  def visit(node):
    found = matching(node)
    if found is not None:
      treedef, boxes, leaves = found
      return jax.tree_util.tree_unflatten(
          treedef, [b.replace_boxed(l) if is_box(b) and not masked(l) else l
                    for b, l in zip(boxes, leaves)])
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(c) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(c) for c in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return node
  return visit(opt_state)
