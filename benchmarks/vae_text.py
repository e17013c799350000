"""Text VAE against the same decoder without z, on held-out python-docs sentences.

  python benchmarks/vae_text.py [--out-dir runs/vae_text] [--steps N]

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


def last_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if '"eval/loss"' in line]
  return lines[-1]


def generate(workdir: str, *args: str) -> list[str]:
  out = subprocess.run([sys.executable, "-m", "tx_jax", "generate", "--workdir", workdir,
                        *args], cwd=ROOT, check=True, capture_output=True, text=True)
  return out.stdout.rstrip("\n").split("\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "runs", "vae_text"))
  parser.add_argument("--steps", type=int, default=0, help="0: the config's train.steps")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  vae_dir, lm_dir = (os.path.join(args.out_dir, n) for n in ("vae", "unconditional"))
  steps = [f"train.steps={args.steps}"] if args.steps else []

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
  times = {"vae": wait(vae, t0), "unconditional": wait(lm, t1)}

  v, u = last_eval(vae_dir), last_eval(lm_dir)
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
      f"`python benchmarks/vae_text.py`: configs/vae.py tiny, {r['step']} steps each, both on "
      "the VAE run's SentencePiece; the baseline is `vae.unconditional=true "
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
      "| run | wall (shared machine) | CPU seconds (user + sys) |", "|---|---|---|",
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
