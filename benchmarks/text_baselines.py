"""Baselines for the BERT and T5 tiny runs, on exactly their eval positions.

  python benchmarks/text_baselines.py [--bert-workdir runs/bert] [--t5-workdir runs/t5]

Masked LM (configs/bert.py): accuracy of always predicting the most frequent
token of the training text, and the cross-entropy of a unigram model of the
training text (add-one smoothed), both over the held-out masked positions that
eval/accuracy and eval/loss use (same pipeline, same eval seed).
Span corruption (configs/t5.py): cross-entropy and accuracy of a unigram model
of the training *targets* (one epoch of the training pipeline: sentinels,
span tokens and </s>), over the held-out target tokens behind eval/loss.
With workdirs, their final eval metrics are put beside the baselines.
Writes benchmarks/results/text_baselines.json.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tx_jax.data import span_corruption as span_data  # pylint: disable=g-import-not-at-top
from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
from tx_jax.objectives import get_objective  # pylint: disable=g-import-not-at-top
from tx_jax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top


def _experiment(config_file: str):
  config = config_lib.load_config_file(os.path.join(ROOT, config_file))
  workdir = tempfile.mkdtemp(prefix="baseline_")
  return config, build_experiment(config, workdir, create_tokenizer=True)


def _eval_targets(exp) -> np.ndarray:
  """Target tokens at the weighted positions of every eval batch."""
  return np.concatenate([b["targets"][b["weights"] > 0] for b in exp.eval_batches()])


def _unigram(counts: np.ndarray, targets: np.ndarray) -> dict:
  probs = (counts + 1.0) / (counts.sum() + len(counts))        # add-one smoothing
  top = int(np.argmax(counts))
  return {"unigram_cross_entropy": float(-np.log(probs[targets]).mean()),
          "most_frequent_token": top,
          "most_frequent_token_accuracy": float((targets == top).mean()),
          "eval_positions": int(targets.size)}


def _final_eval(workdir: str | None) -> dict:
  if not workdir:
    return {}
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [l for l in lines if any(k.startswith("eval/") for k in l)]
  train = [l for l in lines if "train/loss" in l]
  return {"model_step": evals[-1]["step"], **{k: v for k, v in evals[-1].items() if k != "step"},
          "final_train_loss": train[-1]["train/loss"]}


def masked_lm(workdir):
  config, exp = _experiment("configs/bert.py")
  train_source = get_objective(config.objective).open_data(config).train
  tok = exp.tokenizer
  counts = np.zeros(tok.vocab_size)
  for i in range(len(train_source)):
    np.add.at(counts, np.asarray(tok.encode(train_source[i]["text"])), 1)
  return {"config": "configs/bert.py", **_unigram(counts, _eval_targets(exp)),
          **_final_eval(workdir)}


def span_corruption(workdir):
  config, exp = _experiment("configs/t5.py")
  train_source = get_objective(config.objective).open_data(config).train
  tok, d = exp.tokenizer, config.data
  settings = span_data.SpanSettings.from_tokenizer(
      tok, noise_density=d.noise_density, mean_span_length=d.mean_noise_span_length)
  counts = np.zeros(tok.vocab_size)
  for b in span_data.span_train_iterator(train_source, tok, d.seq_len, config.train.batch_size,
                                         config.train.seed, settings, num_epochs=1):
    np.add.at(counts, b["targets"][b["weights"] > 0], 1)
  return {"config": "configs/t5.py", **_unigram(counts, _eval_targets(exp)),
          **_final_eval(workdir)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bert-workdir")
  p.add_argument("--t5-workdir")
  args = p.parse_args()
  result = {"masked_lm": masked_lm(args.bert_workdir),
            "span_corruption": span_corruption(args.t5_workdir)}
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "text_baselines.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
