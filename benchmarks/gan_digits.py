"""Transformer GAN on digits: real held-out images / full-covariance Gaussian / GAN, 3 seeds.

  python benchmarks/gan_digits.py [--runs runs/gan_digits] [--seeds 0 1 2] [--jobs 3]
                                  [--config.a.b=value ...]

Trains `tx-jax train --config configs/gan.py` (the default, `tiny`, on
embedded:digits) once per training seed (train.seed; a workdir that already
holds its final checkpoint is reused), recording each run's wall and CPU
time, then reads the final eval line of every run: FID, Inception Score,
class coverage and classifier confidence of the EMA generator, of real
held-out images (the floor) and of a Gaussian fitted to the training
pixels, all in the feature space of the small CNN each run trains on the
labelled training images (tx_jax/evaluation/sample_quality.py; N = the
360 held-out images for every set). Writes benchmarks/results/gan_digits.json
and .md and copies the first seed's last sample grid beside them.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = ("fid", "inception_score", "class_coverage", "confidence")
SETS = {"real held-out images": "real_", "Gaussian fit to training pixels": "gaussian_",
        "GAN (EMA generator)": "", "GAN (raw generator)": "generator_"}


def final_step(workdir: str) -> int:
  path = os.path.join(workdir, "checkpoints")
  return max([int(d) for d in os.listdir(path) if d.isdigit()], default=0) if os.path.isdir(
      path) else 0


def start(workdir: str, seed: int, extra: list[str]):
  cmd = [sys.executable, "-m", "tx_jax", "train", "--config", "configs/gan.py",
         "--workdir", workdir, f"--config.train.seed={seed}", *extra]
  log = open(workdir + ".log", "w")
  return cmd, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def last_eval(workdir: str) -> dict:
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in lines if "eval/fid" in r]
  return evals[-1]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs", "gan_digits"))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
  p.add_argument("--out", default=os.path.join(HERE, "results", "gan_digits.json"))
  p.add_argument("--collect-only", action="store_true",
                 help="train nothing: tabulate the newest eval of each run as it stands")
  args, extra = p.parse_known_args()
  os.makedirs(args.runs, exist_ok=True)
  sys.path.insert(0, ROOT)
  from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_overrides(
      config_lib.load_config_file(os.path.join(ROOT, "configs", "gan.py")),
      [e[len("--config."):] for e in extra])
  steps = config.train.steps

  # --- Train (at most --jobs at a time), timing each run -------------------------
  workdirs = {s: os.path.join(args.runs, f"seed_{s}") for s in args.seeds}
  todo = [] if args.collect_only else [s for s in args.seeds
                                       if final_step(workdirs[s]) < steps]
  timing, running = {}, {}
  while todo or running:
    while todo and len(running) < args.jobs:
      s = todo.pop(0)
      cmd, proc = start(workdirs[s], s, extra)
      running[s] = (cmd, proc, time.perf_counter())
    time.sleep(2)
    for s, (cmd, proc, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      if proc.returncode:
        raise SystemExit(f"seed {s} failed (exit {proc.returncode}); see {workdirs[s]}.log")
      # getrusage covers every finished child: diff before and after this one's wait.
      timing[s] = {"command": " ".join(["tx-jax", *cmd[3:]]),
                   "wall_s": time.perf_counter() - t0,
                   "load_average_1m_at_end": os.getloadavg()[0]}
      del running[s]
  total = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_all = total.ru_utime + total.ru_stime

  # --- Collect ----------------------------------------------------------------------
  runs = {}
  for s in args.seeds:
    record = last_eval(workdirs[s])
    runs[s] = {"step": record["step"],
               **{f"{prefix}{n}": record[f"eval/{prefix}{n}"] for prefix in SETS.values()
                  for n in NAMES},
               "classifier_accuracy": record.get("eval/classifier_accuracy"),
               "fid_curve": [(r["step"], r["eval/fid"]) for r in map(
                   json.loads, open(os.path.join(workdirs[s], "metrics.jsonl")))
                             if "eval/fid" in r],
               **({"training": timing[s]} if s in timing else {})}

  def spread(key):
    values = [runs[s][key] for s in args.seeds]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
            "per_seed": values}

  table = {name: {n: spread(f"{prefix}{n}") for n in NAMES} for name, prefix in SETS.items()}
  gan, gauss, real = (table["GAN (EMA generator)"], table["Gaussian fit to training pixels"],
                      table["real held-out images"])
  checks = {
      "fid_at_most_half_the_gaussians_every_seed": all(
          runs[s]["fid"] <= 0.5 * runs[s]["gaussian_fid"] for s in args.seeds),
      "all_classes_covered_every_seed": all(runs[s]["class_coverage"] == 1.0
                                            for s in args.seeds),
      "confidence_gap_to_real_images_max": max(
          runs[s]["real_confidence"] - runs[s]["confidence"] for s in args.seeds)}
  result = {"config": "configs/gan.py (tiny)", "data": config.data.source,
            "steps": steps, "seeds": args.seeds, "table": table, "checks": checks,
            "runs": {str(s): r for s, r in runs.items()},
            "cpu_s_all_runs_trained_now": cpu_all if timing else None,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)

  # --- Markdown ---------------------------------------------------------------------
  fmt = lambda d: f"{d['mean']:.2f} ({d['min']:.2f}-{d['max']:.2f})"
  at = sorted({runs[s]["step"] for s in args.seeds})
  lines = [f"# Transformer GAN on digits (step {'/'.join(map(str, at))} of {steps}, "
           f"seeds {args.seeds})", "",
           "Mean over training seeds (min-max). Features, IS and coverage from the small CNN "
           "each run trains on the labelled training images "
           f"(held-out accuracy {fmt(spread('classifier_accuracy'))}); FID against the "
           "features of all training images; every set has the same N (the held-out images).",
           "", "| images | FID | Inception Score | class coverage | confidence |",
           "|---|---|---|---|---|"]
  for name in SETS:
    lines.append(f"| {name} | " + " | ".join(fmt(table[name][n]) for n in NAMES) + " |")
  lines += ["", f"- FID at most half the Gaussian's, every seed: "
                f"{checks['fid_at_most_half_the_gaussians_every_seed']}",
            f"- every class covered, every seed: {checks['all_classes_covered_every_seed']}",
            f"- largest confidence gap to real images: "
            f"{checks['confidence_gap_to_real_images_max']:.3f}",
            f"- GAN FID per seed: {', '.join(f'{v:.2f}' for v in gan['fid']['per_seed'])} "
            f"(Gaussian {fmt(gauss['fid'])}, real {fmt(real['fid'])})"]
  if timing:
    lines += ["", "Training (tx-jax train, " + (f"{args.jobs} at a time" if args.jobs > 1
                                                 else "one at a time") + f", {os.cpu_count()} "
              "CPU cores shared with other work):", ""]
    for s in args.seeds:
      if s in timing:
        t = timing[s]
        lines.append(f"- seed {s}: {t['wall_s']:.0f} s wall, load average "
                     f"{t['load_average_1m_at_end']:.1f} at the end")
    lines.append(f"- CPU time of all runs together: {cpu_all:.0f} s")
  lines += ["", "![samples](gan_digits_samples.png)", ""]
  with open(args.out[:-len(".json")] + ".md", "w") as f:
    f.write("\n".join(lines))
  grids = sorted(os.listdir(os.path.join(workdirs[args.seeds[0]], "samples")))
  shutil.copy(os.path.join(workdirs[args.seeds[0]], "samples", grids[-1]),
              os.path.join(os.path.dirname(args.out), "gan_digits_samples.png"))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
