"""The pieces every task's training step shares: the below-σ_n term, the optimizer + EMA
update, the jit over the mesh, the consistency phase and what a model was trained with.

A task (`training.pixel`, `training.latent`) writes its pure step from these; the Trainer
jits it once per consistency phase with `jit_train_step`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from ambient_jax import losses
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.training import ema
from ambient_jax.training import state as ts

STEP_SALT = 0x57E9  # key of step s: fold_in(fold_in(key(seed), STEP_SALT), s)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of training step `step`: a pure function of (seed, step)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STEP_SALT), step)


def below_sigma_n_term(config) -> tuple[Any, dict]:
  """(the loss below σ_n that config.consistency.loss names, its kwargs): kwargs left
  None mean that loss's own default (e.g. `step`: "posterior" for consistency,
  "posterior_cov" for posterior_sample). Configs written before `loss` existed mean
  consistency."""
  kwargs = {k: v for k, v in config.consistency.kwargs.to_dict().items() if v is not None}
  return losses.BELOW_SIGMA_N_LOSSES[config.consistency.get("loss", "consistency")], kwargs


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
