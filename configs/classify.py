"""Classifier of texts (or images) over a pooled body, from scratch or fine-tuned.

Launch:
  # from scratch: a tiny byte-level encoder on the stdlib docstrings (18 packages)
  tx-jax train --config configs/classify.py --workdir runs/cls
  # fine-tune a pretrained workdir (its architecture and tokenizer are adopted)
  tx-jax train --config configs/classify.py --workdir runs/cls_ft \\
      --config.init_from=runs/spans            # WORKDIR[:STEP]; contrastive / bert / gpt / t5
  # linear probe, or freeze the embeddings and the first N blocks
  ...  --config.finetune.mode=linear_probe     # or freeze_below:1
  # images: an MAE's ViT encoder on the digits
  tx-jax train --config configs/classify.py:image --workdir runs/digits_ft \\
      --config.init_from=runs/mae
  tx-jax eval --workdir runs/cls_ft            # eval/accuracy, eval/macro_f1, per class
  tx-jax predict --workdir runs/cls_ft --data file:new.csv --out preds.csv

Data: `file:PATH.csv|.jsonl` with `text` and `label` columns (strings or ints),
embedded:stdlib-docstrings, tfds:imdb_reviews:train, tfds:sentiment140:train,
tfds:ag_news_subset:train; images: embedded:digits, file:DIR (one subfolder per
class), tfds:cifar10:train (set model.* and data.mean/std for 32x32x3).
data.eval_source, or a seeded held-out data.eval_fraction (stratified by class
for text). The label vocabulary is saved in config.json (`labels`) and labels.json.

Measured (benchmarks/classify_stdlib.py; results/classify_stdlib.md and
classify_digits.md; 2 CPU cores):
  digits, 300 steps of 64: fine-tuned from an MAE (configs/mae.py tiny, 600 steps)
  0.922 held-out accuracy, the same ViT from scratch 0.875, its linear probe 0.788
  (LogisticRegression on the same frozen features: 0.872).
  stdlib docstrings (18 packages): this config with init_from= an imported
  all-MiniLM-L6-v2 reaches 0.859 accuracy (macro-F1 0.843; TF-IDF + LR 0.831) in
  9.5 minutes; 600 steps of 16 x 128 bytes fine-tuned from configs/bert.py tiny
  (1,500 MLM steps) 0.573, the same architecture from scratch 0.364.
"""

import dataclasses

import ml_collections

from tx_jax.data.mlm import MLM_SPECIALS as SPECIALS  # <pad> <mask> <cls> <sep>
from tx_jax.models import ENCODER_SIZES, make_config
from tx_jax.models.vit import make_vit_config, vit_configs


def get_config(arg: str = "text") -> ml_collections.ConfigDict:
  kind = arg or "text"
  if kind not in ("text", "image"):
    raise ValueError(f"unknown variant {kind!r}; use configs/classify.py:text or :image")
  c = ml_collections.ConfigDict()
  c.objective = "classification"
  c.init_from = ""   # WORKDIR[:STEP] of a pretrained run (default: its newest step)
  c.labels = []      # the label vocabulary; filled from the training data
  c.finetune = ml_collections.ConfigDict(dict(
      body="encoder",        # encoder | decoder | encoder_decoder | vit (init_from decides)
      mode="full",           # full | linear_probe | freeze_below:N
      pooling="",            # mean | cls | last ("" = last for decoders, else mean)
      label_smoothing=0.0,
      class_weights="none",  # none | balanced | one comma-separated weight per label
      dropout_rate=-1.0))    # >= 0 replaces the pretrained model's dropout rate

  if kind == "text":
    model = make_config(ENCODER_SIZES, "tiny", num_layers=2, dropout_rate=0.1)
    c.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    c.data = ml_collections.ConfigDict(dict(
        source="embedded:stdlib-docstrings", eval_source="", eval_fraction=0.2,
        tokenizer="byte", specials=SPECIALS,
        seq_len=64,          # tokens per document (truncated); at most model.max_len
        eval_batches=0))
  else:
    c.finetune.body = "vit"
    encoder, vit, _ = vit_configs(make_vit_config("tiny"))
    c.model = ml_collections.ConfigDict({**dataclasses.asdict(encoder),
                                         **dataclasses.asdict(vit)})
    c.data = ml_collections.ConfigDict(dict(
        source="embedded:digits", eval_source="", eval_fraction=0.2,
        mean=[0.3053], std=[0.3760], resize=False, crop_scale=[1.0, 1.0], flip=False,
        eval_crop_fraction=1.0, eval_batches=0, num_threads=0))

  c.train = ml_collections.ConfigDict(dict(
      steps=500, batch_size=32, seed=0, log_every=50, eval_every=250,
      checkpoint_every=250, keep_checkpoints=2, async_checkpoints=True, nonfinite="skip"))

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0,
      accumulate_steps=1, b1=0.9, b2=0.999, eps=1e-8,
      layer_decay=1.0,       # < 1: block l of L learns at lr * layer_decay ** (L + 1 - l)
      head_lr=0.0))          # > 0: the head's own learning rate (0: optim.lr)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp_tp"))
  return c
