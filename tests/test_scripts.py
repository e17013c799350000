"""scripts/*.py launch the same commands as `tx-jax`, from any working directory."""

import os
import subprocess
import sys

import pytest

from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command, args, message", [
    ("train", ["--config", "configs/missing.py", "--workdir", "WD"], "configs/missing.py"),
    ("eval", ["--workdir", "WD"], "does not exist"),
    ("embed", ["--workdir", "WD", "--data", "embedded:stdlib-docstrings", "--out", "x.npz"],
     "does not exist"),
    ("generate", ["--workdir", "WD", "--prompt", "x"], "does not exist"),
])
def test_script_runs_its_command(tmp_path, command, args, message):
  wd = str(tmp_path / "nowhere")
  args = [wd if a == "WD" else a for a in args]
  if command == "train":
    args[1] = os.path.join(ROOT, args[1])
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{command}.py"), *args],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("tx-jax: error:") and message in lines[0], lines
  assert not os.path.exists(wd)


# A worker thread allocates, fills and frees 256 MB twice; the second time is counted in
# page faults (the kernel's count): reused memory faults a few pages, a fresh mapping
# faults every one of its 65,536.
FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, resource, threading
from tx_jax import cli
cli._reuse_freed_memory_when_jax_runs_on_cpu()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def fill_and_free():
  block = libc.malloc(256 << 20)
  ctypes.memset(block, 1, 256 << 20)
  libc.free(block)
def in_a_thread():
  worker = threading.Thread(target=fill_and_free)
  worker.start()
  worker.join()
in_a_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_a_thread()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("env, reused", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "tpu"}, False),                                 # JAX on an accelerator
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=0"}, False),  # the user's
])
def test_the_program_keeps_freed_memory_for_the_next_step_when_jax_runs_on_cpu(env, reused):
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK], capture_output=True,
                       text=True, timeout=120, env={**base, **env})
  assert out.returncode == 0, out.stderr[-2000:]
  faults = int(out.stdout.split()[-1])
  assert (faults < 6_000) if reused else (faults > 60_000), faults
