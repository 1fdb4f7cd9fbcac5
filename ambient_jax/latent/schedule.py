"""A DDPM-trained latent model as a VE denoiser D(x, σ), so the project's losses and
samplers serve Stable Diffusion unchanged.

The ε-model ε̂(x_t, t) is trained on x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε. Dividing by √ᾱ_t gives
the variance-exploding x_σ = x0 + σ ε with σ_t = √((1−ᾱ_t)/ᾱ_t), hence (Karras et al.
2022, Table 1; diffusers' EulerDiscreteScheduler):

    D(x, σ) = x − σ · ε̂(x / √(σ² + 1), t(σ))                   (epsilon)
    D(x, σ) = x/(σ²+1) − σ/√(σ²+1) · v̂(x / √(σ² + 1), t(σ))     (v_prediction)

with t(σ) the inverse of the scheduler's piecewise-linear map t -> σ_t (fractional t
between training steps, exactly what diffusers feeds its UNet). Any sampler over σ is
then a sampler for the latent model; the Euler steps over diffusers' σ list reproduce
diffusers' EulerDiscreteScheduler step for step (tests/test_latent_sampling.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax.precond import BETA_SCHEDULES, ddpm_alphas_bar, expand

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "linspace", "trailing")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> output


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The training noise schedule of a diffusers `scheduler/scheduler_config.json`.

  alphas_cumprod: ᾱ_t for t = 0..T−1, float32 as diffusers computes it.
  """
  alphas_cumprod: np.ndarray
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
    """From a scheduler config dict (DDPM / DDIM / PNDM / Euler schedulers all share it)."""
    num = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
      raise ValueError("scheduler config: trained_betas is not supported.")
    if kind not in BETA_SCHEDULES:
      raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported "
                       f"(supported: {BETA_SCHEDULES}).")
    prediction = config.get("prediction_type", "epsilon")
    spacing = config.get("timestep_spacing", "leading")
    for key, value, allowed in (("prediction_type", prediction, PREDICTIONS),
                                ("timestep_spacing", spacing, SPACINGS)):
      if value not in allowed:
        raise ValueError(f"scheduler config: {key}={value!r} is not supported (supported: {allowed}).")
    for key, default in (("use_karras_sigmas", False), ("interpolation_type", "linear"),
                         ("rescale_betas_zero_snr", False), ("timestep_type", "discrete")):
      if config.get(key, default) not in (default, None):
        raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (only "
                         f"{default!r}).")
    alphas_cumprod = ddpm_alphas_bar(num, start, end, kind)
    return cls(alphas_cumprod, prediction, spacing, int(config.get("steps_offset", 0)))

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  @property
  def ve_sigmas(self) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing in t: [T] float32 (SDXL: 0.029 … 14.6)."""
    return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod).astype(np.float32)

  @property
  def vp_sigmas(self) -> np.ndarray:
    """VP noise levels √(1 − ᾱ_t): [T], as `precond.ddpm_sigmas` (METHOD.md §4)."""
    return np.sqrt(1.0 - self.alphas_cumprod).astype(np.float32)

  def timestep(self, sigma: jax.Array) -> jax.Array:
    """Fractional training step t(σ) for VE σ [B]: the inverse of diffusers' linear
    interpolation t -> σ_t, clamped to [0, T−1] outside the trained range."""
    grid = jnp.asarray(self.ve_sigmas)
    return jnp.interp(jnp.asarray(sigma, jnp.float32), grid,
                      jnp.arange(self.num_train_timesteps, dtype=jnp.float32))

  def inference_timesteps(self, num_steps: int) -> np.ndarray:
    """diffusers' `set_timesteps(num_steps)` training steps, decreasing: [num_steps]."""
    t_max = self.num_train_timesteps
    if self.timestep_spacing == "linspace":
      return np.linspace(0, t_max - 1, num_steps, dtype=np.float32)[::-1].copy()
    if self.timestep_spacing == "leading":
      ratio = t_max // num_steps
      return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + self.steps_offset
    ratio = t_max / num_steps
    return np.arange(t_max, 0, -ratio).round().astype(np.float32) - 1

  def inference_sigmas(self, num_steps: int) -> np.ndarray:
    """VE σ at diffusers' inference steps, then 0: [num_steps + 1] float32, decreasing."""
    sig = np.interp(self.inference_timesteps(num_steps), np.arange(self.num_train_timesteps),
                    self.ve_sigmas)
    return np.concatenate([sig, [0.0]]).astype(np.float32)

  def hot_sigmas(self, num_steps: int, t: int) -> tuple[np.ndarray, float]:
    """The σ list of the paper's "hot sample" from DDPM step t: (VE σ [M + 1] float32, from
    the inference step nearest t down to 0; that step τ).

    The official attack runs a `num_steps` pipeline whose latents are reset to the noised
    latent x_t after every step at a timestep above τ = argmin_i |τ_i − t| (the first on
    ties); so the run is the noised latent taken as the state at τ, then the remaining
    steps (τ included) down to 0. The τ_i are DDPMScheduler's, the paper's: diffusers'
    `inference_timesteps` rounded to whole steps (only "linspace" spacing has fractions).
    """
    steps = np.round(self.inference_timesteps(num_steps))
    start = int(np.argmin(np.abs(steps - float(t))))
    sigmas = self.ve_sigmas[steps[start:].astype(np.int64)]
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), float(steps[start])

  def init_noise_sigma(self, sigmas: np.ndarray) -> float:
    """The scale diffusers gives the initial N(0, I) latents (its `init_noise_sigma`)."""
    top = float(np.max(sigmas))
    return top if self.timestep_spacing in ("linspace", "trailing") else float(np.sqrt(top**2 + 1))


def ve_denoiser(model_fn: ModelFn, schedule: NoiseSchedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """D(x, σ) from a DDPM model `model_fn(x_t, t) -> ε̂ | v̂ | x̂0`; x [B, ...], σ [B]."""

  def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    scale = expand(jax.lax.rsqrt(jnp.square(sigma) + 1.0), x)
    out = model_fn(x * scale, schedule.timestep(sigma)).astype(jnp.float32)
    s = expand(sigma, x)
    if schedule.prediction_type == "epsilon":
      return x - s * out
    if schedule.prediction_type == "v_prediction":
      return x * jnp.square(scale) - s * scale * out
    return out

  return denoise
