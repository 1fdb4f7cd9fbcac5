"""The one module that talks to Orbax.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the whole train state
(step, params, optimizer state, every EMA) as one pytree; `meta` is a small JSON record
(step, images seen, device count, config name). Guarantees:
- Saves are asynchronous (the device-to-host copy happens before `save` returns, so the
  next step may donate the buffers); `wait()` blocks until the last one is on disk.
- Orbax writes into a temporary directory and renames it only when complete, so a
  checkpoint cut short by a crash or kill is never listed, never restored, and is
  cleaned up on the next start.
- Keep the last `max_to_keep`, plus every step divisible by `keep_every_steps`.
- Restore takes an abstract state whose leaves carry the *target* shardings, so a
  checkpoint written on 8 devices restores onto 2 (or onto a TPU slice) unchanged. A
  checkpoint whose array shapes cannot fill it is refused from its metadata, before any
  read (Orbax failing part-way leaves reads pending that warn at exit).
- SIGTERM (preemption) sets a flag the training loop polls; multi-process runs use the
  jax.distributed preemption sync point instead, so all processes stop at the same step.
"""

from __future__ import annotations

from absl import logging
import collections
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from ambient_jax.runtime import storage

STATE, META = "state", "meta"


def _type_handlers() -> Any:
  """Orbax's standard type handlers, except that on CPU a replicated jax.Array is written
  from one replica. Orbax's default splits it over the replicas, slicing each on its
  device: one tiny XLA compile per shape and device (256 in one save of a small UNet on 8
  CPU devices), for no gain where every "device" shares the host's memory. The files are
  the same either way (checkpoints of either kind restore with both)."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  th = ocp.type_handlers
  array = th.ArrayHandler(use_replica_parallel=jax.default_backend() != "cpu",
                          array_metadata_store=array_metadata_store.Store())
  others = [(t, th.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)]
  return th.create_type_handler_registry(*others, (jax.Array, array))


class Checkpointer:
  """Async CheckpointManager over WORKDIR/checkpoints with keep-last-N + keep-every-K."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, keep_every_steps: int = 0,
               async_save: bool = True, read_only: bool = False):
    """read_only=True: for readers (evaluation) of a directory a live run may be writing;
    it neither creates the directory nor removes the run's in-progress temporary ones."""
    self.directory = storage.resolve(directory)  # local or gs://
    storage.check_checkpoint_backend(self.directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                             enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          keep_period=keep_every_steps or None,
          enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True,
          create=True,
      )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, META),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                       META: ocp.JsonCheckpointHandler()})
    self._closed = False

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> Optional[int]:
    """The newest *complete* checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> str:
    return str(self.directory / str(step))

  def save(self, step: int, state: Any, meta: Optional[dict] = None) -> None:
    """Starts writing `state` as checkpoint `step` (returns once device buffers are copied)."""
    meta = dict(meta or {}, step=int(step))
    self._manager.save(int(step), args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step` (default: latest), laid out like `abstract_state`.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set to where each
    leaf should live now (any mesh, any device count).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    self._check_shapes(abstract_state, step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeRestore(abstract_state, restore_args),
           META: ocp.args.JsonRestore()}))
    return restored[STATE], dict(restored[META] or {})

  def _check_shapes(self, abstract_state: Any, step: int) -> None:
    """ValueError, from the checkpoint's metadata alone, when its arrays' shapes are not
    the shapes `abstract_state` asks for (a changed model, optimizer or number of EMAs)."""
    saved = _leaf_shapes(self._manager.item_metadata(step)[STATE])
    wanted = _leaf_shapes(abstract_state)
    if saved.keys() == wanted.keys():  # same leaves: compare each by its path
      changed = [p for p in wanted if saved[p] != wanted[p]]
      if changed:
        more = f"; {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ValueError(f"{len(changed)} of its {len(saved)} arrays have other shapes than "
                         "this config builds (" + "; ".join(
                             f"{p}: checkpoint {saved[p]}, config {wanted[p]}"
                             for p in changed[:3]) + more + ")")
      return
    # Other leaves (or paths spelled otherwise): compare the shapes as multisets.
    have, want = collections.Counter(saved.values()), collections.Counter(wanted.values())
    if have != want:
      only = lambda c: ", ".join(f"{k} x{n}" for k, n in sorted(c.items())[:4]) or "none"
      raise ValueError(
          f"its {sum(have.values())} arrays have other shapes than the {sum(want.values())} "
          f"this config builds (only in the config: {only(want - have)}; only in the "
          f"checkpoint: {only(have - want)})")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and stops Orbax's threads (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()

  def reached_preemption(self, step: int) -> bool:
    """Multi-process: True on every process at the same step once any got SIGTERM."""
    if jax.process_count() == 1:
      return False
    return self._manager.reached_preemption(step)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class SigtermFlag:
  """Context manager: while active, SIGTERM sets `.triggered` instead of killing the process.

  Only installed in single-process runs and on the main thread; multi-process runs rely
  on `Checkpointer.reached_preemption` (jax.distributed owns SIGTERM there). A second
  SIGTERM while the checkpoint is being written is ignored; SIGKILL still kills.
  """

  def __init__(self):
    self.triggered = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    if not self.triggered:
      logging.warning("Received signal %d: will save a checkpoint and exit after this step.",
                      signum)
    self.triggered = True

  def __enter__(self) -> "SigtermFlag":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/backbone/fc0/kernel": shape} of a pytree's array leaves: an abstract state or
  Orbax's metadata of a saved one (dict keys, attribute names and indices spelled alike)."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}
