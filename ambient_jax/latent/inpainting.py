"""Inpainting with a diffusers inpainting folder: StableDiffusionXLInpaintPipeline on our parts.

    pipe = pipeline.load_pretrained("stable-diffusion-xl-1.0-inpainting-0.1")  # UNet in_channels 9
    out = inpaint(pipe, images, masks, prompts, keys)    # images [B, H, W, 3] in [−1, 1]
                                                         # (in and out), masks [B, H, W],
                                                         # 1 = repaint

What diffusers does (0.42.1, `pipeline_stable_diffusion_xl_inpaint.py`), done here the same way:
  - the mask is binarised at 0.5; the masked image is image · (mask < 0.5) in [−1, 1] (the
    region to repaint becomes 0, mid-grey) and is VAE-encoded to latents × scaling factor;
  - the mask goes to latent size by `F.interpolate(mode="nearest")`: mask[f·i, f·j];
  - the UNet sees 9 channels, [Euler-scaled x (4), mask (1), masked-image latents (4)], in
    that order, the same two extra inputs for the guided and the unguided half;
  - `strength`: of the `num_steps` Euler σ's only the last int(num_steps · strength) are run
    (start index t₀ = num_steps − that); strength = 1 starts from N(0, I) · init_noise_sigma,
    strength < 1 from the image's latents noised to σ_{t₀} (VE: z + σ_{t₀} · ε);
  - SDXL time ids (H, W, 0, 0, H, W); a folder whose model_index.json says
    `requires_aesthetics_score` (the refiner style) uses (H, W, 0, 0, score) instead, 6.0
    for the prompt and 2.5 for the negative;
  - classifier-free guidance u + g (c − u), Euler steps, VAE decode, clip to [−1, 1] (the
    range of the VAE, of `data.image_folder` and of the DINOv2 features; diffusers' [0, 1]
    output is (x + 1) / 2).
One deliberate difference: diffusers encodes the image and the masked image by drawing a
sample from the VAE posterior; here the posterior mean is taken (its spread is ~1e-3 of
the latents for the SD/SDXL VAEs), so the only randomness is ε, one key per image. The
parity test (tests/test_latent_inpainting.py) makes diffusers take the mean too.

The sampling (both VAE encodings, the Euler loop over the UNet, the decode) is one jitted
function of the pipeline's parameters, cached by (network structure, guidance scale, batch
shape, number of steps run): calling `inpaint` batch after batch compiles once, whatever the
strength.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax import errors, sampling
from ambient_jax.latent import guidance
from ambient_jax.latent.pipeline import LatentPipeline
from ambient_jax.latent.schedule import NoiseSchedule

INPAINT_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults


class NotInpaintingModelError(errors.UserError, ValueError):
  """The folder's UNet does not take the inpainting inputs (in_channels is not 9)."""


def check_inpainting(pipe: LatentPipeline) -> None:
  """One-line error unless the UNet takes 9 input channels (latents, mask, masked image)."""
  if pipe.unet is None or "unet" not in pipe.configs:
    raise NotInpaintingModelError("the pipeline has no UNet (loaded with_unet=False, e.g. a "
                                  "fine-tuning workdir's); inpainting needs a diffusers "
                                  "inpainting folder.")
  channels = pipe.configs["unet"].get("in_channels", 4)
  if channels != INPAINT_CHANNELS:
    raise NotInpaintingModelError(
        f"the UNet has in_channels={channels}; an inpainting model (e.g. diffusers/stable-"
        f"diffusion-xl-1.0-inpainting-0.1) has {INPAINT_CHANNELS}: latents, mask, masked image.")


def start_index(num_steps: int, strength: float) -> int:
  """diffusers' `get_timesteps`: the first of the `num_steps` inference steps that runs,
  t₀ = num_steps − min(int(num_steps · strength), num_steps) (strength 0.99, 20 steps: 1)."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be in [0, 1]; got {strength}.")
  first = num_steps - min(int(num_steps * strength), num_steps)
  if first >= num_steps:
    raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run.")
  return first


def latent_mask(masks: jax.Array, factor: int) -> jax.Array:
  """Pixel masks [B, H, W] (1 = repaint) -> binarised latent-size masks [B, H/f, W/f, 1]:
  torch's nearest interpolation at an integer factor f picks pixel (f·i, f·j)."""
  h, w = masks.shape[1:3]
  if h % factor or w % factor:
    raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's factor {factor}.")
  return (masks[:, ::factor, ::factor, None] >= 0.5).astype(jnp.float32)


def masked_image(images: jax.Array, masks: jax.Array) -> jax.Array:
  """images [B, H, W, 3] in [−1, 1] with the region to repaint (mask ≥ 0.5) set to 0."""
  return images * (masks[..., None] < 0.5).astype(images.dtype)


def inpainting_time_ids(pipe: LatentPipeline, size: tuple[int, int],
                        batch: int) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """SDXL's added time ids (prompt, negative) [B, 6] or, with `requires_aesthetics_score`,
  [B, 5]; (None, None) for SD 1.x/2.x."""
  if not pipe.is_sdxl:
    return None, None
  h, w = size
  if pipe.configs["model_index"].get("requires_aesthetics_score", False):
    rows = [[h, w, 0, 0, AESTHETIC_SCORE], [h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE]]
  else:
    rows = [[h, w, 0, 0, h, w]] * 2
  return tuple(jnp.tile(jnp.asarray([r], jnp.float32), (batch, 1)) for r in rows)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static part of one inpainting run (hashable: the jit cache key)."""
  unet_graph: Any
  vae_graph: Any
  alphas_cumprod: tuple
  prediction_type: str
  timestep_spacing: str
  steps_offset: int
  factor: int
  guidance_scale: float

  def schedule(self) -> NoiseSchedule:
    return NoiseSchedule(np.asarray(self.alphas_cumprod, np.float32), self.prediction_type,
                         self.timestep_spacing, self.steps_offset)


class _WithInpaintingInputs:
  """unet(x, t, context, ...) with the mask and masked-image latents [B, h, w, 5]
  concatenated after x's 4 channels (repeated over the guided batch of 2B)."""

  def __init__(self, unet: Any, extra: jax.Array):
    self.unet, self.extra = unet, extra

  def __call__(self, x, t, context, **kw):
    extra = jnp.tile(self.extra, (x.shape[0] // self.extra.shape[0], 1, 1, 1))
    return self.unet(jnp.concatenate([x, extra.astype(x.dtype)], axis=-1), t, context, **kw)


@functools.partial(jax.jit, static_argnames=("plan", "decode"))
def _run(plan: _Plan, unet_state, vae_state, images, masks, noise, cond, uncond, sigmas,
         start, decode: bool):
  """images [B, H, W, 3] in [−1, 1], masks [B, H, W], noise [B, h, w, 4] -> images in
  [−1, 1] (or the x0 latents): the whole of diffusers' inpainting loop, compiled once per
  number of steps run. sigmas [S + 1]: the VE σ's run; start = (noise scale, image weight):
  x = image weight · z_image + noise scale · ε ((init_noise_sigma, 0) at strength 1)."""
  unet, vae = nnx.merge(plan.unet_graph, unet_state), nnx.merge(plan.vae_graph, vae_state)
  extra = jnp.concatenate([latent_mask(masks, plan.factor),
                           vae.to_latents(masked_image(images, masks)).astype(jnp.float32)], -1)
  x = start[1] * vae.to_latents(images).astype(jnp.float32) + start[0] * noise
  denoise = guidance.guided_denoiser(_WithInpaintingInputs(unet, extra), plan.schedule(), cond,
                                     uncond, plan.guidance_scale)
  z0 = sampling.euler_sampler(denoise, x, sigmas)
  if not decode:
    return z0
  return jnp.clip(vae.from_latents(z0).astype(jnp.float32), -1.0, 1.0)


def inpaint(pipe: LatentPipeline, images, masks, prompts: Sequence[str], keys: jax.Array, *,
            num_steps: int = 20, guidance_scale: float = 8.0, strength: float = 0.99,
            negative: Optional[Sequence[str]] = None, noise: Optional[jax.Array] = None,
            decode: bool = True) -> jax.Array:
  """Repaints the masked region of each image under its prompt, as diffusers'
  StableDiffusionXLInpaintPipeline (see the module docstring); defaults are the paper's
  inpainting attack (METHOD.md §8).

  images [B, H, W, 3] in [−1, 1] (H, W multiples of the VAE factor 8 and of the UNet's
  downsampling); masks [B, H, W], 1 (≥ 0.5) = repaint; prompts: B strings; keys: one PRNG
  key per image, the only randomness (ε [B, H/8, W/8, 4] = pipe.initial_latents(keys));
  `noise` replaces those draws (e.g. to match diffusers' own). negative: B strings, or None
  for the folder's default (zeros for SDXL folders with force_zeros_for_empty_prompt).
  Returns images [B, H, W, 3] in [−1, 1] float32 (or the x0 latents when not `decode`).
  """
  check_inpainting(pipe)
  images = jnp.asarray(images, jnp.float32)
  masks = jnp.asarray(masks, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
    raise ValueError(f"images [B, H, W, 3] and masks [B, H, W] needed; got {images.shape} and "
                     f"{masks.shape}.")
  size = images.shape[1:3]
  batch = images.shape[0]
  if len(prompts) != batch:
    raise ValueError(f"{len(prompts)} prompts for {batch} images.")
  cond, uncond = pipe.encode_prompts(list(prompts), negative, size)
  time_ids, negative_time_ids = inpainting_time_ids(pipe, size, batch)
  if time_ids is not None:
    cond, uncond = cond._replace(time_ids=time_ids), uncond._replace(time_ids=negative_time_ids)
  noise = pipe.initial_latents(keys, size) if noise is None else jnp.asarray(noise, jnp.float32)
  f = pipe.latent_scale_factor
  if noise.shape != (batch, size[0] // f, size[1] // f, pipe.configs["vae"].get("latent_channels", 4)):
    raise ValueError(f"noise has shape {noise.shape}; images {images.shape} need latents at 1/{f}.")
  unet_graph, unet_state = nnx.split(pipe.unet)
  vae_graph, vae_state = nnx.split(pipe.vae)
  schedule = pipe.schedule
  plan = _Plan(unet_graph, vae_graph, tuple(schedule.alphas_cumprod.tolist()),
               schedule.prediction_type, schedule.timestep_spacing, schedule.steps_offset,
               f, float(guidance_scale))
  all_sigmas = schedule.inference_sigmas(num_steps)
  sigmas = all_sigmas[start_index(num_steps, strength):]
  start = ((schedule.init_noise_sigma(all_sigmas), 0.0) if strength == 1.0
           else (float(sigmas[0]), 1.0))
  return _run(plan, unet_state, vae_state, images, masks, noise, cond, uncond,
              jnp.asarray(sigmas), jnp.asarray(start, jnp.float32), decode)
