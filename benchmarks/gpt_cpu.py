"""tx_jax GPT train step vs PyTorch references of the same shape, same run.

  python benchmarks/gpt_cpu.py [--rounds 3] [--steps 20] [--name gpt_bench_cpu]
      [--jax-xla-flags "--xla_cpu_..."] [--malloc]

Alternates them (JAX, torch eager, torch.compile, JAX, ...) in fresh
processes so drift in machine speed hits all of them, records the load average
before and after, then writes benchmarks/results/NAME.{json,md}.
Shape: configs/gpt.py:bench (4 layers, d 256, 4 heads, MLP 1024, seq 256,
batch 8, byte vocab, fp32, learned positions, tied embeddings). MFU is against
the fp32 matmul peak that each tx_jax run measures (`tx-jax benchmark`).
`--jax-xla-flags` adds a fourth contender: tx_jax again with those XLA flags.
`--malloc` adds three: tx_jax with glibc's default malloc, and PyTorch eager and
compiled with the malloc settings `tx-jax` makes on CPUs (see cli.run).
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


# glibc's malloc as `tx-jax` sets it up when JAX runs on the CPU (cli.run), and glibc's
# defaults (a GLIBC_TUNABLES naming glibc.malloc makes `tx-jax` leave malloc alone).
SAME_MALLOC = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
               "glibc.malloc.trim_threshold=4611686018427387904")
DEFAULT_MALLOC = "glibc.malloc.arena_max=0"


def run_json(cmd, xla_flags=None, tunables=None) -> dict:
  env = dict(os.environ)
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
  """', <model name>' from /proc/cpuinfo where it says, else ''."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
  except OSError:
    return ""
  return f", {names[0]}" if names else ""


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--name", default="gpt_bench_cpu",
                 help="results/NAME.{json,md} (another machine: another name)")
  p.add_argument("--jax-xla-flags", default="",
                 help="also time tx_jax with these XLA_FLAGS (a fourth contender)")
  p.add_argument("--malloc", action="store_true",
                 help="also time tx_jax with glibc's default malloc, and PyTorch with the "
                      "malloc settings tx-jax uses on CPUs")
  args = p.parse_args()
  torch_ref = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--steps",
               str(args.steps)]
  cmds = {"jax": [sys.executable, "-m", "tx_jax", "benchmark", "--config",
                  "configs/gpt.py:bench", "--steps", str(args.steps)],
          "torch_eager": torch_ref, "torch_compile": torch_ref + ["--compile"]}
  flags, tunables = {}, {}
  if args.jax_xla_flags:
    cmds["jax_flags"], flags["jax_flags"] = cmds["jax"], args.jax_xla_flags
  if args.malloc:
    for name, base, setting in (("jax_default_malloc", "jax", DEFAULT_MALLOC),
                                ("torch_eager_same_malloc", "torch_eager", SAME_MALLOC),
                                ("torch_compile_same_malloc", "torch_compile", SAME_MALLOC)):
      cmds[name], tunables[name] = cmds[base], setting
  runs = {k: [] for k in cmds}
  load0 = os.getloadavg()[0]
  for _ in range(args.rounds):
    for name, cmd in cmds.items():
      runs[name].append(run_json(cmd, flags.get(name), tunables.get(name)))
  load1 = os.getloadavg()[0]
  rates = {k: [r["tokens_per_s"] for r in v] for k, v in runs.items()}
  med = {k: statistics.median(v) for k, v in rates.items()}
  flops = runs["jax"][0]["flops_per_token"]
  peak = statistics.median(r["peak_flops"] for r in runs["jax"])
  result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}"
                       f"{cpu_model()}",
            "load_average_1m": [load0, load1], "tokens_per_s_median": med,
            "tokens_per_s_range": {k: [min(v), max(v)] for k, v in rates.items()},
            "jax_over_torch_eager": med["jax"] / med["torch_eager"],
            "jax_over_torch_compile": med["jax"] / med["torch_compile"],
            "mfu": {k: v * flops / peak for k, v in med.items()},
            "flops_per_token": flops, "peak_flops": peak,
            "jax_compile_s": statistics.median(r["compile_s"] for r in runs["jax"]),
            "torch_compile_warmup_s": statistics.median(
                r["warmup_s"] for r in runs["torch_compile"]),
            "jax_xla_flags": args.jax_xla_flags, "glibc_tunables": tunables, "runs": runs}
  # What the targets ask of the whole step, in MFU of the same run's peak.
  result["mfu_needed"] = {"1.2x torch eager": 1.2 * result["mfu"]["torch_eager"],
                          "1.0x torch.compile": result["mfu"]["torch_compile"]}
  if tunables:
    result["jax_over_torch_eager_same_malloc"] = med["jax"] / med["torch_eager_same_malloc"]
    result["jax_over_torch_compile_same_malloc"] = (med["jax"]
                                                    / med["torch_compile_same_malloc"])
  if flags:
    result["jax_flags_over_torch_eager"] = med["jax_flags"] / med["torch_eager"]
    result["jax_flags_over_torch_compile"] = med["jax_flags"] / med["torch_compile"]
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", args.name + ".json"), "w") as f:
    json.dump(result, f, indent=2)
  version = runs["torch_eager"][0]["torch_version"]
  labels = {"jax": "tx_jax (jit, fp32)", "torch_eager": f"PyTorch {version} eager",
            "torch_compile": f"PyTorch {version} torch.compile (inductor)",
            "jax_flags": f"tx_jax with XLA_FLAGS=`{args.jax_xla_flags}`",
            "jax_default_malloc": "tx_jax with glibc's default malloc",
            "torch_eager_same_malloc": f"PyTorch {version} eager, tx-jax's malloc settings",
            "torch_compile_same_malloc": f"PyTorch {version} torch.compile, tx-jax's malloc "
                                         "settings"}
  rows = "".join(
      f"| {labels[k]} | {med[k]:.0f} | {min(rates[k]):.0f}-{max(rates[k]):.0f} | "
      f"{result['mfu'][k]:.2f} |\n" for k in cmds)
  md = (f"# GPT bench shape, train step, CPU ({result['machine']})\n\n"
        f"| implementation | tokens/s (median of {args.rounds}) | range | MFU |\n"
        f"|---|---|---|---|\n{rows}\n"
        f"tx_jax / PyTorch eager = {result['jax_over_torch_eager']:.2f}; tx_jax / "
        f"torch.compile = {result['jax_over_torch_compile']:.2f}"
        + (f"; with the flags {result['jax_flags_over_torch_eager']:.2f} and "
           f"{result['jax_flags_over_torch_compile']:.2f}" if flags else "")
        + (f"; against PyTorch with tx-jax's malloc settings "
           f"(`GLIBC_TUNABLES={SAME_MALLOC}`) "
           f"{result['jax_over_torch_eager_same_malloc']:.2f} and "
           f"{result['jax_over_torch_compile_same_malloc']:.2f}" if tunables else "")
        + ". MFU against the fp32 "
        f"matmul peak measured by the tx_jax runs ({peak / 1e9:.0f} GFLOP/s), "
        f"{flops / 1e6:.1f} MFLOP per token (6N + 12 L d T); 1.2x PyTorch eager would "
        f"take an MFU of {result['mfu_needed']['1.2x torch eager']:.2f} over the whole "
        f"step, matmuls and everything else. tx_jax compile "
        f"{result['jax_compile_s']:.1f} s; torch.compile's first 3 steps "
        f"{result['torch_compile_warmup_s']:.1f} s. Load average {load0:.1f} before, "
        f"{load1:.1f} after.\n")
  with open(os.path.join(HERE, "results", args.name + ".md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
