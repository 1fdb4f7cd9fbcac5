"""What a run leaves in its workdir besides checkpoints: config.json, metrics.jsonl, TensorBoard.

- `DIR/config.json`: the resolved config of the latest start (a changed config on resume
  is logged, field by field).
- `DIR/metrics.jsonl`: one JSON object per logged step, at least {"step", "loss"}. On
  resume, lines past the restored step (logged by a run that died before its next
  checkpoint) are dropped, so the file always describes one consistent run.
- TensorBoard scalars and images through CLU `metric_writers` (process 0 only); an
  evaluation's numbers join them as "eval/..." scalars at the evaluated step.
"""

from __future__ import annotations

import json
from absl import logging
import math
from typing import Any, Mapping

import numpy as np

from ambient_jax.runtime import storage


def _flatten(d: Mapping, prefix: str = "", sep: str = ".") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}{sep}", sep))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_text(config: Any) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_changes(workdir: str, config: Any) -> list[str]:
  """'FIELD: OLD -> NEW' for each field of DIR/config.json (the previous start's) that
  `config` changes or drops (fields new to the schema are not changes); none when there is
  no readable config.json."""
  path = storage.resolve(workdir) / "config.json"
  if not path.exists():
    return []
  try:
    old = _flatten(json.loads(path.read_text()))
  except json.JSONDecodeError:
    return []
  new = _flatten(json.loads(_config_text(config)))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
          for k in sorted(old) if old[k] != new.get(k)]


def write_config_json(workdir: str, config: Any) -> None:
  """Writes DIR/config.json; logs every field that differs from the previous start's."""
  for change in config_changes(workdir, config):
    logging.warning("Config changed since the last start of this workdir: %s", change)
  storage.write_atomic(storage.resolve(workdir) / "config.json", _config_text(config) + "\n")


def _jsonable(v):
  v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep the information readable
  return v


class MetricsWriter:
  """metrics.jsonl + CLU writer (TensorBoard and the log), process 0 writes files."""

  def __init__(self, workdir: str, *, start_step: int, is_main: bool):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.is_main = is_main
    self.path = storage.resolve(workdir) / "metrics.jsonl"
    if is_main and self.path.exists():
      self._truncate(start_step)
    self._file = storage.AppendFile(self.path) if is_main else None
    self.clu = metric_writers.create_default_writer(str(workdir), just_logging=not is_main,
                                                    asynchronous=True)

  def _truncate(self, start_step: int) -> None:
    kept = []
    with self.path.open() as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= start_step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
          pass  # a line cut short by a kill
    storage.write_atomic(self.path, "".join(kept))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: _jsonable(v) for k, v in scalars.items()}
    if self._file is not None:
      self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._file.flush()
    self.clu.write_scalars(int(step), {k: v for k, v in scalars.items()
                                       if isinstance(v, (int, float))})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    self.clu.write_images(int(step), images)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.clu.write_hparams({k: v for k, v in _flatten(hparams).items()
                            if isinstance(v, (int, float, str, bool))})

  def flush(self) -> None:
    self.clu.flush()

  def close(self) -> None:
    if self.clu is not None:
      self.clu.close()
      self.clu = None
    if self._file is not None:
      self._file.close()
      self._file = None


def eval_scalars(result: Mapping[str, Any]) -> dict[str, float]:
  """The finite numbers of an evaluation's result dict, flattened as "eval/a/b" names
  (booleans, strings, paths and non-finite values left out)."""
  flat = _flatten(result, "eval/", sep="/")
  return {k: float(v) for k, v in flat.items()
          if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
          and math.isfinite(float(v))}


def write_eval_scalars(workdir: str, step: int, result: Mapping[str, Any]) -> None:
  """`eval_scalars(result)` into the run's TensorBoard at `step` (beside its training
  curves: TensorBoard reads every events file of the workdir). Process 0 only."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.SummaryWriter(str(storage.resolve(workdir)))
  try:
    writer.write_scalars(int(step), eval_scalars(result))
  finally:
    writer.close()
