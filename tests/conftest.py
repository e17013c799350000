"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

from xla_flags import xla_flags  # pylint: disable=g-import-not-at-top

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gc  # pylint: disable=g-import-not-at-top
import signal  # pylint: disable=g-import-not-at-top

# A test runner may start with SIGCHLD ignored. Children are then reaped by the kernel,
# every wait on one reports exit status 0, and the exit-status checks could not fail;
# the default disposition is restored here, for this process and every process it starts.
signal.signal(signal.SIGCHLD, signal.SIG_DFL)

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module: one process runs the whole
  suite, and hundreds of small models' executables would otherwise pile up in memory."""
  yield
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
