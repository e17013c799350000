"""MAE on digits: trained encoder vs random-init encoder vs raw pixels, one protocol.

  python benchmarks/mae_digits.py [--workdir runs/mae_digits] [--train]

With --train (or when the workdir has no checkpoint) it first runs
`tx-jax train --config configs/mae.py` there and records wall and CPU time.
Then, on the config's split of the digits (80% train / 20% held out, seeded):
  - linear probe (standardised logistic regression), 20-NN (cosine) and
    k-means NMI (k = 10, on all images) of raw pixels, of a randomly
    initialised encoder's `pre_logits` and of the trained encoder's;
  - masked reconstruction loss on the held-out images (averaged over 5 mask
    draws) of the trained and the random-init model, beside predicting each
    masked patch's own mean (the norm-pix baseline).
Writes benchmarks/results/mae_digits.json and .md, and copies the newest
reconstruction grid beside them.
"""

import argparse
import glob
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
sys.path.insert(0, ROOT)


def train(workdir: str, extra: list[str]) -> dict:
  cmd = [sys.executable, "-m", "tx_jax", "train", "--config", "configs/mae.py",
         "--workdir", workdir, *extra]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"command": " ".join(["tx-jax", *cmd[3:]]), "wall_s": time.perf_counter() - t0,
          "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
          "load_average_1m_at_end": os.getloadavg()[0], "cpu_count": os.cpu_count()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "mae_digits"))
  p.add_argument("--train", action="store_true", help="train first (fresh workdir)")
  p.add_argument("--out", default=os.path.join(HERE, "results", "mae_digits.json"))
  p.add_argument("--mask-draws", type=int, default=5)
  p.add_argument("--kmeans-seeds", type=int, default=5)
  args, extra = p.parse_known_args()

  training = None
  has_ckpt = os.path.isdir(os.path.join(args.workdir, "checkpoints")) and any(
      d.isdigit() for d in os.listdir(os.path.join(args.workdir, "checkpoints")))
  if args.train or not has_ckpt:
    training = train(args.workdir, extra)

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tx_jax.evaluation.probe import probe_metrics
  from tx_jax.models.vit import num_kept
  from tx_jax.train.experiment import build_experiment
  from tx_jax.train.trained import load_trained

  trained = load_trained(args.workdir)
  config, objective = trained.config, trained.objective
  exp = build_experiment(config, args.workdir, create_tokenizer=False)
  evaluation = exp.extra_eval
  random_params = nn.unbox(objective.init_params(jax.random.key(config.train.seed + 1)))

  def probes(features_of):
    train_x, train_y = features_of(evaluation.train_src)
    test_x, test_y = features_of(evaluation.eval_src)
    metrics = probe_metrics(train_x, train_y, test_x, test_y, knn_k=config.evaluation.knn_k,
                            seed=config.train.seed)
    # The k-means NMI's spread over k-means seeds (10 k-means++ restarts each).
    from sklearn.metrics import normalized_mutual_info_score
    from tx_jax.analysis.cluster import kmeans
    x, y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    nmis = [normalized_mutual_info_score(y, kmeans(x, len(np.unique(y)), s)[0])
            for s in range(args.kmeans_seeds)]
    return {**metrics, "kmeans_nmi_seeds": {"n": len(nmis), "mean": float(np.mean(nmis)),
                                            "min": float(np.min(nmis)),
                                            "max": float(np.max(nmis))}}

  def pixels(src):
    x = np.stack([evaluation.prep.eval(src[i]["image"]).reshape(-1) for i in range(len(src))])
    return x, np.array([src[i]["label"] for i in range(len(src))])

  t0 = time.perf_counter()
  results = {
      "raw_pixels": probes(pixels),
      "random_init_encoder": probes(lambda s: evaluation.features(random_params, s)),
      "trained_encoder": probes(lambda s: evaluation.features(trained.params, s)),
  }

  loss_fn = jax.jit(lambda p, b, r: objective.loss_fn(p, b, r, False)[1])

  def recon(params):
    total = None
    for draw in range(args.mask_draws):
      for batch in exp.eval_batches():
        sums = loss_fn(params, batch, jax.random.key(1000 + draw))
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    return objective.summarize(jax.device_get(total))

  mine, rand = recon(trained.params), recon(random_params)
  n_eval = len(evaluation.eval_src)
  n = objective.vit.num_patches
  results["reconstruction"] = {
      "trained_loss": mine["loss"], "random_init_loss": rand["loss"],
      "mean_predictor_loss": mine["mean_predictor_loss"],
      "masked_patches_per_draw": n_eval * (n - num_kept(n, objective.mask_ratio)),
      "note": "mean squared error over the pixels of masked patches, each patch normalised "
              "by its own mean/std (norm_pix_loss); predicting every masked patch's mean "
              "scores var/(var+1e-6) per patch: 1 on patches that are not flat, 0 on flat "
              "(all-background) ones"}
  curve = []  # the probes logged at every eval while training
  metrics_file = os.path.join(args.workdir, "metrics.jsonl")
  if os.path.exists(metrics_file):
    with open(metrics_file) as f:
      for line in f:
        row = json.loads(line)
        if "eval/kmeans_nmi" in row:
          curve.append({k.removeprefix("eval/"): row[k] for k in (
              "step", "eval/loss", "eval/linear_probe_accuracy", "eval/knn_accuracy",
              "eval/kmeans_nmi")})
  results.update({
      "during_training": curve,
      "step": trained.step, "eval_seconds": time.perf_counter() - t0,
      "split": {"train": len(evaluation.train_src), "eval": n_eval,
                "protocol": "probe fit on train, scored on eval; k-means on train + eval"},
      "model": {k: config.model[k] for k in ("image_size", "patch_size", "num_layers",
                                             "d_model", "num_heads", "mlp_dim", "pooling",
                                             "decoder_num_layers", "decoder_d_model")},
      "mask_ratio": objective.mask_ratio, "mask_draws": args.mask_draws,
      "train_steps": config.train.steps,
      "batch_size": config.train.batch_size,
      "training": training, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
      "jax": jax.__version__,
  })
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  grids = sorted(glob.glob(os.path.join(args.workdir, "reconstructions", "step_*.png")))
  if grids:  # the newest eval's grid, beside the numbers
    results["reconstruction"]["grid"] = os.path.basename(args.out).replace(
        ".json", "_reconstructions.png")
    shutil.copyfile(grids[-1], os.path.join(os.path.dirname(args.out),
                                            results["reconstruction"]["grid"]))
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  with open(args.out.replace(".json", ".md"), "w") as f:
    f.write(markdown(results))
  print(json.dumps(results, indent=2))


def markdown(r: dict) -> str:
  """The results as a short markdown report."""
  rows = [("raw pixels", r["raw_pixels"]), ("random-init encoder", r["random_init_encoder"]),
          ("MAE encoder (trained)", r["trained_encoder"])]
  rec = r["reconstruction"]
  t = r.get("training") or {}
  lines = [
      "# MAE on digits (tiny config)", "",
      f"`{t.get('command', 'tx-jax train --config configs/mae.py')}`: {r['train_steps']} steps, "
      f"batch {r['batch_size']}, mask ratio {r['mask_ratio']}; model {r['model']}.", "",
      (f"Training took {t['wall_s']:.0f} s wall ({t['cpu_s']:.0f} s CPU) on {r['machine']}, "
       f"1-minute load average {t['load_average_1m_at_end']:.1f} at the end (above the core "
       "count, other jobs shared the cores and slowed it)." if t else ""), "",
      f"Held-out split: {r['split']['train']} train / {r['split']['eval']} eval images; "
      f"{r['split']['protocol']}.", "",
      "| features | linear probe acc. | 20-NN acc. | k-means NMI |", "|---|---|---|---|"]
  lines += [f"| {name} | {m['linear_probe_accuracy']:.3f} | {m['knn_accuracy']:.3f} | "
            f"{m['kmeans_nmi']:.3f} |" for name, m in rows]
  spread = [(name, m["kmeans_nmi_seeds"]) for name, m in rows if "kmeans_nmi_seeds" in m]
  if spread:
    lines += ["", f"k-means NMI over {spread[0][1]['n']} k-means seeds: " + "; ".join(
        f"{name} {s['mean']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})"
        for name, s in spread) + "."]
  if r.get("during_training"):
    lines += ["", "The same probes at each eval while training (`metrics.jsonl`):", "",
              "| step | eval loss | linear probe | 20-NN | k-means NMI |", "|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['loss']:.3f} | {c['linear_probe_accuracy']:.3f} | "
              f"{c['knn_accuracy']:.3f} | {c['kmeans_nmi']:.3f} |" for c in r["during_training"]]
  lines += ["", "Masked-patch reconstruction loss on the eval images (norm-pix MSE, "
            f"{r.get('mask_draws', 5)} mask draws):", "",
            "| predictor | loss |", "|---|---|",
            f"| each masked patch's own mean | {rec['mean_predictor_loss']:.3f} |",
            f"| random-init MAE | {rec['random_init_loss']:.3f} |",
            f"| trained MAE | {rec['trained_loss']:.3f} |", ""]
  if rec.get("grid"):
    lines += [f"![original / masked / reconstructed]({rec['grid']})", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
