"""Embedded corpora that exist on every machine: no download, no network.

- `python_docs`: CPython's documentation topics (`pydoc_data.topics`), ~0.5 MB of
  English prose with code, with a fixed held-out split.
- `stdlib_docstrings`: docstrings of the standard library, labelled by the
  top-level package they come from (a real labelled text set for clustering).
- `digits`: scikit-learn's bundled 8x8 handwritten digits.
"""

import functools
import hashlib
import importlib
import inspect
import pkgutil
import warnings

import numpy as np

from tx_jax.errors import UserError

PYTHON_DOCS_SPLITS = ("train", "eval", "all")

# Top-level stdlib packages/modules whose docstrings form `stdlib_docstrings`.
# Each imports cleanly on Linux CPython 3.11+ without side effects (no GUI, no
# deprecated lib2to3/distutils); the list is fixed so the corpus is stable.
STDLIB_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "email", "http",
    "importlib", "inspect", "json", "logging", "multiprocessing", "pathlib",
    "tarfile", "typing", "unittest", "urllib", "xml", "xmlrpc",
)
_MIN_DOCSTRING_CHARS = 40


def _is_eval_topic(name: str) -> bool:
  # A stable hash of the topic name (not its sorted position), so a topic keeps
  # its split when another Python version adds or removes topics. ~10% of 79.
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def python_docs(split: str = "train") -> list[str]:
  """CPython documentation topics, sorted by topic name.

  split: "train" (~90%), "eval" (a fixed ~10%, disjoint from train) or "all".
  """
  if split not in PYTHON_DOCS_SPLITS:
    raise UserError(
        f"unknown python-docs split '{split}'; use one of "
        f"{', '.join(PYTHON_DOCS_SPLITS)}")
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  names = sorted(topics)
  if split == "eval":
    names = [n for n in names if _is_eval_topic(n)]
  elif split == "train":
    names = [n for n in names if not _is_eval_topic(n)]
  return [topics[n] for n in names]


def _submodules(package: str) -> list:
  """The package and its importable submodules, sorted by name."""
  root = importlib.import_module(package)
  modules = [root]
  if hasattr(root, "__path__"):
    walk = pkgutil.walk_packages(root.__path__, package + ".",
                                 onerror=lambda name: None)
    for info in walk:
      parts = info.name.split(".")
      if any(p in ("test", "tests", "__main__", "idlelib") for p in parts):
        continue
      try:
        modules.append(importlib.import_module(info.name))
      except Exception:  # pylint: disable=broad-except
        # Platform-specific modules (asyncio.windows_events, ...) fail here.
        continue
  return sorted(modules, key=lambda m: m.__name__)


def _module_docstrings(module) -> list[str]:
  """Docstrings of a module, its classes/functions and the classes' methods."""
  docs = []

  def add(obj):
    # `__doc__`, not `inspect.getdoc`: getdoc inherits a base class's docstring,
    # which would label e.g. dict's docs as coming from `collections`.
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str):
      doc = inspect.cleandoc(doc)
      if len(doc) >= _MIN_DOCSTRING_CHARS:
        docs.append(doc)

  add(module)
  for _, obj in sorted(vars(module).items()):
    # Only objects defined here; re-exports are collected in their own module.
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    if getattr(obj, "__module__", None) != module.__name__:
      continue
    add(obj)
    if inspect.isclass(obj):
      for attr, member in sorted(vars(obj).items()):
        if attr.startswith("__") and attr != "__init__":
          continue  # Generic dunder docs ("Return self<value.") are noise.
        if isinstance(member, (classmethod, staticmethod)):
          member = member.__func__
        if inspect.isroutine(member) or isinstance(member, property):
          add(member)
  return docs


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[tuple[str, ...], tuple[str, ...]]:
  texts, labels, seen = [], [], set()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Deprecated submodules warn on import.
    for package in STDLIB_PACKAGES:
      for module in _submodules(package):
        for doc in _module_docstrings(module):
          if doc not in seen:
            seen.add(doc)
            texts.append(doc)
            labels.append(package)
  return tuple(texts), tuple(labels)


def stdlib_docstrings() -> tuple[list[str], list[str]]:
  """(texts, labels): ~2k stdlib docstrings, label = top-level package name.

  Deterministic for a given Python version: fixed package list, modules and
  members walked in sorted order, exact duplicates dropped (first one kept).
  """
  texts, labels = _stdlib_docstrings()
  return list(texts), list(labels)


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: images float32 [1797, 8, 8, 1] in [0, 1], labels int32 [1797]."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap).
  images = (bunch.images.astype(np.float32) / 16.0)[..., None]
  return images, bunch.target.astype(np.int32)
