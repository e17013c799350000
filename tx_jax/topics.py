"""`tx-jax topics`: posts -> tokenizer -> pretrained model -> embeddings -> report.

Every step's output stays in OUT (see the command's --help). The pretraining
objective describes its own small-model context (`topics_defaults`): its base
config file, sequence length and batch size; this module shrinks that config
to a model trained in minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil

from tx_jax.errors import UserError

TOPICS_MODEL = dict(num_layers=2, d_model=128, num_heads=2, mlp_dim=512)
TOPICS_TRAIN = dict(log_every=50, checkpoint_every=200, eval_every=200)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


TOPIC_FLAGS = ("min_topic_size", "reduce_topics", "features", "outliers", "time_bin", "urls",
               "mentions", "min_df", "top_terms", "diversity")


def analyze_summary(args, embeddings: str, out: str, data: str | None = None,
                    topics: bool = False) -> dict:
  """The report step: `tx-jax analyze` (k-means & co., or the topic pipeline with
  --method hdbscan) and `tx-jax topics` (the topic pipeline); a short summary."""
  method = args.method or ("kmeans" if args.k is not None or not topics else "hdbscan")
  if method == "hdbscan" or topics:
    from tx_jax.analysis import topics_report  # pylint: disable=g-import-not-at-top
    report = topics_report(
        embeddings, out, data=data, map_reduce=args.reduce or "umap", method=method, k=args.k,
        min_topic_size=args.min_topic_size, reduce_topics=args.reduce_topics,
        features=args.features, outliers=args.outliers, time_bin=args.time_bin,
        urls=args.urls, mentions=args.mentions, min_df=args.min_df, n_terms=args.top_terms,
        diversity=args.diversity, n_examples=args.examples, seed=args.seed,
        normalize=None if args.normalize == "none" else args.normalize)
    summary = {k: report[k] for k in ("method", "features", "k", "n") if k in report}
    return {"out": out, **summary, "metrics": report["metrics"],
            "baseline_metrics": report.get("baseline", {}).get("metrics")}
  from tx_jax.analysis.report import analyze  # pylint: disable=g-import-not-at-top
  report = analyze(embeddings, out, method=method, k=args.k, k_min=args.k_min,
                   k_max=args.k_max, reduce=args.reduce or "tsne", seed=args.seed, eps=args.eps,
                   min_samples=args.min_samples, max_examples=args.examples,
                   normalize=None if args.normalize == "none" else args.normalize)
  return {"out": out, "method": report["method"], "k": report["k"], "n": report["n"],
          "metrics": report["metrics"]}


def topics_objective(name: str) -> dict:
  """The `topics_defaults` of objective `name`, which must offer them."""
  from tx_jax.objectives import available, get_objective  # pylint: disable=g-import-not-at-top
  try:
    defaults = get_objective(name).topics_defaults
  except UserError:
    defaults = None
  if not defaults:
    offered = [n for n in available() if get_objective(n).topics_defaults]
    raise UserError(f"--objective {name!r} cannot pretrain for topics; use one of {offered}")
  return defaults


def topics_config(args, spm_path, num_docs):
  """The base config of args.objective, shrunk to the topics model, on args.data."""
  from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  defaults = topics_objective(args.objective)
  path = args.config or os.path.join(CONFIG_DIR, defaults["config"])
  config = config_lib.load_config_file(path)
  specials = len(config.data.get("specials", ()))
  if spm_path:
    from tx_jax.data.tokenizers import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
    vocab = SentencePieceTokenizer(spm_path).vocab_size + specials
    tokenizer = f"spm:{spm_path}"
  else:
    vocab, tokenizer = 256 + specials, "byte"
  context, batch_size = defaults["seq_len"], defaults["batch_size"]
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


def run_topics(args):
  """tokenizer -> model -> embeddings.npz -> report/ in args.out.

  A step runs when its output is missing, when its settings differ from those
  recorded in OUT/topics.json, or when an earlier step ran; otherwise it is
  skipped.
  """
  from tx_jax.data import sources, tokenizers  # pylint: disable=g-import-not-at-top
  if args.steps < 1 or args.vocab_size < 0:
    raise UserError("--steps must be >= 1 and --vocab-size >= 0 (0: byte tokens)")
  if not args.encoder:
    topics_objective(args.objective)
  source = sources.open_source(args.data)  # Bad data fails before anything is written.
  if args.encoder:  # a given model: checked before anything is written too
    workdir = os.path.abspath(args.encoder)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      raise UserError(f"--encoder {args.encoder!r} is not a tx-jax workdir (no config.json); "
                      "train one or tx-jax import a Hugging Face model")
    from tx_jax.objectives import get_objective  # pylint: disable=g-import-not-at-top
    from tx_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    name = config_lib.load_workdir_config(workdir).objective
    if not get_objective(name).uses_tokenizer:
      raise UserError(f"--encoder {args.encoder!r} holds an image model ({name}); topics "
                      "embeds posts with a text model")
  # A tiny model pretrained on the posts alone knows little English; beside TF-IDF
  # it adds what it learned of the posts without falling below the bag of words.
  args.features = args.features or ("model" if args.encoder else "both")
  out = os.path.abspath(args.out)
  a = vars(args)
  wanted = {
      "tokenizer": {k: a[k] for k in ("data", "vocab_size")},
      "model": {k: a[k] for k in ("data", "vocab_size", "objective", "config", "steps")},
      "embeddings": {k: a[k] for k in ("layer", "pooling", "seq_len", "sample")},
      "report": {k: a[k] for k in ("method", "k", "k_min", "k_max", "reduce", "normalize",
                                   "eps", "min_samples", "examples", "seed") + TOPIC_FLAGS},
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

  if args.encoder:  # a given model: nothing to pretrain
    wanted["embeddings"]["encoder"] = workdir
  else:
    spm_prefix = os.path.join(out, "tokenizer", "spm")
    spm_path = spm_prefix + ".model" if args.vocab_size else None
    if should_run("tokenizer", not spm_path or os.path.isfile(spm_path)):
      if spm_path:
        tokenizers.train_sentencepiece((source[i]["text"] for i in range(len(source))),
                                       args.vocab_size, spm_prefix)
      done("tokenizer")

    workdir = os.path.join(out, "model")
    config = topics_config(args, spm_path, len(source))
    from tx_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
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
      from tx_jax.train.loop import train  # pylint: disable=g-import-not-at-top
      train(config, workdir)

  npz = os.path.join(out, "embeddings.npz")
  if should_run("embeddings", os.path.isfile(npz)):
    from tx_jax.analysis.embed import embed_workdir  # pylint: disable=g-import-not-at-top
    print(json.dumps(embed_workdir(workdir, args.data, npz, layer=args.layer,
                                   pooling=args.pooling, batch_size=args.batch_size,
                                   seq_len=args.seq_len, sample=args.sample)), flush=True)
    done("embeddings")

  report_dir = os.path.join(out, "report")
  if should_run("report", os.path.isfile(os.path.join(report_dir, "report.html"))):
    print(json.dumps(analyze_summary(args, npz, report_dir, data=args.data, topics=True)),
          flush=True)
    done("report")
  print(f"topics: open {os.path.join(report_dir, 'report.html')}", flush=True)
