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

from ambient_jax import precond, sampling
from ambient_jax.runtime import storage
from ambient_jax.latent import guidance, vae as vae_lib
from ambient_jax.latent.schedule import ve_denoiser
from ambient_jax.runtime.images import save_png, tile


def truncated_sigmas(full: np.ndarray, sigma_stop: float) -> np.ndarray:
  """diffusers' σ list [N + 1] cut at `sigma_stop` (VE): the levels above it, then it."""
  above = full[full > sigma_stop]
  if not above.size:
    raise ValueError(f"truncated sampling at σ = {sigma_stop:.4g} (VE): the {len(full) - 1}-step "
                     f"σ list starts below it (at {float(full[0]):.4g}), so no step is left; "
                     "use more sampling steps (diffusers' leading spacing starts low for few "
                     "steps).")
  return np.concatenate([above, [sigma_stop]]).astype(np.float32)


def batch_conditioning(batch: dict, uncond: dict) -> tuple[guidance.Conditioning,
                                                          guidance.Conditioning]:
  """(prompts, dropped prompts) of a dataset batch: its context [B, 77, D] (SDXL also
  text_embeds [B, Dp], time_ids [B, 6]) and the dataset's unconditional prompt `uncond`
  broadcast to the same shapes (the time ids are the example's own in both)."""
  cond = guidance.Conditioning(*(jnp.asarray(batch[k]) if k in batch else None
                                 for k in ("context", "text_embeds", "time_ids")))
  return cond, guidance.Conditioning(
      jnp.broadcast_to(uncond["context"], cond.context.shape),
      None if cond.text_embeds is None else jnp.broadcast_to(uncond["text_embeds"],
                                                             cond.text_embeds.shape),
      cond.time_ids)


def guided_sample(model: Any, schedule: Any, cond: guidance.Conditioning,
                  uncond: guidance.Conditioning, guidance_scale: float, latents: jax.Array,
                  sigmas: np.ndarray, sigma_stop: float = 0.0) -> jax.Array:
  """Guided Euler sampling: latents [B, h, w, C] ~ N(0, I) -> x0 latents [B, h, w, C].

  sigmas: diffusers' VE σ list ending at 0 (`schedule.inference_sigmas`); the latents are
  scaled by its `init_noise_sigma`. sigma_stop > 0: the steps down to σ_stop
  (`truncated_sigmas`), then one Tweedie step D(x, σ_stop) (METHOD.md §6).
  """
  denoise = ve_denoiser(guidance.guided_model_fn(model, cond, uncond, guidance_scale), schedule)
  x = latents * np.float32(schedule.init_noise_sigma(sigmas))
  if sigma_stop <= 0:
    return sampling.euler_sampler(denoise, x, sigmas)
  x_stop = sampling.euler_sampler(denoise, x, truncated_sigmas(sigmas, sigma_stop))
  return denoise(x_stop, jnp.full((x.shape[0],), sigma_stop, jnp.float32))


def latents_as_seen(noisy: jax.Array, sigma_n: jax.Array) -> jax.Array:
  """Training latents x_n (VP) [B, h, w, C] in the VE view x_n / √(1 − σ_n²), each at its
  own σ_n [B] (mixed-noise datasets included), so that the VAE decodes them as if clean."""
  return noisy / precond.vp_scale(jnp.asarray(sigma_n, jnp.float32))[:, None, None, None]


class LatentSampleGrid:
  """Jitted guided sampler for a LatentTask's trainable tree + the VAE decoder."""

  def __init__(self, task: Any, workdir: str):
    config = task.config
    self.task, self.config = task, config
    self.dir = storage.resolve(workdir) / "samples"
    n = self.num_images = min(int(config.sample.num_images), task.dataset.num_examples)
    idx = (np.arange(n) * task.dataset.num_examples) // n
    batch = task.dataset.get_batch(idx)
    cond, uncond = batch_conditioning(batch, task.uncond)
    self.vae, _ = vae_lib.load_vae(os.path.join(task.pretrained, "vae"),
                                   attention=str(config.latent.get("attention", "auto")))
    self.noisy_latents = latents_as_seen(jnp.asarray(batch["latent"], jnp.float32),
                                         batch["sigma_n"])
    lo, hi = float(np.min(batch["sigma_n"])), float(np.max(batch["sigma_n"]))
    self.sigma_n_text = f"= {hi:.3g}" if lo == hi else f"{lo:.3g} to {hi:.3g}"
    vp = float(np.max(task.dataset.sigma_n, initial=0.0))
    self.sigma_stop = float(precond.vp_to_ve_sigma(vp)) if vp > 0 else 0.0
    seed, shape = int(config.sample.seed), task.dataset.latent_shape
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    latents = sampling.latents_from_keys(keys, shape)
    sched = task.schedule
    full_sigmas = sched.inference_sigmas(int(config.latent.sample_steps))
    g = float(config.latent.guidance_scale)

    def sample(params, frozen):
      run = lambda stop: guided_sample(task.unet(params, frozen), sched, cond, uncond, g,
                                       latents, full_sigmas, stop)
      full = run(0.0)
      return full, (run(self.sigma_stop) if self.sigma_stop > 0 else full)

    self._sample = jax.jit(sample)
    self._decode = jax.jit(lambda z: self.vae.from_latents(z))

  def write(self, step: int, params: Any, writer: Any = None, objective: str = "") -> str:
    """Samples with `params`, writes DIR/samples/step_XXXXXXX.png; returns its path."""
    full, truncated = self._sample(params, self.task.frozen)
    images = {name: np.asarray(self._decode(z)) for name, z in
              (("noisy", self.noisy_latents), ("full", full), ("truncated", truncated))}
    path = str(self.dir / f"step_{step:07d}.png")
    if jax.process_index() != 0:
      return path
    panels = [(f"training latents as seen (σ_n VP {self.sigma_n_text}), decoded",
               tile(images["noisy"]))]
    if self.sigma_stop > 0:
      panels.append(("truncated at σ_n (Tweedie)", tile(images["truncated"])))
    panels.append((f"full ({self.config.latent.sample_steps} Euler steps, guidance "
                   f"{self.config.latent.guidance_scale:g})", tile(images["full"])))
    save_png(path, panels, " · ".join(filter(None, [f"step {step}", self.task.name, objective])))
    if writer is not None:
      writer.write_images(step, {"samples/full": tile(images["full"])[None]})
    return path
