"""The training state: one pytree that is jitted, sharded and checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data; per-step keys are fold_in(rng, step)
  skipped: jax.Array       # int32 scalar: updates skipped for non-finite loss/gradients
  skip_run: jax.Array      # int32 scalar: consecutive skips ending at the last step
