"""Fine-tuning a pretrained body: modes, parameter depth, and grafting by path.

`parse_mode` reads `finetune.mode` (full | linear_probe | freeze_below:N),
`layer_of` gives a parameter's depth (for freezing and layer-wise learning-rate
decay), and `graft` copies a pretrained body into fresh params by name.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from tx_jax.errors import UserError


def parse_mode(mode: str, num_layers: int) -> tuple[str, int]:
  """("full" | "linear_probe" | "freeze_below", N) from finetune.mode."""
  if mode in ("full", "linear_probe"):
    return mode, 0
  m = re.fullmatch(r"freeze_below:(\d+)", str(mode))
  if not m:
    raise UserError(f"finetune.mode={mode!r}: use full, linear_probe or freeze_below:N")
  n = int(m.group(1))
  if n > num_layers:
    raise UserError(f"finetune.mode={mode}: the body has only {num_layers} layers; use "
                    f"freeze_below:0..{num_layers}")
  return "freeze_below", n


def layer_of(path: tuple[str, ...], num_layers: int) -> int:
  """Depth of a parameter: 0 embeddings, 1..L blocks, L + 1 final norm and head."""
  if path[0] == "head":
    return num_layers + 1
  for name in path:
    m = re.fullmatch(r"block_(\d+)", name)
    if m:
      return int(m.group(1)) + 1
  if any(name in ("final_norm", "encoder_norm") for name in path):
    return num_layers + 1
  return 0


def _paths(tree) -> list[tuple[str, ...]]:
  return [tuple(getattr(k, "key", str(k)) for k in p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _flat(tree) -> dict[str, object]:
  return {"/".join(p): leaf for p, leaf in zip(_paths(tree), jax.tree_util.tree_leaves(tree))}


def graft(fresh, source, prefix: str = "body") -> tuple[dict, dict]:
  """fresh params with every `prefix/...` leaf replaced by the same path of `source`.

  -> (params, report {"loaded", "new", "dropped": [paths], "*_params": counts}).
  The body must be fully covered with equal shapes (UserError otherwise, one line);
  source leaves the body does not have are dropped; leaves outside `prefix` stay new,
  unless `source` has them with the same shape (re-fine-tuning a classifier).
  """
  src = {k: np.asarray(v) for k, v in _flat(source).items()}
  out, loaded, new = {}, [], []
  for key, leaf in _flat(fresh).items():
    inner = key[len(prefix) + 1:] if key.startswith(prefix + "/") else None
    src_key = inner if inner is not None else key
    have = src.get(src_key)
    if inner is not None and have is None:
      raise UserError(f"init_from does not fit this model: it has no {inner!r} (it holds "
                      f"{', '.join(sorted(src)[:6])} ...); use a workdir of the same family")
    if have is not None and tuple(have.shape) != tuple(np.shape(leaf)):
      if inner is None:  # a head for other classes: start it fresh
        out[key] = leaf
        new.append(key)
        continue
      raise UserError(f"init_from does not fit this model: {inner} is {tuple(have.shape)} "
                      f"there but {tuple(np.shape(leaf))} here")
    if have is None:
      out[key] = leaf
      new.append(key)
    else:
      out[key] = have.astype(np.asarray(leaf).dtype)
      loaded.append(src_key)
  used = set(loaded)
  dropped = sorted(k for k in src if k not in used)
  size = lambda keys, tree: int(sum(np.size(tree[k]) for k in keys))
  report = {"loaded": loaded, "new": new, "dropped": dropped,
            "loaded_params": size(loaded, src), "new_params": size(new, out),
            "dropped_params": size(dropped, src)}
  treedef = jax.tree_util.tree_structure(fresh)
  return jax.tree_util.tree_unflatten(treedef, [out[k] for k in _flat(fresh)]), report
