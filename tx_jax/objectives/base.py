"""The contract between an objective and everything that runs it.

An objective is one file under `tx_jax/objectives/` whose class is decorated
with `@register("NAME")`; a run config's `objective: NAME` finds it by
importing `tx_jax.objectives.NAME` (`get_objective`). The class owns every
objective-specific piece, and the generic code only asks it:

  building     `open_data(config)` (sources), `tokenizer_texts(data)` (what a
               trained tokenizer learns from), `from_config(config, tokenizer)`,
               `needs_tokenizer(config)`, `complete_config(config, data)` (what the
               data settles, e.g. a label vocabulary, saved in config.json)
  pretrained   `init_from`: `adopt(config, pretrained_config)` (the architecture
               of the pretrained workdir), `transfer(fresh_params, pretrained)`
  batches      `train_iterator(config, data)`, `eval_batches(config, data)`,
               `units_per_batch(config)`, `init_len(config)`
  the loss     `init_params(rng, init_len)`, `loss_fn(params, batch, rng, train)
               -> (loss, sums)`, `summarize(sums) -> metrics`
  optimizer    `optimizer(optim_cfg, make_default)`: default AdamW; fine-tuning
               and two-network objectives build their own from the default
  the update   optional `train_update(params, opt_state, tx, batch, rng, step)`
               for a step that is not one gradient of `loss_fn` (a GAN)
  benchmark    `synthetic_batch(batch_size, seq_len, vocab, seed)`,
               `flops_per_unit(params, seq_len)`, `unit` ("tokens" / "images")
  evaluation   `evaluation(config, data)`: extra metrics at every eval
               (e.g. frozen-encoder probes), or None
  inference    `open_embed_source`, `embed_setup`, `embed_collate`,
               `embed_batch` (`tx-jax embed`); `generate(trained, request)`
               (`tx-jax generate`); `topics_defaults` (`tx-jax topics`)

`sums` is a dict of sums (always with `weight`, the loss denominator) that
add up exactly across micro-batches, devices and eval batches; `summarize`
turns their total into metrics. Text objectives share their data wiring
through `tx_jax.objectives.text.TextObjective`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any, Callable, ClassVar, Iterator

from tx_jax.errors import UserError

_REGISTRY: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes the objective available as `objective: name`.

  The class must live in `tx_jax/objectives/<name>.py` (or be imported before
  it is looked up), so the config's name alone finds its module.
  """
  def wrap(cls):
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def get_objective(name: str) -> type:
  """The objective class registered as `name`, imported from its module on first use."""
  if name not in _REGISTRY and isinstance(name, str) and name.isidentifier():
    try:
      importlib.import_module(f"tx_jax.objectives.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"tx_jax.objectives.{name}":
        raise
  if name not in _REGISTRY:
    raise UserError(f"objective {name!r} is unknown; choose one of {available()}")
  return _REGISTRY[name]


def available() -> list[str]:
  """Every registered objective name (imports each objective module once)."""
  for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
    if info.name not in ("base", "text", "transfer"):  # shared helpers, no objective
      importlib.import_module(f"tx_jax.objectives.{info.name}")
  return sorted(_REGISTRY)


@dataclasses.dataclass
class Data:
  """What `open_data` read: train / eval sources and what the policy did."""
  train: Any
  eval: Any
  stats: dict = dataclasses.field(default_factory=dict)


class Objective:
  """Base class of every objective; the defaults below are what most need."""

  name: ClassVar[str] = ""
  unit: ClassVar[str] = "tokens"        # what tokens_per_s / images_per_s count
  uses_tokenizer: ClassVar[bool] = True
  # `tx-jax topics` can pretrain with this objective when it names its base
  # config file and context: {"config": "contrastive.py", "seq_len": 64,
  # "batch_size": 64}. None: not offered there.
  topics_defaults: ClassVar[dict | None] = None

  # --- building ----------------------------------------------------------------------

  @classmethod
  def open_data(cls, config) -> Data:
    """The run's train and eval sources (checked: a bad spec fails here, in one line)."""
    raise NotImplementedError

  @classmethod
  def tokenizer_texts(cls, data: Data):
    """A text source a new tokenizer is trained on (`data.tokenizer=spm-train:N`)."""
    return data.train

  @classmethod
  def needs_tokenizer(cls, config) -> bool:
    """Whether a run of this config reads text (and so has a tokenizer/ in its workdir)."""
    return cls.uses_tokenizer

  @classmethod
  def complete_config(cls, config, data: Data):
    """The run config with what only the data settles filled in (e.g. the label
    vocabulary of a classifier), checked against the eval data. It is saved as the
    workdir's config.json, so inference needs no data. Default: unchanged."""
    return config

  @classmethod
  def adopt(cls, config, pretrained_config):
    """The run config for starting from a pretrained workdir (`init_from`) whose
    config is `pretrained_config`: typically its architecture (`model`) and the
    data settings it was trained with. The tokenizer is copied by the caller.
    Default: refuse, in one line."""
    raise UserError(f"objective {config.objective!r} does not start from a pretrained "
                    "workdir; leave init_from empty")

  @classmethod
  def from_config(cls, config, tokenizer) -> "Objective":
    """The objective of a run config (and its tokenizer; None for image objectives)."""
    raise NotImplementedError

  # --- batches -----------------------------------------------------------------------

  def init_len(self, config) -> int:
    """Sequence length the parameters are initialised with."""
    return int(config.data.get("seq_len", 1))

  def units_per_batch(self, config) -> int:
    """Tokens (or images) in one global batch, for tokens_per_s / images_per_s."""
    return config.train.batch_size * config.data.seq_len

  def train_iterator(self, config, data: Data):
    """This process's rows of every global train batch: an iterator with
    get_state() / set_state() (checkpointed with the model)."""
    raise NotImplementedError

  def eval_batches(self, config, data: Data) -> Callable[[], Iterator[dict]]:
    """A factory of this process's rows of the (same every time) eval batches."""
    raise NotImplementedError

  # --- the loss ----------------------------------------------------------------------

  def init_params(self, rng, seq_len: int):
    """Fresh (logically boxed) parameters, initialised for rows of seq_len."""
    raise NotImplementedError

  def loss_fn(self, params, batch, rng, train: bool):
    """(mean loss, sums) of one batch; pure, jitted."""
    raise NotImplementedError

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    raise NotImplementedError

  def optimizer(self, optim_cfg, make_default):
    """The optax transformation of the run; `make_default(optim_cfg)` is AdamW with
    warmup + cosine decay, clipping and the decay mask (tx_jax.train.optim)."""
    return make_default(optim_cfg)

  # An objective whose step is more than one gradient of `loss_fn` (a GAN: the
  # discriminator's update, then the generator's against the updated
  # discriminator) defines the method
  #   train_update(params, opt_state, tx, batch, rng, step) -> (params, opt_state, loss,
  #                                                             sums, grads)
  # that applies the whole update with `tx` (its own `optimizer`); the train step
  # (tx_jax.train.step) keeps the non-finite skip / halt checks and the
  # grad_norm / param_norm metrics, and refuses gradient accumulation.
  train_update: ClassVar[Callable | None] = None

  def transfer(self, fresh_params, pretrained) -> tuple[Any, dict]:
    """Fresh params (host numpy, as initialised) with a pretrained workdir's weights
    grafted in -> (params of the same structure, report). `pretrained` is a
    `tx_jax.train.trained.Trained` (config, tokenizer, objective, params, step).
    The report lists the paths "loaded", "new" (kept as initialised) and
    "dropped" (pretrained weights not used, e.g. an MLM head); a body that does
    not fit (another family, other shapes) raises UserError in one line."""
    raise UserError(f"objective {self.name!r} does not load pretrained weights; leave "
                    "init_from empty")

  # --- benchmark ---------------------------------------------------------------------

  def synthetic_batch(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A random batch with the keys `loss_fn` reads, for `tx-jax benchmark`."""
    raise NotImplementedError

  def flops_per_unit(self, params, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token or image."""
    raise NotImplementedError

  def benchmark_shape(self, config) -> dict:
    """Shape facts reported beside the throughput (seq_len, image_size, ...)."""
    return {"seq_len": config.data.get("seq_len", 0)}

  # --- evaluation --------------------------------------------------------------------

  def evaluation(self, config, data: Data):
    """Extra evaluation at every eval, or None: an object with
    `__call__(params, step, workdir) -> metrics` (may write files into workdir)
    and `metrics(params) -> metrics` (read-only, for `tx-jax eval`)."""
    return None

  # --- inference ---------------------------------------------------------------------

  def open_embed_source(self, spec: str):
    """The records `tx-jax embed` reads from a data spec."""
    raise UserError(f"{type(self).__name__} models do not embed data")

  embed_normalized: bool = False  # embeddings are L2-normalised (set by embed_setup)

  def embed_setup(self, config, layer: str | None, pooling: str | None, seq_len: int | None):
    """Checks and resolves the embedding options (None: the model's default) before
    anything runs: -> (layer, pooling as applied, seq_len or None)."""
    return layer or "pre_logits", pooling or "mean", None

  def embed_collate(self, records):
    """Records -> a batch of numpy arrays, or (batch, documents truncated)."""
    raise NotImplementedError

  def embed_batch(self, params, batch, layer: str, pooling: str):
    """(B, D) features of a batch; traced under jit. Raises ValueError naming the
    valid choices for a layer or pooling it does not know."""
    raise NotImplementedError

  def generate(self, trained, request: dict) -> list[str]:
    """`tx-jax generate`: lines to print. `request` holds the command's options."""
    raise UserError(f"{trained.workdir!r} holds a {self.name} model, which does not generate "
                    "text; use a causal_lm or encoder-decoder workdir")
