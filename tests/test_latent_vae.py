"""AutoencoderKL parity with diffusers 0.42.1: tiny random VAEs built by diffusers itself.

Each reference is perturbed (tests/latent_reference.perturb_) and saved with
`save_pretrained`; ambient_jax loads the folder as a user's checkpoint. Encode (mean,
logvar), the posterior sample with the same noise, the scaled latents and decode agree
within 1e-4 relative (fp32). Nothing is downloaded.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ambient_jax.runtime import sharding
from ambient_jax.latent import safetensors_io, weights
from ambient_jax.latent.vae import AutoencoderKL, load_vae, save_vae, vae_config
from tests.latent_reference import nchw_to_nhwc, nhwc_to_nchw, perturb_, relative_error

diffusers = pytest.importorskip("diffusers")

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "ambient_jax", "latent", "model_configs")

TINY = {  # SD-1.5-shaped: 2 levels, mid-block attention.
    "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 2, "norm_num_groups": 4,
    "latent_channels": 4, "sample_size": 16, "scaling_factor": 0.18215,
}
VARIANTS = {
    "sd15": TINY,
    # SDXL-shaped: 4 levels (the last two of equal width), layers_per_block 2.
    "sdxl": {**TINY, "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 32, "scaling_factor": 0.13025},
    # The optional parts switched the other way: shift_factor, no quant convs, no attention.
    "plain": {**TINY, "layers_per_block": 1, "shift_factor": 0.1159, "use_quant_conv": False,
              "use_post_quant_conv": False, "mid_block_add_attention": False},
}
TOLERANCE = 1e-4


def reference(config, seed=0):
  torch.manual_seed(seed)
  return perturb_(diffusers.AutoencoderKL(**config), seed=seed)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  """(name, torch reference, our model loaded from its save_pretrained folder, folder)."""
  folder = str(tmp_path_factory.mktemp(f"vae_{request.param}"))
  torch_vae = reference(VARIANTS[request.param])
  torch_vae.save_pretrained(folder)
  ours, _ = load_vae(folder)
  return request.param, torch_vae, ours, folder


def images(size, batch=2, seed=0):
  return np.tanh(np.random.RandomState(seed).randn(batch, size, size, 3)).astype(np.float32)


def torch_outputs(torch_vae, x, noise):
  """diffusers' posterior (mean, logvar, mean + std·noise), the scaled latents, decode."""
  cfg = torch_vae.config
  with torch.no_grad():
    dist = torch_vae.encode(nhwc_to_nchw(x)).latent_dist
    sample = dist.mean + dist.std * nhwc_to_nchw(noise)
    latents = (sample - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    decoded = torch_vae.decode(latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample
  return {"mean": nchw_to_nhwc(dist.mean), "logvar": nchw_to_nhwc(dist.logvar),
          "sample": nchw_to_nhwc(sample), "latents": nchw_to_nhwc(latents),
          "decoded": nchw_to_nhwc(decoded)}


def our_outputs(vae, x, key):
  mean, logvar = vae.encode(jnp.asarray(x))
  latents = vae.to_latents(jnp.asarray(x), key)
  return {"mean": mean, "logvar": logvar, "sample": vae.sample_posterior(mean, logvar, key),
          "latents": latents, "decoded": vae.from_latents(latents)}


def test_parity_with_diffusers(pair):
  name, torch_vae, ours, _ = pair
  size = torch_vae.config.sample_size
  x, key = images(size), jax.random.key(3)
  got = our_outputs(ours, x, key)
  noise = jax.random.normal(key, got["mean"].shape, jnp.float32)  # sample_posterior's ε
  want = torch_outputs(torch_vae, x, noise)
  errors = {k: relative_error(got[k], want[k]) for k in want}
  assert max(errors.values()) < TOLERANCE, (name, errors)
  assert got["decoded"].shape == x.shape and got["mean"].dtype == jnp.float32


def test_save_vae_opens_in_diffusers(pair, tmp_path):
  """Our save -> diffusers from_pretrained: identical tensors, so identical outputs."""
  _, torch_vae, ours, folder = pair
  save_vae(ours, vae_config(json.load(open(os.path.join(folder, "config.json")))), tmp_path)
  reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
  want, got = torch_vae.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  assert all(torch.equal(want[k], got[k]) for k in want)
  x = images(torch_vae.config.sample_size, batch=1, seed=1)
  with torch.no_grad():
    decoded = reloaded.decode(reloaded.encode(nhwc_to_nchw(x)).latent_dist.mean).sample
  assert relative_error(ours.decode(ours.encode(jnp.asarray(x))[0]), nchw_to_nhwc(decoded)) < TOLERANCE
  assert reloaded.config.scaling_factor == torch_vae.config.scaling_factor
  assert reloaded.config.shift_factor == torch_vae.config.shift_factor


def test_sharded_load_matches(pair):
  """Loading straight into FSDP shards (8 fake devices) gives the same model."""
  _, _, ours, folder = pair
  mesh = sharding.make_mesh(type("Mesh", (), {"data": 1, "fsdp": 8})())
  sharded, _ = load_vae(folder, shardings=lambda state: sharding.param_sharding(mesh, state, min_size=64))
  kernel = sharded.decoder.conv_in.weight[...]
  assert len(kernel.sharding.device_set) == 8
  z = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  np.testing.assert_allclose(sharded.decode(z), ours.decode(z), rtol=1e-5, atol=1e-5)


def test_force_upcast_computes_in_float32(tmp_path):
  """A force_upcast VAE asked for bfloat16 stores bf16 parameters but computes in float32;
  without force_upcast it computes in bfloat16."""
  torch_vae = reference(TINY)
  x = jnp.asarray(images(16, batch=1))
  for upcast in (True, False):
    folder = str(tmp_path / str(upcast))
    torch_vae.register_to_config(force_upcast=upcast)
    torch_vae.save_pretrained(folder)
    vae, _ = load_vae(folder, dtype=jnp.bfloat16)
    assert vae.decoder.conv_in.weight[...].dtype == jnp.bfloat16
    mean, _ = vae.encode(x)
    want = jnp.float32 if upcast else jnp.bfloat16
    assert vae.dtype == want and mean.dtype == want and vae.from_latents(mean).dtype == want
  full, _ = load_vae(folder)
  upcast_vae, _ = load_vae(str(tmp_path / "True"), dtype=jnp.bfloat16)
  # Only the parameters were rounded to bf16: close to fp32, far closer than a bf16 run.
  assert relative_error(upcast_vae.encode(x)[0], full.encode(x)[0]) < 2e-2


def test_missing_or_misshapen_tensor_is_named(tmp_path):
  reference(TINY).save_pretrained(tmp_path)
  path = os.path.join(tmp_path, "diffusion_pytorch_model.safetensors")
  file = safetensors_io.SafetensorsFile(path)
  tensors = {name: np.array(file[name]) for name in file}
  del file
  missing = "encoder.mid_block.attentions.0.to_q.weight"
  wrong = "decoder.up_blocks.1.resnets.2.conv1.weight"
  del tensors[missing]
  tensors[wrong] = tensors[wrong][:, :4]
  safetensors_io.save_file(tensors, path, {"format": "pt"})
  with pytest.raises(ValueError) as err:
    load_vae(tmp_path)
  assert missing in str(err.value) and wrong in str(err.value)


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),  # one entry for two levels
    ("act_fn", "gelu"), ("latents_mean", [0.0] * 4), ("force_upcast", "yes"),
    ("layers_per_block", 0), ("use_tiling_everywhere", True),
])
def test_unsupported_config_names_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    weights.build_abstract(lambda: AutoencoderKL({**TINY, key: value}, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name,scaling", [("sdxl", 0.13025), ("sd15", 0.18215)])
def test_real_config_parameter_count(name, scaling):
  """The released SDXL / SD-1.5 VAE configs: 83,653,863 parameters, counted abstractly."""
  with open(os.path.join(CONFIGS, name, "vae.json")) as f:
    config = json.load(f)
  vae = weights.build_abstract(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(vae, nnx.Param)))
  assert count == 83_653_863
  assert vae.scaling_factor == scaling and vae.shift_factor == 0.0
