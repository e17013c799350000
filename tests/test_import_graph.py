"""The import graph read from the source: no cycles, and the directions of DESIGN.md.

Edges come from every `import` / `from ... import` statement (at any depth,
so imports inside functions count too) and from the "tx_jax.module:Name"
strings that code imports by name. Importing a name from a package is an
edge to its `__init__`; importing a submodule, to the submodule.
"""

import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tx_jax")
BY_NAME = re.compile(r"^(tx_jax(?:\.\w+)+):\w+$")

# Modules that only the entry points may import (DESIGN: "nothing imports them").
ENTRY_POINTS = {"tx_jax.cli", "tx_jax.__main__", "tx_jax.topics", "tx_jax.plan"}
# Parts that every part may use: the one exception type of user errors.
SHARED = {"errors"}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        found[_module_name(path)] = path
  return found


def _resolve(name: str, modules) -> str | None:
  """The tx_jax module `name` refers to (a module, or a package's __init__)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """({module: tx_jax modules it imports}, {module: third-party top-level names})."""
  modules = _modules()
  edges, external = {m: set() for m in modules}, {m: set() for m in modules}
  for module, path in modules.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
          base = ".".join(parts + ([base] if base else []))
        # `from pkg import sub` imports the submodule; `from pkg import Name` the package
        # (every submodule import runs its parents' __init__ first, so those are no edge).
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = BY_NAME.match(node.value)
        targets = [match.group(1)] if match else []
      for target in targets:
        if target == "tx_jax" or target.startswith("tx_jax."):
          resolved = _resolve(target, modules)
          if resolved and resolved != module:
            edges[module].add(resolved)
        elif target and not isinstance(node, ast.Constant):
          external[module].add(target.split(".")[0])
  return edges, external


def part(module: str) -> str:
  """tx_jax.train.loop -> train; tx_jax.cli -> cli; tx_jax -> tx_jax."""
  pieces = module.split(".")
  return pieces[1] if len(pieces) > 1 else pieces[0]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the directed graph, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def part_edges(edges) -> dict[str, set[str]]:
  parts: dict[str, set[str]] = {}
  for module, targets in edges.items():
    a = part(module)
    for target in targets:
      b = part(target)
      if a != b and "tx_jax" not in (a, b) and b not in SHARED:
        parts.setdefault(a, set()).add(b)
  return parts


EDGES, EXTERNAL = graph()


def test_the_reader_sees_imports_of_every_kind():
  """The graph is read right: a plain import, a function-level import and a
  by-name string are all edges (so the checks below can fail)."""
  assert "tx_jax.train.loop" in EDGES["tx_jax.cli"]            # inside cmd_train
  assert "tx_jax.objectives.base" in EDGES["tx_jax.objectives.causal_lm"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modules():
  assert find_cycle(EDGES) is None, f"import cycle: {' -> '.join(find_cycle(EDGES))}"


def test_no_two_parts_import_each_other_and_parts_form_no_cycle():
  parts = part_edges(EDGES)
  mutual = sorted({tuple(sorted((a, b))) for a, bs in parts.items() for b in bs
                   if a in parts.get(b, ())})
  assert not mutual, f"parts importing each other: {mutual}"
  assert find_cycle(parts) is None, f"cycle between parts: {find_cycle(parts)}"


def _parts_imported_by(name: str) -> set[str]:
  return {part(t) for m, ts in EDGES.items() if part(m) == name for t in ts} - {name}


def test_models_import_only_jax_flax_numpy():
  assert _parts_imported_by("models") == set()
  stdlib = set(sys.stdlib_module_names)
  third_party = {n for m, names in EXTERNAL.items() if part(m) == "models" for n in names}
  assert third_party - stdlib <= {"jax", "flax", "numpy", "jaxlib"}, third_party - stdlib


@pytest.mark.parametrize("name, forbidden", [
    ("data", {"models", "train", "objectives", "analysis", "evaluation", "interop"}),
    ("objectives", {"train", "analysis", "interop"}),
    ("parallel", {"models", "objectives", "train", "data", "analysis"}),
    ("evaluation", {"train", "analysis", "objectives"}),
    ("analysis", {"objectives"}),
    ("generate", {"train", "analysis", "objectives", "data"}),
])
def test_directions_of_design(name, forbidden):
  assert not _parts_imported_by(name) & forbidden, _parts_imported_by(name) & forbidden


def test_nothing_imports_the_entry_points():
  importers = {m: ts & ENTRY_POINTS for m, ts in EDGES.items()
               if ts & ENTRY_POINTS and m not in ENTRY_POINTS}
  assert not importers, importers
  # Entry points may use each other only from the CLI's dispatch.
  for module in ENTRY_POINTS - {"tx_jax.cli", "tx_jax.__main__"}:
    assert not (EDGES.get(module, set()) & ENTRY_POINTS), module


def test_inference_code_never_imports_the_training_loop():
  for module, targets in EDGES.items():
    if part(module) in ("analysis", "generate", "interop", "evaluation", "objectives"):
      assert "tx_jax.train.loop" not in targets, module
