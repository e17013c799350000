"""The README's "what fits where" table: `tx-jax plan` of the full-size configs.

  python benchmarks/plans_tpu.py [--only gpt124m t5 ...]

Runs each row's command in a fresh process (one after another, so each has
the machine to itself), times it, and writes every plan's JSON line with its
command and wall seconds to benchmarks/results/plans_tpu.json. Needs the
`tpu` extra (libtpu). The step times in the plans are XLA's compile-time
estimates, not measurements.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "plans_tpu.json")

FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
ROWS = {
    "gpt124m": ["configs/gpt.py:124m", "v5e:4x4", *FSDP],
    "gpt124m_v5p": ["configs/gpt.py:124m", "v5p:2x2x1", *FSDP],
    "gpt1b": ["configs/gpt.py:1b", "v5p:2x2x2"],
    "gpt1b_v6e": ["configs/gpt.py:1b", "v6e:4x4"],
    "bert": ["configs/bert.py:base", "v5e:4x4"],
    "t5": ["configs/t5.py:base", "v5e:4x4", *FSDP],
    "t5acc": ["configs/t5.py:base", "v5e:4x4", *FSDP, "--config.optim.accumulate_steps=4"],
    "mae": ["configs/mae.py:b16", "v5e:4x4"],
}


def command(row: list[str]) -> list[str]:
  config, topology, *overrides = row
  return ["tx-jax", "plan", "--config", config, "--topology", topology, *overrides]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", nargs="+", choices=sorted(ROWS), help="rows to (re)plan")
  p.add_argument("--out", default=OUT)
  args = p.parse_args()
  previous = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
  plans, walls = dict(previous.get("plans", {})), dict(previous.get("wall_s", {}))
  for name in args.only or ROWS:
    cmd = command(ROWS[name])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tx_jax", *cmd[1:]], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    walls[name] = round(time.perf_counter() - start, 2)
    if done.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    plans[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "command": " ".join(cmd)}
    print(f"{name}: {walls[name]} s, fits={plans[name]['fits']}", flush=True)
  from importlib.metadata import version  # pylint: disable=g-import-not-at-top
  result = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, libtpu "
                       f"{version('libtpu')}, jax {version('jax')}",
            "wall_s": walls, "plans": plans}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
