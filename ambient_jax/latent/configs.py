"""Component configs: hashable frozen copies for modules, and the bundled public configs.

A module keeps its `config.json` so that it can be saved back; NNX puts such attributes
in the (hashed) GraphDef, so they are stored frozen: dicts as `FrozenDict`, lists as
tuples. `bundled_config("sdxl", "unet")` reads the public SDXL / SD-1.5 configurations that
ship in `model_configs/` (configuration only, no weights: for shape checks, parameter
counts and memory planning).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict

MODEL_CONFIGS = os.path.join(os.path.dirname(__file__), "model_configs")


def freeze(value: Any) -> Any:
  """dicts -> FrozenDict, lists/tuples -> tuples, recursively (hashable, for a GraphDef)."""
  if isinstance(value, Mapping):
    return FrozenDict({k: freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def thaw(value: Any) -> Any:
  """The inverse of `freeze`, JSON-ready: FrozenDict -> dict, tuples -> lists."""
  if isinstance(value, Mapping):
    return {k: thaw(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [thaw(v) for v in value]
  return value


def bundled_config(family: str, component: str) -> dict[str, Any]:
  """The public config.json of `component` ("unet", "vae", "text_encoder", ...) of `family`
  ("sdxl", "sd15") that ships with ambient_jax."""
  path = os.path.join(MODEL_CONFIGS, family, f"{component}.json")
  if not os.path.isfile(path):
    have = sorted(f"{f}/{c[:-5]}" for f in os.listdir(MODEL_CONFIGS)
                  for c in os.listdir(os.path.join(MODEL_CONFIGS, f)) if c.endswith(".json"))
    raise ValueError(f"no bundled config {family}/{component}; bundled: {have}.")
  with open(path) as f:
    return json.load(f)
