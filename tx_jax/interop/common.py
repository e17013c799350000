"""Reading and writing Hugging Face model directories, one tensor at a time.

A family module (bert.py, gpt2.py, t5.py, vit.py) describes its checkpoint as
a list of `Rule`s: one Hugging Face tensor <-> one or more tx_jax parameters,
with the layout change between them. The same rules drive import and export,
so the two directions cannot drift apart. Tensors are read through
`safetensors` as numpy (no torch): each one is converted and dropped before
the next is read, so an import holds the model once plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable

import numpy as np

from tx_jax.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"'{path}' not found") from None
  except ValueError as e:
    raise UserError(f"'{path}' is not valid JSON ({e})") from None


def read_config(model_dir: str) -> dict:
  """The directory's config.json; UserError when it is not a Hugging Face model dir."""
  if not os.path.isdir(model_dir):
    raise UserError(f"'{model_dir}' is not a directory; pass a Hugging Face model directory")
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f"no {CONFIG_FILE} in '{model_dir}'; is it a Hugging Face model "
                    "directory (save_pretrained output)?")
  return read_json(path)


class TensorReader:
  """Lazy access to the tensors of `model.safetensors` or a sharded index."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = lambda path: safe_open(path, framework="np")
    single, index = (os.path.join(model_dir, WEIGHTS_FILE), os.path.join(model_dir, INDEX_FILE))
    if os.path.isfile(single):
      files = {None: single}
      with self._open(single) as f:
        self.where = {name: single for name in f.keys()}
    elif os.path.isfile(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"'{index}' has no weight_map; re-save the model with save_pretrained")
      self.where = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
      files = set(self.where.values())
      for path in files:
        if not os.path.isfile(path):
          raise UserError(f"shard '{path}' named in {INDEX_FILE} is missing")
    else:
      raise UserError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in '{model_dir}' (only safetensors "
                      "checkpoints are read; convert .bin files with save_pretrained("
                      "safe_serialization=True))")
    self._handles = {}

  def names(self) -> set[str]:
    return set(self.where)

  def _handle(self, name: str):
    path = self.where[name]
    if path not in self._handles:
      self._handles[path] = self._open(path).__enter__()
    return self._handles[path]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    # A handle of its own per tensor: the file is memory-mapped, and pages read
    # through a long-lived mapping stay in this process's resident set, so a
    # shared handle would hold a second copy of the model by the end.
    path = self.where[name]
    with self._open(path) as f:
      if f.get_slice(name).get_dtype() != "BF16":
        return f.get_tensor(name)
    # numpy has no bfloat16: read through JAX (ml_dtypes) and widen to float32.
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework="flax") as f:
      return np.asarray(f.get_tensor(name), np.float32)

  def close(self):
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles = {}


# ------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Hugging Face tensor <-> tx_jax parameter(s).

  kind:
    "copy"    same values, reshaped: HF (prod in, prod out) or flat (prod,) for vectors.
    "linear"  a torch Linear weight (out, in) <-> kernel (*in, *out): transposed.
    "split"   one HF (in, parts·out) tensor (GPT-2's fused c_attn) <-> len(paths)
              kernels/biases, cut along its last axis.
  n_in: how many leading axes of the tx_jax kernel are input axes (2 for the
    attention output kernel (N, H, D)); 0 for vectors.
  """
  hf: str
  paths: tuple[str, ...]
  kind: str = "copy"
  n_in: int = 1


def copy(hf: str, path: str, n_in: int = 1) -> Rule:
  return Rule(hf, (path,), "copy", n_in)


def vec(hf: str, path: str) -> Rule:
  return Rule(hf, (path,), "copy", 0)


def linear(hf: str, path: str, n_in: int = 1) -> Rule:
  return Rule(hf, (path,), "linear", n_in)


def split(hf: str, paths: tuple[str, ...], n_in: int = 1) -> Rule:
  return Rule(hf, paths, "split", n_in)


def hf_shape(rule: Rule, tx_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
  """The Hugging Face tensor's shape implied by the tx_jax shapes of its paths."""
  shape = tx_shapes[0]
  ins, outs = math.prod(shape[:rule.n_in]), math.prod(shape[rule.n_in:])
  if rule.kind == "split":
    parts = len(rule.paths)
    return (ins, parts * outs) if rule.n_in else (parts * outs,)
  if rule.n_in == 0:
    return (ins * outs,)
  return (outs, ins) if rule.kind == "linear" else (ins, outs)


def to_tx(rule: Rule, value: np.ndarray, tx_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  if rule.kind == "split":
    parts = np.split(value, len(rule.paths), axis=-1)
    return [np.ascontiguousarray(p).reshape(s) for p, s in zip(parts, tx_shapes)]
  if rule.kind == "linear":
    value = value.T
  return [np.ascontiguousarray(value).reshape(tx_shapes[0])]


def to_hf(rule: Rule, values: list[np.ndarray]) -> np.ndarray:
  shape = hf_shape(rule, [v.shape for v in values])
  if rule.kind == "split":
    flat = [v.reshape(shape[:-1] + (-1,)) for v in values]
    return np.ascontiguousarray(np.concatenate(flat, axis=-1))
  if rule.kind == "linear":
    return np.ascontiguousarray(values[0].reshape(shape[::-1]).T)
  return np.ascontiguousarray(values[0].reshape(shape))


# ------------------------------------------------------------------ param trees


def flat_shapes(tree, prefix: str = "") -> dict[str, tuple]:
  """{"a/b/kernel": shape} of a nested dict of arrays or ShapeDtypeStructs."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flat_shapes(value, name + "/"))
    else:
      out[name] = tuple(value.shape)
  return out


def set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def get_path(tree: dict, path: str):
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      raise UserError(f"parameter '{path}' is missing from the params")
    tree = tree[key]
  return tree


class Importer:
  """Fills a params tree of known shapes from a TensorReader, tensor by tensor.

  `take` reads one HF tensor (checking its shape) and stores its tx_jax form;
  `finish` checks that every parameter was set and that no HF tensor was left
  over except the ones named as ignorable (buffers, dropped heads).
  """

  def __init__(self, reader: TensorReader, shapes: dict[str, tuple], dtype, source: str):
    self.reader, self.shapes, self.dtype, self.source = reader, shapes, np.dtype(dtype), source
    self.params: dict = {}
    self.done: set[str] = set()
    self.used: set[str] = set()

  def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One HF tensor as float32 numpy, UserError if it is absent or misshaped."""
    if name not in self.reader.where:
      raise UserError(f"tensor '{name}' is missing from {self.source}")
    found = self.reader.shape(name)
    if shape is not None and found != tuple(shape):
      raise UserError(f"tensor '{name}' in {self.source} has shape {list(found)}, expected "
                      f"{list(shape)} from config.json")
    self.used.add(name)
    return self.reader.read(name)

  def put(self, path: str, value: np.ndarray) -> None:
    want = self.shapes[path]
    if value.shape != want:
      raise UserError(f"parameter '{path}' built from {self.source} has shape "
                      f"{list(value.shape)}, expected {list(want)}")
    set_path(self.params, path, value.astype(self.dtype, copy=False))
    self.done.add(path)

  def take(self, rule: Rule) -> None:
    tx_shapes = [self.shapes[p] for p in rule.paths]
    value = self.read(rule.hf, hf_shape(rule, tx_shapes))
    for path, part in zip(rule.paths, to_tx(rule, value, tx_shapes)):
      self.put(path, part)

  def tied(self, name: str, kept: np.ndarray | str) -> None:
    """An HF tensor that must equal an imported one (tied weights saved twice)."""
    if name not in self.reader.where:
      return
    kept = get_path(self.params, kept) if isinstance(kept, str) else kept
    value = self.read(name)
    if value.shape != kept.shape or not np.array_equal(value.astype(self.dtype), kept):
      raise UserError(f"tensor '{name}' in {self.source} differs from the weight it is tied to "
                      "(tie_word_embeddings is true in config.json); set it to false for an "
                      "untied model")

  def finish(self, ignorable: Callable[[str], bool] = lambda name: False) -> tuple[dict, list]:
    missing = sorted(set(self.shapes) - self.done)
    if missing:
      raise UserError(f"no tensor in {self.source} fills parameter '{missing[0]}' "
                      f"({len(missing)} missing)")
    left = sorted(self.reader.names() - self.used)
    ignored = [name for name in left if ignorable(name)]
    extra = [name for name in left if not ignorable(name)]
    if extra:
      raise UserError(f"unexpected tensor '{extra[0]}' in {self.source} ({len(extra)} not "
                      "used); the checkpoint does not match its config.json architecture")
    return self.params, ignored


def export_tensors(rules: Iterable[Rule], params: dict) -> dict[str, np.ndarray]:
  """HF name -> numpy tensor for every rule, from a tx_jax params tree."""
  return {rule.hf: to_hf(rule, [np.asarray(get_path(params, p), np.float32) for p in rule.paths])
          for rule in rules}


def write_model_dir(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """config.json + model.safetensors (torch-style metadata) into out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})


def hf_activation(name: str, where: str) -> str:
  """tx_jax activation for a Hugging Face activation name."""
  table = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
           "relu": "relu", "silu": "silu", "swish": "silu"}
  if name not in table:
    raise UserError(f"{where}: activation {name!r} is not supported; use one of {sorted(table)}")
  return table[name]


def tx_activation(name: str) -> str:
  """Hugging Face activation name for a tx_jax one."""
  return {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu", "silu": "silu"}[name]


def abstract_shapes(model, *inputs, rngs: tuple[str, ...] = ("params",)) -> dict[str, tuple]:
  """Flat {path: shape} of `model.init(*inputs)["params"]`, from shapes only (no memory)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  keys = {name: jax.random.key(0) for name in rngs}
  variables = jax.eval_shape(lambda: model.init(keys, *inputs))
  return flat_shapes(nn.unbox(variables["params"]))


def require(config: dict, key: str, where: str):
  if key not in config:
    raise UserError(f"{where}: config.json has no '{key}'")
  return config[key]


@dataclasses.dataclass
class Imported:
  """A Hugging Face model as tx_jax sees it.

  family: "bert" | "gpt2" | "t5" | "vit" | "vit_mae".
  architecture: the Hugging Face class it was saved from, e.g. "BertForPreTraining".
  objective: the tx_jax objective whose model the params fit ("masked_lm",
    "causal_lm", "span_corruption", "mae"), or None for an encoder alone (ViTModel).
  model_config: the run's `model` section (TransformerConfig fields; flat ViT/MAE
    fields for the image families).
  objective_options: keyword options of that objective (e.g. mlm_head, sentence_order).
  params: nested dict of numpy arrays, the tree `init` makes (unboxed).
  tokenizer: an HFTokenizer from the directory's tokenizer.json, or None.
  embedding_defaults: pooling / normalize / max_len for embeddings
    (sentence-transformers directories), else {}.
  ignored: HF tensors read but not kept (buffers, a pooler no tx_jax head uses).
  """
  family: str
  architecture: str
  objective: str | None
  model_config: dict
  objective_options: dict
  params: dict
  tokenizer: object = None
  embedding_defaults: dict = dataclasses.field(default_factory=dict)
  ignored: list = dataclasses.field(default_factory=list)


def check_exportable(cfg, family: str, free_head_dim: bool = False, **expected) -> None:
  """UserError naming the first model field a `family` checkpoint cannot express."""
  if not free_head_dim and cfg.dim_per_head * cfg.num_heads != cfg.d_model:
    raise UserError(f"{family} needs model.head_dim * num_heads == d_model")
  if cfg.kv_heads != cfg.num_heads:
    raise UserError(f"{family} has no grouped-query attention; model.num_kv_heads must be 0")
  for name, want in expected.items():
    if getattr(cfg, name) != want:
      raise UserError(f"{family} cannot express model.{name}={getattr(cfg, name)!r} "
                      f"(needs {want!r})")
