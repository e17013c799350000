"""Transfer learning on one split: TF-IDF + logistic regression, a classifier from
scratch, fine-tuned from the project's own pretrained encoder, and its linear probe.

  python benchmarks/classify_stdlib.py [--steps 600] [--runs runs/classify_bench] [--minilm W]
  python benchmarks/classify_stdlib.py --digits      # MAE fine-tune / probe / ViT scratch

Text (embedded:stdlib-docstrings, 18 packages): the classifier's own split, a
seeded stratified 20% held out by document. The encoder is configs/bert.py
tiny pretrained (masked LM) on the *training* documents' texts only
(`--pretrain-steps`), so no held-out document is seen before evaluation. Rows:
  tfidf_logreg   TF-IDF (word 1-2 grams, sublinear tf) + LogisticRegression (C = 10)
  scratch        configs/classify.py with the pretrained encoder's architecture and
                 tokenizer, random init, the same steps and optimizer as `finetune`
  finetune       init_from the pretrained encoder, every parameter trained
  linear_probe   init_from, body frozen; beside it scikit-learn's LogisticRegression
                 on the same frozen features (the probe's reference)
  minilm         fine-tuned from the imported all-MiniLM-L6-v2 (needs `tx-jax import`)

Digits (embedded:digits, the MAE config's 80/20 split): configs/mae.py tiny
pretrained for `--pretrain-steps` steps, then fine-tuned, linear-probed, and the
same ViT trained from scratch, the same steps each.

Each run is a `tx-jax train` subprocess in its own workdir under --runs (reused
when it already holds its final checkpoint); results go to
benchmarks/results/classify_{stdlib,digits}.{json,md}.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def run_train(config: str, workdir: str, overrides: list[str], steps: int) -> dict:
  """`tx-jax train` (skipped when `workdir` holds step `steps`); -> final eval metrics
  (the last logged training loss when the run was stopped before its eval)."""
  done = os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
  timing = {}
  if not done:
    cmd = [sys.executable, "-m", "tx_jax", "train", "--config", config, "--workdir", workdir,
           *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round((after.ru_utime - before.ru_utime)
                             + (after.ru_stime - before.ru_stime), 1),
              "load_average_1m_at_end": os.getloadavg()[0]}
    with open(os.path.join(workdir, "bench_timing.json"), "w") as f:
      json.dump(timing, f)
  elif os.path.isfile(os.path.join(workdir, "bench_timing.json")):
    timing = json.load(open(os.path.join(workdir, "bench_timing.json")))
  logs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [e for e in logs if any(k.startswith("eval/") for k in e)]
  last = evals[-1] if evals else {"step": logs[-1]["step"],
                                  "eval/train_loss": logs[-1].get("train/loss")}
  rel = lambda a: a.replace(ROOT + os.sep, "")  # paths as typed from the checkout
  return {"command": " ".join(["tx-jax train --config", config, "--workdir", rel(workdir),
                               *map(rel, overrides)]),
          "step": last["step"], **{k[5:]: v for k, v in last.items()
                                  if k.startswith("eval/") and "/" not in k[5:]},
          **timing}


def model_overrides(workdir: str) -> list[str]:
  """--config.model.* = the pretrained workdir's architecture (a same-shape scratch run)."""
  model = json.load(open(os.path.join(workdir, "config.json")))["model"]
  return [f"--config.model.{k}={v}" for k, v in model.items()
          if not k.startswith("decoder_")]


def probe_reference(workdir: str, train_src, eval_src) -> dict:
  """LogisticRegression on the frozen features the probe workdir's head was trained on."""
  import jax
  import numpy as np
  from sklearn.linear_model import LogisticRegression
  from tx_jax.data import labelled
  from tx_jax.train.trained import load_trained

  trained = load_trained(workdir)
  obj = trained.objective
  feats = jax.jit(lambda p, b: obj.logits(p, b)[1])

  def features(src):
    src = labelled.remap_labels(src, obj.labels)
    xs, ys = [], []
    for start in range(0, len(src), 64):
      records = [src[i] for i in range(start, min(len(src), start + 64))]
      xs.append(np.asarray(feats(trained.params, obj.predict_collate(records))))
      ys += [r["label"] for r in records]
    return np.concatenate(xs), np.asarray(ys)
  (xt, yt), (xe, ye) = features(train_src), features(eval_src)
  from sklearn.metrics import f1_score
  clf = LogisticRegression(C=10.0, max_iter=5000).fit(xt, yt)
  pred = clf.predict(xe)
  return {"accuracy": float((pred == ye).mean()),
          "macro_f1": float(f1_score(ye, pred, average="macro")),
          "protocol": "LogisticRegression(C=10) on the frozen body's pooled features"}


def wanted(args, *rows) -> bool:
  """Whether this call runs any of `rows` (--only runs single rows, e.g. in parallel)."""
  return not args.only or any(r in args.only for r in rows)


def text(args) -> dict:
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import f1_score
  from tx_jax.data import labelled, sources

  runs = args.runs
  os.makedirs(runs, exist_ok=True)
  src = sources.open_source("embedded:stdlib-docstrings")
  train_src, eval_src = labelled.stratified_split(src, 0.2, 0)
  rows = {}

  # TF-IDF + logistic regression on the same split.
  xt = [train_src[i]["text"] for i in range(len(train_src))]
  xe = [eval_src[i]["text"] for i in range(len(eval_src))]
  yt, ye = labelled.all_labels(train_src), labelled.all_labels(eval_src)
  vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
  clf = LogisticRegression(C=10.0, max_iter=5000).fit(vec.fit_transform(xt), yt)
  pred = clf.predict(vec.transform(xe))
  rows["tfidf_logreg"] = {"accuracy": float(sum(p == y for p, y in zip(pred, ye)) / len(ye)),
                          "macro_f1": float(f1_score(ye, pred, average="macro"))}

  # The pretrained encoder: masked LM on the training documents' texts only.
  corpus = os.path.join(runs, "stdlib_train.jsonl")
  if not os.path.isfile(corpus):
    with open(corpus, "w") as f:
      for t in xt:
        f.write(json.dumps({"text": t}) + "\n")
  pre = os.path.join(runs, "pretrained_bert")
  pretrain = {"command": "(not run in this call)", "step": None}
  if wanted(args, "finetune", "linear_probe"):
    pretrain = run_train("configs/bert.py", pre, [
        f"--config.data.source=file:{corpus}", "--config.data.eval_source=",
        f"--config.train.steps={args.pretrain_steps}",
        f"--config.train.eval_every={args.pretrain_steps}",
        f"--config.train.checkpoint_every={args.pretrain_steps // 2}"],
        args.pretrain_stop or args.pretrain_steps)

  n = args.steps
  common = [f"--config.train.steps={n}", f"--config.train.eval_every={n}",
            f"--config.train.checkpoint_every={n}", "--config.train.batch_size=16",
            f"--config.data.seq_len={args.seq_len}", f"--config.optim.lr={args.lr}",
            "--config.optim.warmup_steps=30"]
  if wanted(args, "scratch"):
    rows["scratch"] = run_train("configs/classify.py", os.path.join(runs, "scratch"),
                                [*common, *model_overrides(pre)], n)
  if wanted(args, "finetune"):
    rows["finetune"] = run_train("configs/classify.py", os.path.join(runs, "finetune"),
                                 [*common, f"--config.init_from={pre}"], n)
  probe_wd = os.path.join(runs, "linear_probe")
  if wanted(args, "linear_probe"):
    rows["linear_probe"] = run_train("configs/classify.py", probe_wd, [
        *common, f"--config.init_from={pre}", "--config.finetune.mode=linear_probe",
        f"--config.optim.lr={args.probe_lr}", "--config.optim.weight_decay=0.0"], n)
    rows["linear_probe_sklearn"] = probe_reference(probe_wd, train_src, eval_src)
  if args.minilm and wanted(args, "minilm"):
    # The default config as a user runs it (500 steps of 32 x 64 wordpieces), unless
    # --minilm-steps / --minilm-lr say otherwise.
    steps = args.minilm_steps or 500
    extra = ([f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
              f"--config.train.checkpoint_every={steps}"] if args.minilm_steps else [])
    extra += [f"--config.optim.lr={args.minilm_lr}"] if args.minilm_lr else []
    rows["minilm"] = run_train("configs/classify.py", os.path.join(runs, "minilm_finetune"),
                               [f"--config.init_from={args.minilm}", *extra], steps)
    rows["minilm"]["steps_note"] = (f"{steps} steps of 32 (the default config); the other "
                                    f"rows: {n} of 16")
  elif not args.minilm:
    rows["minilm"] = {"status": "not run: give --minilm WORKDIR (tx-jax import of "
                                "all-MiniLM-L6-v2)"}
  return {"data": "embedded:stdlib-docstrings", "split": "stratified 20% held out, seed 0",
          "train_documents": len(train_src), "eval_documents": len(eval_src),
          "classes": len(set(yt)), "pretrain": pretrain, "rows": rows}


def digits(args) -> dict:
  runs = args.runs
  os.makedirs(runs, exist_ok=True)
  pre = os.path.join(runs, "pretrained_mae")
  pretrain = {"command": "(not run in this call)", "step": None}
  if wanted(args, "finetune", "linear_probe"):
    pretrain = run_train("configs/mae.py", pre, [
        f"--config.train.steps={args.pretrain_steps}",
        f"--config.train.eval_every={args.pretrain_steps}",
        f"--config.train.checkpoint_every={args.pretrain_steps // 2}"],
        args.pretrain_stop or args.pretrain_steps)
  n = args.steps
  common = [f"--config.train.steps={n}", f"--config.train.eval_every={n}",
            f"--config.train.checkpoint_every={n}", "--config.train.batch_size=64",
            "--config.optim.warmup_steps=30"]
  rows = {}
  if wanted(args, "finetune"):
    rows["finetune"] = run_train("configs/classify.py:image",
                                 os.path.join(runs, "digits_finetune"),
                                 [*common, f"--config.init_from={pre}",
                                  f"--config.optim.lr={args.lr}"], n)
  if wanted(args, "linear_probe"):
    rows["linear_probe"] = run_train("configs/classify.py:image",
                                     os.path.join(runs, "digits_probe"),
                                     [*common, f"--config.init_from={pre}",
                                      "--config.finetune.mode=linear_probe",
                                      f"--config.optim.lr={args.probe_lr}",
                                      "--config.optim.weight_decay=0.0"], n)
    from tx_jax.data import images
    train_src, eval_src = images.image_train_eval_sources("embedded:digits", None, 0.2, 0)
    rows["linear_probe_sklearn"] = probe_reference(os.path.join(runs, "digits_probe"),
                                                   train_src, eval_src)
  if wanted(args, "scratch"):
    rows["scratch"] = run_train("configs/classify.py:image",
                                os.path.join(runs, "digits_scratch"),
                                [*common, *model_overrides(pre), f"--config.optim.lr={args.lr}"],
                                n)
  return {"data": "embedded:digits", "split": "the MAE config's seeded 20% held out",
          "pretrain": pretrain, "rows": rows}


def write(result: dict, name: str):
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  result["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version()}
  with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = [f"# {name}: {result['data']} ({result['split']})", "",
           "| row | accuracy | macro-F1 | steps | wall s | CPU s |", "|---|---|---|---|---|---|"]
  for row, r in result["rows"].items():
    if "accuracy" not in r:
      lines.append(f"| {row} | {r.get('status', '')} | | | | |")
      continue
    lines.append(f"| {row} | {r['accuracy']:.4f} | {r.get('macro_f1', float('nan')):.4f} | "
                 f"{r.get('step', '')} | {r.get('wall_s', '')} | {r.get('cpu_s', '')} |")
  p = result["pretrain"]
  lines += ["", f"Pretraining: `{p['command']}` (used: step {p['step']}; wall "
            f"{p.get('wall_s', '?')} s, CPU {p.get('cpu_s', 'not measured')} s"
            + (f"; {p['note']}" if p.get("note") else "") + ")."]
  for row, r in result["rows"].items():
    if r.get("steps_note"):
      lines.append(f"{row}: {r['steps_note']}.")
  lines.append(f"Machine: {os.cpu_count()} cores shared with other jobs (load average "
               f"{os.getloadavg()[0]:.0f} when written); wall times are not speeds.")
  with open(os.path.join(HERE, "results", f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--digits", action="store_true", help="the digits comparison instead")
  p.add_argument("--runs", default=os.path.join(ROOT, "runs", "classify_bench"))
  p.add_argument("--steps", type=int, default=0, help="0: 600 (text), 300 (digits)")
  p.add_argument("--pretrain-steps", type=int, default=0, help="0: 1500 (text), 600 (digits)")
  p.add_argument("--pretrain-stop", type=int, default=0,
                 help="pretraining counts as done at this checkpoint (a run stopped early, "
                      "by SIGTERM, on a loaded machine); 0: at --pretrain-steps")
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--probe-lr", type=float, default=1e-2)
  p.add_argument("--minilm", default="", help="workdir of `tx-jax import --from "
                 "all-MiniLM-L6-v2`: adds the row fine-tuned from it")
  p.add_argument("--minilm-steps", type=int, default=0, help="its steps (0: the config's)")
  p.add_argument("--minilm-lr", type=float, default=0.0, help="its lr (0: the config's)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per document")
  p.add_argument("--only", nargs="*", default=[], help="run only these rows (results are "
                 "written by a call without --only, which reuses finished runs)")
  args = p.parse_args()
  args.steps = args.steps or (300 if args.digits else 600)
  args.pretrain_steps = args.pretrain_steps or (600 if args.digits else 1500)
  if args.only:
    (digits if args.digits else text)(args)
  elif args.digits:
    write(digits(args), "classify_digits")
  else:
    write(text(args), "classify_stdlib")


if __name__ == "__main__":
  main()
