"""AdamW with linear warmup + cosine decay, global-norm clipping, decay mask."""

from __future__ import annotations

import jax
import optax


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to optim.lr, then cosine decay to optim.min_lr_ratio * lr."""
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only: no decay on norms, biases (1-D leaves)."""
  return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  chain = []
  if optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.adamw(lr_schedule(optim_cfg, total_steps), b1=optim_cfg.b1,
                           b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
