"""Import speed and memory of a GPT-2 124M-shaped Hugging Face checkpoint.

  python benchmarks/import_gpt2.py [--rounds 3] [--dir /tmp/gpt2_124m_random]

Writes a random checkpoint with GPT-2 small's tensor names and shapes
(config.json + model.safetensors, fp32, ~498 MB) using numpy only, then runs
`tx_jax.interop.load_hf` in fresh processes and records wall time and peak
resident memory (ru_maxrss), both in total and above the process's RSS just
before the import (Python + JAX already loaded). Targets: < 60 s and peak
< 2.5x the checkpoint size. Results: benchmarks/results/import_gpt2.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
          "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
          "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}


def write_checkpoint(directory: str) -> int:
  """Random GPT-2 small tensors, one at a time into safetensors; returns the file size."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  d, f, v, t = 768, 3072, 50257, 1024
  shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (t, d),
            "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
  for i in range(12):
    p = f"transformer.h.{i}."
    shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                   p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                   p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                   p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                   p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
                   p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
  tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02)
             for name, shape in shapes.items()}
  path = os.path.join(directory, "model.safetensors")
  save_file(tensors, path, metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(CONFIG, fh)
  return os.path.getsize(path)


def child(directory: str) -> None:
  """One import in this process; prints a JSON line."""
  import resource
  import time
  sys.path.insert(0, ROOT)
  from tx_jax import interop
  from tx_jax.models import count_params

  def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
      return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

  before = rss_mb()
  start = time.perf_counter()
  imported = interop.load_hf(directory, with_tokenizer=False)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
  print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before,
                    "params": count_params(imported.params)}))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--dir", default="/tmp/gpt2_124m_random")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args.dir)
  size = write_checkpoint(args.dir)
  runs = []
  for _ in range(args.rounds):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--dir", args.dir],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  size_mb = size / 2**20
  peak = max(r["peak_rss_mb"] for r in runs)
  above = max(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs)
  result = {
      "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
      "load_average_1min": round(os.getloadavg()[0], 1),
      "python": platform.python_version(), "checkpoint_mb": round(size_mb, 1),
      "params": runs[0]["params"], "rounds": len(runs),
      "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
      "seconds_max": round(max(r["seconds"] for r in runs), 2),
      "peak_rss_mb": round(peak, 1), "peak_rss_over_checkpoint": round(peak / size_mb, 2),
      "peak_above_start_mb": round(above, 1),
      "peak_above_start_over_checkpoint": round(above / size_mb, 2),
      "targets": {"seconds": 60, "peak_over_checkpoint": 2.5}, "runs": runs}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "import_gpt2.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  md = (f"# Import of a GPT-2 124M-shaped safetensors checkpoint ({result['machine']})\n\n"
        f"`python benchmarks/import_gpt2.py` — random weights, GPT-2 small names and shapes, "
        f"fp32, {result['checkpoint_mb']} MiB, {result['params']:,} parameters; "
        f"`tx_jax.interop.load_hf` in {len(runs)} fresh processes (machine shared: 1-minute "
        f"load average {result['load_average_1min']} at the end).\n\n"
        "| measure | value | target |\n|---|---|---|\n"
        f"| import wall time (median / max) | {result['seconds_median']} s / "
        f"{result['seconds_max']} s | < 60 s |\n"
        f"| peak RSS, whole process (Python + JAX + import) | {result['peak_rss_mb']} MiB = "
        f"{result['peak_rss_over_checkpoint']}x checkpoint | < 2.5x |\n"
        f"| peak RSS above the process before the import | {result['peak_above_start_mb']} MiB "
        f"= {result['peak_above_start_over_checkpoint']}x checkpoint | |\n")
  with open(os.path.join(HERE, "results", "import_gpt2.md"), "w") as fh:
    fh.write(md)
  print(md)


if __name__ == "__main__":
  main()
