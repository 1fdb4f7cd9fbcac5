"""Latent sampling: ours equals diffusers step for step, and a whole SDXL folder generates
the same images as diffusers' StableDiffusionXLPipeline.

The UNet is wrapped as a VE denoiser D(x, σ) (ambient_jax.latent.schedule) and sampled by
the project's own `sampling.euler_sampler`; the references are diffusers'
EulerDiscreteScheduler loop and pipeline, on tiny random components diffusers and
transformers build themselves.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ambient_jax import sampling
from ambient_jax.latent import configs, guidance, pipeline, schedule, unet
from tests.latent_reference import (nchw_to_nhwc, relative_error, save_tiny_sdxl_pipeline,
                                    save_tiny_unet, unet_inputs)

TOL = 1e-4


def test_schedule_matches_diffusers():
  """ᾱ, σ lists, inference timesteps and the initial scale, for every spacing."""
  for spacing in ("leading", "linspace", "trailing"):
    cfg = {**configs.bundled_config("sdxl", "scheduler"), "timestep_spacing": spacing}
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ours = schedule.NoiseSchedule.from_config(cfg)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)  # float32 rounding
    ref.set_timesteps(25)
    np.testing.assert_allclose(ours.inference_timesteps(25), ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.inference_sigmas(25), ref.sigmas.numpy(), rtol=1e-5)
    sig = ours.inference_sigmas(25)
    assert abs(ours.init_noise_sigma(sig) - float(ref.init_noise_sigma)) < 1e-4 * float(ref.init_noise_sigma)
    # t(σ) inverts the scheduler's interpolation exactly at its (fractional) timesteps.
    np.testing.assert_allclose(ours.timestep(jnp.asarray(sig[:-1])), ref.timesteps.numpy(), atol=2e-3)
  np.testing.assert_allclose(ours.vp_sigmas[[100, 500, 800]], [0.325, 0.851, 0.981], atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ve_denoiser_inverts_the_forward_process(prediction):
  """A model that outputs the true ε (or v) gives D(x, σ) = x0 exactly, at any σ."""
  sched = schedule.NoiseSchedule.from_config(
      {**configs.bundled_config("sdxl", "scheduler"), "prediction_type": prediction})
  key = jax.random.key(0)
  x0, eps = jax.random.normal(key, (3, 4, 4, 2)), jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  sigma = jnp.array([0.1, 0.7, 3.0])
  s = sigma[:, None, None, None]
  x = x0 + s * eps                               # VE
  vp_scale = 1 / jnp.sqrt(s**2 + 1)
  def oracle(x_t, t):
    del t
    if prediction == "epsilon":
      return jnp.broadcast_to(eps, x_t.shape)
    return vp_scale * eps - s * vp_scale * x0   # v = √ᾱ ε − √(1−ᾱ) x0
  denoise = schedule.ve_denoiser(oracle, sched)
  np.testing.assert_allclose(denoise(x, sigma), x0, atol=1e-5)


@pytest.fixture(scope="module")
def sdxl_unet(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sched") / "unet"
  reference = save_tiny_unet(folder, "sdxl")
  return reference, unet.load_unet(str(folder))[0]


def test_guided_euler_sampling_matches_diffusers_step_for_step(sdxl_unet):
  """The diffusers loop (scale_model_input, UNet, CFG on ε, scheduler.step) vs
  `sampling.euler_sampler` over our guided VE denoiser; every intermediate latent."""
  reference, ours = sdxl_unet
  sched_cfg = configs.bundled_config("sdxl", "scheduler")
  scheduler = diffusers.EulerDiscreteScheduler.from_config(sched_cfg)
  sched = schedule.NoiseSchedule.from_config(sched_cfg)
  inputs, negative = unet_inputs("sdxl", seed=0), unet_inputs("sdxl", seed=1)
  latents = inputs["x"]
  g, steps = 4.0, 6
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(latents).permute(0, 3, 1, 2) * scheduler.init_noise_sigma
  trajectory = []
  cond_t = lambda d: (torch.from_numpy(d["context"]), {"text_embeds": torch.from_numpy(d["text_embeds"]),
                                                       "time_ids": torch.from_numpy(d["time_ids"])})
  (ctx_c, add_c), (ctx_u, add_u) = cond_t(inputs), cond_t(negative)
  with torch.no_grad():
    for t in scheduler.timesteps:
      model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
      out = reference(model_in, t, torch.cat([ctx_u, ctx_c]),
                      added_cond_kwargs={k: torch.cat([add_u[k], add_c[k]]) for k in add_c}).sample
      u, c = out.chunk(2)
      x = scheduler.step(u + g * (c - u), t, x).prev_sample
      trajectory.append(nchw_to_nhwc(x))
  as_cond = lambda d: guidance.Conditioning(jnp.asarray(d["context"]), jnp.asarray(d["text_embeds"]),
                                            jnp.asarray(d["time_ids"]))
  denoise = guidance.guided_denoiser(ours, sched, as_cond(inputs), as_cond(negative), g)
  sigmas = sched.inference_sigmas(steps)
  x_ours = jnp.asarray(latents) * sched.init_noise_sigma(sigmas)
  one_step = jax.jit(lambda x, pair: sampling.euler_sampler(denoise, x, pair))  # compiled once
  for k in range(steps):
    x_ours = one_step(x_ours, sigmas[k:k + 2])
    err = relative_error(x_ours, trajectory[k])
    assert err < TOL, f"step {k}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
  """A complete tiny SDXL diffusers folder written by diffusers' own save_pretrained."""
  return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl_pipe"))


PROMPTS = ["a photograph of an astronaut riding a horse", "Portrait, oil painting!"]


def _diffusers_images(pipe, latents, negative, steps=5, g=5.0):
  # np.array: a writable copy (torch warns on a read-only view of a jax array)
  generator_free = torch.from_numpy(np.array(latents)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=g,
                height=32, width=32, latents=generator_free, output_type="np").images


@pytest.mark.parametrize("negative", [["blurry", ""], None])
def test_whole_sdxl_folder_generates_diffusers_images(sdxl_folder, negative):
  """Text -> tokenizers -> both encoders -> guided 5-step Euler -> VAE decode, from the
  folder alone, equals StableDiffusionXLPipeline (None: zeros as the negative, SDXL's
  force_zeros_for_empty_prompt)."""
  pipe_ref, folder = sdxl_folder
  ours = pipeline.load_pretrained(folder)
  assert ours.is_sdxl and ours.default_size == (32, 32)
  keys = jax.random.split(jax.random.key(0), len(PROMPTS))
  latents = ours.initial_latents(keys, (32, 32))
  images = ours.generate(PROMPTS, keys, num_steps=5, guidance_scale=5.0, negative=negative)
  reference = _diffusers_images(pipe_ref, latents, negative)
  assert images.shape == reference.shape == (2, 32, 32, 3)
  assert relative_error(images, reference) < TOL


def test_save_pretrained_roundtrip_opens_in_diffusers(sdxl_folder, tmp_path):
  pipe_ref, folder = sdxl_folder
  ours = pipeline.load_pretrained(folder)
  pipeline.save_pretrained(ours, tmp_path / "copy", source=folder)
  reopened = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "copy"))
  latents = ours.initial_latents(jax.random.split(jax.random.key(1), 2), (32, 32))
  assert relative_error(_diffusers_images(reopened, latents, ["", ""], steps=3),
                        _diffusers_images(pipe_ref, latents, ["", ""], steps=3)) < TOL


def test_missing_component_is_named(sdxl_folder, tmp_path):
  import shutil
  _, folder = sdxl_folder
  shutil.copytree(folder, tmp_path / "broken")
  shutil.rmtree(tmp_path / "broken" / "vae")
  with pytest.raises(FileNotFoundError, match="vae"):
    pipeline.load_pretrained(tmp_path / "broken")


def test_truncated_sigmas_cut_at_the_stop_level_and_refuse_an_empty_cut():
  from ambient_jax.training.latent_grid import truncated_sigmas
  full = np.array([10.0, 5.0, 2.0, 0.0], np.float32)
  np.testing.assert_array_equal(truncated_sigmas(full, 3.0), [10.0, 5.0, 3.0])
  with pytest.raises(ValueError, match="more sampling steps"):
    truncated_sigmas(full, 11.0)
