"""One place restores a run for every evaluator: its config, a mesh for the devices at hand,
a checkpoint (latest or a step) and the weights to judge (an EMA or the raw parameters).

Read-only: a live run may be writing the same workdir.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import jax

from ambient_jax import errors
from ambient_jax.runtime import storage


class RunNotFoundError(errors.UserError, FileNotFoundError):
  """--workdir is not a training run, or lacks the asked-for checkpoint."""


def log_message(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[evaluate] {msg}", flush=True)


def load_config(workdir: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = storage.resolve(workdir) / "config.json"
  if not path.exists():
    raise RunNotFoundError(f"--workdir={workdir} is not a training run: it has no config.json "
                           "(give the --workdir of a python -m ambient_jax.main run).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def eval_mesh(config: Any, devices: Optional[Sequence[jax.Device]] = None):
  """The run's ("data", "fsdp") mesh over `devices` (default all), or, when its shape does
  not fit them (a run trained on a TPU slice evaluated on one GPU), data-parallel over all."""
  from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = sharding_lib.mesh_shape(config.mesh, len(devices))
  if data * fsdp == len(devices):
    return sharding_lib.make_mesh(config.mesh, devices)
  log_message(f"the run's mesh (data={data}, fsdp={fsdp}) does not fit {len(devices)} devices; "
       f"evaluating data-parallel over all {len(devices)}")
  return sharding_lib.make_mesh({"data": -1, "fsdp": 1}, devices)


def restore_state(root, abstract: Any, step: Optional[int] = None) -> tuple[Any, dict]:
  """(state, meta) of the run at `root` (an epath.Path) at `step` (default the newest
  complete checkpoint), laid out as `abstract` (ShapeDtypeStructs with shardings).
  A run without checkpoints, or without that step, is a RunNotFoundError naming them."""
  from ambient_jax.runtime import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  # read_only: a live run may be writing this directory (its temporary checkpoint
  # directories must not be cleaned up by us).
  ckpt = checkpoint_lib.Checkpointer(root / "checkpoints", read_only=True)
  try:
    available = sorted(ckpt.all_steps())
    if not available:
      raise RunNotFoundError(f"--workdir={root} has no complete checkpoint yet "
                             f"(in {ckpt.directory}).")
    if step is not None and step not in available:
      raise RunNotFoundError(f"--step={step}: no checkpoint for that step in {ckpt.directory}; "
                             f"available: {available}.")
    return ckpt.restore(abstract, step)
  finally:
    ckpt.close()


def select_weights(state: Any, shardings: Any, config: Any, ema: int) -> tuple[Any, Any, str]:
  """(params, their shardings, a label) of a restored state: EMA `ema`, or the raw
  (last optimizer step's) parameters when ema < 0."""
  if ema < 0:
    return state.params, shardings.params, "raw"
  if ema >= len(state.ema):
    raise errors.UsageError(f"--ema={ema}: the run keeps {len(state.ema)} EMA(s) "
                         f"(config.ema.halflife_kimg={tuple(config.ema.halflife_kimg)}).")
  return (state.ema[ema], shardings.ema[ema],
          f"ema{ema} (half-life {config.ema.halflife_kimg[ema]} kimg)")
