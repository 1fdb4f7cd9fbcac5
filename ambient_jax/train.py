"""`train_and_evaluate(config, workdir)`: ambient (+ consistency) training, sharded and resumable.

One `jax.jit`-compiled step over the mesh, state donated, batch sharded on ("data",
"fsdp"); the compiler averages gradients. Per step, with key = fold_in(key(seed), step):
  x_n  = x0 + σ_n z[index]                                   (fixed corruption, data/)
  loss = mean_B ambient_loss(D, x_n, σ_n) + λ_c(step) · mean_k consistency_loss(D, x_n[::s], σ_n[::s])
where λ_c(step) = consistency.weight once step >= consistency.start_step, and every s-th
example (s = 1/batch_fraction) gets the consistency term. The kick-in is a static
argument of the jitted step: it is traced once per phase (at most twice a run), and
before it the consistency term costs nothing. (A lax.cond on the step would trace once,
but XLA:CPU runs a conditional's branch ~6x slower than the same ops outside one.) loss.kind="naive" passes σ_n = 0 (plain
EDM on the noisy images: the baseline). Then Adam (warm-up, clipping) and the EMAs.

The loop: restore the newest complete checkpoint of WORKDIR (or initialise), then for
each step fetch the previous step's metrics (one step behind, so dispatch stays
asynchronous), stop on a non-finite loss naming the step and the last good checkpoint,
log / sample / checkpoint on schedule, and on SIGTERM save and raise `cli.Stopped` (the
entry point exits with status 143). A workdir that is already finished is left untouched.
"""

from __future__ import annotations

import collections
import os
import time

from absl import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from ambient_jax import checkpoint as checkpoint_lib
from ambient_jax import cli
from ambient_jax import config_validation, ema, losses
from ambient_jax import sharding as sharding_lib
from ambient_jax import storage
from ambient_jax import train_state as ts
from ambient_jax.data import corruption
from ambient_jax import data as data_lib

_STEP_SALT = 0x57E9


def below_sigma_n_term(config) -> tuple[Any, dict]:
  """(the loss below σ_n that config.consistency.loss names, its kwargs): kwargs left
  None mean that loss's own default (e.g. `step`: "posterior" for consistency,
  "posterior_cov" for posterior_sample). Configs written before `loss` existed mean
  consistency."""
  kwargs = {k: v for k, v in config.consistency.kwargs.to_dict().items() if v is not None}
  return losses.BELOW_SIGMA_N_LOSSES[config.consistency.get("loss", "consistency")], kwargs


def make_train_step(config: Any, model_def: ts.ModelDef, tx: optax.GradientTransformation,
                    param_shardings: Any = None):
  """The pure step (state, batch) -> (state, metrics); jit it with `jit_train_step`.

  `param_shardings` (the state's `.params` shardings): when they are FSDP-sharded, every
  parameter is all-gathered right before the network uses it and its gradient
  reduce-scattered back (`sharding.gather_for_use`), so the step moves parameters and
  gradients instead of resharding activations inside every layer.
  """
  batch_size = int(config.batch_size)
  naive = config.loss.kind == "naive"
  ambient_kwargs = config.loss.ambient.to_dict()
  cons_weight = float(config.consistency.weight)
  below_loss, cons_kwargs = below_sigma_n_term(config)
  stride = (int(round(1.0 / config.consistency.batch_fraction))
            if cons_weight > 0 else 0)
  halflives = tuple(float(h) for h in config.ema.halflife_kimg)
  rampup = float(config.ema.rampup_ratio)
  schedule = ts.learning_rate_schedule(config.optim)
  seed, corruption_seed = int(config.seed), int(config.data.corruption_seed)
  use_labels = model_def.label_dim > 0
  gather_params = sharding_lib.gather_for_use(param_shardings)

  def train_step(state: ts.TrainState, batch: dict, consistency: bool = False, frozen: Any = None
                 ) -> tuple[ts.TrainState, dict]:
    """consistency (static): whether λ_c is on, i.e. step >= consistency.start_step.
    frozen: unused here (latent tasks pass their frozen base weights)."""
    del frozen
    train_step.num_traces += 1  # runs only while jax traces: counts (re)compilations
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STEP_SALT), state.step)
    k_ambient, k_cons, k_dropout = jax.random.split(key, 3)
    x0 = corruption.uint8_to_float(batch["image"])
    sigma_n = batch["sigma_n"]
    x_n = corruption.corrupt(x0, batch["index"], sigma_n, corruption_seed)
    sigma_loss = jnp.zeros_like(sigma_n) if naive else sigma_n
    labels = batch["label"] if use_labels else None

    def loss_fn(params):
      params = gather_params(params)
      denoise = model_def.denoiser(params, train=True, key=k_dropout, labels=labels)
      per_example, aux = losses.ambient_loss(denoise, x_n, sigma_loss, k_ambient, **ambient_kwargs)
      ambient_loss = jnp.mean(per_example)
      metrics = {"ambient_loss": ambient_loss, "sigma_mean": jnp.mean(aux["sigma"])}
      total = ambient_loss
      if cons_weight > 0 and consistency:
        sub_labels = None if labels is None else labels[::stride]
        d = model_def.denoiser(params, train=True, key=jax.random.fold_in(k_dropout, 1 << 20),
                               labels=sub_labels)
        loss_c, _ = below_loss(d, x_n[::stride], sigma_loss[::stride], k_cons, **cons_kwargs)
        cons = jnp.mean(loss_c)
        total = total + cons_weight * cons
      else:
        cons = jnp.zeros((), jnp.float32)
      metrics["consistency_loss"] = cons
      metrics["consistency_weight"] = jnp.asarray(cons_weight if consistency else 0.0)
      metrics["loss"] = total
      return total, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads, metrics, tx, batch_size, halflives, rampup, schedule)

  train_step.num_traces = 0
  return train_step


def apply_gradients(state: ts.TrainState, grads: Any, metrics: dict,
                    tx: optax.GradientTransformation, batch_size: int, halflives: tuple,
                    rampup: float, schedule) -> tuple[ts.TrainState, dict]:
  """The end of every task's step: optimizer update, EMAs, step + 1, gradient-norm and lr."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  emas = ema.update(state.ema, params, state.step, batch_size, halflives, rampup)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = schedule(state.step)
  return ts.TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=emas), metrics


def jit_train_step(step_fn, mesh: jax.sharding.Mesh, state_shardings: Any,
                   frozen_shardings: Any = None):
  """jax.jit over the mesh: state donated and kept in place, batch split, metrics replicated.

  Call as `train_step(state, batch, consistency_active(config, step))` (the flag is static),
  plus the frozen weights as a fourth argument when `frozen_shardings` is given (latent
  fine-tuning: passed, never donated, never checkpointed).
  """
  batch_sh = sharding_lib.batch_sharding(mesh)
  in_shardings = (state_shardings, batch_sh) + (() if frozen_shardings is None
                                                 else (frozen_shardings,))
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,), static_argnums=(2,))


def consistency_active(config: Any, step: int) -> bool:
  """Whether training step `step` (0-based) includes the consistency term."""
  return config.consistency.weight > 0 and step >= config.consistency.start_step


def objective(config: Any, steps_done: int, sigma_n_max: float) -> str:
  """What a model trained for `steps_done` steps was trained with, for picture titles:
  "clean" (no noisy example), "naive", "ambient" or "ambient + consistency"."""
  if sigma_n_max == 0:
    return "clean"
  if config.loss.kind == "naive":
    return "naive"
  if steps_done > 0 and consistency_active(config, steps_done - 1):
    return "ambient + consistency"
  return "ambient"


class CheckpointMismatchError(cli.UserError, RuntimeError):
  """The workdir's checkpoint does not fit the config (a changed model, optimizer or EMAs)."""

  def __init__(self, path: str, cause: Exception, changes: Sequence[str]):
    reason = str(cause).split(". ")[0].strip().rstrip(".")  # Orbax's first sentence
    changed = f"changed since the run began: {'; '.join(changes)}. " if changes else ""
    super().__init__(f"checkpoint {path} does not fit this config ({reason}). {changed}"
                     "Use a new --workdir for a new experiment, or the run's own config.json "
                     "settings to resume it.")


class NonFiniteLossError(cli.Exit, FloatingPointError):
  """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class PixelTask:
  """Pixel-space training from scratch on a tfds dataset corrupted in the step (the EDM
  networks). A task gives the Trainer its data, its step-0 state, its step and its grids;
  `ambient_jax.latent.training.LatentTask` is the other one."""

  frozen = None  # no frozen weights: everything in the state trains

  def __init__(self, config: Any, mesh: jax.sharding.Mesh):
    barrier = None
    if jax.process_count() > 1:
      barrier = lambda: multihost_utils.sync_global_devices("ambient_jax:dataset_prepared")
    self.config, self.mesh = config, mesh
    self.dataset = data_lib.load_dataset(config.data, barrier=barrier)
    self.loader = data_lib.GlobalBatchLoader(self.dataset.source, self.dataset.sigma_n,
                                             config.batch_size, config.seed,
                                             sharding_lib.batch_sharding(mesh))
    self.model_def = ts.make_model_def(config, self.dataset.image_shape)
    self.sigma_n_max = float(np.max(self.dataset.sigma_n, initial=0.0))
    self._grid = None

  def init(self, tx: optax.GradientTransformation):
    """(init function, its arguments): jit(init)(*args) is the step-0 state."""
    return ts.init_fn(self.config, tx), ()

  def make_step(self, tx: optax.GradientTransformation, state_shardings: Any):
    return make_train_step(self.config, self.model_def, tx, state_shardings.params)

  def write_grid(self, done: int, params: Any, writer: Any, objective_name: str,
                 params_sharding: Any, workdir: str) -> None:
    from ambient_jax import sample_grid  # pylint: disable=g-import-not-at-top
    if self._grid is None:
      self._grid = sample_grid.SampleGrid(self.config, self.mesh, self.model_def, self.dataset,
                                          params_sharding, workdir)
    self._grid.write(done, params, writer, objective_name)


def _absolute_latent_paths(config: Any) -> None:
  """config.latent's folders made absolute in place, so that config.json (read by
  evaluate and export_lora) works from any directory."""
  latent = config.get("latent")
  if latent is not None and latent.pretrained:
    for field in ("pretrained", "dataset"):
      if latent[field] and "://" not in latent[field]:
        latent[field] = os.path.abspath(latent[field])


def make_task(config: Any, mesh: jax.sharding.Mesh):
  """LatentTask when config.latent.pretrained is set, else PixelTask."""
  if config.get("latent") is not None and config.latent.pretrained:
    from ambient_jax.latent import training  # pylint: disable=g-import-not-at-top
    return training.LatentTask(config, mesh)
  return PixelTask(config, mesh)


class Trainer:
  """Everything one run needs, built once; `run()` trains to config.num_train_steps."""

  def __init__(self, config: Any, workdir: str,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(jax.devices() if devices is None else devices)
    config_validation.validate(config, num_devices=len(devices))
    _absolute_latent_paths(config)
    self.root = storage.make_workdir(workdir)  # epath.Path: local or gs://
    self.config, self.workdir = config, str(self.root)
    self.is_main = jax.process_index() == 0
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    self.task = make_task(config, self.mesh)
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
    from ambient_jax import metrics_io  # pylint: disable=g-import-not-at-top
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
    and raises `cli.Stopped` naming it.
    """
    from ambient_jax import metrics_io  # pylint: disable=g-import-not-at-top
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
    t_log, step_log = time.time(), start
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
            eta = (total - done) / max(rate, 1e-9)
            scalars = {k: v / count for k, v in sums.items()}
            scalars["steps_per_sec"] = rate
            writer.write_scalars(done, scalars)
            logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", done, total,
                         scalars["loss"], rate, _format_seconds(eta))
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
        if stopped_at is None and (start < total or self._grid_due(total)):
          self._write_grid(total, state, writer)
      finally:
        self.checkpointer.wait()
        writer.close()
    if stopped_at is not None:
      raise cli.Stopped(f"stopped at step {stopped_at}/{total} by SIGTERM; checkpoint "
                        f"{self.checkpointer.path(stopped_at)} saved; the same command resumes "
                        "from it.")
    if self.step_fn.num_traces > 2:
      logging.warning("The train step was traced %d times (expected once per consistency phase).",
                      self.step_fn.num_traces)
    return state

  def _grid_due(self, total: int) -> bool:
    """Whether the run's final sample grid is asked for and not written yet."""
    return (self.config.sample.every_steps >= 0
            and not (self.root / "samples" / f"step_{total:07d}.png").exists())

  def _write_grid(self, done: int, state: ts.TrainState, writer: Any) -> None:
    k = int(self.config.ema.sample_with)
    self.task.write_grid(done, state.ema[k], writer,
                         objective(self.config, done, self.task.sigma_n_max),
                         self.state_shardings.ema[k], self.workdir)

  def close(self) -> None:
    self.checkpointer.close()


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def train_and_evaluate(config: Any, workdir: str) -> ts.TrainState:
  """Trains `config` in `workdir` (resuming whatever is there); returns the final state."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
