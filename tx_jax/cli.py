"""`tx-jax` command line: train, eval, generate, tokenizer, benchmark.

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
  return parser


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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "tokenizer": cmd_tokenizer, "benchmark": cmd_benchmark}


def main(argv=None) -> int:
  parser = build_parser()
  args, overrides = parser.parse_known_args(argv)
  if overrides and args.command not in ("train", "benchmark"):
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
