"""EDM preconditioning, noise-level samplers and weights, and VE <-> VP conversions.

Everything is per example: σ and σ_n are arrays of shape [B]. Pure jax; no Flax.
References: Karras et al. 2022 (EDM), METHOD.md §2–§4.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from ambient_jax import random_draws

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def expand(v: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a per-example [B] array to [B, 1, ..., 1] so it broadcasts against `like`."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def edm_coefficients(sigma: jax.Array, sigma_data: float = SIGMA_DATA):
  """EDM's (c_skip, c_out, c_in, c_noise) for D(x, σ) = c_skip x + c_out F(c_in x, c_noise)."""
  sigma = jnp.asarray(sigma)
  total = sigma**2 + sigma_data**2
  c_skip = sigma_data**2 / total
  c_out = sigma * sigma_data / jnp.sqrt(total)
  c_in = 1.0 / jnp.sqrt(total)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def edm_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """EDM loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)², which makes the loss unit-variance at init."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma(key: jax.Array, sigma_n: jax.Array, p_mean: float = P_MEAN,
                 p_std: float = P_STD) -> jax.Array:
  """Draws σ ~ lognormal(p_mean, p_std) truncated to σ > σ_n, per example: [B] -> [B].

  Inverse-CDF sampling of the upper tail, so no draw is wasted (the follow-up's
  clamp `max(σ, σ_n)` spends the clamped mass on a zero loss). With σ_n = 0 this is
  the plain EDM lognormal, drawn from the same key the same way. `key`: one key, or [B]
  keys (one per example: then an example's σ does not depend on the batch it is in).
  """
  sigma_n = jnp.asarray(sigma_n, jnp.float32)
  # Standardised lower bound a = (ln σ_n − P_mean) / P_std; −inf for clean examples.
  safe_log = jnp.log(jnp.where(sigma_n > 0, sigma_n, 1.0))
  a = jnp.where(sigma_n > 0, (safe_log - p_mean) / p_std, -jnp.inf)
  tail_mass = special.ndtr(-a)  # P(Z > a)
  u = random_draws.uniform(key, sigma_n.shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
  z = -special.ndtri(u * tail_mass)  # Z > a; the upper tail is sampled directly for accuracy.
  sigma = jnp.exp(p_mean + p_std * z)
  return jnp.maximum(sigma, jnp.nextafter(sigma_n, jnp.inf))  # rounding can never reach σ_n.


# ----------------------------------------------------------------------------- VE <-> VP
# VE: x_σ = x0 + σ z.   VP: x_t = √(1 − σ_t²) x0 + σ_t z.   x_t = √(1 − σ_t²) · x_σ with
# σ = σ_t / √(1 − σ_t²).


def vp_to_ve_sigma(sigma_t: jax.Array) -> jax.Array:
  """VP noise level σ_t ∈ [0, 1) -> equivalent VE level σ = σ_t / √(1 − σ_t²)."""
  return sigma_t / jnp.sqrt((1.0 - sigma_t) * (1.0 + sigma_t))  # (1−σ)(1+σ): no cancellation in σ²


def ve_to_vp_sigma(sigma: jax.Array) -> jax.Array:
  """VE noise level σ ≥ 0 -> equivalent VP level σ_t = σ / √(1 + σ²)."""
  return sigma / jnp.sqrt(1.0 + sigma**2)


def vp_scale(sigma_t: jax.Array) -> jax.Array:
  """Signal scale √(1 − σ_t²) of the VP process: x_t = vp_scale · x_σ (VE)."""
  return jnp.sqrt((1.0 - sigma_t) * (1.0 + sigma_t))


def ve_denoiser_from_vp(denoise_vp: DenoiseFn) -> DenoiseFn:
  """Wraps a VP denoiser D_vp(x_t, σ_t) -> x0 as a VE denoiser D(x_σ, σ) -> x0."""

  def denoise(x, sigma):
    sigma_t = ve_to_vp_sigma(sigma)
    return denoise_vp(x * expand(vp_scale(sigma_t), x), sigma_t)

  return denoise


def vp_denoiser_from_ve(denoise_ve: DenoiseFn) -> DenoiseFn:
  """Wraps a VE denoiser D(x_σ, σ) -> x0 as a VP denoiser D_vp(x_t, σ_t) -> x0."""

  def denoise(x_t, sigma_t):
    return denoise_ve(x_t / expand(vp_scale(sigma_t), x_t), vp_to_ve_sigma(sigma_t))

  return denoise


BETA_SCHEDULES = ("scaled_linear", "linear")


def ddpm_alphas_bar(num_timesteps: int = 1000, beta_start: float = 0.00085,
                    beta_end: float = 0.012, schedule: str = "scaled_linear") -> np.ndarray:
  """ᾱ_t = Π_{s≤t} (1 − β_s), t = 0..T−1, of a DDPM β schedule: [T] float32, computed as
  diffusers' schedulers do (numpy float32), so latent models match them bit for bit."""
  if schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float32) ** 2
  elif schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float32)
  else:
    raise ValueError(f"beta schedule {schedule!r} is not supported (supported: "
                     f"{BETA_SCHEDULES}).")
  return np.cumprod(1.0 - betas, dtype=np.float32)


def ddpm_sigmas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                schedule: str = "scaled_linear") -> jax.Array:
  """VP noise levels σ_t = √(1 − ᾱ_t), t = 0..T−1, of a DDPM β schedule: [T].

  Defaults are Stable Diffusion / SDXL's scaled-linear schedule, where t = 100/500/800
  give σ_t ≈ 0.325/0.851/0.981 (METHOD.md §4).
  """
  return jnp.sqrt(1.0 - jnp.asarray(ddpm_alphas_bar(num_timesteps, beta_start, beta_end,
                                                     schedule)))
