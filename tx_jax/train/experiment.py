"""The generic experiment: what a run needs, asked of its objective.

config -> objective class -> sources -> tokenizer (the workdir's, or made from
`data.tokenizer`) -> objective -> train iterator, eval batches, extra
evaluation, optimizer. Nothing here knows one objective from another.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Iterator

import jax
import optax

from tx_jax.data import tokenizers
from tx_jax.errors import UserError
from tx_jax.objectives import Objective, get_objective
from tx_jax.train import config as config_lib
from tx_jax.train import optim


@dataclasses.dataclass
class Experiment:
  """Everything objective-specific the loop needs, behind a small interface."""
  config: object
  tokenizer: object
  objective: object
  tx: optax.GradientTransformation
  init_len: int                         # sequence length used to initialise params
  units_per_batch: int                  # tokens (or images) per global batch
  train_iterator: Callable[[], object]  # per-host iterator with get_state/set_state
  eval_batches: Callable[[], Iterator[dict]]
  lr: Callable[[int], float]
  data_stats: dict = dataclasses.field(default_factory=dict)  # what the DocPolicy did
  # Optional evaluation beyond the loss (probes, images): (params, step, workdir)
  # -> metrics, logged as eval/<name> at every eval; .metrics(params) read-only.
  extra_eval: object | None = None
  # (pretrained workdir, step or None = newest) whose weights start a fresh run.
  init_from: tuple[str, int | None] | None = None

  def meta(self) -> dict:
    return checkpoint_meta(self.config, self.tokenizer)


def checkpoint_meta(config, tokenizer) -> dict:
  """What a checkpoint records of its run, checked when it is restored."""
  return {"objective": config.objective, "model": config.model.to_dict(),
          "tokenizer": tokenizer.fingerprint() if tokenizer else None}


def make_tx(objective, config) -> optax.GradientTransformation:
  """The run's optimizer: the objective's choice, built on the default AdamW."""
  steps = config.train.steps
  return objective.optimizer(config.optim, lambda cfg: optim.make_optimizer(cfg, steps))


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def get_tokenizer(config, workdir: str, create: bool, train_texts: Callable | None = None):
  """The workdir's tokenizer; created from `data.tokenizer` on the first run.

  `data.tokenizer` is "byte", "spm:PATH.model" (an existing SentencePiece
  model) or "spm-train:N" (train an N-piece SentencePiece on the text source
  that `train_texts()` returns).
  """
  path = tokenizer_dir(workdir)
  specials = tuple(config.data.get("specials", ()))
  if os.path.isdir(path):
    return tokenizers.load_tokenizer(path)
  if not create:
    raise UserError(f"{workdir!r} holds no tokenizer/: is it a tx-jax train workdir?")
  spec = config.data.tokenizer
  if spec.startswith("spm-train:"):
    try:
      vocab = int(spec.split(":", 1)[1])
    except ValueError:
      raise UserError(f"data.tokenizer={spec!r}: expected spm-train:VOCAB_SIZE") from None
    source = train_texts()
    texts = (source[i]["text"] for i in range(len(source)))
    if jax.process_index() == 0:  # one writer on the shared workdir; the others wait
      tokenizers.train_sentencepiece(texts, vocab, os.path.join(workdir, "spm"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("tx_jax: spm tokenizer trained")
    tok = tokenizers.make_tokenizer(f"spm:{os.path.join(workdir, 'spm.model')}", specials)
  else:
    tok = tokenizers.make_tokenizer(spec, specials)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
  return tok


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """`WORKDIR[:STEP]` -> (workdir, step or None for the newest)."""
  path, sep, step = str(spec).rpartition(":")
  if sep and step.isdigit() and path:
    return path, int(step)
  return str(spec), None


def adopt_pretrained(cls, config, workdir: str):
  """config.init_from: the objective adopts the pretrained workdir's architecture, and
  its tokenizer is copied into `workdir` (unless one is there already).
  -> (config, (pretrained workdir, step))."""
  path, step = parse_init_from(config.init_from)
  if not os.path.isdir(path):
    raise UserError(f"init_from={config.init_from!r}: {path!r} does not exist; give a "
                    "tx-jax train workdir (WORKDIR[:STEP])")
  config = cls.adopt(config, config_lib.load_workdir_config(path))
  source, target = tokenizer_dir(path), tokenizer_dir(workdir)
  if cls.needs_tokenizer(config) and not os.path.isdir(target):
    if not os.path.isdir(source):
      raise UserError(f"init_from={config.init_from!r} holds no tokenizer/, but this run reads "
                      "text; give a workdir of a text model")
    if jax.process_index() == 0:
      shutil.copytree(source, target + ".tmp", dirs_exist_ok=True)
      os.replace(target + ".tmp", target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("tx_jax: init_from tokenizer copied")
  return config, (path, step)


def build_experiment(config, workdir: str, create_tokenizer: bool,
                     init_from: bool = False) -> Experiment:
  """The run's experiment; every input is checked here, before training starts.

  With init_from=True and config.init_from set (a training run), the config first
  adopts the pretrained workdir (`adopt_pretrained`); `Experiment.config` is the
  completed config the run records as config.json.
  """
  cls = get_objective(config.objective)
  pretrained = None
  if init_from and config.get("init_from"):
    config, pretrained = adopt_pretrained(cls, config, workdir)
  data = cls.open_data(config)
  config = cls.complete_config(config, data)
  tok = None
  if cls.needs_tokenizer(config):
    tok = get_tokenizer(config, workdir, create_tokenizer, lambda: cls.tokenizer_texts(data))
  objective = cls.from_config(config, tok)
  eval_batches = objective.eval_batches(config, data)
  tx_lr = optim.lr_schedule(config.optim, config.train.steps)
  return Experiment(
      config, tok, objective, make_tx(objective, config), objective.init_len(config),
      objective.units_per_batch(config), lambda: objective.train_iterator(config, data),
      eval_batches, lambda s: float(tx_lr(s)), data.stats,
      objective.evaluation(config, data), pretrained)


def build_objective(config, tokenizer=None):
  """The objective of a config without its data (benchmarks, plans, inference)."""
  return get_objective(config.objective).from_config(config, tokenizer)


def completed_config(config):
  """A config file's run config completed from its data where the objective needs the
  data to know its shapes (a classifier's label vocabulary), for benchmarks and plans
  that build the objective without a run."""
  cls = get_objective(config.objective)
  if getattr(cls.complete_config, "__func__", None) is Objective.complete_config.__func__:
    return config
  return cls.complete_config(config, cls.open_data(config))
