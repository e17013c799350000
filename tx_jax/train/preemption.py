"""Graceful stop on SIGTERM / SIGINT, agreed on by every process of a job.

Preemptible TPU VMs and batch schedulers send SIGTERM and allow a grace
period; a user presses Ctrl-C. Either way the loop finishes the step it is on,
writes a checkpoint, flushes its logs and exits 0, and the next run resumes.

A signal may reach only some processes of a multi-host job, at different
steps. `StopRequest.agreed()` is called once per step by every process and
turns the local flags into one decision: it starts a tiny all-reduce (max) of
the flags over all devices and returns the result of the *previous* step's
all-reduce, which has long finished, so the loop never waits on it and every
process stops after the same step. A single process needs no collective and
stops after the current step. (JAX's own preemption sync point needs
`jax.distributed` and only covers SIGTERM, hence this.)

The first signal restores the previous handlers, so a second Ctrl-C or
SIGTERM stops the process the usual way; a kill during a save is safe (the
half-written step is never used, see checkpoint.py).
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager that records SIGTERM / SIGINT instead of dying on them."""

  def __init__(self):
    self.signal_name: str | None = None  # the first signal received here
    self._previous: dict[int, object] = {}
    self._pending = None  # last step's all-reduce, read at the next step
    self._any = None      # jitted max over one flag per device (multi-process only)
    self._sharding = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal.signal's rule
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc):
    self._restore()

  def _restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _on_signal(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._restore()
    sys.stderr.write(f"tx-jax: {self.signal_name} received: finishing the current step and "
                     f"saving a checkpoint (send it again to stop at once)\n")
    sys.stderr.flush()

  def agreed(self) -> bool:
    """True, on every process after the same call, once any process got a signal."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    if self._any is None:
      mesh = Mesh(np.asarray(jax.devices()), ("processes",))
      self._sharding = NamedSharding(mesh, PartitionSpec("processes"))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
    flags = np.full((jax.local_device_count(),), local, np.int32)
    new = self._any(jax.make_array_from_process_local_data(self._sharding, flags))
    previous, self._pending = self._pending, new
    return previous is not None and bool(np.asarray(previous.addressable_data(0)))
