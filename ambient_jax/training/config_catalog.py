"""The config files in configs/ and their variants, one line each.

`python -m ambient_jax.main --list_configs` (and the end of `--help`) prints `describe()`.
A config's line is the first line of its docstring; its variants are its module-level
`VARIANTS` dict ({example variant: what it does}), which configs sharing a set (the paper
configs) list once. Every field is documented in configs/default.py.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import types
from typing import Optional

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load_module(path: pathlib.Path, name: Optional[str] = None) -> types.ModuleType:
  """Executes a config file as a module of its own (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name or f"ambient_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _display(path: pathlib.Path) -> str:
  """The path as a user types it: relative to the working directory when it is inside it."""
  try:
    return str(path.relative_to(pathlib.Path.cwd().resolve()))
  except ValueError:
    return str(path)


def _paths() -> list[pathlib.Path]:
  """Config files under configs/: default.py first, then by path; `_name.py` are helpers."""
  if not CONFIGS_DIR.is_dir():
    return []
  paths = [p for p in CONFIGS_DIR.rglob("*.py")
           if not p.name.startswith("_") and "__pycache__" not in p.parts]
  return sorted(paths, key=lambda p: (p.name != "default.py" or p.parent != CONFIGS_DIR,
                                      p.relative_to(CONFIGS_DIR).parts))


def config_files() -> list[str]:
  """Every config file, as the user would pass it to --config."""
  return [_display(p) for p in _paths()]


def _summary(path: pathlib.Path) -> str:
  """The first line of the file's docstring (read without running it)."""
  try:
    doc = ast.get_docstring(ast.parse(path.read_text()))
  except (SyntaxError, OSError, ValueError) as e:
    return f"(cannot be read: {type(e).__name__})"
  return doc.strip().splitlines()[0] if doc else ""


def _variants(path: pathlib.Path) -> dict:
  """The file's VARIANTS dict; only files that mention VARIANTS are executed."""
  if "VARIANTS" not in path.read_text():
    return {}
  try:
    return dict(getattr(load_module(path), "VARIANTS", {}))
  except Exception as e:  # pylint: disable=broad-except
    return {"?": f"(the file does not load: {type(e).__name__}: {e})"}


def describe() -> str:
  """Every config with its one-line summary, then each set of variants once."""
  paths = _paths()
  if not paths:
    return f"No configs found (expected them in {CONFIGS_DIR})."
  names = [_display(p) for p in paths]
  width = max(len(n) for n in names) + 2
  lines = ["Configs (--config=PATH[:VARIANT]; every field is documented in configs/default.py; "
           "override any with --config.FIELD=VALUE):"]
  lines += [f"  {n:<{width}}{_summary(p)}" for n, p in zip(names, paths)]
  groups: list[tuple[dict, list[str]]] = []
  for path in paths:
    variants = _variants(path)
    if not variants:
      continue
    for known, members in groups:
      if known == variants:
        members.append(path.stem)
        break
    else:
      groups.append((variants, [path.stem]))
  for variants, members in groups:
    lines.append(f"Variants of {', '.join(members)} (several joined by commas: PATH:A,B):")
    w = max(len(v) for v in variants) + 3
    lines += [f"  :{v:<{w}}{what}" for v, what in variants.items()]
  return "\n".join(lines)
