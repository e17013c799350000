"""XLA_FLAGS of the test process and of every process a test starts.

The suite's programs are small and each is compiled once or twice, so compiling takes
most of its time; LLVM's optimisation level 0 makes XLA's CPU compile about 1.5x
faster. The programs compute the same values to float rounding (and a run and its
resumed twin, both at level 0, the same bits); only their speed differs.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a process on `devices` CPU devices."""
  if devices > 1:
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
  return FAST_COMPILE
