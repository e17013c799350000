"""Compile time against depth for a scanned GPT at the bench widths, on this machine.

  python benchmarks/compile_depth.py [--depths 2 24] [--rounds 2]

Each round runs `tx-jax benchmark --config configs/gpt.py:bench
--config.model.scan_layers=true --config.model.num_layers=L` in a fresh process
for every depth, alternating, and keeps its JSON line: `xla_compile_s` is XLA's
compile of the lowered step on its own; `compile_s` is what the first step
costs a user (lowering + compile + one execution), so it grows with the
execution time of the deeper model. Writes benchmarks/results/compile_depth.{json,md}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("lower_s", "xla_compile_s", "first_step_s", "compile_s", "step_ms", "peak_rss_mb")


def one(depth: int) -> dict:
  cmd = [sys.executable, "-m", "tx_jax", "benchmark", "--config", "configs/gpt.py:bench",
         "--steps", "2", "--config.model.scan_layers=true", f"--config.model.num_layers={depth}"]
  out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", type=int, nargs="+", default=[2, 24])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "compile_depth.json"))
  args = parser.parse_args()
  load0 = os.getloadavg()[0]
  runs = {d: [] for d in args.depths}
  for _ in range(args.rounds):
    for d in args.depths:
      record = one(d)
      runs[d].append({k: record[k] for k in KEYS})
  load1 = os.getloadavg()[0]
  median = {d: {k: statistics.median(r[k] for r in rs) for k in KEYS} for d, rs in runs.items()}
  lo, hi = min(args.depths), max(args.depths)
  result = {"machine": f"{os.cpu_count()}-core CPU", "load_avg_1m": [load0, load1],
            "rounds": args.rounds, "runs": runs, "median": median,
            "xla_compile_ratio": median[hi]["xla_compile_s"] / median[lo]["xla_compile_s"],
            "first_step_ratio": median[hi]["compile_s"] / median[lo]["compile_s"]}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  lines = [f"# Compile time against depth: scanned GPT, bench widths ({result['machine']})", "",
           f"`python benchmarks/compile_depth.py --depths {' '.join(map(str, args.depths))} "
           f"--rounds {args.rounds}`; medians of {args.rounds} fresh processes per depth, "
           f"alternating; 1-minute load average {load0:.2f} before, {load1:.2f} after.", "",
           "| layers | lower s | XLA compile s | first step s | compile_s (all three) | "
           "step ms | peak RSS MB |", "|---|---|---|---|---|---|---|"]
  for d in args.depths:
    m = median[d]
    lines.append(f"| {d} | {m['lower_s']:.2f} | {m['xla_compile_s']:.2f} | "
                 f"{m['first_step_s']:.2f} | {m['compile_s']:.2f} | {m['step_ms']:.0f} | "
                 f"{m['peak_rss_mb']:.0f} |")
  lines += ["", f"XLA compile, {hi} / {lo} layers: **{result['xla_compile_ratio']:.2f}x**; "
            f"first step (compile_s), {hi} / {lo}: {result['first_step_ratio']:.2f}x (it "
            "includes one execution, which grows with depth).", ""]
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write("\n".join(lines))
  print(json.dumps({k: result[k] for k in ("xla_compile_ratio", "first_step_ratio")}))


if __name__ == "__main__":
  main()
