"""`tx-jax` command line: train, eval, generate, tokenizer, benchmark, embed, predict,
analyze, topics.

User mistakes (UserError, bad flags) exit with status 2 and one line on
stderr; nothing in an existing workdir is touched before the inputs check out.
A failed read or write of the command's own files (disk full, read-only or
failing filesystem: IOFailure or OSError) exits with status 3 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
  """argparse that reports errors in one line and exits 2."""

  def error(self, message):
    command = " ".join(self.prog.split()[1:2])
    help_hint = f"tx-jax {command} --help" if command else "tx-jax --help"
    sys.stderr.write(f"tx-jax: error: {_one_line(message)} (see {help_hint})\n")
    sys.exit(2)


def _one_line(text: str) -> str:
  """text with every line break (CR, LF, U+2028, ... as str.splitlines sees them) a space."""
  return " ".join(str(text).splitlines())


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
  p.add_argument("--config", help="configs/NAME.py[:ARG] (default: the workdir's own "
                 "config.json, e.g. of an imported model)")
  p.add_argument("--workdir", required=True)
  _add_distributed_flags(p)

  p = sub.add_parser("eval", help="eval metrics of the newest checkpoint, one JSON line")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", help="data spec to evaluate on (default: the held-out split)")

  p = sub.add_parser("generate", help="sample text from a trained decoder (or decode a "
                                       "trained encoder-decoder's target)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", help="text to continue (decoders) or to decode from "
                 "(encoder-decoders)")
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
  p.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                 help="VAE workdirs: --num-samples N sentences along the line between the "
                 "posterior means of A and B")
  p.add_argument("--reconstruct", metavar="TEXT",
                 help="VAE workdirs: decode the posterior mean of TEXT")
  p.add_argument("--out", help="GAN (or other image) workdirs: write the samples to this .npz "
                 "(key images: N x H x W x C float in [0, 1])")
  p.add_argument("--grid", help="GAN workdirs: also save the samples as a PNG grid")

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

  p = sub.add_parser("predict", help="a trained classifier's labels and probabilities -> .csv")
  p.add_argument("--workdir", required=True, help="a workdir trained with configs/classify.py")
  p.add_argument("--data", required=True, help="data spec, e.g. file:new.csv")
  p.add_argument("--out", required=True, help="output FILE.csv")
  p.add_argument("--batch-size", type=int, default=64)

  p = sub.add_parser("import", help="a Hugging Face model directory -> a tx_jax workdir")
  p.add_argument("--from", dest="source", required=True,
                 help="directory with config.json, model.safetensors[.index.json], tokenizer.json")
  p.add_argument("--out", required=True, help="new workdir (must not exist or be empty)")

  p = sub.add_parser("export", help="a workdir's newest checkpoint -> a Hugging Face directory")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="new directory (must not exist or be empty)")

  p = sub.add_parser("analyze", help="cluster embeddings; write report.json/html, map, csv")
  p.add_argument("--embeddings", required=True, help="FILE.npz from tx-jax embed")
  p.add_argument("--out", required=True, help="output directory")
  _add_analyze_flags(p)

  p = sub.add_parser(
      "topics", help="tokenizer -> pretrain -> embed -> clusters on your posts",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOPICS_EPILOG)
  p.add_argument("--data", required=True, help="data spec, e.g. file:posts.csv")
  p.add_argument("--out", required=True, help="output directory (every step's output stays)")
  p.add_argument("--encoder", metavar="WORKDIR",
                 help="embed with this trained or imported model (e.g. tx-jax import of a "
                      "sentence encoder) instead of pretraining one on the posts")
  p.add_argument("--objective", default="contrastive",
                 help="pretraining objective: contrastive (default), causal_lm or masked_lm")
  p.add_argument("--config", help="base config file (default: the objective's configs/*.py)")
  p.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600)")
  p.add_argument("--vocab-size", type=int, default=2000,
                 help="SentencePiece pieces (0: raw bytes; default 2000)")
  _add_embed_flags(p)
  _add_analyze_flags(p, topics=True)
  return parser


def _add_embed_flags(p):
  # Choices are checked by tx_jax.analysis (importing it here would slow every command).
  g = p.add_argument_group("embedding")
  g.add_argument("--layer", help="named model output to pool (default: the final hidden "
                 "states, pre_logits; encoded for an encoder-decoder): embedded, block_00, ...")
  g.add_argument("--pooling", help="mean, cls or last token (default: the workdir's own, e.g. "
                 "an imported sentence encoder's, else mean)")
  g.add_argument("--batch-size", type=int, default=64)
  g.add_argument("--seq-len", type=int, help="tokens per document (default: the training seq_len)")
  g.add_argument("--sample", type=int, help="embed a seeded random sample of this many documents")


def _add_analyze_flags(p, topics: bool = False):
  g = p.add_argument_group("clustering")
  g.add_argument("--method", default=None, help=(
      "hdbscan (after UMAP; the default, or kmeans when --k is given), kmeans, spectral or "
      "agglomerative" if topics else
      "kmeans (default), dbscan, spectral, agglomerative, or hdbscan (the topic pipeline "
      "of tx-jax topics)"))
  g.add_argument("--k", type=int, help="number of clusters (default: best silhouette in range)")
  g.add_argument("--k-min", type=int, default=2)
  g.add_argument("--k-max", type=int, default=20)
  g.add_argument("--reduce", default=None, help="2-D map: umap (topics' default), tsne "
                 "(analyze's default) or pca")
  g.add_argument("--normalize", choices=("none", "standardize", "l2"), default="l2",
                 help="scaling before clustering (l2: by cosine similarity)")
  g.add_argument("--eps", type=float, help="DBSCAN radius (default: estimated)")
  g.add_argument("--min-samples", type=int, default=5, help="DBSCAN core size")
  g.add_argument("--examples", type=int, default=5, help="representative posts per cluster")
  g.add_argument("--seed", type=int, default=0)
  g = p.add_argument_group("topics (the HDBSCAN pipeline)")
  g.add_argument("--min-topic-size", type=int, default=10, help="HDBSCAN's smallest topic")
  g.add_argument("--reduce-topics", type=int, help="merge the most similar topics down to N")
  # topics chooses its own default (see tx_jax.topics.run_topics).
  g.add_argument("--features", default=None if topics else "model",
                 help="model (the embeddings), tfidf, or both "
                 "(the two views concatenated after scaling); default: model, except for "
                 "a model tx-jax topics pretrains itself, where both" if topics else
                 "model (the embeddings, default), tfidf, or both (the two views "
                 "concatenated after scaling)")
  g.add_argument("--outliers", default="embeddings", help="noise posts go to the nearest topic "
                 "by embeddings (default) or ctfidf, or stay outliers (none)")
  g.add_argument("--time-bin", default="week", help="topics over time: day, week or month")
  g.add_argument("--urls", default="remove", help="URLs in posts: remove, token or keep")
  g.add_argument("--mentions", default="token", help="@mentions: token, remove or keep")
  g.add_argument("--min-df", type=int, default=2, help="c-TF-IDF: smallest document frequency")
  g.add_argument("--top-terms", type=int, default=10)
  g.add_argument("--diversity", type=float, default=0.3, help="MMR weight of the top terms")
  if not topics:
    g.add_argument("--data", help="the data spec the embeddings came from (full texts, ids, "
                   "time column)")


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
  if args.config is None:  # `train --workdir W`: continue with the workdir's own config
    config = config_lib.workdir_run_config(args.workdir)
  else:
    config = config_lib.load_config_file(args.config)
  return config_lib.apply_overrides(config, [o[len("--config."):] for o in overrides])


def cmd_train(args, overrides):
  config = _config_from(args, overrides)
  _init_distributed(args)
  from tx_jax.train.loop import train
  train(config, args.workdir)


def cmd_eval(args, _):
  from tx_jax.train.evaluate import evaluate_workdir
  print(json.dumps(evaluate_workdir(args.workdir, args.data)))


MAX_SAMPLES = 65_536   # generated in one batch on the device
MAX_BEAMS = 256


def cmd_generate(args, _):
  from tx_jax.errors import UserError
  from tx_jax.train.trained import load_trained
  if (args.max_new_tokens is not None and args.max_new_tokens <= 0) or args.num_samples <= 0:
    raise UserError("--max-new-tokens and --num-samples must be positive")
  if args.num_samples > MAX_SAMPLES or not 1 <= args.beam_size <= MAX_BEAMS:
    raise UserError(f"--num-samples must be at most {MAX_SAMPLES} and --beam-size in "
                    f"1..{MAX_BEAMS} (samples are made in one batch)")
  if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
    raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
  try:
    if args.prompt is not None:
      args.prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise UserError("--prompt is not valid UTF-8; pass UTF-8 text") from None
  trained = load_trained(args.workdir)
  for line in trained.objective.generate(trained, vars(args)):
    print(line)


def cmd_tokenizer(args, _):
  from tx_jax.data import tokenizers
  print(json.dumps(tokenizers.train_on_spec(args.data, args.vocab_size, args.out)))


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


def cmd_predict(args, _):
  from tx_jax.analysis.predict import predict_workdir
  print(json.dumps(predict_workdir(args.workdir, args.data, args.out, args.batch_size)))


def cmd_import(args, _):
  from tx_jax.interop.workdir import import_hf
  print(json.dumps(import_hf(args.source, args.out)))


def cmd_export(args, _):
  from tx_jax.interop.workdir import export_hf
  print(json.dumps(export_hf(args.workdir, args.out)))


def cmd_analyze(args, _):
  from tx_jax.topics import analyze_summary
  print(json.dumps(analyze_summary(args, args.embeddings, args.out, data=args.data)))


def cmd_topics(args, _):
  from tx_jax.topics import run_topics
  run_topics(args)


def _fail(error, status: int) -> int:
  message = _one_line(error)  # always one line, whatever the input held
  sys.stderr.write(f"tx-jax: error: {message}\n")
  return status


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "tokenizer": cmd_tokenizer, "benchmark": cmd_benchmark, "embed": cmd_embed,
            "predict": cmd_predict, "analyze": cmd_analyze, "topics": cmd_topics,
            "import": cmd_import, "export": cmd_export, "plan": cmd_plan}


def _accelerator_visible() -> bool:
  """A TPU's device files or a GPU plugin for JAX on this host (nothing is initialized)."""
  import glob
  import importlib.util
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True  # a TPU VM
  return any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                   "jax_rocm60_plugin"))


def _cpu_when_libtpu_has_no_tpu():
  """libtpu installed (for `tx-jax plan`) on a host with no TPU chips and no GPU plugin:
  keep JAX on the CPU, since probing for a TPU prints lines of warnings on every command."""
  import importlib.util
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if not _accelerator_visible():
    os.environ["JAX_PLATFORMS"] = "cpu"


def _reuse_freed_memory_when_jax_runs_on_cpu():
  """glibc's malloc: one arena, no mmap for large blocks, no trimming, in a process whose
  JAX runs on the CPU.

  XLA's CPU runtime allocates each execution's temporary buffer (286 MB for the GPT
  bench train step) from the worker thread that runs it and frees it afterwards. By
  default glibc serves a block that large from a fresh mmap and unmaps it on free, so
  every step faults all of it in again (70,000-85,000 page faults a step, each page
  zeroed by the kernel). With the block kept, the GPT bench step ran a median 1.045x
  faster in alternating fresh processes (1.3x in one process, benchmarks/README.md).
  Takes effect only before JAX starts its threads, hence here; a GLIBC_TUNABLES that
  sets glibc.malloc options wins.
  """
  import ctypes
  import platform
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if (platforms and platforms != "cpu") or (not platforms and _accelerator_visible()):
    return
  if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
    return
  mallopt = ctypes.CDLL(None).mallopt  # glibc's M_* numbers: malloc.h
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  mallopt(m_arena_max, 1)        # every thread allocates from the main (brk) heap
  mallopt(m_mmap_max, 0)         # large blocks come from that heap, not from mmap
  mallopt(m_trim_threshold, -1)  # and freed ones stay there for the next step


def run(argv=None) -> int:
  """The `tx-jax` program (console script, `python -m tx_jax`, scripts/): sets up malloc
  before JAX starts, then runs `main` (which picks JAX's platform)."""
  _reuse_freed_memory_when_jax_runs_on_cpu()
  return main(argv)


def main(argv=None) -> int:
  _cpu_when_libtpu_has_no_tpu()
  parser = build_parser()
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command not in ("train", "benchmark", "plan"):
    parser.error(f"unrecognized arguments: {' '.join(overrides)}")
  from tx_jax import errors
  try:
    COMMANDS[args.command](args, overrides)
  except errors.UserError as e:
    return _fail(e, errors.USER_ERROR_STATUS)
  except errors.IOFailure as e:
    return _fail(e, errors.IO_FAILURE_STATUS)
  except OSError as e:  # a read or write the command did not name: still the machine's
    if os.environ.get("TX_JAX_TRACEBACK"):
      raise
    return _fail(errors.describe_io_error(e, f"{args.command}: file operation on",
                                          e.filename or "?"), errors.IO_FAILURE_STATUS)
  except KeyboardInterrupt:
    sys.stderr.write("tx-jax: interrupted\n")
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
