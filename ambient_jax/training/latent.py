"""Latent fine-tuning of a pretrained SD / SDXL UNet from noisy latents: the Trainer's task.

The paper's experiment (METHOD.md §4, §10). Per step, on a prepared dataset of noisy
latents x_n = √(1 − σ_n²) z0 + σ_n ε (VP, fixed per example):
  loss.kind="ambient": losses.ambient_loss_vp with the ε-UNet, t uniform over the DDPM
      steps above t_n (latent.timesteps="uniform", the paper's) or the truncated lognormal,
      plain MSE on x̂_n; + λ_c · consistency_loss below σ_n through the VE wrapper D(x, σ).
  loss.kind="naive": losses.ddpm_loss on x_n as if clean (the naive baseline; on a clean
      dataset, t_n = 0, this is ordinary fine-tuning: the clean baseline).
Trainable: LoRA adapters (latent.lora_rank > 0; only they are in the optimizer, EMAs and
checkpoints) or the whole UNet (lora_rank = 0). The frozen base weights are loaded from the
diffusers folder on every start, in latent.param_dtype, FSDP-sharded like the state, and
passed to the step as a non-donated argument. Prompt embeddings come precomputed with
the dataset; latent.cfg_dropout replaces a prompt by the unconditional one.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ambient_jax import errors, losses, precond, random_draws
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.training import state as ts
from ambient_jax.training.step import (accumulate_gradients, apply_gradients, batch_shards,
                                      below_sigma_n_term, grad_accum_loop, grad_accum_steps,
                                      micro_batches, micro_example_keys, step_key)
from ambient_jax.data.loader import GlobalBatchLoader
from ambient_jax.data import latent as dataset_lib
from ambient_jax.latent import guidance, lora, unet, weights
from ambient_jax.latent.schedule import NoiseSchedule, ve_denoiser

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_LORA_SALT, _DROP_SALT = 0x10AA, 0xC0FD
COND_KEYS = ("context", "text_embeds", "time_ids")


class PretrainedError(errors.UserError, ValueError):
  """The pretrained folder is missing or not a model this config can fine-tune."""


PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
INPAINTING_CLASSES = ("StableDiffusionXLInpaintPipeline", "StableDiffusionInpaintPipeline")


def check_pretrained(folder: str, name: str = "config.latent.pretrained",
                     classes: tuple[str, ...] = PIPELINE_CLASSES) -> dict:
  """The folder's model_index.json, after checking it is a diffusers pipeline folder of one
  of `classes` (default: SD / SDXL text-to-image) with a unet/ and a scheduler/ (one clear
  error otherwise, before anything compiles); `name`: where the folder was given."""
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index_path):
    raise PretrainedError(f"{name} = {folder!r} is not a diffusers folder "
                          "(no model_index.json); point it at e.g. a local copy of "
                          "stabilityai/stable-diffusion-xl-base-1.0.")
  index = weights.read_json(index_path)
  name = index.get("_class_name", "")
  if name not in classes:
    raise PretrainedError(f"{index_path}: _class_name {name!r} is not supported here (expected "
                          f"{' / '.join(classes)}).")
  for part in ("unet", "scheduler"):
    if not os.path.isdir(os.path.join(folder, part)):
      raise PretrainedError(f"{folder}: no {part}/ folder.")
  return index


def _expand_cond(cond: guidance.Conditioning, batch: int) -> guidance.Conditioning:
  """Tiles per-example conditioning [b, ...] to a batch of k·b (the consistency loss runs
  several chains as one batch)."""
  reps = batch // cond.context.shape[0]
  if reps == 1:
    return cond
  return jax.tree.map(lambda a: jnp.concatenate([a] * reps, axis=0), cond)


def absolute_folders(latent_config: Any) -> None:
  """latent.pretrained and latent.dataset made absolute in place, so that the run's
  config.json (read by evaluate and export_lora) works from any directory."""
  for field in ("pretrained", "dataset"):
    if latent_config[field] and "://" not in latent_config[field]:
      latent_config[field] = os.path.abspath(latent_config[field])


class LatentTask:
  """Data, state, step and grids of a latent fine-tuning run (see the module docstring)."""

  def __init__(self, config: Any, mesh: jax.sharding.Mesh, base_weights: bool = True):
    """base_weights=False: the frozen base UNet stays abstract (ShapeDtypeStructs, nothing
    read): enough to restore a checkpoint and export its adapters, not to run the UNet."""
    self.config, self.mesh, self.base_weights = config, mesh, base_weights
    lc = config.latent
    absolute_folders(lc)
    self.pretrained = os.path.abspath(lc.pretrained)
    self.index = check_pretrained(self.pretrained)
    self.dataset = dataset_lib.open_latent_dataset(lc.dataset)
    self.name = os.path.basename(os.path.normpath(self.dataset.path))
    self.sigma_n_max = float(np.max(self.dataset.sigma_n, initial=0.0))
    self.schedule = NoiseSchedule.from_config(weights.read_json(
        os.path.join(self.pretrained, "scheduler", "scheduler_config.json")))
    self.loader = GlobalBatchLoader(self.dataset, config.batch_size, config.seed,
                                    sharding_lib.batch_sharding(mesh),
                                    micro_batches=grad_accum_steps(config))
    self.uncond = {k: jnp.asarray(v) for k, v in self.dataset.uncond().items()}
    self._build_model()
    self._grid = None

  # ----------------------------------------------------------------------------- model

  def _build_model(self) -> None:
    """Loads the base UNet (sharded straight from the file), attaches LoRA, splits the
    trainable tree from the frozen one."""
    lc, config = self.config.latent, self.config
    param_dtype = DTYPES[lc.param_dtype]
    min_size = int(config.mesh.get("fsdp_min_size", sharding_lib.FSDP_MIN_SIZE))
    shard = lambda state: sharding_lib.param_sharding(self.mesh, state, min_size=min_size)
    model, self.unet_config = unet.load_unet(
        os.path.join(self.pretrained, "unet"), param_dtype=param_dtype,
        dtype=DTYPES[lc.dtype], shardings=shard, remat=bool(lc.remat),
        scan_layers=bool(lc.scan_layers),
        attention=str(lc.get("attention", "auto")), with_weights=self.base_weights)
    self._check_dataset_fits()
    if lc.lora_rank > 0:
      alpha = float(lc.lora_alpha) or None
      layers, count = lora.add_lora(model, rank=int(lc.lora_rank), alpha=alpha,
                                    targets=tuple(lc.lora_targets),
                                    key=jax.random.fold_in(jax.random.key(config.seed), _LORA_SALT))
      logging.info("LoRA r=%d on %d layers: %d trainable parameters (base UNet frozen, %s).",
                   lc.lora_rank, layers, count, lc.param_dtype)
      self.graphdef, trainable, frozen = nnx.split(model, lora.LoRAParam, ...)
    else:
      self.graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
      trainable = jax.tree.map(lambda a: a.astype(jnp.float32), trainable)
    self.trainable_init = nnx.to_pure_dict(trainable)
    self.frozen = nnx.to_pure_dict(frozen)

  def _check_dataset_fits(self) -> None:
    shape, cfg = self.dataset.latent_shape, self.unet_config
    if shape[-1] != cfg.get("in_channels", 4):
      raise PretrainedError(f"{self.dataset.path}: latents have {shape[-1]} channels, the UNet "
                            f"of {self.pretrained} takes {cfg.get('in_channels', 4)}.")
    sdxl = cfg.get("addition_embed_type") == "text_time"
    if sdxl != self.dataset.is_sdxl:
      raise PretrainedError(f"{self.dataset.path} was prepared for a "
                            f"{'SDXL' if self.dataset.is_sdxl else 'SD'} model; {self.pretrained}'s "
                            f"UNet is {'SDXL' if sdxl else 'SD'}.")

  def unet(self, params: Any, frozen: Any) -> unet.UNet2DConditionModel:
    """The UNet with `params` (trainable tree) over the frozen weights."""
    return nnx.merge(self.graphdef, params, frozen, copy=True)

  # ----------------------------------------------------------------------------- task API

  def init(self, tx: optax.GradientTransformation):
    num_emas = len(tuple(self.config.ema.halflife_kimg))
    return (lambda params: ts.state_from_params(params, tx, num_emas)), (self.trainable_init,)

  def make_step(self, tx: optax.GradientTransformation, state_shardings: Any):
    return make_latent_step(self.config, self.graphdef, self.schedule, self.uncond, tx,
                            state_shardings, jax.tree.map(lambda a: a.sharding, self.frozen),
                            sharding_lib.data_parallel_size(self.mesh))

  def write_grid(self, done: int, params: Any, writer: Any, objective_name: str,
                 params_sharding: Any, workdir: str) -> str:
    """Writes the sample grid of step `done` with `params`; returns the PNG's path."""
    from ambient_jax.training import latent_grid  # pylint: disable=g-import-not-at-top
    if self._grid is None:
      self._grid = latent_grid.LatentSampleGrid(self, workdir)
    return self._grid.write(done, params, writer, objective_name)


def make_latent_step(config: Any, graphdef: Any, schedule: NoiseSchedule, uncond: dict,
                     tx: optax.GradientTransformation, state_shardings: Any,
                     frozen_shardings: Any, num_shards: Optional[int] = None):
  """The pure step (state, batch, consistency, frozen) -> (state, metrics).

  graphdef: the UNet's (with LoRA slots when adapters train), split as
  `nnx.split(model, trainable_filter, ...)`; uncond: the dropped prompt ("context" [77, D],
  SDXL "text_embeds" [Dp]); frozen_shardings: where the frozen weights live (FSDP: they
  are all-gathered right before use). Needs no weights: `benchmarks/sdxl_memory.py`
  compiles it for the real SDXL from shapes alone.
  num_shards: the devices the batch is split over (default: those of the state's mesh).
  With config.optim.grad_accum_steps = k the UNet runs on k micro-batches of B/k in turn
  (`step.accumulate_gradients`); example p of the batch draws its timestep, noise, prompt
  dropout and consistency chains from fold_in(key', p), the same for every k.
  """
  lc = config.latent
  naive = config.loss.kind == "naive"
  cons_weight = float(config.consistency.weight)
  below_loss, cons_kwargs = below_sigma_n_term(config)
  stride = int(round(1.0 / config.consistency.batch_fraction)) if cons_weight > 0 else 0
  halflives = tuple(float(h) for h in config.ema.halflife_kimg)
  schedule_lr = ts.learning_rate_schedule(config.optim)
  seed, batch_size = int(config.seed), int(config.batch_size)
  num_micro = grad_accum_steps(config)
  num_shards = batch_shards(state_shardings) if num_shards is None else int(num_shards)
  vp_sigmas = jnp.asarray(schedule.vp_sigmas)
  sigma_schedule = vp_sigmas if lc.timesteps == "uniform" else None
  cfg_dropout = float(lc.cfg_dropout)
  gather_params = sharding_lib.gather_for_use(state_shardings.params)
  # The frozen base is gathered block by block inside the UNet (unet.BlockCall.gather): one
  # block's weights live at a time, gathered again in the backward pass under remat.
  gather_in_blocks = sharding_lib.replicate_for_use(frozen_shardings)
  sched = schedule

  def merge(params, frozen):
    """The UNet on gathered trainable weights and block-gathered frozen ones."""
    model = nnx.merge(graphdef, gather_params(params), frozen, copy=True)
    model.gather_weights = gather_in_blocks
    return model

  def conditioning(batch: dict, keys: jax.Array) -> guidance.Conditioning:
    """The batch's prompts, each replaced by the unconditional one with probability
    cfg_dropout (keys [b]: one per example)."""
    cond = guidance.Conditioning(*(batch.get(k) for k in COND_KEYS))
    if cfg_dropout <= 0:
      return cond
    drop = random_draws.uniform(keys, (cond.context.shape[0],)) < cfg_dropout
    mix = lambda c, u: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), u[None], c)
    context = mix(cond.context, uncond["context"])
    pooled = (cond.text_embeds if cond.text_embeds is None
              else mix(cond.text_embeds, uncond["text_embeds"]))
    return guidance.Conditioning(context, pooled, cond.time_ids)

  def train_step(state: ts.TrainState, batch: dict, consistency: bool = False, frozen: Any = None):
    train_step.num_traces += 1
    key = step_key(seed, state.step)
    k_loss, k_cons, k_drop = jax.random.split(key, 3)

    def prepare(params, micro, frozen):
      """The micro-batch, its (dropped-out) prompts and the UNet on these weights."""
      batch, _, _, drop_keys = micro
      return batch, conditioning(batch, drop_keys), merge(params, frozen)

    def main_term(params, micro, frozen):
      """The mean main loss (ambient, or DDPM for the baselines) of one micro-batch."""
      batch, cond, model = prepare(params, micro, frozen)
      x_n, sigma_n, loss_keys = batch["latent"], batch["sigma_n"], micro[1]
      model_fn = lambda x_t, t: _expand_cond(cond, x_t.shape[0]).apply(model, x_t, t)
      # ε̂(x_t, σ_t) for the VP losses: σ_t -> VE σ -> the (fractional) training step.
      eps_fn = lambda x_t, sigma_t: model_fn(x_t, sched.timestep(precond.vp_to_ve_sigma(sigma_t)))
      if naive:
        per_example, _ = losses.ddpm_loss(eps_fn, x_n, loss_keys, vp_sigmas)
      else:
        per_example, _ = losses.ambient_loss_vp(eps_fn, x_n, sigma_n, loss_keys, prediction="eps",
                                                sigma_schedule=sigma_schedule)
      main = jnp.mean(per_example)
      return main, {"ambient_loss": main, "consistency_loss": jnp.zeros((), jnp.float32),
                    "consistency_weight": jnp.asarray(cons_weight if consistency else 0.0)}

    def consistency_term(params, micro, frozen):
      """λ_c × the mean below-σ_n loss of the micro-batch's every stride-th example, on
      the VE view of the data: x_n / √(1 − σ_n²) = z0 + σ_n^VE ε."""
      batch, cond, model = prepare(params, micro, frozen)
      sub_cond = jax.tree.map(lambda a: a[::stride], cond)
      sub_fn = lambda x_t, t: _expand_cond(sub_cond, x_t.shape[0]).apply(model, x_t, t)
      denoise = ve_denoiser(sub_fn, sched)
      x_sub, s_sub = batch["latent"][::stride], batch["sigma_n"][::stride]
      x_ve = x_sub / precond.expand(precond.vp_scale(s_sub), x_sub)
      cons_keys = micro[2]  # [b]: one per example (micro = batch, loss, cons, dropout keys)
      loss_c, _ = below_loss(denoise, x_ve, precond.vp_to_ve_sigma(s_sub), cons_keys[::stride],
                             **cons_kwargs)
      cons = jnp.mean(loss_c)
      return cons_weight * cons, {"consistency_loss": cons}

    # Each term's gradient is taken on its own (`step.sum_of_term_gradients`): with
    # optim.grad_accum_loop "scan" one term per loop iteration, so the consistency phase's
    # peak is the larger term's, not both terms' at once.
    terms = (main_term,) + ((consistency_term,) if cons_weight > 0 and consistency else ())
    micro = (micro_batches(batch, num_micro, num_shards),
             micro_example_keys(k_loss, batch_size, num_micro),
             micro_example_keys(k_cons, batch_size, num_micro),
             micro_example_keys(jax.random.fold_in(k_drop, _DROP_SALT), batch_size, num_micro))
    grads, metrics = accumulate_gradients(terms, state.params, micro, num_micro,
                                          state_shardings.params, grad_accum_loop(config),
                                          frozen=frozen)
    return apply_gradients(state, grads, metrics, tx, batch_size, halflives,
                           float(config.ema.rampup_ratio), schedule_lr)

  train_step.num_traces = 0
  return train_step
