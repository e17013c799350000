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
