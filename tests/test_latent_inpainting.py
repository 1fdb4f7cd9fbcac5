"""Inpainting (latent/inpainting.py) against diffusers' StableDiffusionXLInpaintPipeline,
prompt to pixels, on a tiny random SDXL inpainting folder that diffusers writes itself
(the tiny SDXL parts of tests/latent_reference.py with a 9-channel UNet, every parameter
perturbed).

diffusers draws the VAE posterior samples of the image and of the masked image from its
generator; ours takes the posterior mean, so the reference is run with diffusers'
`retrieve_latents` switched to the mean ("argmax"). Its only other draw is then ε, which
a generator seeded here reproduces (strength < 1) or `latents=` supplies (strength = 1).
"""

import dataclasses
import os

import diffusers
import jax
import numpy as np
import pytest
import torch

from ambient_jax.latent import configs, inpainting, pipeline
from tests.latent_reference import (TINY_POOLED, TINY_UNETS, nchw_to_nhwc, nhwc_to_nchw, perturb_,
                                    relative_error, save_tiny_sdxl_pipeline)

TOL = 1e-4
SIZE = 32
PROMPTS = ["a photograph of an astronaut riding a horse", "Portrait, oil painting!"]
INPAINT_MODULE = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint"


def save_tiny_inpainting_folder(root):
  """(diffusers StableDiffusionXLInpaintPipeline, its saved folder): the tiny SDXL parts of
  `save_tiny_sdxl_pipeline` (whose own folder stays beside it) and a perturbed 9-channel UNet."""
  base, _ = save_tiny_sdxl_pipeline(root)
  torch.manual_seed(5)
  unet = perturb_(diffusers.UNet2DConditionModel(**{
      **TINY_UNETS["sdxl"], "in_channels": inpainting.INPAINT_CHANNELS, "out_channels": 4}), 5)
  pipe = diffusers.StableDiffusionXLInpaintPipeline(
      vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
      tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
      scheduler=diffusers.EulerDiscreteScheduler.from_config(configs.bundled_config("sdxl", "scheduler")),
      add_watermarker=False)
  pipe.save_pretrained(root / "inpaint")
  return pipe, str(root / "inpaint")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(diffusers pipeline, folder, our pipeline loaded from it)."""
  ref, path = save_tiny_inpainting_folder(tmp_path_factory.mktemp("inpaint"))
  return ref, path, pipeline.load_pretrained(path)


def inputs(batch: int = 2):
  """Images [B, 32, 32, 3] in [0, 1] (smooth, so the VAE sees structure) and box masks."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
  images = np.stack([np.stack([np.sin(3 * xx + b), np.cos(2 * yy - b), xx * yy], -1)
                     for b in range(batch)]) * 0.4 + 0.5
  images = np.clip(images + 0.05 * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
  masks = np.zeros((batch, SIZE, SIZE), np.float32)
  masks[0, 4:20, 8:28] = 1
  masks[1, 12:31, 2:15] = 1
  return images, masks


def diffusers_inpaint(ref, images, masks, monkeypatch, **kw):
  """The reference pipeline's images [B, H, W, 3] in [0, 1], VAE posterior means."""
  monkeypatch.setattr(f"{INPAINT_MODULE}.retrieve_latents",
                      lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
  with torch.no_grad():
    return ref(PROMPTS, image=nhwc_to_nchw(images), mask_image=torch.from_numpy(masks),
               height=SIZE, width=SIZE, output_type="np", **kw).images


def test_strength_below_one_matches_diffusers_with_its_generator(folder, monkeypatch):
  """The attack's settings (guidance 8, strength 0.99: the first step skipped, the image
  latents noised to the second σ), 4 steps; ε = the generator's one draw."""
  ref, _, ours = folder
  images, masks = inputs()
  expected = diffusers_inpaint(ref, images, masks, monkeypatch, num_inference_steps=4,
                               guidance_scale=8.0, strength=0.99,
                               generator=torch.Generator().manual_seed(3))
  side = SIZE // ours.latent_scale_factor
  noise = nchw_to_nhwc(torch.randn((2, 4, side, side), generator=torch.Generator().manual_seed(3)))
  got = inpainting.inpaint(ours, images * 2 - 1, masks, PROMPTS, None, num_steps=4,
                           guidance_scale=8.0, strength=0.99, noise=noise) / 2 + 0.5
  assert got.shape == expected.shape == (2, SIZE, SIZE, 3)
  assert relative_error(got, expected) < TOL


def test_full_strength_with_a_negative_prompt_matches_diffusers(folder, monkeypatch):
  """strength 1: pure noise × init_noise_sigma (diffusers' `latents=`), every step run (3
  steps: the compile of the 3 steps run at strength 0.99 of 4 serves)."""
  ref, _, ours = folder
  images, masks = inputs()
  keys = jax.random.split(jax.random.key(7), 2)
  latents = np.asarray(ours.initial_latents(keys, (SIZE, SIZE)))
  negative = ["blurry", ""]
  expected = diffusers_inpaint(ref, images, masks, monkeypatch, num_inference_steps=3,
                               guidance_scale=8.0, strength=1.0, negative_prompt=negative,
                               latents=nhwc_to_nchw(latents))
  got = inpainting.inpaint(ours, images * 2 - 1, masks, PROMPTS, keys, num_steps=3,
                           guidance_scale=8.0, strength=1.0, negative=negative) / 2 + 0.5
  assert relative_error(got, expected) < TOL


@pytest.mark.parametrize("aesthetics", [False, True])
def test_time_ids_are_diffusers(folder, aesthetics):
  """(H, W, 0, 0, H, W), or (H, W, 0, 0, 6.0 | 2.5) for a requires_aesthetics_score folder,
  as diffusers' `_get_add_time_ids` on a UNet whose added embedding takes that many."""
  import types
  ref, _, ours = folder
  count = 5 if aesthetics else 6
  fake = types.SimpleNamespace(
      config=types.SimpleNamespace(requires_aesthetics_score=aesthetics),
      unet=types.SimpleNamespace(config=ref.unet.config, add_embedding=types.SimpleNamespace(
          linear_1=types.SimpleNamespace(in_features=TINY_POOLED + 4 * count))))
  size = (48, 64)
  expected = type(ref)._get_add_time_ids(fake, size, (0, 0), size, 6.0, 2.5, size, (0, 0), size,
                                         torch.float32, TINY_POOLED)
  index = {**ours.configs["model_index"], "requires_aesthetics_score": aesthetics}
  got = inpainting.inpainting_time_ids(
      dataclasses.replace(ours, configs={**ours.configs, "model_index": index}), size, 3)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g, np.tile(e.numpy(), (3, 1)))


@pytest.mark.parametrize("steps,strength", [(20, 0.99), (20, 1.0), (7, 0.5), (10, 0.25), (3, 0.34)])
def test_start_index_is_diffusers_get_timesteps(folder, steps, strength):
  ref = folder[0]
  ref.scheduler.set_timesteps(steps)
  timesteps, count = ref.get_timesteps(steps, strength, "cpu")
  assert inpainting.start_index(steps, strength) == steps - count
  np.testing.assert_array_equal(ref.scheduler.timesteps[steps - count:], timesteps)


def test_a_plain_text_to_image_folder_is_refused_in_one_line(folder):
  with pytest.raises(inpainting.NotInpaintingModelError, match="no UNet"):
    inpainting.check_inpainting(dataclasses.replace(folder[2], unet=None))
  text_to_image = os.path.join(os.path.dirname(folder[1]), "sdxl")  # the tiny SDXL parts
  with pytest.raises(inpainting.NotInpaintingModelError, match="in_channels=4"):
    inpainting.inpaint(pipeline.load_pretrained(text_to_image), np.zeros((1, 32, 32, 3)),
                       np.zeros((1, 32, 32)), [""], jax.random.split(jax.random.key(0), 1))


# --- The attack (evaluation/inpainting.py) on the tiny inpainting folder and a tiny DINOv2. ---


@pytest.fixture(scope="module")
def tiny_dinov2():
  import transformers
  from flax import nnx
  from ambient_jax.metrics import dinov2
  config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     patch_size=14, image_size=224, layerscale_value=0.5).to_dict()
  return dinov2.Dinov2Model(config, rngs=nnx.Rngs(0))


def _pooled_directly(tokens, masks_224):
  """The official script's pooling, loop for loop: a patch counts if any of its pixels is
  masked (`get_patch_mask`), its pre-norm tokens summed, then L2-normalised."""
  out = []
  for t, m in zip(tokens, masks_224):
    keep = [np.any(m[i * 14:(i + 1) * 14, j * 14:(j + 1) * 14]) for i in range(16) for j in range(16)]
    f = (t[1:].astype(np.float64) * np.asarray(keep, np.float64)[:, None]).sum(0)
    out.append(f / np.linalg.norm(f))
  return np.stack(out)


def test_attack_similarities_equal_a_direct_computation(folder, tiny_dinov2):
  """Source and nearest similarities of the attack = the pooling done by hand on the
  tokens of its own outputs; the nearest search over [sources, outputs] finds each output
  itself (similarity 1); the UNet call is the parity test's (one compile)."""
  from ambient_jax.evaluation import inpainting as attack
  from ambient_jax.metrics.dinov2_features import dinov2_tokens
  _, _, ours = folder
  images, masks = inputs()
  images = images * 2 - 1
  masks[1] = 0
  masks[1, :3, :3] = 1  # < 10 % of the image: not kept
  result = attack.inpainting_attack(ours, images, PROMPTS, masks, dinov2=tiny_dinov2, seed=0,
                                    indices=[5, 9], num_steps=4, batch_size=2)
  masks_224 = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None], size=(224, 224),
                                              mode="nearest")[:, 0].numpy()
  src = _pooled_directly(dinov2_tokens(tiny_dinov2, images), masks_224)
  out_tokens = dinov2_tokens(tiny_dinov2, result.inpainted)
  got = _pooled_directly(out_tokens, masks_224)
  np.testing.assert_allclose(result.source_similarity, np.sum(src * got, 1), atol=1e-5)
  assert result.kept.tolist() == [True, False]
  dataset = np.concatenate([dinov2_tokens(tiny_dinov2, images), out_tokens])
  patches = attack.masked_tokens.patch_mask(attack.masked_tokens.resize_mask(masks, 224))
  sim, idx = attack.masked_tokens.nearest_pooled_similarity(out_tokens, dataset, patches,
                                                            block_size=3)
  np.testing.assert_allclose(sim, 1.0, atol=1e-5)
  assert idx.tolist() == [2, 3]
  near = attack.inpainting_attack(ours, images, PROMPTS, masks, dinov2=tiny_dinov2, seed=0,
                                  indices=[5, 9], num_steps=4, batch_size=2,
                                  dataset_tokens=dataset[:2])
  np.testing.assert_allclose(near.inpainted, result.inpainted)  # keys from (seed, index) only
  np.testing.assert_allclose(near.nearest_similarity[0],
                             max(np.sum(_pooled_directly(dataset[:2], masks_224[:1].repeat(2, 0))
                                        * got[0], 1)), atol=1e-5)
  summary = near.summary
  assert summary["count"] == 2 and summary["kept"] == 1
  assert summary["source"]["mean_similarity"] == pytest.approx(float(result.source_similarity[0]))
  assert set(summary["nearest"]) >= {"frac_sim_above_0.9", "frac_sim_above_0.95",
                                     "frac_sim_above_0.99", "self_match"}


class _Folder:
  """What `attack_image_folder` reads of a `data.image_folder.ImageFolder`."""

  def __init__(self, images, captions):
    self.images, self.captions = images, captions
    self.names, self.resolution = [f"{i}.png" for i in range(len(images))], images.shape[1]

  def chunks(self, size, count=None):
    count = len(self.images) if count is None else count
    for start in range(0, count, size):
      idx = np.arange(start, min(start + size, count))
      yield idx, self.images[idx]


def test_folder_attack_is_chunk_invariant_and_reads_the_mask_folder(folder, tiny_dinov2, tmp_path):
  """Three images in chunks of 2 with masks from PNG files = one call on all three; the
  grid holds the kept images, most similar first."""
  from PIL import Image
  from ambient_jax.evaluation import inpainting as attack
  _, _, ours = folder
  images, masks = inputs(3)
  images = images * 2 - 1
  masks[2, 2:30, 2:30] = 1
  for i, m in enumerate(masks):
    Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
  captions = PROMPTS + ["a third one"]
  result, grid = attack.attack_image_folder(
      ours, _Folder(images, captions), dinov2=tiny_dinov2, seed=1, mask_folder=str(tmp_path),
      chunk_size=2, grid_size=2, num_steps=4, batch_size=2, log=lambda m: None)
  whole = attack.inpainting_attack(ours, images, captions, masks, dinov2=tiny_dinov2, seed=1,
                                   num_steps=4, batch_size=2, dataset_tokens=attack.dinov2_tokens(
                                       tiny_dinov2, images))
  np.testing.assert_allclose(result.source_similarity, whole.source_similarity, atol=1e-5)
  np.testing.assert_allclose(result.nearest_similarity, whole.nearest_similarity, atol=1e-3)
  assert result.inpainted is None and result.kept.all()
  order = np.argsort(-whole.nearest_similarity)[:2]
  np.testing.assert_array_equal(grid["indices"], order)
  np.testing.assert_allclose(grid["inpainted"], whole.inpainted[order], atol=1e-5)
  assert grid["masked"].shape == (2, SIZE, SIZE, 3)
