"""Does a trained text VAE's greedy decoding follow its input?

  python benchmarks/vae_follow.py --workdir runs/vae [--sentences 48] [--out FILE.json]

Encodes held-in (train) and held-out (eval) sentences of the workdir's own
data, decodes each posterior mean greedily, and reports the token F1 between
every sentence and its reconstruction beside a control: the F1 between each
reconstruction and a *different* input sentence. A decoder that ignores z
scores the same on both; one that follows z scores higher on the first. Also
the share of exact reconstructions and of distinct outputs.
"""

import argparse
import collections
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tx_jax.generate import decode_latents  # noqa: E402
from tx_jax.objectives.vae import encoder_rows  # noqa: E402
from tx_jax.train.trained import load_trained  # noqa: E402


def token_f1(a: list[int], b: list[int]) -> float:
  """F1 of the token multisets of a (reference) and b (candidate)."""
  common = sum((collections.Counter(a) & collections.Counter(b)).values())
  if not common:
    return 0.0
  precision, recall = common / len(b), common / len(a)
  return 2 * precision * recall / (precision + recall)


def follow(trained, source, count: int, seed: int = 0) -> dict:
  obj, tok, seq_len = trained.objective, trained.tokenizer, int(trained.config.data.seq_len)
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(source), min(len(source), 2 * count), replace=False)
  texts = [source[int(i)]["text"] for i in picks]
  texts = [t for t in texts if 3 <= len(tok.encode(t)) <= seq_len - 2][:count]
  tokens, segments = encoder_rows(tok, texts, seq_len, obj.eos_id)
  mu, _ = obj.posterior(trained.params, tokens, segments)
  out = np.asarray(decode_latents(obj.model, trained.params, mu, jax.random.key(0),
                                  max_len=seq_len, bos_id=obj.bos_id, eos_id=obj.eos_id))
  recs = [[t for t in row if t != obj.eos_id] for row in out.tolist()]
  ins = [tok.encode(t) for t in texts]
  other = np.roll(np.arange(len(ins)), 1)
  return {"sentences": len(ins),
          "f1": float(np.mean([token_f1(a, b) for a, b in zip(ins, recs)])),
          "control_f1": float(np.mean([token_f1(ins[j], b) for j, b in zip(other, recs)])),
          "exact": float(np.mean([a == b for a, b in zip(ins, recs)])),
          "distinct": len(set(map(tuple, recs))) / max(len(recs), 1),
          "examples": [[t, tok.decode(r)] for t, r in list(zip(texts, recs))[:3]]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--sentences", type=int, default=48)
  p.add_argument("--out", default="")
  args = p.parse_args()
  trained = load_trained(args.workdir)
  data = trained.objective.open_data(trained.config)
  result = {"workdir": args.workdir, "step": trained.step,
            **{name: follow(trained, src, args.sentences)
               for name, src in (("train", data.train), ("eval", data.eval))}}
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
