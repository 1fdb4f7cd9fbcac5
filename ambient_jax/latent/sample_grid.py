"""PNG grids of a latent run: training latents as seen | truncated samples | full samples.

Prompts are those of fixed training examples (their precomputed embeddings, so no text
encoder is loaded during training); guided Euler sampling over diffusers' σ list with the
run's EMA weights; the VAE (computing in float32) decodes. Image k starts from the latent
of key fold_in(key(sample.seed), k), so grids are comparable across steps.
- truncated: the same Euler steps down to σ_n, then one Tweedie step D(x_σn, σ_n): good
  without consistency (METHOD.md §6);
- full: down to σ = 0 — exact only for a consistency-trained model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import precond, sampling, storage
from ambient_jax.latent import guidance, vae as vae_lib
from ambient_jax.latent.schedule import ve_denoiser
from ambient_jax.sample_grid import save_png, tile


def truncated_sigmas(full: np.ndarray, sigma_stop: float) -> np.ndarray:
  """diffusers' σ list [N + 1] cut at `sigma_stop` (VE): the levels above it, then it."""
  above = full[full > sigma_stop]
  return np.concatenate([above, [sigma_stop]]).astype(np.float32)


class LatentSampleGrid:
  """Jitted guided sampler for a LatentTask's trainable tree + the VAE decoder."""

  def __init__(self, task: Any, workdir: str):
    config = task.config
    self.task, self.config = task, config
    self.dir = storage.resolve(workdir) / "samples"
    n = self.num_images = min(int(config.sample.num_images), task.dataset.num_examples)
    idx = (np.arange(n) * task.dataset.num_examples) // n
    batch = task.dataset.get_batch(idx)
    cond = guidance.Conditioning(*(jnp.asarray(batch[k]) if k in batch else None
                                   for k in ("context", "text_embeds", "time_ids")))
    unc = task.uncond
    uncond = guidance.Conditioning(
        jnp.broadcast_to(unc["context"], cond.context.shape),
        None if cond.text_embeds is None else jnp.broadcast_to(unc["text_embeds"], cond.text_embeds.shape),
        cond.time_ids)
    self.vae, _ = vae_lib.load_vae(os.path.join(task.pretrained, "vae"))
    self.noisy_latents = jnp.asarray(batch["latent"])
    vp = float(np.max(task.dataset.sigma_n, initial=0.0))
    self.sigma_stop = float(precond.vp_to_ve_sigma(vp)) if vp > 0 else 0.0
    seed, shape = int(config.sample.seed), task.dataset.latent_shape
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    latents = sampling.latents_from_keys(keys, shape)
    sched = task.schedule
    full_sigmas = sched.inference_sigmas(int(config.latent.sample_steps))
    scale = np.float32(sched.init_noise_sigma(full_sigmas))
    g = float(config.latent.guidance_scale)

    def sample(params, frozen):
      model = task.unet(params, frozen)
      denoise = ve_denoiser(guidance.guided_model_fn(model, cond, uncond, g), sched)
      x = latents * scale
      full = sampling.euler_sampler(denoise, x, full_sigmas)
      if self.sigma_stop <= 0:
        return full, full
      cut = truncated_sigmas(full_sigmas, self.sigma_stop)
      x_stop = sampling.euler_sampler(denoise, x, cut)
      return full, denoise(x_stop, jnp.full((n,), self.sigma_stop))

    self._sample = jax.jit(sample)
    self._decode = jax.jit(lambda z: self.vae.from_latents(z))

  def write(self, step: int, params: Any, writer: Any = None, objective: str = "") -> str:
    """Samples with `params`, writes DIR/samples/step_XXXXXXX.png; returns its path."""
    full, truncated = self._sample(params, self.task.frozen)
    noisy = self.noisy_latents
    # Training latents as seen: x_n (VP) rescaled to the VE view, decoded as if clean.
    s = jnp.asarray(self.task.dataset.sigma_n[:1].max(initial=0.0))
    images = {name: np.asarray(self._decode(z)) for name, z in
              (("noisy", noisy / precond.vp_scale(s)), ("full", full), ("truncated", truncated))}
    path = str(self.dir / f"step_{step:07d}.png")
    if jax.process_index() != 0:
      return path
    vp = float(np.max(self.task.dataset.sigma_n, initial=0.0))
    panels = [(f"training latents as seen (σ_n VP = {vp:.3g}), decoded", tile(images["noisy"]))]
    if self.sigma_stop > 0:
      panels.append((f"truncated at σ_n (Tweedie)", tile(images["truncated"])))
    panels.append((f"full ({self.config.latent.sample_steps} Euler steps, guidance "
                   f"{self.config.latent.guidance_scale:g})", tile(images["full"])))
    save_png(path, panels, " · ".join(filter(None, [f"step {step}", self.task.name, objective])))
    if writer is not None:
      writer.write_images(step, {"samples/full": tile(images["full"])[None]})
    return path
