"""`tx-jax` command line: train, eval, generate, tokenizer, benchmark, embed, analyze, topics.

User mistakes (UserError, bad flags) exit with status 2 and one line on
stderr; nothing in an existing workdir is touched before the inputs check out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
  """argparse that reports errors in one line and exits 2."""

  def error(self, message):
    sys.stderr.write(f"tx-jax: error: {message} (see tx-jax {self.prog.split()[-1]} --help)\n")
    sys.exit(2)


TOPICS_EPILOG = """steps, each kept in OUT:
  OUT/tokenizer/spm.model   SentencePiece on the posts (skipped with --vocab-size 0)
  OUT/model/                a small model pretrained on the posts (a tx-jax train workdir)
  OUT/embeddings.npz        one vector per post (tx-jax embed)
  OUT/report/               report.html, report.json, clusters.csv, map.png (tx-jax analyze)
Re-running skips every step whose output exists and whose flags are unchanged
(recorded in OUT/topics.json). A step runs again, followed by every later one,
when its output is deleted or its flags change: e.g. a new --k redoes only the
report, a new --layer the embeddings and the report. An interrupted
pretraining resumes from its last checkpoint."""


def _add_distributed_flags(p):
  g = p.add_argument_group("multi-host (passed to jax.distributed.initialize; without them "
                           "JAX auto-detects Cloud TPU VMs, SLURM and Open MPI)")
  g.add_argument("--coordinator-address", help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  g.add_argument("--heartbeat-timeout", type=int, default=60, metavar="SECONDS",
                 help="a process silent this long is declared dead and the others stop "
                      "(default 60)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="tx-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("train", help="train (or resume) a model in a workdir")
  p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
  p.add_argument("--workdir", required=True)
  _add_distributed_flags(p)

  p = sub.add_parser("eval", help="eval metrics of the newest checkpoint, one JSON line")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="data spec to evaluate on (default: the held-out split)")

  p = sub.add_parser("generate", help="sample text from a trained decoder (or decode a "
                                       "trained encoder-decoder's target)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="default: fill the model's context")
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-samples", type=int, default=1)
  p.add_argument("--beam-size", type=int, default=1,
                 help="encoder-decoder workdirs: 1 = greedy, >1 = beam search")
  p.add_argument("--length-penalty", type=float, default=0.6,
                 help="beam search: scores are log p / ((5 + length) / 6) ** this")

  p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on a data spec")
  p.add_argument("--data", required=True)
  p.add_argument("--vocab-size", type=int, required=True)
  p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model/.vocab")

  p = sub.add_parser("benchmark", help="train-step throughput, MFU and compile time")
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=20)

  p = sub.add_parser("plan", help="compile the train step for a TPU slice from this machine: "
                                   "HBM per chip, FLOPs, estimated step time (one JSON line)")
  p.add_argument("--config", required=True)
  p.add_argument("--topology", required=True, help="e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:8x8")
  p.add_argument("--sweep", action="store_true",
                 help="rank data/fsdp/tensor splits x remat policies by estimated step time")

  p = sub.add_parser("embed", help="one vector per document from a trained model -> .npz")
  p.add_argument("--workdir", required=True, help="a tx-jax train workdir")
  p.add_argument("--data", required=True, help="data spec, e.g. file:posts.csv")
  p.add_argument("--out", required=True, help="output FILE.npz")
  _add_embed_flags(p)

  p = sub.add_parser("analyze", help="cluster embeddings; write report.json/html, map, csv")
  p.add_argument("--embeddings", required=True, help="FILE.npz from tx-jax embed")
  p.add_argument("--out", required=True, help="output directory")
  _add_analyze_flags(p)

  p = sub.add_parser(
      "topics", help="tokenizer -> pretrain -> embed -> clusters on your posts",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOPICS_EPILOG)
  p.add_argument("--data", required=True, help="data spec, e.g. file:posts.csv")
  p.add_argument("--out", required=True, help="output directory (every step's output stays)")
  p.add_argument("--objective", choices=sorted(TOPICS_CONFIGS), default=TOPICS_OBJECTIVE,
                 help=f"pretraining objective (default {TOPICS_OBJECTIVE})")
  p.add_argument("--config", help="base config file (default: the objective's configs/*.py)")
  p.add_argument("--steps", type=int, default=TOPICS_STEPS, help="pretraining steps")
  p.add_argument("--vocab-size", type=int, default=TOPICS_VOCAB,
                 help="SentencePiece pieces (0: raw bytes)")
  _add_embed_flags(p)
  _add_analyze_flags(p)
  return parser


def _add_embed_flags(p):
  # Choices are checked by tx_jax.analysis (importing it here would slow every command).
  g = p.add_argument_group("embedding")
  g.add_argument("--layer", help="named model output to pool (default: the final hidden "
                 "states, pre_logits; encoded for an encoder-decoder): embedded, block_00, ...")
  g.add_argument("--pooling", default="mean", help="mean (default), cls or last token")
  g.add_argument("--batch-size", type=int, default=64)
  g.add_argument("--seq-len", type=int, help="tokens per document (default: the training seq_len)")
  g.add_argument("--sample", type=int, help="embed a seeded random sample of this many documents")


def _add_analyze_flags(p):
  g = p.add_argument_group("clustering")
  g.add_argument("--method", default="kmeans", help="kmeans (default), dbscan, spectral or "
                 "agglomerative")
  g.add_argument("--k", type=int, help="number of clusters (default: best silhouette in range)")
  g.add_argument("--k-min", type=int, default=2)
  g.add_argument("--k-max", type=int, default=20)
  g.add_argument("--reduce", default="tsne", help="2-D map: tsne (default) or pca")
  g.add_argument("--normalize", choices=("none", "standardize", "l2"), default="l2",
                 help="scaling before clustering (l2: by cosine similarity)")
  g.add_argument("--eps", type=float, help="DBSCAN radius (default: estimated)")
  g.add_argument("--min-samples", type=int, default=5, help="DBSCAN core size")
  g.add_argument("--examples", type=int, default=5, help="representative posts per cluster")
  g.add_argument("--seed", type=int, default=0)


def _init_distributed(args):
  """jax.distributed from flags / env, or JAX's auto-detection on TPU VMs / SLURM."""
  from tx_jax import parallel
  parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)


def _config_from(args, overrides):
  from tx_jax.train import config as config_lib
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    from tx_jax.errors import UserError
    raise UserError(f"unrecognized argument {bad[0]!r}; overrides look like --config.train.steps=100")
  config = config_lib.load_config_file(args.config)
  return config_lib.apply_overrides(config, [o[len("--config."):] for o in overrides])


def cmd_train(args, overrides):
  config = _config_from(args, overrides)
  _init_distributed(args)
  from tx_jax.train.loop import train
  train(config, args.workdir)


def cmd_eval(args, _):
  import jax
  from tx_jax import parallel
  from tx_jax.train import loop, setup
  trained = setup.load_trained(args.workdir)
  config = trained.config
  if args.data:
    config.data.eval_source = args.data
  exp = setup.build_experiment(config, args.workdir, create_tokenizer=False)
  mesh = parallel.make_mesh(type("M", (), {"data": 1, "fsdp": 1, "tensor": 1})(),
                            devices=jax.devices()[:1])
  from tx_jax.train.step import make_eval_step
  sharding = parallel.batch_sharding(mesh, parallel.resolve_rules(config.mesh.rules))
  metrics = loop.evaluate(jax.jit(make_eval_step(exp.objective)), trained.params,
                          exp.eval_batches(), sharding, exp.objective.summarize)
  probes = getattr(exp.extra_eval, "probes", None)  # frozen-encoder probes (MAE)
  if probes is not None:
    metrics.update(probes(trained.params))
  print(json.dumps({"step": trained.step, **{f"eval/{k}": v for k, v in metrics.items()}}))


def cmd_generate(args, _):
  from tx_jax.errors import UserError
  from tx_jax.generate import generate_text
  from tx_jax.train import setup
  if (args.max_new_tokens is not None and args.max_new_tokens <= 0) or args.num_samples <= 0:
    raise UserError("--max-new-tokens and --num-samples must be positive")
  if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
    raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
  try:
    args.prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise UserError("--prompt is not valid UTF-8; pass UTF-8 text") from None
  trained = setup.load_trained(args.workdir)
  from tx_jax.models import DecoderLM, EncoderDecoder
  if isinstance(trained.objective.model, EncoderDecoder):
    from tx_jax.generate import generate_seq2seq
    print(generate_seq2seq(trained, args.prompt, max_new_tokens=args.max_new_tokens,
                           beam_size=args.beam_size, alpha=args.length_penalty))
    return
  if not isinstance(trained.objective.model, DecoderLM):
    raise UserError(f"{args.workdir!r} holds a {trained.config.objective} model, which does not "
                    "generate text; use a causal_lm or encoder-decoder workdir")
  if args.beam_size != 1:
    raise UserError("--beam-size is for encoder-decoder workdirs; decoders sample")
  for text in generate_text(trained, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, num_samples=args.num_samples):
    print(args.prompt + text)
    print("-" * 40)


def cmd_tokenizer(args, _):
  from tx_jax.data import sources, tokenizers
  source = sources.open_source(args.data)
  texts = (source[i]["text"] for i in range(len(source)))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tok = tokenizers.train_sentencepiece(texts, args.vocab_size, args.out)
  print(json.dumps({"model": args.out + ".model", "vocab_size": tok.vocab_size,
                    "documents": len(source)}))


def cmd_benchmark(args, overrides):
  from tx_jax.train.benchmark import benchmark
  config = _config_from(args, overrides)
  print(json.dumps(benchmark(config, steps=args.steps)))


def cmd_plan(args, overrides):
  from tx_jax.plan import run
  run(_config_from(args, overrides), args.topology, args.sweep)


def cmd_embed(args, _):
  from tx_jax.analysis.embed import embed_workdir
  summary = embed_workdir(args.workdir, args.data, args.out, layer=args.layer,
                          pooling=args.pooling, batch_size=args.batch_size,
                          seq_len=args.seq_len, sample=args.sample)
  print(json.dumps(summary))


def _analyze(args, embeddings, out):
  from tx_jax.analysis.report import analyze
  report = analyze(embeddings, out, method=args.method, k=args.k, k_min=args.k_min,
                   k_max=args.k_max, reduce=args.reduce, seed=args.seed, eps=args.eps,
                   min_samples=args.min_samples, max_examples=args.examples,
                   normalize=None if args.normalize == "none" else args.normalize)
  return {"out": out, "method": report["method"], "k": report["k"], "n": report["n"],
          "metrics": report["metrics"]}


def cmd_analyze(args, _):
  print(json.dumps(_analyze(args, args.embeddings, args.out)))


# `tx-jax topics`: the base config of each pretraining objective, shrunk to a
# small model trained on the user's posts (2 layers, d 128: minutes on 2 CPU
# cores); the context and batch suit each objective (contrastive: 64-token
# spans, 64 pairs per batch, so that each pair has 63 negatives).
TOPICS_CONFIGS = {"contrastive": "contrastive.py", "causal_lm": "gpt.py",
                  "masked_lm": "bert.py"}
TOPICS_OBJECTIVE = "contrastive"
TOPICS_STEPS = 600
TOPICS_VOCAB = 2000
TOPICS_MODEL = dict(num_layers=2, d_model=128, num_heads=2, mlp_dim=512)
TOPICS_CONTEXT = {"contrastive": (64, 64), "causal_lm": (128, 16), "masked_lm": (128, 32)}
TOPICS_TRAIN = dict(log_every=50, checkpoint_every=200, eval_every=200)


def _topics_config(args, spm_path, num_docs):
  """The base config for args.objective, shrunk to the topics model, on args.data."""
  from tx_jax.errors import UserError
  from tx_jax.objectives import OBJECTIVES
  from tx_jax.train import config as config_lib
  if args.objective not in OBJECTIVES:
    raise UserError(f"objective {args.objective!r} is not in this tx_jax build; use "
                    f"--objective {TOPICS_OBJECTIVE}")
  path = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "configs", TOPICS_CONFIGS[args.objective])
  config = config_lib.load_config_file(path)
  specials = len(config.data.get("specials", ()))
  if spm_path:
    from tx_jax.data.tokenizers import SentencePieceTokenizer
    vocab = SentencePieceTokenizer(spm_path).vocab_size + specials
    tokenizer = f"spm:{spm_path}"
  else:
    vocab, tokenizer = 256 + specials, "byte"
  context, batch_size = TOPICS_CONTEXT[args.objective]
  # A batch of distinct documents: at most the power of two that the 95% kept
  # for training holds (the loop holds out 5% for eval).
  train_docs = num_docs - max(1, round(num_docs * 0.05))
  batch_size = max(2, min(batch_size, 1 << (max(train_docs, 2).bit_length() - 1)))
  overrides = [f"model.{k}={v}" for k, v in TOPICS_MODEL.items()]
  overrides += [f"train.{k}={v}" for k, v in TOPICS_TRAIN.items()]
  overrides += [f"model.max_len={context}", f"data.seq_len={context}",
                f"train.batch_size={batch_size}", f"model.vocab_size={vocab}",
                f"data.source={args.data}", "data.eval_source=", f"data.tokenizer={tokenizer}",
                f"train.steps={args.steps}", "optim.warmup_steps=" + str(min(100, args.steps // 5))]
  return config_lib.apply_overrides(config, overrides)


def cmd_topics(args, _):
  """tokenizer -> model -> embeddings.npz -> report/ in args.out.

  A step runs when its output is missing, when its settings differ from those
  recorded in OUT/topics.json, or when an earlier step ran; otherwise it is
  skipped.
  """
  import shutil
  from tx_jax.data import sources, tokenizers
  from tx_jax.errors import UserError
  if args.steps < 1 or args.vocab_size < 0:
    raise UserError("--steps must be >= 1 and --vocab-size >= 0 (0: byte tokens)")
  source = sources.open_source(args.data)  # Bad data fails before anything is written.
  out = os.path.abspath(args.out)
  a = vars(args)
  wanted = {
      "tokenizer": {k: a[k] for k in ("data", "vocab_size")},
      "model": {k: a[k] for k in ("data", "vocab_size", "objective", "config", "steps")},
      "embeddings": {k: a[k] for k in ("layer", "pooling", "seq_len", "sample")},
      "report": {k: a[k] for k in ("method", "k", "k_min", "k_max", "reduce", "normalize",
                                   "eps", "min_samples", "examples", "seed")},
  }
  record_path = os.path.join(out, "topics.json")
  recorded = {}
  if os.path.isfile(record_path):
    with open(record_path) as f:
      recorded = json.load(f)
  os.makedirs(out, exist_ok=True)
  redo = False

  def should_run(name, output_done):
    nonlocal redo
    run = redo or not output_done or recorded.get(name) != wanted[name]
    why = ("an earlier step ran" if redo else "no output yet" if not output_done else
           "settings changed" if run else "done, skipped")
    print(f"topics: {name}: {'running (' + why + ')' if run else why}", flush=True)
    redo = redo or run
    return run

  def done(name):
    recorded[name] = wanted[name]
    tmp = record_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(recorded, f, indent=2)
    os.replace(tmp, record_path)

  spm_prefix = os.path.join(out, "tokenizer", "spm")
  spm_path = spm_prefix + ".model" if args.vocab_size else None
  if should_run("tokenizer", not spm_path or os.path.isfile(spm_path)):
    if spm_path:
      tokenizers.train_sentencepiece((source[i]["text"] for i in range(len(source))),
                                     args.vocab_size, spm_prefix)
    done("tokenizer")

  workdir = os.path.join(out, "model")
  config = _topics_config(args, spm_path, len(source))
  from tx_jax.train import checkpoint as ckpt_lib
  trained_steps = None
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    trained_steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          async_save=False).latest_step()
  # A run cut short resumes; anything else that must run starts from scratch.
  resumable = recorded.get("model") == wanted["model"] and not redo and trained_steps
  if should_run("model", trained_steps == args.steps):
    if not resumable and os.path.isdir(workdir):
      shutil.rmtree(workdir)
    done("model")  # Recorded first, so that an interrupted run resumes.
    from tx_jax.train.loop import train
    train(config, workdir)

  npz = os.path.join(out, "embeddings.npz")
  if should_run("embeddings", os.path.isfile(npz)):
    from tx_jax.analysis.embed import embed_workdir
    print(json.dumps(embed_workdir(workdir, args.data, npz, layer=args.layer,
                                   pooling=args.pooling, batch_size=args.batch_size,
                                   seq_len=args.seq_len, sample=args.sample)), flush=True)
    done("embeddings")

  report_dir = os.path.join(out, "report")
  if should_run("report", os.path.isfile(os.path.join(report_dir, "report.html"))):
    print(json.dumps(_analyze(args, npz, report_dir)), flush=True)
    done("report")
  print(f"topics: open {os.path.join(report_dir, 'report.html')}", flush=True)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "tokenizer": cmd_tokenizer, "benchmark": cmd_benchmark, "embed": cmd_embed,
            "analyze": cmd_analyze, "topics": cmd_topics, "plan": cmd_plan}


def main(argv=None) -> int:
  parser = build_parser()
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command not in ("train", "benchmark", "plan"):
    parser.error(f"unrecognized arguments: {' '.join(overrides)}")
  from tx_jax.errors import UserError
  try:
    COMMANDS[args.command](args, overrides)
  except UserError as e:
    message = " ".join(str(e).split("\n"))  # always one line
    sys.stderr.write(f"tx-jax: error: {message}\n")
    return 2
  except KeyboardInterrupt:
    sys.stderr.write("tx-jax: interrupted\n")
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
