"""Prompt conditioning as diffusers' pipelines compute it from the CLIP text encoders.

SD 1.x (`StableDiffusionPipeline.encode_prompt`): the UNet's context is the encoder's
last_hidden_state [B, 77, 768]. SDXL (`StableDiffusionXLPipeline.encode_prompt`): the
context is both encoders' penultimate hidden states side by side [B, 77, 768 + 1280], the
added `text_embeds` are the second encoder's projection [B, 1280], and the added `time_ids`
are (original size, crop top-left, target size) [6]. Classifier-free guidance's negative
prompt goes through the same functions; SDXL's config `force_zeros_for_empty_prompt`
(True for the base model) means that an absent negative prompt is zeros instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax.latent.clip import CLIPTextModel, CLIPTextModelWithProjection


def encode_prompt_sd(ids: jax.Array, encoder: CLIPTextModel, *,
                     clip_skip: int | None = None) -> jax.Array:
  """ids [B, 77] -> context [B, 77, C]: last_hidden_state, or with `clip_skip` the
  hidden state that many layers earlier passed through final_layer_norm (diffusers')."""
  out = encoder(ids)
  if clip_skip is None:
    return out.last_hidden_state
  return encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def encode_prompt_sdxl(ids_1: jax.Array, ids_2: jax.Array, enc_1: CLIPTextModel,
                       enc_2: CLIPTextModelWithProjection, *,
                       clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
  """SDXL's conditioning from the two tokenizers' ids [B, 77] each.

  Returns (prompt_embeds [B, 77, C1 + C2] = both encoders' hidden_states[-2] (or
  [-(clip_skip + 2)]) concatenated, pooled [B, projection_dim] = the second's text_embeds).
  """
  index = -(2 if clip_skip is None else clip_skip + 2)
  out_1, out_2 = enc_1(ids_1), enc_2(ids_2)
  if out_2.text_embeds is None:
    raise ValueError("encode_prompt_sdxl: the second encoder must be a "
                     "CLIPTextModelWithProjection (its text_embeds are SDXL's pooled prompt).")
  embeds = jnp.concatenate([out_1.hidden_states[index], out_2.hidden_states[index]], axis=-1)
  return embeds, out_2.text_embeds


def sdxl_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int],
                  target_size: Sequence[int]) -> np.ndarray:
  """SDXL's micro-conditioning [6] float32: (height, width) of the original image, the crop's
  (top, left), the target (height, width). Generation uses original = target =
  (1024, 1024) and crop (0, 0); fine-tuning passes each image's own values."""
  values = [*original_size, *crops_coords_top_left, *target_size]
  if len(values) != 6:
    raise ValueError(f"sdxl_time_ids: expected three (a, b) pairs, got {values}.")
  return np.asarray(values, np.float32)
