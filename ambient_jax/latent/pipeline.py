"""A whole diffusers folder (SD 1.x/2.x or SDXL) as one object: load, prompt, sample, save.

    pipe = load_pretrained("stable-diffusion-xl-base-1.0")       # the user's diffusers folder
    cond, uncond = pipe.encode_prompts(["a cat"], negative=[""])
    images = pipe.generate(["a cat"], jax.random.split(key, 1), num_steps=25, guidance_scale=5)

The folder's `model_index.json` names the components; each is read from its own folder
(`unet/`, `vae/`, `text_encoder[_2]/`, `tokenizer[_2]/`, `scheduler/`) with safetensors
and numpy only. `generate` equals diffusers' pipeline with the Euler scheduler on the same
initial latents (tests/test_latent_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax.latent import clip, guidance, prompts, tokenizer, unet, vae, weights
from ambient_jax.latent.schedule import NoiseSchedule

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                   "scheduler")


@dataclasses.dataclass
class LatentPipeline:
  """The loaded components; `text_encoders` / `tokenizers` hold one (SD) or two (SDXL)."""
  unet: Any
  vae: Any
  text_encoders: tuple
  tokenizers: tuple
  schedule: NoiseSchedule
  configs: dict  # component name -> its config dict (model_index.json under "model_index")

  @property
  def is_sdxl(self) -> bool:
    return len(self.text_encoders) == 2

  @property
  def latent_scale_factor(self) -> int:
    """Image pixels per latent pixel: 2^(VAE levels − 1) (8 for SD / SDXL)."""
    return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

  def encode_text(self, texts: Sequence[str], size: tuple[int, int]) -> guidance.Conditioning:
    """Prompts -> the UNet's conditioning, as diffusers' `encode_prompt`; `size` (H, W) of
    the images for SDXL's time ids (original = target size, no crop)."""
    ids = [jnp.asarray(tok(list(texts))) for tok in self.tokenizers]
    if not self.is_sdxl:
      return guidance.Conditioning(prompts.encode_prompt_sd(ids[0], self.text_encoders[0]))
    context, pooled = prompts.encode_prompt_sdxl(*ids, *self.text_encoders)
    time_ids = np.tile(prompts.sdxl_time_ids(size, (0, 0), size)[None], (len(texts), 1))
    return guidance.Conditioning(context, pooled, jnp.asarray(time_ids))

  def encode_prompts(self, texts: Sequence[str], negative: Optional[Sequence[str]] = None,
                     size: Optional[tuple[int, int]] = None):
    """(cond, uncond) for classifier-free guidance. Without `negative`, SDXL folders whose
    model_index says force_zeros_for_empty_prompt (the base model) use zeros, others ""."""
    size = size or self.default_size
    cond = self.encode_text(texts, size)
    if negative is None and self.configs["model_index"].get("force_zeros_for_empty_prompt",
                                                            self.is_sdxl) and self.is_sdxl:
      return cond, guidance.Conditioning(jnp.zeros_like(cond.context),
                                         jnp.zeros_like(cond.text_embeds), cond.time_ids)
    return cond, self.encode_text([""] * len(texts) if negative is None else negative, size)

  @property
  def default_size(self) -> tuple[int, int]:
    side = int(self.configs["unet"].get("sample_size") or 64) * self.latent_scale_factor
    return side, side

  def initial_latents(self, keys: jax.Array, size: tuple[int, int]) -> jax.Array:
    """N(0, I) latents [B, H/f, W/f, C], one key per image (batch-size invariant); C is the
    VAE's latent_channels (an inpainting UNet takes more input channels than that)."""
    f = self.latent_scale_factor
    shape = (size[0] // f, size[1] // f, self.configs["vae"].get("latent_channels", 4))
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)

  def generate(self, texts: Sequence[str], keys: jax.Array, *, num_steps: int = 25,
               guidance_scale: float = 5.0, negative: Optional[Sequence[str]] = None,
               size: Optional[tuple[int, int]] = None, latents: Optional[jax.Array] = None,
               decode: bool = True) -> jax.Array:
    """Guided Euler sampling: images [B, H, W, 3] in [0, 1] (or x0 latents if not decode)."""
    size = size or self.default_size
    cond, uncond = self.encode_prompts(texts, negative, size)
    if latents is None:
      latents = self.initial_latents(keys, size)
    denoise = guidance.guided_denoiser(self.unet, self.schedule, cond, uncond, guidance_scale)
    z0 = guidance.sample_latents(denoise, self.schedule, latents, num_steps)
    if not decode:
      return z0
    return jnp.clip(self.vae.from_latents(z0).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def load_pretrained(folder: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None,
                    unet_shardings: Any = None, variant: str | None = None,
                    with_unet: bool = True, attention: str = "auto") -> LatentPipeline:
  """Loads a diffusers Stable Diffusion / SDXL folder (`model_index.json` + components).

  `param_dtype` (default float32) and `dtype` (compute, default = param_dtype) apply to
  the UNet and the text encoders; the VAE computes in float32 when its config says
  force_upcast. `unet_shardings`: see `weights.load_params` (e.g. FSDP over a mesh).
  with_unet=False: everything but the UNet (unet=None; latent preparation never runs it,
  and SDXL's is 10 GB in float32), and the folder needs no unet/. `attention`: the UNet's
  and the VAE's attention implementation (latent.attention.ATTENTION_IMPLEMENTATIONS).
  """
  folder = os.fspath(folder)
  index = weights.read_json(os.path.join(folder, "model_index.json"))
  sdxl = "text_encoder_2" in index and index["text_encoder_2"] and index["text_encoder_2"][0]
  names = SDXL_COMPONENTS if sdxl else tuple(n for n in SDXL_COMPONENTS if not n.endswith("_2"))
  names = names if with_unet else tuple(n for n in names if n != "unet")
  missing = [n for n in names if not os.path.isdir(os.path.join(folder, n))]
  if missing:
    raise FileNotFoundError(f"{folder}: component folder(s) {missing} are missing (the folder "
                            f"must hold {list(names)}, as diffusers' save_pretrained writes).")
  param_dtype = param_dtype or jnp.float32
  path = lambda n: os.path.join(folder, n)
  unet_module, unet_config = None, None
  if with_unet:
    unet_module, unet_config = unet.load_unet(path("unet"), dtype=dtype, param_dtype=param_dtype,
                                              shardings=unet_shardings, variant=variant,
                                              attention=attention)
  vae_module, vae_config = vae.load_vae(path("vae"), dtype=param_dtype, attention=attention)
  encoders, configs = [], {"model_index": index, "vae": vae_config}
  if with_unet:
    configs["unet"] = unet_config
  for name in [n for n in names if n.startswith("text_encoder")]:
    module, configs[name] = clip.load_text_encoder(path(name), dtype=param_dtype, variant=variant)
    encoders.append(module)
  tokenizers = tuple(tokenizer.load_tokenizer(path(n)) for n in names if n.startswith("tokenizer"))
  configs["scheduler"] = weights.read_json(os.path.join(path("scheduler"), "scheduler_config.json"))
  return LatentPipeline(unet_module, vae_module, tuple(encoders), tokenizers,
                        NoiseSchedule.from_config(configs["scheduler"]), configs)


def save_pretrained(pipe: LatentPipeline, folder: str | os.PathLike, *, source: str | None = None,
                    dtype: Any = None) -> None:
  """Writes the pipeline as a diffusers folder. Tokenizer and scheduler folders are copied
  from `source` (the folder it was loaded from); the networks are written from memory."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(pipe.configs["model_index"], f, indent=2)
  unet.save_unet(pipe.unet, os.path.join(folder, "unet"), dtype=dtype)
  vae.save_vae(pipe.vae, pipe.configs["vae"], os.path.join(folder, "vae"), dtype=dtype)
  for i, encoder in enumerate(pipe.text_encoders):
    name = "text_encoder" + ("_2" if i else "")
    clip.save_text_encoder(encoder, pipe.configs[name], os.path.join(folder, name), dtype=dtype)
  if source is not None:
    for name in os.listdir(source):
      if name.startswith(("tokenizer", "scheduler")):
        shutil.copytree(os.path.join(source, name), os.path.join(folder, name), dirs_exist_ok=True)
