"""The tasks the Trainer can run, by name: the one seam between the generic loop and the
kinds of training.

A task is a class built as `Task(config, mesh)` that provides `loader` (batches),
`init(tx)` (the step-0 state's init function and its arguments), `make_step(tx,
state_shardings)` (the pure step), `frozen` (weights passed to the step but never trained,
or None), `sigma_n_max`, `name` and `write_grid(...)` (sample grids). Adding a task is one
module and one line in TASKS; modules are imported by name, so the Trainer imports none.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class"
TASKS = {
    "pixel": "ambient_jax.training.pixel:PixelTask",    # EDM networks from scratch on images
    "latent": "ambient_jax.training.latent:LatentTask",  # LoRA / full fine-tuning of SD / SDXL
}


def task_name(config: Any) -> str:
  """The task a config trains: "latent" when config.latent.pretrained names a diffusers
  folder, else "pixel"."""
  latent = config.get("latent")
  return "latent" if latent is not None and latent.get("pretrained") else "pixel"


def is_latent(config: Any) -> bool:
  """Whether `config` is a latent fine-tuning run."""
  return task_name(config) == "latent"


def task_class(name: str) -> type:
  """The class registered as `name` in TASKS."""
  module, _, cls = TASKS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def make_task(config: Any, mesh: Any, **kwargs) -> Any:
  """The config's task, built over `mesh`."""
  return task_class(task_name(config))(config, mesh, **kwargs)
