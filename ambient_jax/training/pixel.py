"""Pixel-space training from scratch (the EDM networks): the pixel task and its step.

Per step, with key = step_key(seed, step):
  x_n  = x0 + σ_n z[index]                                   (fixed corruption, data/)
  loss = mean_B ambient_loss(D, x_n, σ_n) + λ_c(step) · mean_k consistency_loss(D, x_n[::s], σ_n[::s])
where λ_c(step) = consistency.weight once step >= consistency.start_step, and every s-th
example (s = 1/batch_fraction) gets the consistency term. The kick-in is a static
argument of the jitted step: it is traced once per phase (at most twice a run), and
before it the consistency term costs nothing. (A lax.cond on the step would trace once,
but XLA:CPU runs a conditional's branch ~6x slower than the same ops outside one.)
loss.kind="naive" passes σ_n = 0 (plain EDM on the noisy images: the baseline). Example p
of the batch draws from fold_in(key', p) (one key per example). With
optim.grad_accum_steps = k the loss is computed on k micro-batches of B/k in turn and
their gradients averaged (`step.accumulate_gradients`; the same gradient, less memory).
The ambient and consistency terms are two loss terms, each differentiated on its own
(`step.sum_of_term_gradients`; in a loop, one at a time, with grad_accum_loop "scan").
Then Adam (warm-up, clipping) and the EMAs (`step.apply_gradients`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from ambient_jax import data as data_lib
from ambient_jax import losses
from ambient_jax.data import corruption
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.training import state as ts
from ambient_jax.training.step import (accumulate_gradients, apply_gradients, batch_shards,
                                      below_sigma_n_term, grad_accum_loop, grad_accum_steps,
                                      micro_batches, micro_example_keys, step_key)


def make_train_step(config: Any, model_def: ts.ModelDef, tx: optax.GradientTransformation,
                    param_shardings: Any = None, num_shards: Optional[int] = None):
  """The pure step (state, batch) -> (state, metrics); jit it with `jit_train_step`.

  `param_shardings` (the state's `.params` shardings): when they are FSDP-sharded, every
  parameter is all-gathered right before the network uses it and its gradient
  reduce-scattered back (`sharding.gather_for_use`), so the step moves parameters and
  gradients instead of resharding activations inside every layer.
  `num_shards`: the devices the batch is split over (default: those of `param_shardings`'
  mesh, else 1); with config.optim.grad_accum_steps = k > 1 it must be the loader's, whose
  batch order (`data.loader.physical_order`) the step undoes (`step.micro_batches`).

  Randomness: example p of the global batch draws σ, noise and its consistency chains from
  fold_in(k_ambient or k_cons, p), the same for every k. Network dropout draws one key per
  micro-batch, fold_in(k_dropout, m): with model.dropout > 0 its masks change with k
  (equal in distribution, not bit for bit).
  """
  batch_size = int(config.batch_size)
  num_micro = grad_accum_steps(config)
  num_shards = batch_shards(param_shardings) if num_shards is None else int(num_shards)
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
    key = step_key(seed, state.step)
    k_ambient, k_cons, k_dropout = jax.random.split(key, 3)

    def prepare(params, micro):
      """The micro-batch's noisy images, levels, labels, dropout key and its denoiser."""
      batch, _, _, index = micro
      k_drop = jax.random.fold_in(k_dropout, index)
      x0 = corruption.uint8_to_float(batch["image"])
      sigma_n = batch["sigma_n"]
      x_n = corruption.corrupt(x0, batch["index"], sigma_n, corruption_seed)
      sigma_loss = jnp.zeros_like(sigma_n) if naive else sigma_n
      labels = batch["label"] if use_labels else None
      return x_n, sigma_loss, labels, k_drop, gather_params(params)

    def ambient_term(params, micro, frozen):
      """The mean ambient loss of one micro-batch (b examples)."""
      del frozen
      x_n, sigma_loss, labels, k_drop, params = prepare(params, micro)
      denoise = model_def.denoiser(params, train=True, key=k_drop, labels=labels)
      ambient_keys = micro[1]  # [b]: one per example (micro = batch, ambient, cons keys, index)
      per_example, aux = losses.ambient_loss(denoise, x_n, sigma_loss, ambient_keys,
                                             **ambient_kwargs)
      ambient_loss = jnp.mean(per_example)
      return ambient_loss, {
          "ambient_loss": ambient_loss, "sigma_mean": jnp.mean(aux["sigma"]),
          "consistency_loss": jnp.zeros((), jnp.float32),
          "consistency_weight": jnp.asarray(cons_weight if consistency else 0.0)}

    def consistency_term(params, micro, frozen):
      """λ_c × the mean consistency loss of the micro-batch's every stride-th example."""
      del frozen
      x_n, sigma_loss, labels, k_drop, params = prepare(params, micro)
      sub_labels = None if labels is None else labels[::stride]
      d = model_def.denoiser(params, train=True, key=jax.random.fold_in(k_drop, 1 << 20),
                             labels=sub_labels)
      cons_keys = micro[2]  # [b]
      loss_c, _ = below_loss(d, x_n[::stride], sigma_loss[::stride], cons_keys[::stride],
                             **cons_kwargs)
      cons = jnp.mean(loss_c)
      return cons_weight * cons, {"consistency_loss": cons}

    terms = (ambient_term,) + ((consistency_term,) if cons_weight > 0 and consistency else ())
    micro = (micro_batches(batch, num_micro, num_shards),
             micro_example_keys(k_ambient, batch_size, num_micro),
             micro_example_keys(k_cons, batch_size, num_micro), jnp.arange(num_micro))
    grads, metrics = accumulate_gradients(terms, state.params, micro, num_micro,
                                          param_shardings, grad_accum_loop(config))
    return apply_gradients(state, grads, metrics, tx, batch_size, halflives, rampup, schedule)

  train_step.num_traces = 0
  return train_step


class PixelTask:
  """Pixel-space training from scratch on a tfds dataset corrupted in the step (the EDM
  networks); registered in `training.tasks` as "pixel"."""

  frozen = None  # no frozen weights: everything in the state trains

  def __init__(self, config: Any, mesh: jax.sharding.Mesh):
    barrier = None
    if jax.process_count() > 1:
      barrier = lambda: multihost_utils.sync_global_devices("ambient_jax:dataset_prepared")
    self.config, self.mesh = config, mesh
    self.dataset = data_lib.load_dataset(config.data, barrier=barrier)
    self.loader = data_lib.GlobalBatchLoader(self.dataset, config.batch_size, config.seed,
                                             sharding_lib.batch_sharding(mesh),
                                             micro_batches=grad_accum_steps(config))
    self.model_def = ts.make_model_def(config, self.dataset.image_shape)
    self.sigma_n_max = float(np.max(self.dataset.sigma_n, initial=0.0))
    self._grid = None

  def init(self, tx: optax.GradientTransformation):
    """(init function, its arguments): jit(init)(*args) is the step-0 state."""
    return ts.init_fn(self.config, tx), ()

  def make_step(self, tx: optax.GradientTransformation, state_shardings: Any):
    return make_train_step(self.config, self.model_def, tx, state_shardings.params,
                           sharding_lib.data_parallel_size(self.mesh))

  def write_grid(self, done: int, params: Any, writer: Any, objective_name: str,
                 params_sharding: Any, workdir: str) -> str:
    """Writes the sample grid of step `done` with `params`; returns the PNG's path."""
    from ambient_jax.training import pixel_grid  # pylint: disable=g-import-not-at-top
    if self._grid is None:
      self._grid = pixel_grid.SampleGrid(self.config, self.mesh, self.model_def, self.dataset,
                                          params_sharding, workdir)
    return self._grid.write(done, params, writer, objective_name)
