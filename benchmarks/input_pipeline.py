"""How long training steps wait for their batches: the LM and MAE pipelines.

  python benchmarks/input_pipeline.py [--steps 120]

Trains `configs/gpt.py:bench` (batch 8 x 256 tokens of embedded:python-docs,
tokenized and packed on the fly) and the default MAE (128 digits per batch,
augmented on the fly) with `tx-jax train`, and reads `input_wait_frac` from
metrics.jsonl: the share of each log interval the loop spent in
`next(batches)`. The device computes the previous step meanwhile, so this is an
upper bound on the share of time the step waited. The first interval (compile)
is left out. Writes benchmarks/results/input_pipeline.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = {"GPT bench (LM packing)": ["--config", "configs/gpt.py:bench"],
        "MAE tiny (digits)": ["--config", "configs/mae.py"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=120)
  args = p.parse_args()
  load0, out = os.getloadavg()[0], {}
  for name, flags in RUNS.items():
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [sys.executable, "-m", "tx_jax", "train", *flags, "--workdir", tmp,
             f"--config.train.steps={args.steps}", "--config.train.log_every=20",
             f"--config.train.eval_every={args.steps}",
             f"--config.train.checkpoint_every={args.steps}"]
      subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
      with open(os.path.join(tmp, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if '"input_wait_frac"' in l]
    waits = [l["input_wait_frac"] for l in lines[1:]]   # past the compile interval
    rate_key = next(k for k in lines[-1] if k.endswith("_per_s"))
    out[name] = {"input_wait_frac_median": statistics.median(waits),
                 "input_wait_frac_max": max(waits), rate_key: lines[-1][rate_key],
                 "command": "tx-jax train " + " ".join(cmd[4:]).replace(tmp, "W")}
  result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "load_average_1m": [load0, os.getloadavg()[0]], "runs": out}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "input_pipeline.json"), "w") as f:
    json.dump(result, f, indent=2)
  rows = "".join(f"| {k} | {v['input_wait_frac_median']:.1%} | {v['input_wait_frac_max']:.1%} |"
                 f" `{v['command']}` |\n" for k, v in out.items())
  md = (f"# Input pipeline: share of step time waiting for batches ({result['machine']})\n\n"
        "| pipeline | median over log intervals | worst interval | command |\n"
        f"|---|---|---|---|\n{rows}\nLoad average {load0:.1f} before, "
        f"{result['load_average_1m'][1]:.1f} after.\n")
  with open(os.path.join(HERE, "results", "input_pipeline.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
