"""tx_jax GPT train step vs a PyTorch eager reference of the same shape, same run.

  python benchmarks/gpt_cpu.py [--rounds 3] [--steps 20]

Alternates the two (JAX, torch, JAX, torch, ...) in fresh processes so drift in
machine speed hits both, then writes benchmarks/results/gpt_bench_cpu.{json,md}.
Shape: configs/gpt.py:bench (4 layers, d 256, 4 heads, MLP 1024, seq 256,
batch 8, byte vocab, fp32, learned positions, tied embeddings).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()
  jax_cmd = [sys.executable, "-m", "tx_jax", "benchmark", "--config", "configs/gpt.py:bench",
             "--steps", str(args.steps)]
  torch_cmd = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--steps",
               str(args.steps)]
  runs = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    runs["jax"].append(run_json(jax_cmd))
    runs["torch"].append(run_json(torch_cmd))
  med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
  mfu = statistics.median(r["mfu"] for r in runs["jax"])
  result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "jax_tokens_per_s": med["jax"], "torch_tokens_per_s": med["torch"],
            "jax_over_torch": med["jax"] / med["torch"], "jax_mfu": mfu,
            "flops_per_token": runs["jax"][0]["flops_per_token"],
            "peak_flops": statistics.median(r["peak_flops"] for r in runs["jax"]),
            "compile_s": statistics.median(r["compile_s"] for r in runs["jax"]),
            "runs": runs}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "gpt_bench_cpu.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = (f"# GPT bench shape, train step, CPU ({result['machine']})\n\n"
        f"| implementation | tokens/s (median of {args.rounds}) | MFU |\n|---|---|---|\n"
        f"| tx_jax (jit, fp32) | {med['jax']:.0f} | {mfu:.2f} |\n"
        f"| PyTorch {runs['torch'][0]['torch_version']} eager | {med['torch']:.0f} | "
        f"{med['torch'] * result['flops_per_token'] / result['peak_flops']:.2f} |\n\n"
        f"tx_jax / PyTorch = {result['jax_over_torch']:.2f}; compile "
        f"{result['compile_s']:.1f} s; MFU against a measured fp32 matmul peak of "
        f"{result['peak_flops'] / 1e9:.0f} GFLOP/s.\n")
  with open(os.path.join(HERE, "results", "gpt_bench_cpu.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
