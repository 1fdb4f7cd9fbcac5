"""Workdir paths that are local directories or cloud buckets (gs://, s3://) alike.

Every file a run or an evaluation writes outside Orbax (config.json, metrics.jsonl,
sample grids, eval outputs) goes through these helpers, which use `etils.epath`: local
paths go to the OS, `gs://` paths to TensorFlow's GCS filesystem (tensorflow-cpu is
already a dependency of CLU's TensorBoard writer). Orbax takes the same `epath.Path`s.
A TPU pod slice therefore needs only `--workdir=gs://bucket/run` and the `gcs` extra
(Orbax's checkpoints in a bucket use the google-cloud-storage client).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import uuid
from typing import Any, IO, Union

from etils import epath

from ambient_jax import errors

PathLike = Union[str, epath.Path]


class WorkdirError(errors.UserError):
  """The workdir is a file, or cannot be created or written."""


def is_remote(p: PathLike) -> bool:
  """True for bucket URIs (gs://, s3://, ...), False for local paths."""
  return "://" in str(p)


def resolve(p: PathLike) -> epath.Path:
  """A workdir as an epath.Path: local paths made absolute, bucket URIs kept as they are."""
  return epath.Path(p) if is_remote(p) else epath.Path(p).expanduser().resolve()


def make_workdir(workdir: PathLike) -> epath.Path:
  """The run directory, created if needed (with its parents); a WorkdirError naming it when
  it is an existing file or cannot be created or written."""
  root = resolve(workdir)
  if root.exists() and not root.is_dir():
    raise WorkdirError(f"workdir {workdir} is an existing file, not a directory: give a new "
                       "directory, or the directory of a run to resume.")
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} cannot be created: {e.strerror or e}.") from e
  if not is_remote(root) and not os.access(root, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir} is not writable by this user.")
  return root


def remove_tree(p: PathLike) -> None:
  """Deletes a directory and everything in it (local or gs://); nothing if it is absent."""
  root = resolve(p)
  if root.exists():
    root.rmtree()


def _has_gcs_client() -> bool:
  try:
    return importlib.util.find_spec("google.cloud.storage") is not None
  except ModuleNotFoundError:  # no google.cloud namespace at all
    return False


def check_checkpoint_backend(p: PathLike) -> None:
  """Orbax needs the google-cloud-storage client for gs:// checkpoint directories (it asks
  the bucket for its namespace layout); say how to get it instead of failing deep inside."""
  if str(p).startswith("gs://") and not _has_gcs_client():
    raise ImportError(f"Checkpoints in {p} need the google-cloud-storage client, which Orbax "
                      "uses for gs:// paths: pip install -e '.[gcs]' (launch/tpu_worker.sh "
                      "installs it on TPU VMs).")


class AppendFile:
  """A text file kept open for appending (local or bucket) until `close()`.

  epath's TensorFlow backend (used for gs:// whenever TF is installed) returns a context
  manager from `open`, not a file, so the file is entered on an ExitStack. On GCS every
  `flush()` re-uploads the object: flush at logging frequency, not per line.
  """

  def __init__(self, path: PathLike):
    self._stack = contextlib.ExitStack()
    self._file: IO[str] = self._stack.enter_context(epath.Path(path).open("a"))

  def write(self, text: str) -> None:
    self._file.write(text)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._stack.close()


def write_atomic(path: PathLike, data: Union[str, bytes]) -> epath.Path:
  """Writes `data` to `path` through a temporary file + rename, so readers (and a run
  killed mid-write) never see half a file. Creates the parent directory. The temporary
  name is unique, so concurrent writers of the same file do not trip over each other."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)
  return path


def save_figure(fig: Any, path: PathLike, **savefig_kwargs) -> epath.Path:
  """A matplotlib figure -> PNG at `path` (local or bucket), written atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", **savefig_kwargs)
  return write_atomic(path, buffer.getvalue())
