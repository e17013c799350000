"""Every family's train step on one GPU, in one call: tokens/s or images/s, MFU, memory.

  PYTHONPATH=. python benchmarks/gpu.py [--steps 20] [--out DIR]

Runs `tx-jax benchmark` (the loop's own jitted step on synthetic batches) in a
fresh process per row and writes DIR/gpu_benchmarks.{json,md} (DIR defaults to
$OUT when set, else benchmarks/results). Rows: GPT-2 124M at T = 1024 in bf16
with cuDNN attention and with XLA's, BERT base, T5 base, MAE ViT-B/16, and the
default VAE, GAN and classifier. Batches are sized for one 80-141 GB GPU with no
accumulation. MFU is given twice: against the bf16 (or fp32) matmul peak that
each run measures on random 8192^2 operands, and against the datasheet's dense
peak for the GPU found (H100 / H200 SXM: 989 TFLOP/s bf16, 495 tf32; A100:
312 / 156), the figure llm.c's "about 40% on an H100" uses.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROWS = [  # name, config, overrides
    ("gpt 124m cudnn", "configs/gpt.py:124m",
     ["--config.model.attention_impl=cudnn", "--config.train.batch_size=32",
      "--config.optim.accumulate_steps=1"]),
    ("gpt 124m xla attention", "configs/gpt.py:124m",
     ["--config.model.attention_impl=xla", "--config.train.batch_size=32",
      "--config.optim.accumulate_steps=1"]),
    ("bert base", "configs/bert.py:base",
     ["--config.train.batch_size=128", "--config.optim.accumulate_steps=1"]),
    ("t5 base", "configs/t5.py:base",
     ["--config.train.batch_size=64", "--config.optim.accumulate_steps=1"]),
    ("mae b16", "configs/mae.py:b16",
     ["--config.train.batch_size=256", "--config.optim.accumulate_steps=1"]),
    ("vae", "configs/vae.py", []),
    ("gan", "configs/gan.py", []),
    ("classifier", "configs/classify.py", []),
]
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def gpu_name() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[0]
  except (OSError, subprocess.CalledProcessError):
    return "unknown GPU"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
  args = p.parse_args()
  name = gpu_name()
  sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
  rows = []
  for label, config, overrides in ROWS:
    cmd = [sys.executable, "-m", "tx_jax", "benchmark", "--config", config,
           "--steps", str(args.steps), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
      rows.append({"row": label, "command": " ".join(cmd[2:]),
                   "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
      print(label, "failed:", rows[-1]["error"], flush=True)
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    unit = "tokens" if "tokens_per_s" in r else "images"
    flops = r[f"flops_per_{unit[:-1]}"] * r[f"{unit}_per_s"]
    r.update(row=label, command="tx-jax " + " ".join(cmd[4:]), unit=unit,
             mfu_datasheet=(flops / sheet if sheet and r["dtype"] == "bfloat16" else None))
    rows.append(r)
    print(json.dumps(r), flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "gpu_benchmarks.json"), "w") as f:
    json.dump({"gpu": name, "rows": rows}, f, indent=2)
  lines = [f"# Train steps on one {name}\n",
           "| row | dtype | units/s | MFU (measured peak) | MFU (datasheet) | peak RSS MB "
           "| device peak MB | compile s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | |")
      continue
    ds = f"{r['mfu_datasheet']:.2f}" if r["mfu_datasheet"] else "-"
    lines.append(f"| {r['row']} | {r['dtype']} | {r[r['unit'] + '_per_s']:.0f} {r['unit']} | "
                 f"{r['mfu']:.2f} | {ds} | {r['peak_rss_mb']:.0f} | {r['device_peak_mb'] or 0:.0f} | "
                 f"{r['compile_s']:.1f} |")
  md = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "gpu_benchmarks.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
