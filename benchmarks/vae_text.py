"""Text VAE against the same decoder without z, on held-out python-docs sentences.

  python benchmarks/vae_text.py [--out-dir runs/vae_text] [--steps N]
  python benchmarks/vae_text.py --no-train [--at-step S]   # report on existing runs

Trains configs/vae.py (tiny, defaults) and, in parallel, the same network with
z = 0, no KL and no word dropout (`vae.unconditional=true`, `vae.word_dropout=0`:
an unconditional causal LM of exactly the VAE decoder's size, as good as it
can be made) for the same steps on the same tokenizer (the VAE run's), then
reports from each run's last eval: the VAE's negative ELBO, reconstruction
loss given z, KL, active units, mutual information and ELBO bits per byte
beside the unconditional decoder's loss and bits per byte; wall and CPU
seconds of each run; and prior samples, reconstructions and an interpolation
of the trained VAE. Writes benchmarks/results/vae_text.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
INTERPOLATE = ("Return the number of items in the list.",
               "The exception is raised when the file is closed.")
RECONSTRUCT = ("Return the number of items in the list.",
               "If the value is not found, an exception is raised.",
               "The object is created when the class is called.")


def train(workdir: str, overrides: list[str]) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "tx_jax", "train", "--config", "configs/vae.py",
         "--workdir", workdir] + [f"--config.{o}" for o in overrides]
  log = open(workdir + ".log", "w")
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, started: float) -> dict:
  """Waits for `proc`; its wall seconds and CPU seconds (user + sys, with children)."""
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"training failed ({proc.args}); see its .log")
  return {"wall_s": round(time.time() - started, 1),
          "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def last_eval(workdir: str, at_step: int = 0) -> dict:
  """The run's last eval line (or the one at step at_step)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if '"eval/loss"' in line]
  if at_step:
    lines = [line for line in lines if line["step"] == at_step]
  if not lines:
    raise SystemExit(f"{workdir} has no eval{f' at step {at_step}' if at_step else ''} yet")
  return lines[-1]


def time_log(path: str) -> dict:
  """Wall and CPU seconds from `/usr/bin/time -v` output at the end of a run's log, or
  from a {"wall_s", "cpu_s"} JSON file."""
  if path.endswith(".json"):
    with open(path) as f:
      return json.load(f)
  text = open(path).read()
  get = lambda key: text.split(key)[-1].split("\n")[0].strip()
  h_m_s = [float(x) for x in get("Elapsed (wall clock) time (h:mm:ss or m:ss):").split(":")]
  wall = sum(x * 60 ** i for i, x in enumerate(reversed(h_m_s)))
  cpu = float(get("User time (seconds):")) + float(get("System time (seconds):"))
  return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def generate(workdir: str, *args: str) -> list[str]:
  out = subprocess.run([sys.executable, "-m", "tx_jax", "generate", "--workdir", workdir,
                        *args], cwd=ROOT, check=True, capture_output=True, text=True)
  return out.stdout.rstrip("\n").split("\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "vae_text"))
  parser.add_argument("--steps", type=int, default=0, help="0: the config's train.steps")
  parser.add_argument("--no-train", action="store_true",
                      help="report on runs already in --out-dir (times from their "
                      "`/usr/bin/time -v` logs, NAME.log, or NAME.time.json)")
  parser.add_argument("--at-step", type=int, default=0,
                      help="compare the evals at this step (0: the last ones)")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  vae_dir, lm_dir = (os.path.join(args.out_dir, n) for n in ("vae", "unconditional"))
  if args.no_train:
    times = {n: time_log(next(p for p in (os.path.join(args.out_dir, f"{n}.time.json"),
                                          os.path.join(args.out_dir, f"{n}.log"))
                              if os.path.exists(p))) for n in ("vae", "unconditional")}
  else:
    times = train_both(vae_dir, lm_dir, [f"train.steps={args.steps}"] if args.steps else [])
  report(vae_dir, lm_dir, times, args.at_step)


def train_both(vae_dir: str, lm_dir: str, steps: list[str]) -> dict:
  t0 = time.time()
  vae = train(vae_dir, steps)
  spm = os.path.join(vae_dir, "tokenizer")
  while not os.path.isdir(spm):   # the baseline reads the VAE run's own tokenizer
    if vae.poll() is not None:
      raise SystemExit(f"the VAE run stopped before writing its tokenizer; see {vae_dir}.log")
    time.sleep(2)
  t1 = time.time()
  lm = train(lm_dir, steps + ["vae.unconditional=true", "vae.word_dropout=0",
                              f"data.tokenizer=spm:{os.path.join(vae_dir, 'spm.model')}"])
  return {"vae": wait(vae, t0), "unconditional": wait(lm, t1)}


def report(vae_dir: str, lm_dir: str, times: dict, at_step: int):
  v, u = last_eval(vae_dir, at_step), last_eval(lm_dir, at_step)
  assert v["step"] == u["step"], (v["step"], u["step"])
  keys = ("loss", "reconstruction_loss", "kl", "active_units", "mutual_info",
          "elbo_bits_per_byte", "reconstruction_bits_per_byte", "accuracy")
  result = {
      "step": v["step"],
      "vae": {k: v.get(f"eval/{k}") for k in keys},
      "unconditional": {"loss": u["eval/reconstruction_loss"],
                        "bits_per_byte": u["eval/elbo_bits_per_byte"],
                        "accuracy": u["eval/accuracy"]},
      "times": times,
      "samples_from_prior": generate(vae_dir, "--num-samples", "5", "--temperature", "0"),
      "interpolation": {"a": INTERPOLATE[0], "b": INTERPOLATE[1], "greedy": generate(
          vae_dir, "--interpolate", *INTERPOLATE, "--num-samples", "5", "--temperature", "0")},
      "reconstructions": {t: generate(vae_dir, "--reconstruct", t, "--temperature", "0")[0]
                          for t in RECONSTRUCT},
  }
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "vae_text.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(RESULTS, "vae_text.md"), "w") as f:
    f.write(markdown(result))
  print(json.dumps(result, indent=2))


def markdown(r: dict) -> str:
  v, u, t = r["vae"], r["unconditional"], r["times"]
  lines = [
      "# Text VAE vs the same decoder without z (python-docs sentences, held out)", "",
      f"`python benchmarks/vae_text.py`: configs/vae.py tiny, held-out evals at step {r['step']}, "
      "both runs on one SentencePiece (the VAE's); "
      "the baseline is `vae.unconditional=true "
      "vae.word_dropout=0` (z = 0, no KL: a causal LM of the decoder's exact size).", "",
      "| held-out metric | VAE | unconditional decoder |", "|---|---|---|",
      f"| reconstruction loss given z (nats/token) | {v['reconstruction_loss']:.4f} | "
      f"{u['loss']:.4f} (no z) |",
      f"| negative ELBO (nats/token) | {v['loss']:.4f} | {u['loss']:.4f} |",
      f"| bits per byte | {v['elbo_bits_per_byte']:.4f} (ELBO bound) | "
      f"{u['bits_per_byte']:.4f} |",
      f"| KL (nats/sentence) | {v['kl']:.3f} | 0 |",
      f"| active units (of the latent dims) | {v['active_units']} | - |",
      f"| mutual information I(x; z) (nats) | {v['mutual_info']:.3f} | - |",
      f"| next-token accuracy | {v['accuracy']:.4f} | {u['accuracy']:.4f} |", "",
      "| run | wall | CPU seconds (user + sys) |", "|---|---|---|",
      f"| VAE | {t['vae']['wall_s']:.0f} s | {t['vae']['cpu_s']:.0f} |",
      f"| unconditional | {t['unconditional']['wall_s']:.0f} s | "
      f"{t['unconditional']['cpu_s']:.0f} |", "",
      "Samples from the prior (greedy):", ""]
  lines += [f"- {s}" for s in r["samples_from_prior"]]
  i = r["interpolation"]
  lines += ["", f"Interpolation (greedy), A = \"{i['a']}\", B = \"{i['b']}\":", ""]
  lines += [f"{k}. {s}" for k, s in enumerate(i["greedy"], 1)]
  lines += ["", "Reconstructions (greedy from the posterior mean):", ""]
  lines += [f"- \"{a}\" -> \"{b}\"" for a, b in r["reconstructions"].items()]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
