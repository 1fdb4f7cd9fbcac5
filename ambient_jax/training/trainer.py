"""`train_and_evaluate(config, workdir)`: the generic training loop, sharded and resumable.

It knows nothing of pixels or latents: a task (`training.tasks` picks it from the config)
gives it the data, the step-0 state, the pure step and the sample grids. The Trainer jits
the step once per consistency phase over the mesh (state donated, batch sharded on
("data", "fsdp"); the compiler averages gradients) and runs the loop: restore the newest
complete checkpoint of WORKDIR (or initialise), then for each step fetch the previous
step's metrics (one step behind, so dispatch stays asynchronous), stop on a non-finite
loss naming the step and the last good checkpoint, log / sample / checkpoint on schedule,
and on SIGTERM save and raise `errors.Stopped` (the entry point exits with status 143).
A workdir that is already finished is left untouched.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging

from ambient_jax import errors
from ambient_jax.runtime import checkpoint as checkpoint_lib
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.runtime import storage
from ambient_jax.training import config_validation, tasks
from ambient_jax.training import state as ts
from ambient_jax.training.step import consistency_active, jit_train_step, objective


class CheckpointMismatchError(errors.UserError, RuntimeError):
  """The workdir's checkpoint does not fit the config (a changed model, optimizer or EMAs)."""

  def __init__(self, path: str, cause: Exception, changes: Sequence[str]):
    reason = str(cause).split(". ")[0].strip().rstrip(".")  # Orbax's first sentence
    changed = f"changed since the run began: {'; '.join(changes)}. " if changes else ""
    super().__init__(f"checkpoint {path} does not fit this config ({reason}). {changed}"
                     "Use a new --workdir for a new experiment, or the run's own config.json "
                     "settings to resume it.")


class NonFiniteLossError(errors.Exit, FloatingPointError):
  """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class Trainer:
  """Everything one run needs, built once; `run()` trains to config.num_train_steps."""

  def __init__(self, config: Any, workdir: str,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(jax.devices() if devices is None else devices)
    config_validation.validate(config, num_devices=len(devices))
    self.root = storage.make_workdir(workdir)  # epath.Path: local or gs://
    self.config, self.workdir = config, str(self.root)
    self.is_main = jax.process_index() == 0
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    self.task = tasks.make_task(config, self.mesh)
    self.loader = self.task.loader
    self.tx = ts.make_optimizer(config.optim)
    init, init_args = self.task.init(self.tx)
    self._init = lambda: jax.jit(init, out_shardings=self.state_shardings)(*init_args)
    self.abstract_state, self.state_shardings = ts.abstract_train_state(
        config, self.mesh, self.tx, init, init_args)
    self.step_fn = self.task.make_step(self.tx, self.state_shardings)
    frozen = self.task.frozen
    jitted = jit_train_step(self.step_fn, self.mesh, self.state_shardings,
                            None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen))
    self.train_step = jitted if frozen is None else (
        lambda state, batch, consistency: jitted(state, batch, consistency, frozen))
    self.last_grid: Optional[str] = None  # path of the newest sample grid this run wrote
    self.steps_done = 0  # training steps this process has run in this run() call
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.root / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
        keep_every_steps=config.checkpoint.keep_every_steps,
        async_save=config.checkpoint.async_save)

  @property
  def model_def(self):  # pixel runs: the network as pure functions
    return self.task.model_def

  @property
  def dataset(self):
    return self.task.dataset

  def initial_state(self, announce: bool = True) -> ts.TrainState:
    """The newest complete checkpoint of the workdir, laid out on this mesh, or step 0.
    announce: log where it comes from."""
    from ambient_jax.runtime import metrics_io  # pylint: disable=g-import-not-at-top
    step = self.checkpointer.latest_step()
    if step is None:
      logging.info("No checkpoint in %s: starting from step 0.", self.checkpointer.directory)
      return self._init()
    try:
      state, meta = self.checkpointer.restore(self.abstract_state, step)
    except Exception as e:
      raise CheckpointMismatchError(self.checkpointer.path(step), e,
                                    metrics_io.config_changes(self.workdir, self.config)) from e
    if announce:
      logging.info("Resumed from %s (step %d, saved on %s devices).", self.checkpointer.path(step),
                   step, meta.get("num_devices", "?"))
    return state

  def save(self, step: int, state: ts.TrainState) -> None:
    self.checkpointer.save(step, state, meta=dict(
        num_devices=jax.device_count(), images_seen=step * int(self.config.batch_size),
        dataset=self.dataset_name))

  @property
  def dataset_name(self) -> str:
    return getattr(self.task, "name", self.config.data.name)

  def run(self, state: Optional[ts.TrainState] = None) -> ts.TrainState:
    """Trains from `state` (default: the workdir's newest checkpoint) to num_train_steps.

    A finished workdir is left as it is (one log line). After SIGTERM it saves a checkpoint
    and raises `errors.Stopped` naming it.
    """
    from ambient_jax.runtime import metrics_io  # pylint: disable=g-import-not-at-top
    config = self.config
    total = int(config.num_train_steps)
    latest = self.checkpointer.latest_step()
    finished = state is None and latest is not None and latest >= total and not self._grid_due(total)
    state = self.initial_state(announce=not finished) if state is None else state
    start = int(jax.device_get(state.step))
    if finished:
      logging.info("%s already finished at step %d (config.num_train_steps = %d); nothing to do.",
                   self.workdir, start, total)
      return state
    if self.is_main:
      metrics_io.write_config_json(self.workdir, config)
    writer = metrics_io.MetricsWriter(self.workdir, start_step=start, is_main=self.is_main)
    if start == 0:
      writer.write_hparams(config.to_dict())
    last_good = self.checkpointer.latest_step()
    sums: dict[str, float] = collections.defaultdict(float)
    count = 0
    pending = None
    t_start = t_log = time.time()
    step_log = start
    switch = consistency_start(config)
    rates: dict[bool, float] = {}  # steps/s measured in each phase (False: ambient only)
    last_loss = float("nan")
    stopped_at = None

    def consume(item):
      nonlocal count
      done, metrics = item
      values = jax.device_get(metrics)
      if not np.isfinite(values["loss"]):
        self.checkpointer.wait()
        where = (f"{self.checkpointer.path(last_good)} (step {last_good})" if last_good is not None
                 else "none (no checkpoint was written yet)")
        writer.write_scalars(done, {k: v for k, v in values.items()})
        raise NonFiniteLossError(
            f"Non-finite loss ({values['loss']}) at step {done}; stopping. Last good checkpoint: "
            f"{where}. Metrics of that step: { {k: float(v) for k, v in values.items()} }. "
            "Lower --config.optim.lr or raise --config.optim.warmup_steps and resume from it.")
      for k, v in values.items():
        sums[k] += float(v)
      count += 1

    logging.info("Training %s from step %d to %d on %d devices (mesh %s), global batch %d; "
                 "config in %s.", self.dataset_name, start, total, self.mesh.size,
                 dict(self.mesh.shape), config.batch_size, self.root / "config.json")
    # SIGTERM: stop after the current step and save; ignored once the last step is done (the
    # run is complete once its final grid and checkpoint are written).
    with checkpoint_lib.SigtermFlag() as sigterm:
      try:
        for step, batch in self.loader.iterate(start, total):
          state, metrics = self.train_step(state, batch, consistency_active(config, step))
          done = step + 1
          self.steps_done += 1
          if pending is not None:
            consume(pending)
          pending = (done, metrics)
          is_last = done == total
          stop = sigterm.triggered or self.checkpointer.reached_preemption(done)
          if done % config.log_every_steps == 0 or is_last or stop:
            consume(pending)
            pending = None
            now = time.time()
            rate = (done - step_log) / max(now - t_log, 1e-9)
            if (step_log >= switch) == (done - 1 >= switch):  # a window inside one phase
              rates[step_log >= switch] = rate  # (its first window includes the compile)
            eta, estimated = eta_seconds(done, total, switch, rates)
            scalars = {k: v / count for k, v in sums.items()}
            scalars["steps_per_sec"] = rate
            last_loss = scalars["loss"]
            writer.write_scalars(done, scalars)
            logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s%s", done, total,
                         scalars["loss"], rate, _format_seconds(eta),
                         " (the consistency phase's speed estimated)" if estimated else "")
            sums.clear()
            count, t_log, step_log = 0, now, done
          if config.sample.every_steps > 0 and done % config.sample.every_steps == 0 and not is_last:
            self._write_grid(done, state, writer)
          if done % config.checkpoint.every_steps == 0 or is_last or stop:
            if pending is not None:
              consume(pending)
              pending = None
            self.save(done, state)
            last_good = done
          if stop:
            stopped_at = done
            break
        if stopped_at is None and self._grid_due(total, trained=start < total):
          self._write_grid(total, state, writer)
      finally:
        self.checkpointer.wait()
        writer.close()
    if stopped_at is not None:
      raise errors.Stopped(f"stopped at step {stopped_at}/{total} by SIGTERM; checkpoint "
                        f"{self.checkpointer.path(stopped_at)} saved; the same command resumes "
                        "from it.")
    if self.is_main:
      grid = self.last_grid or "none written"
      logging.info("Finished %s: step %d/%d in %s (this run), final loss %.4f; last checkpoint "
                   "%s; last sample grid %s.", self.workdir, total, total,
                   _format_seconds(time.time() - t_start), last_loss,
                   self.checkpointer.path(total), grid)
    if self.step_fn.num_traces > 2:
      logging.warning("The train step was traced %d times (expected once per consistency phase).",
                      self.step_fn.num_traces)
    return state

  def _grid_due(self, total: int, trained: bool = False) -> bool:
    """Whether the run's final sample grid is to be written: asked for (sample.every_steps
    -1 asks for none: tests, benchmarks), and this run trained or it is not written yet."""
    return self.config.sample.every_steps >= 0 and (
        trained or not (self.root / "samples" / f"step_{total:07d}.png").exists())

  def _write_grid(self, done: int, state: ts.TrainState, writer: Any) -> None:
    k = int(self.config.ema.sample_with)
    self.last_grid = self.task.write_grid(done, state.ema[k], writer,
                                          objective(self.config, done, self.task.sigma_n_max),
                                          self.state_shardings.ema[k], self.workdir)

  def close(self) -> None:
    """Waits for pending checkpoint writes and releases Orbax (idempotent)."""
    self.checkpointer.close()


# Until the consistency phase has run, its steps are assumed this much slower than the
# ambient phase's: measured on configs/default.py (4.69 vs 2.95 steps/s on 2 CPU cores).
CONSISTENCY_SLOWDOWN_GUESS = 1.6


def consistency_start(config: Any) -> int:
  """The first step of the consistency phase (num_train_steps when there is none)."""
  if config.consistency.weight > 0:
    return min(int(config.consistency.start_step), int(config.num_train_steps))
  return int(config.num_train_steps)


def eta_seconds(done: int, total: int, switch: int, rates: dict[bool, float],
                slowdown: float = CONSISTENCY_SLOWDOWN_GUESS) -> tuple[float, bool]:
  """(seconds left, whether a phase's speed was guessed) for steps done..total, the steps
  from `switch` on running at the consistency phase's speed.

  rates: steps/s measured so far, {False: ambient phase, True: consistency phase}; a phase
  not measured yet runs at the other's speed changed by `slowdown`.
  """
  ambient_left = max(0, min(total, switch) - done)
  consistency_left = max(0, total - max(done, switch))
  ambient, consistency = rates.get(False), rates.get(True)
  guessed = False
  if consistency is None and consistency_left and ambient:
    consistency, guessed = ambient / slowdown, True
  if ambient is None and ambient_left and consistency:
    ambient, guessed = consistency * slowdown, True
  seconds = (ambient_left / max(ambient or 0.0, 1e-9) if ambient_left else 0.0) + (
      consistency_left / max(consistency or 0.0, 1e-9) if consistency_left else 0.0)
  return seconds, guessed


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def train_and_evaluate(config: Any, workdir: str,
                       devices: Optional[Sequence[jax.Device]] = None) -> ts.TrainState:
  """Trains `config` in `workdir` (resuming whatever is there) on `devices` (default: all);
  returns the final state.

  A run that fails before its first step (a dataset not prepared, a compile error) removes
  the workdir when this call created it, so a failed start leaves nothing behind; a
  workdir that existed before is never removed.
  """
  created = not storage.resolve(workdir).exists()
  trainer = None
  try:
    trainer = Trainer(config, workdir, devices)
    return trainer.run()
  except BaseException:
    if trainer is not None:
      trainer.close()  # before the workdir may go: Orbax's writes finish first
    if created and (trainer is None or trainer.steps_done == 0) and jax.process_index() == 0:
      storage.remove_tree(workdir)  # silently: the error itself is the run's one line
    raise
  finally:
    if trainer is not None:
      trainer.close()
