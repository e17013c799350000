"""`tx-jax benchmark` for every family at its named shapes, on this CPU, one process each.

  python benchmarks/families_cpu.py [--steps 3]

The full-size shapes (GPT 124m, BERT / T5 base, MAE ViT-B/16) run at their own
widths and depths with a small batch (and no accumulation) so that one step
takes seconds here; the small ones at their defaults. Each row is one JSON line
of `tx-jax benchmark`: units/s, FLOPs per unit (the objective's formula), MFU
against the matmul peak measured in the same process and dtype, peak host RSS,
XLA's compile seconds. Writes benchmarks/results/families_cpu.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ONE = ["--config.optim.accumulate_steps=1"]
ROWS = [  # family, size, config, overrides
    ("GPT", "bench", "configs/gpt.py:bench", []),
    ("GPT", "124m", "configs/gpt.py:124m", ["--config.train.batch_size=2", *ONE]),
    ("BERT", "base", "configs/bert.py:base", ["--config.train.batch_size=8", *ONE]),
    ("T5", "base", "configs/t5.py:base", ["--config.train.batch_size=2", *ONE]),
    ("MAE", "ViT-B/16", "configs/mae.py:b16", ["--config.train.batch_size=8", *ONE]),
    ("MAE", "tiny (digits)", "configs/mae.py", []),
    ("contrastive", "tiny", "configs/contrastive.py", []),
    ("VAE", "tiny", "configs/vae.py", []),
    ("GAN", "tiny (digits)", "configs/gan.py", ["--config.train.batch_size=64"]),
    ("classifier", "tiny (text)", "configs/classify.py", []),
]


def shape(r: dict) -> str:
  """'124m: 124.4M params, batch 2 x T 1024' from a benchmark line."""
  length = f"T {r['seq_len']}" if r.get("seq_len") else f"{r['image_size']} px"
  return f"{r['size']}: {r['params'] / 1e6:.1f}M params, batch {r['batch_size']} x {length}"


def _rate(v: float) -> str:
  return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(result: dict) -> str:
  lines = [f"# Every family's train step, {result['machine']}\n",
           "| family | shape | machine | units/s | MFU | memory (peak RSS) | compile s "
           "| command |", "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    unit = "tokens" if "tokens_per_s" in r else "images"
    lines.append(f"| {r['family']} | {shape(r)} | CPU, {result['cores']} cores, {r['dtype']} "
                 f"| {_rate(r[unit + '_per_s'])} {unit} | {r['mfu']:.2f} | "
                 f"{r['peak_rss_mb'] / 1024:.1f} GB | {r['xla_compile_s']:.1f} | "
                 f"`{r['command']}` |")
  load = result["load_average_1m"]
  return "\n".join(lines) + f"\n\nLoad average {load[0]:.1f} before, {load[1]:.1f} after.\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  load0, rows = os.getloadavg()[0], []
  for family, size, config, overrides in ROWS:
    cmd = ["tx-jax", "benchmark", "--config", config, "--steps", str(args.steps), *overrides]
    proc = subprocess.run([sys.executable, "-m", "tx_jax", *cmd[1:]], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r.update(family=family, size=size, command=" ".join(cmd))
    rows.append(r)
    print(json.dumps(r), flush=True)
  result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "cores": os.cpu_count(), "load_average_1m": [load0, os.getloadavg()[0]],
            "rows": rows}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "families_cpu.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = markdown(result)
  with open(os.path.join(HERE, "results", "families_cpu.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
