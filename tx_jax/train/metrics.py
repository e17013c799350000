"""Metric logging (metrics.jsonl + TensorBoard, process 0 only) and FLOP accounting."""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tx_jax import parallel
from tx_jax.errors import io_operation


class MetricWriter:
  """Appends one JSON object per log to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes. On resume, lines at or past the resumed step are
  dropped first so the log never holds a step twice.
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = [l for l in f if l.strip()]
      kept = []
      for line in lines:
        try:
          if json.loads(line)["step"] <= resume_step:
            kept.append(line)
        except (ValueError, KeyError):
          continue  # a line torn by a kill mid-write
      with io_operation("rewriting the metrics log", self.path + ".tmp"):
        try:
          with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
          os.replace(self.path + ".tmp", self.path)
        except OSError:
          with contextlib.suppress(OSError):
            os.remove(self.path + ".tmp")
          raise
    from tensorboardX import SummaryWriter  # TensorBoard without TensorFlow
    self._tb_dir = os.path.join(workdir, "tensorboard")
    with io_operation("creating the TensorBoard log", self._tb_dir):
      self._tb = SummaryWriter(self._tb_dir, flush_secs=30)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    # A line torn by a full disk is dropped on resume (see __init__).
    with io_operation(f"appending step {step} to the metrics log", self.path):
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    with io_operation("writing the TensorBoard log", self._tb_dir):
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def flush(self):
    if self._tb is not None:
      with io_operation("flushing the TensorBoard log", self._tb_dir):
        self._tb.flush()

  def close(self):
    if self._tb is not None:
      tb, self._tb = self._tb, None
      with io_operation("closing the TensorBoard log", self._tb_dir):
        tb.close()


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def measure_peak_flops(dtype: str = "float32", n: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul in `dtype` on one local device (the MFU denominator)."""
  device = jax.local_devices()[0]  # this process's own device, in multi-process jobs too
  if n is None:
    n = 1024 if device.platform == "cpu" else 8192
  # From host memory, so no global (mesh-wide) array is made under jax.set_mesh; random,
  # not constant, data: some matmul units run faster on zeros and ones.
  x = np.random.default_rng(0).standard_normal((n, n), np.float32)
  a = jax.device_put(x.astype(jnp.dtype(dtype)), device)
  f = jax.jit(lambda x: x @ x, compiler_options=parallel.compiler_options(device.platform))
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))
