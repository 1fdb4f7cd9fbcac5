"""Prompt conditioning, classifier-free guidance and latent sampling for a UNet.

    cond = Conditioning(context, text_embeds, time_ids)          # from the text encoders
    denoise = guided_denoiser(unet, schedule, cond, uncond, guidance_scale=5.0)
    z0 = sample_latents(denoise, schedule, latents, num_steps=25)  # latents ~ N(0, I)

Guidance mixes the UNet outputs, u + g (c − u), as diffusers does; because D is affine in
the output, this is the same mix of the denoisers, so the guided D serves every sampler
of `ambient_jax.sampling`. The unconditional and conditional passes run as one batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import sampling
from ambient_jax.latent.schedule import NoiseSchedule, ve_denoiser


class Conditioning(NamedTuple):
  """What the UNet is conditioned on, per example: context [B, T, D] (text encoder states);
  SDXL also text_embeds [B, P] (pooled text) and time_ids [B, 6] (sizes and crop)."""
  context: jax.Array
  text_embeds: Optional[jax.Array] = None
  time_ids: Optional[jax.Array] = None

  def apply(self, unet: Any, x: jax.Array, t: jax.Array) -> jax.Array:
    """unet(x [B, h, w, C], t [B]) under this conditioning."""
    return unet(x, t, self.context, text_embeds=self.text_embeds, time_ids=self.time_ids)


def _concat(a: Conditioning, b: Conditioning) -> Conditioning:
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def guided_model_fn(unet: Any, cond: Conditioning, uncond: Optional[Conditioning] = None,
                    guidance_scale: float = 1.0):
  """(x_t [B, ...], t [B]) -> guided model output u + g (c − u); one batch of 2B."""
  if uncond is None or guidance_scale == 1.0:
    return lambda x, t: cond.apply(unet, x, t)
  both = _concat(uncond, cond)

  def model_fn(x, t):
    out = both.apply(unet, jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    u, c = jnp.split(out.astype(jnp.float32), 2)
    return u + guidance_scale * (c - u)

  return model_fn


def guided_denoiser(unet: Any, schedule: NoiseSchedule, cond: Conditioning,
                    uncond: Optional[Conditioning] = None, guidance_scale: float = 1.0):
  """The guided VE denoiser D(x, σ) of a DDPM UNet (see `schedule.ve_denoiser`)."""
  return ve_denoiser(guided_model_fn(unet, cond, uncond, guidance_scale), schedule)


def sample_latents(denoise_fn, schedule: NoiseSchedule, latents: jax.Array,
                   num_steps: int = 25) -> jax.Array:
  """diffusers-equivalent Euler sampling: latents [B, h, w, C] ~ N(0, I) -> x0 latents.

  The σ list and the initial scale are diffusers' EulerDiscreteScheduler's for the
  schedule's spacing, so the result equals a diffusers pipeline run with those latents.
  """
  sigmas = schedule.inference_sigmas(num_steps)
  x = jnp.asarray(latents, jnp.float32) * np.float32(schedule.init_noise_sigma(sigmas))
  return sampling.euler_sampler(denoise_fn, x, sigmas)


def hot_sample(denoise_fn, schedule: NoiseSchedule, noisy: jax.Array, t: int, keys: jax.Array,
               num_steps: int = 50) -> jax.Array:
  """The paper's posterior sample of a noised latent ("hot sample", METHOD.md §8): x0 latents
  [B, h, w, C] from `noisy` [B, h, w, C] = z0 + σ_t ε, the VE view of x_t at DDPM step t.

  As the official attack: a `num_steps` DDPM-scheduler pipeline whose latents are held at
  x_t until the inference step τ nearest t (`NoiseSchedule.hot_sigmas`), then run to 0.
  Holding means the UNet sees x_t itself at timestep τ: in the VE view x = x_t √(1 + σ_τ²)
  = noisy · √(1 + σ_τ²) / √(1 + σ_t²) (equal to `noisy` when τ = t). DDPMScheduler's
  ancestral steps are posterior steps over the σ list (`sampling.ancestral_steps`), the
  last one to σ = 0 returning D; keys [B], one per image.
  """
  sigmas, _ = schedule.hot_sigmas(num_steps, t)  # sigmas[0] = σ_τ
  scale = np.float32(np.sqrt((1.0 + float(sigmas[0]) ** 2) /
                             (1.0 + float(schedule.ve_sigmas[t]) ** 2)))
  return sampling.ancestral_steps(denoise_fn, jnp.asarray(noisy, jnp.float32) * scale, sigmas,
                                  keys)
