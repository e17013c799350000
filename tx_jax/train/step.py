"""Pure train and eval steps, and the loop's jitted train step (shardings, donation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tx_jax import parallel
from tx_jax.train.state import TrainState


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def make_train_step(objective, tx: optax.GradientTransformation, accumulate_steps: int = 1,
                    halt_after: int | None = None):
  """Returns train_step(state, batch) -> (state, metrics).

  With accumulate_steps = k the global batch is split into k micro-batches
  (rows i, i+k, i+2k, ... so each stays spread over the data axes), whose
  weight-summed gradients are added in a scan: the update equals the one from
  the whole batch at once, in a k-th of the activation memory.

  A non-finite loss, gradient or update (a NaN learning rate) leaves params
  and optimizer state unchanged, adds one to `skipped` and to `skip_run` (the
  number of skips in a row; a good step resets it). After `halt_after` skips
  in a row the state *halts*: every later call returns it unchanged, `step`
  included, so the host can find out lazily (it reads `skip_run` only at log
  and checkpoint steps) and still knows exactly which step halted it and that
  nothing was applied since. halt_after=None never halts.

  An objective whose step is not one gradient of its loss (a GAN: the
  discriminator's update, then the generator's against it) defines
  `train_update(params, opt_state, tx, batch, rng, step) -> (params,
  opt_state, loss, sums, grads)` and applies the update itself; the same
  checks then hold, the finite check reading the new params in place of the
  updates, and grad_norm is over the `grads` it returns. It cannot accumulate.
  """
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
  custom_update = getattr(objective, "train_update", None)
  if custom_update is not None and accumulate_steps != 1:
    raise ValueError(f"{type(objective).__name__} applies its own update and cannot "
                     f"accumulate {accumulate_steps} micro-batches")

  def micro_step(params, batch, rng):
    (loss, sums), grads = grad_fn(params, batch, rng, True)
    return grads, {**sums, "loss_sum": loss * sums["weight"]}

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if custom_update is not None:
      params, opt_state, loss, sums, grads = custom_update(
          state.params, state.opt_state, tx, batch, rng, state.step)
      changed = params
    elif accumulate_steps == 1:
      grads, sums = micro_step(state.params, batch, rng)
      loss = sums["loss_sum"] / jnp.maximum(sums["weight"], 1e-9)
    else:
      k = accumulate_steps
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        mb, i = xs
        grads, sums = micro_step(state.params, mb, jax.random.fold_in(rng, i))
        grads = jax.tree_util.tree_map(lambda g: g * sums["weight"], grads)
        return _tree_add(carry, (grads, sums)), None

      zeros = jax.eval_shape(lambda: micro_step(state.params, jax.tree_util.tree_map(
          lambda x: x[0], micro), rng))
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
      denom = jnp.maximum(sums["weight"], 1e-9)
      grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
      loss = sums["loss_sum"] / denom

    grad_norm = optax.tree.norm(grads)
    if custom_update is None:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      changed = updates
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(changed)))
    halted = (state.skip_run >= halt_after) if halt_after else jnp.bool_(False)
    apply = finite & ~halted
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(apply, n, o), new, old)
    skip = (~finite & ~halted).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + (~halted).astype(jnp.int32), params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + skip,
        skip_run=jnp.where(halted, state.skip_run, (state.skip_run + 1) * skip))
    metrics = {"train/loss": loss, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(state.params),
               "finite": finite, "weight": sums["weight"]}
    return new_state, metrics

  return train_step


def make_eval_step(objective):
  """Returns eval_step(params, batch) -> dict of sums (added up over batches)."""
  def eval_step(params, batch):
    _, sums = objective.loss_fn(params, batch, jax.random.key(0), False)
    return sums
  return eval_step


def jit_eval_step(objective, mesh, params_sharding=None, batch_sharding=None):
  """`make_eval_step` jitted for `mesh`'s devices: the loop's evaluations and
  `tx-jax eval` run this one, so both compile (and sum) the same way."""
  shardings = None if params_sharding is None else (params_sharding, batch_sharding)
  return jax.jit(make_eval_step(objective), in_shardings=shardings,
                 compiler_options=parallel.mesh_compiler_options(mesh))


def halt_after(train_cfg) -> int:
  """Non-finite steps in a row after which the state halts (`train.nonfinite` = "stop": 1)."""
  if train_cfg.get("nonfinite", "skip") == "stop":
    return 1
  return train_cfg.get("max_consecutive_skips", 10)


def jit_train_step(objective, tx, config, mesh, state_shardings, batch_sharding):
  """The loop's train step, jitted: the state comes in and goes out with its shardings
  (donated), metrics come out replicated. Training, `tx-jax benchmark` and `tx-jax plan`
  all run this one."""
  return jax.jit(
      make_train_step(objective, tx, config.optim.accumulate_steps, halt_after(config.train)),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0,
      compiler_options=parallel.mesh_compiler_options(mesh))
