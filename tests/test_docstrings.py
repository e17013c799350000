"""Every public module, class, function and method of tx_jax.models,
tx_jax.objectives and tx_jax.analysis has a docstring, so `python -m pydoc
tx_jax.models` reads as an API reference. A method that implements a documented
method of a base class (an objective's `loss_fn`, say) shares its docstring, as
pydoc shows it."""

import importlib
import inspect
import pkgutil

import pytest


def _doc(cls, method: str, fn) -> str:
  """The method's own docstring, else that of the base class method it implements."""
  if (fn.__doc__ or "").strip():
    return fn.__doc__
  for base in cls.__mro__[1:]:
    inherited = vars(base).get(method)
    if inherited is not None and (getattr(inherited, "__doc__", None) or "").strip():
      return inherited.__doc__
  return ""


def undocumented(package: str) -> list[str]:
  missing = []
  pkg = importlib.import_module(package)
  for name in [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]:
    module = importlib.import_module(name)
    if not (module.__doc__ or "").strip():
      missing.append(name)
    for attr, obj in vars(module).items():
      if attr.startswith("_") or getattr(obj, "__module__", None) != name:
        continue
      if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      if not (obj.__doc__ or "").strip():
        missing.append(f"{name}.{attr}")
      if inspect.isclass(obj):
        for method, fn in vars(obj).items():
          if method.startswith("_") and method != "__call__":
            continue
          fn = fn.fget if isinstance(fn, property) else fn
          if inspect.isfunction(fn) and not _doc(obj, method, fn):
            missing.append(f"{name}.{attr}.{method}")
  return missing


@pytest.mark.parametrize("package", ["tx_jax.models", "tx_jax.objectives", "tx_jax.analysis"])
def test_public_api_has_docstrings(package):
  assert undocumented(package) == []
