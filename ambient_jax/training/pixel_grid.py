"""Periodic PNG sample grids: noisy training images | truncated samples | full samples.

Image k of every grid starts from the latent of key fold_in(key(sample.seed), k), so
grids are comparable across steps, runs, batch sizes and device counts. One sampler call
produces both kinds of samples from the same latents (EDM Heun, METHOD.md §6):
- truncated: run down to σ_stop (the data's σ_n unless config.sample.truncate_sigma)
  and return D(x_σstop, σ_stop) — good without consistency, a little blurry;
- full: run down to σ_min = 0.002 — exact only for a consistency-trained model.
The left panel shows fixed training examples exactly as the model sees them (clean image
+ its fixed noise), so "what went in" and "what comes out" sit side by side.
"""

from __future__ import annotations

from absl import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ambient_jax import sampling
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.runtime import storage
from ambient_jax.runtime.images import save_png, tile
from ambient_jax.data import corruption


class SampleGrid:
  """Jitted sampler over the mesh + the fixed noisy-example panel."""

  def __init__(self, config: Any, mesh: jax.sharding.Mesh, model_def: Any, dataset: Any,
               param_shardings: Any, workdir: str):
    self.config, self.model_def, self.workdir = config, model_def, workdir
    self.num_images = n = int(config.sample.num_images)
    self.dir = storage.resolve(workdir) / "samples"
    table = dataset.sigma_n
    t = float(config.sample.truncate_sigma)
    self.sigma_stop = float(table.max()) if t == -1 else t
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    # Built inside jit with an output sharding: device_put cannot place a global array on a
    # mesh whose devices belong to other processes (multi-host).
    seed = int(config.sample.seed)
    self.keys = jax.jit(lambda: jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
        jnp.arange(n)), out_shardings=self.batch_sharding)()
    self.labels = None
    if model_def.label_dim:
      label_dim = int(model_def.label_dim)
      self.labels = jax.jit(lambda: jnp.arange(n, dtype=jnp.int32) % label_dim,
                            out_shardings=self.batch_sharding)()

    # Fixed training examples, spread over the dataset, exactly as the model sees them.
    idx = (np.arange(n) * dataset.num_examples) // n
    images, _ = dataset.source.get(idx)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      self.noisy = np.asarray(corruption.corrupt(
          corruption.uint8_to_float(jnp.asarray(images)), jnp.asarray(idx),
          jnp.asarray(table[idx]), dataset.corruption_seed))
    levels = sorted(set(np.round(table[idx], 4).tolist()))
    self.noisy_title = "training images as seen (σ_n = " + ", ".join(f"{s:g}" for s in levels) + ")"

    shape = model_def.image_shape
    truncate = self.sigma_stop > 0
    num_steps, churn = int(config.sample.num_steps), float(config.sample.s_churn)

    def sample(params, keys, labels):
      latents = sampling.latents_from_keys(keys, shape)
      stop = jnp.zeros((n,), jnp.float32)
      if truncate:  # one sampler call for both kinds, on the same latents
        latents = jnp.concatenate([latents, latents])
        keys = jnp.concatenate([keys, keys])
        stop = jnp.concatenate([stop, jnp.full((n,), self.sigma_stop, jnp.float32)])
        labels = None if labels is None else jnp.concatenate([labels, labels])
      denoise = model_def.denoiser(params, train=False, labels=labels)
      return sampling.edm_sampler(denoise, latents, num_steps, sigma_stop=stop,
                                  keys=keys if churn > 0 else None, S_churn=churn)

    self._sample = jax.jit(sample, in_shardings=(param_shardings, self.batch_sharding,
                                                 self.batch_sharding),
                           out_shardings=self.batch_sharding)

  def samples(self, params: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(full [n, H, W, C], truncated [n, H, W, C] or None) as host numpy (all processes call)."""
    out = self._sample(params, self.keys, self.labels)
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    n = self.num_images
    return out[:n], (out[n:] if self.sigma_stop > 0 else None)

  def write(self, step: int, params: Any, writer: Any = None, objective: str = "") -> str:
    """Samples with `params`, writes DIR/samples/step_XXXXXXX.png (process 0); returns its path.
    objective: what the model was trained with (`training.step.objective`), for the title."""
    full, truncated = self.samples(params)
    path = str(self.dir / f"step_{step:07d}.png")
    if jax.process_index() != 0:
      return path
    panels = [(self.noisy_title, tile(self.noisy))]
    if truncated is not None:
      panels.append((f"generated, truncated at σ = {self.sigma_stop:g} (Tweedie)", tile(truncated)))
    panels.append((f"generated, full ({self.config.sample.num_steps} Heun steps)", tile(full)))
    save_png(path, panels, " · ".join(filter(None, [f"step {step}", self.config.data.name,
                                                    objective])))
    if writer is not None:
      imgs = {"samples/full": tile(full)[None]}
      if truncated is not None:
        imgs["samples/truncated"] = tile(truncated)[None]
      writer.write_images(step, imgs)
    logging.info("Wrote sample grid %s", path)
    return path
