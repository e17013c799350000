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
ROWS = [  # family, shape, config, overrides
    ("GPT", "bench: 4 x 256, T 256, batch 8", "configs/gpt.py:bench", []),
    ("GPT", "124m: 12 x 768, T 1024, batch 2", "configs/gpt.py:124m",
     ["--config.train.batch_size=2", *ONE]),
    ("BERT", "base: 12 x 768, T 128, batch 8", "configs/bert.py:base",
     ["--config.train.batch_size=8", *ONE]),
    ("T5", "base: 12+12 x 768, T 512/114, batch 2", "configs/t5.py:base",
     ["--config.train.batch_size=2", *ONE]),
    ("MAE", "b16: ViT-B/16, 224 px, batch 8", "configs/mae.py:b16",
     ["--config.train.batch_size=8", *ONE]),
    ("MAE", "tiny: 8 px digits, batch 128", "configs/mae.py", []),
    ("contrastive", "tiny (default)", "configs/contrastive.py", []),
    ("VAE", "tiny (default)", "configs/vae.py", []),
    ("GAN", "tiny: 8 px digits (default)", "configs/gan.py", []),
    ("classifier", "tiny text (default)", "configs/classify.py", []),
]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  load0, rows = os.getloadavg()[0], []
  for family, shape, config, overrides in ROWS:
    cmd = ["tx-jax", "benchmark", "--config", config, "--steps", str(args.steps), *overrides]
    proc = subprocess.run([sys.executable, "-m", "tx_jax", *cmd[1:]], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r.update(family=family, shape=shape, command=" ".join(cmd))
    rows.append(r)
    print(json.dumps(r), flush=True)
  machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}"
  result = {"machine": machine, "load_average_1m": [load0, os.getloadavg()[0]], "rows": rows}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "families_cpu.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = ["| family | shape | machine | units/s | MFU | memory (peak RSS) | compile s "
           "| command |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    unit = "tokens" if "tokens_per_s" in r else "images"
    lines.append(f"| {r['family']} | {r['shape']} | CPU, {os.cpu_count()} cores, "
                 f"{r['dtype']} | {r[unit + '_per_s']:,.0f} {unit} | {r['mfu']:.2f} | "
                 f"{r['peak_rss_mb'] / 1024:.1f} GB | {r['xla_compile_s']:.1f} | "
                 f"`{r['command']}` |")
  md = "\n".join(lines) + "\n"
  with open(os.path.join(HERE, "results", "families_cpu.md"), "w") as f:
    f.write(f"# Every family's train step, {machine}\n\n{md}\nLoad average {load0:.1f} "
            f"before, {result['load_average_1m'][1]:.1f} after.\n")
  print(md)


if __name__ == "__main__":
  main()
