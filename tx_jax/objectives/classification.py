"""Sequence (or image) classification over a pooled representation of any body.

The body is one of the project's models, run without its pretraining head: an
Encoder (BERT, contrastive), a DecoderLM (GPT), the encoder of an
EncoderDecoder (T5), or a ViT (the encoder of an MAE). Its final hidden
states are pooled over real tokens (mean, CLS or last token; a ViT's own
`pre_logits`), and a linear head maps them to the classes. Parameters are
{"body": ..., "head": {"kernel" (D, K), "bias" (K,)}}, so a pretrained body is
grafted in by name (`transfer`) and frozen or decayed by path (`optimizer`).

Batches (tx_jax.data.labelled): text {"tokens", "segment_ids" (B, T), "label",
"valid" (B,)}; images {"image" (B, H, W, C), "label", "valid"}. The loss is
(label-smoothed, class-weighted) cross-entropy over valid rows; the sums carry
the confusion matrix, so accuracy, macro-F1 and per-class precision / recall /
support are exact over the whole eval set.

Config (configs/classify.py): `finetune.body` (encoder | decoder |
encoder_decoder | vit), `finetune.mode` (full | linear_probe | freeze_below:N),
`finetune.pooling`, `finetune.label_smoothing`, `finetune.class_weights`
(none | balanced | comma-separated floats), `optim.layer_decay`,
`optim.head_lr`; `init_from` names the pretrained workdir (its architecture,
tokenizer and image normalisation are adopted, see `adopt`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tx_jax.data import images, labelled, sources
from tx_jax.data.doc_policy import DocPolicy
from tx_jax.errors import UserError
from tx_jax.evaluation.confusion import ConfusionEvaluation, confusion_metrics
from tx_jax.models import DecoderLM, Encoder, EncoderDecoder, TransformerConfig, count_params
from tx_jax.models.layers import Projection
from tx_jax.models.vit import ViT, ViTConfig, vit_configs
from tx_jax.objectives.base import Data, register
from tx_jax.objectives.transfer import graft, layer_of, parse_mode
from tx_jax.objectives.text import (POOLINGS, TextObjective, check_vocab, host_eval_batches, pool,
                                    process_shards, transformer_config, transformer_flops)

BODIES = ("encoder", "decoder", "encoder_decoder", "vit")
# Which body a pretraining objective leaves behind.
FAMILY_OF = {"masked_lm": "encoder", "contrastive": "encoder", "causal_lm": "decoder",
             "span_corruption": "encoder_decoder", "seq2seq": "encoder_decoder", "mae": "vit"}
# The image data keys a ViT body takes from an MAE workdir (same normalisation).
IMAGE_DATA_KEYS = ("mean", "std", "resize", "crop_scale", "flip", "eval_crop_fraction")
FROZEN, TRAINED = "frozen", "trained"


class Classifier(nn.Module):
  """Body + pooling + linear head: inputs -> class logits (B, K) float32.

  Text: tokens (B, T) and segment_ids (B, T) (0 = padding); images (B, H, W, C).
  `probe` runs the body deterministically and stops its gradient (linear probe).
  """
  body: nn.Module
  cfg: TransformerConfig
  num_classes: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, inputs, segment_ids=None, *, deterministic: bool = True,
               probe: bool = False):
    """(logits (B, K) float32, pooled features (B, D) float32)."""
    body_det = deterministic or probe
    if isinstance(self.body, ViT):
      _, out = self.body(inputs, deterministic=body_det)
      feats = out["pre_logits"].astype(jnp.float32)                          # (B, D)
    else:
      if isinstance(self.body, EncoderDecoder):
        _, out = self.body(inputs, None, inputs_segment_ids=segment_ids,
                           deterministic=body_det)
        hidden = out["encoded"]
      else:
        _, out = self.body(inputs, segment_ids=segment_ids, deterministic=body_det)
        hidden = out["pre_logits"]                                           # (B, T, D)
      feats = pool(hidden, segment_ids, self.pooling)                        # (B, D)
    if probe:
      feats = jax.lax.stop_gradient(feats)
    feats = nn.Dropout(self.cfg.dropout_rate)(feats, deterministic=deterministic)
    head_cfg = dataclasses.replace(self.cfg, use_bias=True, dtype="float32")
    logits = Projection(head_cfg, (self.num_classes,), ("embed", "classes"),
                        name="head")(feats)
    return logits.astype(jnp.float32), feats


# ------------------------------------------------------------------ loss and metrics


def classification_sums(logits, labels, valid, class_weights=None, smoothing: float = 0.0):
  """(training loss, sums) of logits (B, K) against labels (B,) on valid rows (B,).

  The loss uses label smoothing and class weights; the sums hold the plain
  cross-entropy ("nll"), the correct count, the confusion matrix (K, K) (rows:
  true class, columns: predicted) and "weight" (the loss denominator).
  """
  k = logits.shape[-1]
  rows = (valid > 0) & (labels >= 0)
  count = rows.astype(jnp.float32)                                           # (B,)
  safe = jnp.where(rows, labels, 0)
  onehot = jax.nn.one_hot(safe, k)                                           # (B, K)
  nll = optax.softmax_cross_entropy(logits, onehot)                          # (B,)
  targets = optax.smooth_labels(onehot, smoothing) if smoothing else onehot
  train_nll = optax.softmax_cross_entropy(logits, targets) if smoothing else nll
  ex_weight = count * (class_weights[safe] if class_weights is not None else 1.0)
  pred = jnp.argmax(logits, -1)
  confusion = jnp.einsum("bi,bj->ij", onehot * count[:, None], jax.nn.one_hot(pred, k))
  weight = jnp.sum(ex_weight)
  loss = jnp.sum(jnp.where(rows, train_nll, 0.0) * ex_weight) / jnp.maximum(weight, 1e-9)
  return loss, {"nll": jnp.sum(jnp.where(rows, nll, 0.0)), "count": jnp.sum(count),
                "correct": jnp.sum((pred == labels) * count), "confusion": confusion,
                "weight": weight}


# ------------------------------------------------------------------ the objective


def _image_model(config) -> bool:
  return config.finetune.get("body", "encoder") == "vit"


def _vit_fields(model) -> dict:
  """The ViT encoder's flat fields of a run's model section (no MAE decoder fields)."""
  return {k: v for k, v in dict(model).items() if not k.startswith("decoder_")}


@register("classification")
class Classification(TextObjective):
  """A linear head on a pooled body; text or images, from scratch or pretrained."""

  def __init__(self, body: str, model_cfg: TransformerConfig, labels: list[str], *,
               vit: ViTConfig | None = None, pooling: str = "", mode: str = "full",
               label_smoothing: float = 0.0, class_weights=None, tokenizer=None,
               seq_len: int = 0, prep: images.Preprocess | None = None):
    if body not in BODIES:
      raise UserError(f"finetune.body={body!r} is not one of {list(BODIES)}")
    if len(labels) < 2:
      raise UserError(f"a classifier needs at least 2 labels, got {labels}")
    self.body_name, self.cfg, self.labels = body, model_cfg, list(labels)
    self.image = body == "vit"
    self.vit, self.prep, self.tokenizer = vit, prep, tokenizer
    self.seq_len = seq_len
    self.mode, self.freeze_below = parse_mode(mode, self.num_layers)
    self.pooling = pooling or ("last" if body == "decoder" else "mean")
    if not self.image and self.pooling not in POOLINGS:
      raise UserError(f"finetune.pooling={self.pooling!r} is not one of {list(POOLINGS)}")
    if not 0.0 <= label_smoothing < 1.0:
      raise UserError(f"finetune.label_smoothing must be in [0, 1), got {label_smoothing}")
    self.label_smoothing = float(label_smoothing)
    # None, "balanced" (resolved from the training data) or one weight per class.
    self.class_weights = (np.asarray(class_weights, np.float32)
                          if isinstance(class_weights, (list, tuple)) else class_weights)
    if self.image:
      self.unit = "images"
      body_module = ViT(model_cfg, dataclasses.replace(vit, num_classes=0))
    else:
      body_module = {"encoder": Encoder, "decoder": DecoderLM,
                     "encoder_decoder": EncoderDecoder}[body](model_cfg)
    self.body_model = body_module
    self.classifier = Classifier(body_module, model_cfg, len(self.labels), self.pooling)
    # The text embedding hooks of TextObjective read self.model (the body).
    self.model = body_module
    self.last_confusion = None

  @property
  def num_layers(self) -> int:
    """Blocks of the body (an encoder-decoder's encoder blocks)."""
    c = self.cfg
    return c.num_encoder_layers if self.body_name == "encoder_decoder" and \
        c.num_encoder_layers else c.num_layers

  # --- building --------------------------------------------------------------------

  @classmethod
  def needs_tokenizer(cls, config) -> bool:
    return not _image_model(config)

  @classmethod
  def adopt(cls, config, pretrained_config):
    """The run config with the pretrained workdir's architecture (and, for images, its
    normalisation); refuses a workdir whose objective leaves no body to classify with."""
    config = ml_collections.ConfigDict(config.to_dict())
    objective = pretrained_config.objective
    if objective == "classification":
      family = pretrained_config.finetune.body
    elif objective in FAMILY_OF:
      family = FAMILY_OF[objective]
    else:
      raise UserError(f"init_from holds a {objective!r} model, which has no body to classify "
                      f"with; use a workdir of {', '.join(sorted(FAMILY_OF))}")
    config.finetune.body = family
    model = dict(pretrained_config.model)
    if family == "vit":
      model = _vit_fields(model)
      for key in IMAGE_DATA_KEYS:
        if key in pretrained_config.data:
          config.data[key] = pretrained_config.data[key]
    else:
      for key in ("tokenizer", "specials"):
        if key in pretrained_config.data:
          config.data[key] = pretrained_config.data[key]
    dropout = config.finetune.get("dropout_rate", -1.0)
    if dropout >= 0:
      model["dropout_rate"] = dropout
    config.model = ml_collections.ConfigDict(model)
    return config

  @classmethod
  def open_data(cls, config) -> Data:
    """Train / eval sources: data.eval_source, or a seeded held-out data.eval_fraction
    (stratified by class for text; the MAE config's random split for images, so a
    pretrained MAE never saw the eval images)."""
    d = config.data
    image = _image_model(config)
    try:
      if image:
        train, evaluation = images.image_train_eval_sources(
            d.source, d.eval_source or None, d.eval_fraction, config.train.seed)
      else:
        policy = DocPolicy.from_config(d)
        train = sources.open_source(d.source, policy)
        if d.eval_source:
          evaluation = sources.open_source(d.eval_source, policy)
        else:
          train, evaluation = labelled.stratified_split(train, d.eval_fraction,
                                                        config.train.seed)
    except UserError as e:
      if not config.get("init_from"):
        raise
      kind = "an image" if image else "a text"
      raise UserError(f"init_from={config.init_from} holds {kind} model ({config.finetune.body}),"
                      f" which cannot read data.source={d.source}: {e}") from None
    for src in (train, evaluation):
      if not src.has_labels:
        raise UserError(f"{src.name} has no labels; a classifier needs a 'label' column "
                        "(csv / jsonl), class subfolders or a labelled dataset")
    return Data(train, evaluation, {"train": train.stats} if not image else {})

  @classmethod
  def complete_config(cls, config, data: Data):
    """The label vocabulary (config.labels) from the training data, if not yet set, and
    the eval set checked against it."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not list(config.get("labels") or []):
      config.labels = labelled.label_vocabulary(data.train)
    labelled.check_labels(data.eval, list(config.labels))
    return config

  @classmethod
  def from_config(cls, config, tokenizer):
    f = config.finetune
    labels = [str(v) for v in config.get("labels") or []]
    if len(labels) < 2:
      raise UserError("config.labels must name at least 2 classes (it is filled from the "
                      "training data)")
    weights = cls._class_weights(f.get("class_weights", "none"), labels, config)
    common = dict(pooling=f.get("pooling", ""), mode=f.get("mode", "full"),
                  label_smoothing=f.get("label_smoothing", 0.0), class_weights=weights)
    if _image_model(config):
      try:
        enc, vit, _ = vit_configs(_vit_fields(config.model))
      except ValueError as e:
        raise UserError(str(e)) from None
      d = config.data
      prep = images.Preprocess(image_size=vit.image_size, channels=vit.channels,
                               mean=tuple(d.mean), std=tuple(d.std), resize=d.resize,
                               crop_scale=tuple(d.crop_scale), flip=d.flip,
                               eval_crop_fraction=d.eval_crop_fraction)
      return cls("vit", enc, labels, vit=vit, prep=prep, **common)
    cfg = transformer_config(config)
    if tokenizer is not None:
      check_vocab(config, tokenizer)
    seq_len = int(config.data.get("seq_len", 0) or cfg.max_len)
    if seq_len < 2 or (cfg.max_len and seq_len > cfg.max_len):
      raise UserError(f"data.seq_len={seq_len} must be in 2..{cfg.max_len} (model.max_len)")
    return cls(f.get("body", "encoder"), cfg, labels, tokenizer=tokenizer, seq_len=seq_len,
               **common)

  @staticmethod
  def _class_weights(spec, labels, config):
    if spec in ("", "none", None):
      return None
    if spec == "balanced":
      return spec  # n / (K * n_c), from the training labels (train_iterator)
    try:
      values = [float(v) for v in str(spec).split(",")]
    except ValueError:
      raise UserError(f"finetune.class_weights={spec!r}: use none, balanced or "
                      f"{len(labels)} comma-separated numbers") from None
    if len(values) != len(labels) or min(values) < 0:
      raise UserError(f"finetune.class_weights needs {len(labels)} non-negative numbers (one "
                      f"per label: {', '.join(labels)}), got {len(values)}")
    return values

  # --- batches -----------------------------------------------------------------------

  def init_len(self, config) -> int:
    return 1 if self.image else self.seq_len

  def units_per_batch(self, config) -> int:
    return config.train.batch_size * (1 if self.image else self.seq_len)

  def benchmark_shape(self, config) -> dict:
    return {"image_size": self.vit.image_size} if self.image else {"seq_len": self.seq_len}

  def _resolve_weights(self, data: Data):
    if isinstance(self.class_weights, str):  # "balanced": n / (K * n_c) over the training labels
      counts = np.asarray(labelled.label_counts(data.train, self.labels), np.float64)
      self.class_weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))).astype(
          np.float32)

  def train_iterator(self, config, data: Data):
    self._resolve_weights(data)
    t = config.train
    train = labelled.remap_labels(data.train, self.labels)
    if self.image:
      n_proc, pid = jax.process_count(), jax.process_index()
      return labelled.image_train_iterator(train, self.prep, t.batch_size // n_proc, t.seed,
                                           shard_index=pid, shard_count=n_proc,
                                           num_threads=config.data.get("num_threads", 0))
    shards, count = process_shards(config)
    from tx_jax.data.pipeline import ConcatRows  # pylint: disable=g-import-not-at-top
    per_shard = [labelled.text_train_iterator(train, self.tokenizer, self.seq_len,
                                              t.batch_size // count, t.seed, self.labels, i,
                                              count) for i in shards]
    return per_shard[0] if len(per_shard) == 1 else ConcatRows(per_shard)

  def eval_batches(self, config, data: Data):
    self._resolve_weights(data)
    t = config.train
    evaluation = labelled.remap_labels(data.eval, self.labels)
    if self.image:
      make = lambda: (
          {k: b[k] for k in ("image", "label", "valid")} for b in images.image_eval_batches(
              evaluation, self.prep, t.batch_size,
              num_threads=config.data.get("num_threads", 0)))
    else:
      make = lambda: labelled.text_eval_batches(evaluation, self.tokenizer, self.seq_len,
                                                t.batch_size, self.labels)
    return host_eval_batches(make, config.data.get("eval_batches", 0), t.batch_size)

  # --- the loss ----------------------------------------------------------------------

  def dummy_inputs(self, batch: int = 1, seq_len: int | None = None):
    """Zero inputs and segment ids (None for images) of the body's input shape."""
    if self.image:
      v = self.vit
      return (jnp.zeros((batch, v.image_size, v.image_size, v.channels), jnp.float32), None)
    t = seq_len or self.seq_len
    return jnp.zeros((batch, t), jnp.int32), jnp.ones((batch, t), jnp.int32)

  def init_params(self, rng, seq_len: int = 0):
    inputs, segments = self.dummy_inputs(1, seq_len or None)
    return self.classifier.init(rng, inputs, segments)["params"]

  def logits(self, params, batch, rng=None, train: bool = False):
    """(class logits (B, K), pooled features (B, D)) of a batch."""
    inputs = batch["image"] if self.image else batch["tokens"]
    return self.classifier.apply(
        {"params": params}, inputs, None if self.image else batch["segment_ids"],
        deterministic=not train, probe=self.mode == "linear_probe",
        rngs={"dropout": rng} if train else None)

  def loss_fn(self, params, batch, rng, train: bool):
    logits, _ = self.logits(params, batch, rng, train)
    weights = None  # "balanced" before the data resolved it: inference, plain loss
    if isinstance(self.class_weights, np.ndarray):
      weights = jnp.asarray(self.class_weights)
    return classification_sums(logits, batch["label"], batch["valid"], weights,
                               self.label_smoothing if train else 0.0)

  def summarize(self, sums) -> dict[str, float]:
    """loss (plain cross-entropy), accuracy, macro_f1 and per-class metrics."""
    confusion = np.asarray(sums["confusion"])
    self.last_confusion = confusion
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["nll"]) / count, **confusion_metrics(confusion, self.labels)}

  # --- optimizer: freezing, layer-wise decay, head learning rate ----------------------

  def frozen(self, path: tuple[str, ...]) -> bool:
    """Whether finetune.mode keeps the parameter at `path` fixed."""
    if path[0] == "head":
      return False
    if self.mode == "linear_probe":
      return True
    return self.mode == "freeze_below" and layer_of(path, self.num_layers) <= self.freeze_below

  def lr_scale(self, path: tuple[str, ...], optim_cfg) -> float:
    """Learning-rate factor of a trained parameter: optim.head_lr / optim.lr for the
    head, optim.layer_decay ** (L + 1 - depth) for the body (depth: `layer_of`)."""
    if path[0] == "head":
      return float(optim_cfg.get("head_lr", 0.0) or optim_cfg.lr) / float(optim_cfg.lr)
    decay = float(optim_cfg.get("layer_decay", 1.0) or 1.0)
    return decay ** (self.num_layers + 1 - layer_of(path, self.num_layers))

  def optimizer(self, optim_cfg, make_default):
    """The default AdamW on the trained leaves, its updates scaled per leaf (= a
    per-leaf learning rate); frozen leaves get no update and no optimizer state."""
    decay = float(optim_cfg.get("layer_decay", 1.0) or 1.0)
    if self.mode == "full" and decay == 1.0 and not optim_cfg.get("head_lr", 0.0):
      return make_default(optim_cfg)
    if self.cfg.scan_layers and (decay != 1.0 or self.mode == "freeze_below"):
      raise UserError("optim.layer_decay and finetune.mode=freeze_below need "
                      "model.scan_layers=false (they act per layer)")
    key = lambda path: tuple(getattr(k, "key", str(k)) for k in path)

    def scale_updates(updates, params=None):
      del params
      return jax.tree_util.tree_map_with_path(
          lambda p, u: u * self.lr_scale(key(p), optim_cfg), updates)

    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda p, _: FROZEN if self.frozen(key(p)) else TRAINED, params)
    trained = optax.chain(make_default(optim_cfg), optax.stateless(scale_updates))
    return optax.multi_transform({TRAINED: trained, FROZEN: optax.set_to_zero()}, labels)

  # --- pretrained weights --------------------------------------------------------------

  def transfer(self, fresh, pretrained):
    """Grafts the body of a pretrained workdir (an MAE's encoder, a text model's
    network, a classifier's body, and its head when the classes match) into fresh params."""
    objective = pretrained.config.objective
    family = (pretrained.config.finetune.body if objective == "classification"
              else FAMILY_OF.get(objective))
    if family != self.body_name:
      raise UserError(f"init_from holds a {objective} model ({family or 'no body'}), which "
                      f"does not fit a {self.body_name} classifier")
    source = pretrained.params
    if objective == "mae":
      source = source["encoder"]
    elif objective == "classification":
      source = {**source["body"], "head": source["head"]}
    return graft(fresh, source)

  # --- benchmark -----------------------------------------------------------------------

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = {"label": rng.integers(0, len(self.labels), batch_size).astype(np.int32),
             "valid": np.ones(batch_size, np.float32)}
    if self.image:
      v = self.vit
      batch["image"] = rng.normal(size=(batch_size, v.image_size, v.image_size, v.channels)
                                  ).astype(np.float32)
    else:
      batch["tokens"] = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
      batch["segment_ids"] = np.ones((batch_size, seq_len), np.int32)
    return batch

  def flops_per_unit(self, params, seq_len: int = 0) -> float:
    if self.image:
      tokens = self.vit.num_patches + (1 if self.vit.pooling == "cls" else 0)
      return (6 * count_params(params) * tokens
              + 12 * self.cfg.num_layers * self.cfg.d_model * tokens ** 2)
    return transformer_flops(params, self.cfg, self.seq_len)

  # --- evaluation: confusion matrix PNG and the label vocabulary ----------------------

  def evaluation(self, config, data: Data):
    return ConfusionEvaluation(self)

  # --- inference: embedding and prediction -------------------------------------------

  def open_embed_source(self, spec: str):
    return images.open_image_source(spec) if self.image else sources.open_source(spec)

  def embed_setup(self, config, layer, pooling, seq_len):
    if self.image:
      return "pre_logits", f"model:{self.vit.pooling}", None
    return super().embed_setup(config, layer, pooling, seq_len or self.seq_len)

  def embed_collate(self, records):
    if self.image:
      return {"image": np.stack([self.prep.eval(r["image"], r.get("id", "")) for r in records])}
    return super().embed_collate(records)

  def embed_batch(self, params, batch, layer: str, pooling: str):
    if self.image:
      return self.classifier.apply({"params": params}, batch["image"])[1]
    return super().embed_batch(params["body"], batch, layer, pooling)

  def predict_collate(self, records) -> dict[str, np.ndarray]:
    """Records -> one fixed-shape batch for `probabilities` (as the eval rows are made)."""
    if self.image:
      return {"image": np.stack([self.prep.eval(r["image"], r.get("id", "")) for r in records])}
    encode = labelled._EncodeText(self.tokenizer, self.seq_len, None, None)  # pylint: disable=protected-access
    rows = [encode.map({"text": r["text"]}) for r in records]
    return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids")}

  def probabilities(self, params, batch):
    """Class probabilities (B, K) float32; traced under jit."""
    return jax.nn.softmax(self.logits(params, batch)[0], axis=-1)
