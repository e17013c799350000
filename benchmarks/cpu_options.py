"""XLA's CPU compiler options for tx_jax's steps: the options tx_jax compiles with
(`parallel.CPU_COMPILER_OPTIONS`) against XLA's defaults and against YNNPACK off, in
the whole train step.

  python benchmarks/cpu_options.py [--config configs/gpt.py:bench] [--rounds 8]

In the step: the loop's jitted train step compiled once per option set in one
process, timed in alternating blocks of 5 steps (`--rounds` blocks each), so drift
in the machine's speed hits every set alike (single matmuls timed alone drift too
much here to show the difference). Writes benchmarks/results/cpu_options.{json,md}.
"""

import argparse
import json
import os
import platform

import jax

from tx_jax import parallel

from attention_cpu import alternate, compile_step  # sibling scripts: this folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
YNN = "xla_cpu_experimental_ynn_fusion_type"
VARIANTS = {"tx_jax: YNNPACK reductions only": dict(parallel.CPU_COMPILER_OPTIONS),
            "XLA defaults": {},
            "YNNPACK off": {YNN: ""}}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/gpt.py:bench")
  p.add_argument("--rounds", type=int, default=8)
  args = p.parse_args()
  load0 = os.getloadavg()[0]
  compiled = {}
  for name, options in VARIANTS.items():
    parallel.CPU_COMPILER_OPTIONS = options  # read when the step is jitted
    try:
      compiled[name] = compile_step(args.config, 5 * args.rounds)
    finally:
      parallel.CPU_COMPILER_OPTIONS = VARIANTS["tx_jax: YNNPACK reductions only"]
  in_step = alternate(compiled, args.rounds)
  result = {"config": args.config, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "jax": jax.__version__, "options": VARIANTS, "in_step": in_step,
            "load_average_1m": [load0, os.getloadavg()[0]]}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "cpu_options.json"), "w") as f:
    json.dump(result, f, indent=2)
  base = in_step["XLA defaults"]["step_ms_median"]
  rows = "".join(
      f"| {name} | `{json.dumps(VARIANTS[name])}` | {s['step_ms_median']:.0f} "
      f"({s['step_ms_min']:.0f}) | {base / s['step_ms_median']:.2f}x |\n"
      for name, s in in_step.items())
  md = (f"# XLA CPU options: `{args.config}` ({result['machine']}, jax {jax.__version__})\n\n"
        f"| options | compiler_options | train step ms, median (min) of {5 * args.rounds} | "
        f"speed vs XLA defaults |\n|---|---|---|---|\n{rows}\n"
        f"Load average {load0:.1f} before, {result['load_average_1m'][1]:.1f} after.\n")
  with open(os.path.join(HERE, "results", "cpu_options.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
