"""The package's layers, read from its import statements: no cycles, arrows down only.

Every `import` and `from ... import` inside ambient_jax (module level and inside
functions alike) is an edge. README's "Architecture" section states the rule each layer
keeps; these tests hold the code to it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ambient_jax"
ENTRY_POINTS = {"ambient_jax.main", "ambient_jax.evaluate", "ambient_jax.prepare_latents",
                "ambient_jax.export_lora", "ambient_jax.attack", "ambient_jax.cli"}
# Layer of each top-level module or subpackage; a module may import its own layer or below.
LAYERS = {
    "errors": 0, "checks": 0, "random_draws": 0, "precond": 0, "sampling": 0, "losses": 0,
    "gaussian_mixture": 0,
    "runtime": 1, "models": 1, "latent": 1, "data": 1, "metrics": 1,
    "training": 2,
    "evaluation": 3,
    "main": 4, "evaluate": 4, "prepare_latents": 4, "export_lora": 4, "attack": 4, "cli": 4,
}
MATH = {"errors", "checks", "random_draws", "precond", "sampling", "losses", "gaussian_mixture"}


def module_names(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file under the package."""
  root = package.parent
  return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
          for p in package.rglob("*.py")}


def import_edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Module -> the package modules it imports (a `from pkg import name` counts as
  pkg.name when that is a module, else as pkg)."""
  edges = {m: set() for m in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        targets = [s for s in subs if s in modules] or [node.module]
      edges[name].update(t for t in targets if t in modules and t != name)
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(edges[u]):
      if state.get(v) == "open":
        return stack[stack.index(v):] + [v]
      if v not in state:
        found = visit(v)
        if found:
          return found
    stack.pop()
    state[u] = "done"
    return None

  for m in sorted(edges):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def layer_of(module: str) -> tuple[str, int]:
  top = module.split(".")[1] if module.count(".") else ""
  return top, LAYERS.get(top, -1)


EDGES = import_edges(module_names())


def test_cycle_finder_finds_a_planted_cycle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert find_cycle(edges) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
  assert find_cycle(EDGES) is None


def test_every_module_has_a_layer():
  unplaced = sorted(m for m in EDGES if m != "ambient_jax" and layer_of(m)[1] < 0)
  assert not unplaced, f"add these to LAYERS (and README's architecture section): {unplaced}"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_no_module_imports_an_entry_point(entry):
  importers = sorted(m for m, deps in EDGES.items() if entry in deps and m not in ENTRY_POINTS)
  assert not importers, f"{importers} import the entry point {entry}"


def test_imports_point_down_the_layers():
  upward = []
  for module, deps in EDGES.items():
    top, layer = layer_of(module)
    for dep in deps:
      dep_top, dep_layer = layer_of(dep)
      if dep_layer > layer and dep_top != top:
        upward.append(f"{module} -> {dep}")
  assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_the_math_imports_no_framework_or_io():
  """losses / sampling / precond: jax and numpy only (DESIGN.md: `import ambient_jax.losses`
  pulls in neither TensorFlow nor Orbax nor Flax)."""
  banned = ("tensorflow", "orbax", "flax", "clu", "tensorflow_datasets", "etils")
  for name in MATH:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    for node in ast.walk(tree):
      mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
              [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
      bad = [m for m in mods if m.split(".")[0] in banned]
      assert not bad, f"ambient_jax/{name}.py imports {bad}"
