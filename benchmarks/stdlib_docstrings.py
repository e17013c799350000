"""Clustering the standard library's docstrings by package: TF-IDF vs tx_jax embeddings.

  python benchmarks/stdlib_docstrings.py [--dir DIR] [--steps 600] [--workdir WD ...]

The 2,154 docstrings of `embedded:stdlib-docstrings` come from 18 top-level
packages. Both sides cluster with k-means, k = 18, and never see the package
labels, which only score the result (NMI, mean over 5 seeds):

- baseline: `tfidf_kmeans_nmi` (word TF-IDF, sublinear tf, English stop words).
- tx_jax: `tx-jax topics --data embedded:stdlib-docstrings --k 18` pretrains the
  topics model on the docstrings themselves (self-supervised: the labels are
  not used), then every named layer x pooling x normalisation is embedded and
  clustered. `--workdir` adds other trained workdirs (e.g. a GPT pretrained on
  embedded:python-docs) to the table.

Writes benchmarks/results/stdlib_docstrings.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEEDS = range(5)
NORMALIZE = (None, "l2", "standardize")


def nmi_over_seeds(x, labels, k):
  from sklearn.metrics import normalized_mutual_info_score
  from tx_jax.analysis import cluster
  scores = [normalized_mutual_info_score(labels, cluster.kmeans(x, k, seed)[0]) for seed in SEEDS]
  return {"mean": round(float(np.mean(scores)), 4), "min": round(float(np.min(scores)), 4),
          "max": round(float(np.max(scores)), 4)}


def variants(workdir, source, labels, k):
  """NMI of k-means on every layer x pooling x normalisation of a trained model."""
  from tx_jax.analysis import embed, reduce
  from tx_jax.objectives import text as text_obj
  from tx_jax.train.trained import load_trained
  trained = load_trained(workdir, mesh=embed.embed_mesh())
  layers = text_obj.model_layers(trained.objective.model, 8)
  rows = []
  for layer in layers:
    for pooling in text_obj.POOLINGS:
      if pooling == "cls" and "<cls>" not in trained.tokenizer.special_ids:
        continue  # A causal model's first token has seen only itself.
      result = embed.embed_source(trained, source, layer=layer, pooling=pooling, progress=False)
      for how in NORMALIZE:
        x = reduce.normalize(result.embeddings, how)
        rows.append({"layer": layer, "pooling": pooling, "normalize": how or "none",
                     "nmi": nmi_over_seeds(x, labels, k), "truncated": result.truncated})
        print(json.dumps(rows[-1]), flush=True)
  return {"workdir": workdir, "step": int(trained.step), "objective": trained.config.objective,
          "model": {k: trained.config.model[k] for k in ("num_layers", "d_model", "num_heads",
                                                         "mlp_dim", "max_len", "vocab_size")},
          "train_source": trained.config.data.source, "tokenizer": trained.config.data.tokenizer,
          "variants": rows, "best": max(rows, key=lambda r: r["nmi"]["mean"])}


def markdown(result) -> str:
  """The results as a short markdown page (the best variants of each model)."""
  t = result["tfidf_kmeans_nmi"]
  lines = [
      "# Clustering stdlib docstrings by package: TF-IDF vs tx_jax embeddings", "",
      f"{result['n']} docstrings of `embedded:stdlib-docstrings`, {result['k']} packages "
      f"(labels held back; they only score). k-means with k = {result['k']}, NMI as mean "
      f"[min, max] over seeds {result['seeds']}. Python {result['python']}; "
      f"{result['machine']}.", "",
      f"Command: `{result['command']}`", "",
      "| representation | NMI mean | min | max |", "|---|---|---|---|",
      f"| TF-IDF (words, sublinear tf, English stop words) + k-means | {t['mean']} | "
      f"{t['min']} | {t['max']} |"]
  for m in result["models"]:
    rows = sorted(m["variants"], key=lambda r: -r["nmi"]["mean"])[:3]
    for r in rows:
      lines.append(f"| {m['objective']} ({m['model']['num_layers']} layers, d "
                   f"{m['model']['d_model']}, {m['step']} steps): {r['layer']}, {r['pooling']} "
                   f"pooling, {r['normalize']} | {r['nmi']['mean']} | {r['nmi']['min']} | "
                   f"{r['nmi']['max']} |")
  topics = result["topics"]
  lines += ["", f"`tx-jax topics` (tokenizer + {topics['steps']} pretraining steps + embed + "
            f"report) took {topics['wall_s']} s wall; its own report (default flags, seed 0): "
            f"NMI {round(topics['report_metrics'].get('nmi'), 4)}.", ""]
  lines += [f"- {note}" for note in result.get("notes", [])] + [""]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/tx_jax_stdlib_topics")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--workdir", action="append", default=[],
                      help="more trained workdirs to compare")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "stdlib_docstrings.json"))
  parser.add_argument("--note", action="append", default=[],
                      help="a line for the markdown (e.g. how a --workdir was trained)")
  parser.add_argument("--add", action="store_true",
                      help="keep the topics run and models of the existing --out file and "
                           "only score the --workdir models")
  args = parser.parse_args()
  from tx_jax.analysis.report import tfidf_kmeans_nmi
  from tx_jax.data import sources
  source = sources.open_source("embedded:stdlib-docstrings")
  texts = [source[i]["text"] for i in range(len(source))]
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  k = len(source.label_names)
  tfidf = [tfidf_kmeans_nmi(texts, labels, k, seed) for seed in SEEDS]
  result = {"n": len(texts), "k": k, "packages": source.label_names,
            "python": sys.version.split()[0], "seeds": list(SEEDS),
            "tfidf_kmeans_nmi": {"mean": round(float(np.mean(tfidf)), 4),
                                 "min": round(float(np.min(tfidf)), 4),
                                 "max": round(float(np.max(tfidf)), 4)}}
  print(json.dumps(result), flush=True)

  if args.add:
    with open(args.out) as f:
      old = json.load(f)
    result.update(topics=old["topics"], notes=old.get("notes", []) + args.note,
                  command=old["command"] + "; " + " ".join(
        ["python", "benchmarks/stdlib_docstrings.py", *sys.argv[1:]]))
    result["models"] = [m for m in old["models"] if m["workdir"] not in args.workdir]
    result["models"] += [variants(wd, source, labels, k) for wd in args.workdir]
    return _write(result, args.out)

  # The analyst's path, on the docstrings themselves.
  t0 = time.perf_counter()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  subprocess.run([sys.executable, "-m", "tx_jax", "topics", "--data",
                  "embedded:stdlib-docstrings", "--out", args.dir, "--k", str(k),
                  "--steps", str(args.steps)], check=True, cwd=ROOT, env=env)
  report = json.load(open(os.path.join(args.dir, "report", "report.json")))
  evals = [json.loads(l) for l in open(os.path.join(args.dir, "model", "metrics.jsonl"))
           if "eval/loss" in l]
  result["topics"] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": args.steps,
                      "eval": evals[-1] if evals else None,
                      "report_metrics": report["metrics"], "normalize": report["normalize"]}
  result["models"] = [variants(wd, source, labels, k)
                      for wd in [os.path.join(args.dir, "model"), *args.workdir]]
  result["command"] = " ".join(["python", "benchmarks/stdlib_docstrings.py", *sys.argv[1:]])
  result["notes"] = args.note
  _write(result, args.out)


def _write(result, out):
  result["load_avg_1m"] = round(os.getloadavg()[0], 2)
  result["machine"] = f"shared {os.cpu_count()}-core CPU (other jobs running; see load_avg_1m)"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(markdown(result))
  print(json.dumps({"tfidf": result["tfidf_kmeans_nmi"],
                    "best": [m["best"] for m in result["models"]]}))


if __name__ == "__main__":
  main()
