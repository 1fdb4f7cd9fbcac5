"""diffusers' AutoencoderKL (the SD / SDXL VAE) in Flax NNX, built from its `config.json`.

Parameter paths are diffusers' checkpoint names (`encoder.down_blocks.0.resnets.1.conv1.weight`,
`encoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, ...), so `load_vae` reads a
user's `vae/` folder with numpy alone and `save_vae` writes one that diffusers'
`AutoencoderKL.from_pretrained` opens. Images are NHWC [B, H, W, in_channels] in [-1, 1];
latents [B, H/f, W/f, latent_channels] with f = 2^(len(block_out_channels) − 1) (8 for SD).

The diffusion side should use `to_latents` / `from_latents`, which apply the config's
`scaling_factor` (SD 0.18215, SDXL 0.13025) and `shift_factor`, and never the constants.

`force_upcast`: diffusers' pipelines run a VAE whose config says `force_upcast: true` in
float32 when the pipeline is in float16 (the SD / SDXL VAEs overflow in half precision at
high resolution). Here: when such a VAE is built with a 16-bit `dtype` (bfloat16 or
float16), it computes in float32 instead: every layer casts its (possibly 16-bit)
parameters and its input to float32, and `encode` / `decode` / `to_latents` /
`from_latents` return float32 arrays. Parameters stay in `param_dtype` (so loading in
bfloat16 still halves memory). `module.dtype` is the dtype it actually computes in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.latent import weights
from ambient_jax.latent.attention import Attention
from ambient_jax.latent.layers import Conv2d, GroupNorm
from ambient_jax.latent.resnet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any

# AutoencoderKL.__init__'s arguments and defaults (diffusers 0.42.1): the keys a config may hold.
DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
EPS = 1e-6  # diffusers' Encoder / Decoder fix every GroupNorm's eps to this.
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp.
HALF = (jnp.bfloat16, jnp.float16)


def vae_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config with diffusers' defaults filled in; ValueError naming any key whose value
  this implementation does not reproduce (or that AutoencoderKL does not know)."""
  def bad(key, why):
    raise ValueError(f"vae config: {key}={config.get(key)!r} is not supported ({why}).")
  unknown = sorted(k for k in config if k not in DEFAULTS and not k.startswith("_"))
  if unknown:
    raise ValueError(f"vae config: unknown key(s) {unknown} (AutoencoderKL takes {sorted(DEFAULTS)}).")
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    bad("_class_name", "only AutoencoderKL is implemented")
  c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  levels = len(c["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if any(t != block for t in c[key]):
      bad(key, f"every block must be {block}")
    if len(c[key]) != levels:
      bad(key, f"needs one entry per block_out_channels ({levels})")
  for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
    if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
      bad(key, "a positive integer is needed")
  if not levels or any(not isinstance(n, int) or n < 1 for n in c["block_out_channels"]):
    bad("block_out_channels", "positive integers are needed")
  if c["act_fn"] not in ("silu", "swish"):
    bad("act_fn", "the SD / SDXL VAEs use silu; other activations are not implemented")
  for key in ("latents_mean", "latents_std"):
    if c[key] is not None:
      bad(key, "per-channel latent statistics are not implemented; use scaling/shift_factor")
  if not isinstance(c["scaling_factor"], (int, float)) or c["scaling_factor"] <= 0:
    bad("scaling_factor", "a positive number is needed")
  if c["shift_factor"] is not None and not isinstance(c["shift_factor"], (int, float)):
    bad("shift_factor", "None or a number is needed")
  for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
    if not isinstance(c[key], bool):
      bad(key, "true or false is needed")
  return c


class UNetMidBlock2D(nnx.Module):
  """resnets.0 → (attentions.0 → resnets.1): the VAE's middle, [B, h, w, C] -> same.

  The attention is one head over all h·w positions with GroupNorm and a residual, as
  diffusers builds it (`attention_head_dim` = channels); `add_attention=False` drops it.
  `attention`: its dot_product_attention implementation (h·w tokens: 16,384 for a 1024²
  image, a 1 GiB float32 score map per example with "xla").
  """

  def __init__(self, channels: int, *, groups: int, add_attention: bool, act: str, dtype: Dtype,
               param_dtype: Dtype, attention: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, eps=EPS, act=act, **kw)
                             for _ in range(2)])
    self.attentions = nnx.List(
        [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                   eps=EPS, residual_connection=True, attention=attention, **kw)]
        if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class ResnetStack(nnx.Module):
  """`num_layers` resnets (in -> out), then the level's resampler when it has one: the
  common body of DownEncoderBlock2D and UpDecoderBlock2D."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
               act: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                           groups=groups, eps=EPS, act=act, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)
                             for i in range(num_layers)])

  def resamplers(self) -> nnx.List:
    raise NotImplementedError

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.resamplers()):
      x = layer(x)
    return x


class DownEncoderBlock2D(ResnetStack):
  """Resnets, then `downsamplers.0` (stride 2, asymmetric pad) unless the last level:
  [B, H, W, in] -> [B, H/2, W/2, out] (or [B, H, W, out])."""

  def __init__(self, in_channels: int, out_channels: int, *, add_downsample: bool, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs, **kw):
    super().__init__(in_channels, out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
    self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs)]
                                 if add_downsample else [])

  def resamplers(self) -> nnx.List:
    return self.downsamplers


class UpDecoderBlock2D(ResnetStack):
  """Resnets, then `upsamplers.0` (nearest ×2, conv) unless the last level:
  [B, H, W, in] -> [B, 2H, 2W, out] (or [B, H, W, out])."""

  def __init__(self, in_channels: int, out_channels: int, *, add_upsample: bool, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs, **kw):
    super().__init__(in_channels, out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
    self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, param_dtype=param_dtype,
                                           rngs=rngs)] if add_upsample else [])

  def resamplers(self) -> nnx.List:
    return self.upsamplers


class Encoder(nnx.Module):
  """conv_in → down_blocks → mid_block → GroupNorm → SiLU → conv_out:
  [B, H, W, in] -> [B, H/f, W/f, 2·latent] (mean and log-variance, not yet quant_conv'd)."""

  def __init__(self, c: Mapping[str, Any], *, dtype: Dtype, param_dtype: Dtype,
               attention: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels, groups, act = c["block_out_channels"], c["norm_num_groups"], c["act_fn"]
    self.conv_in = Conv2d(c["in_channels"], channels[0], 3, padding=1, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], n, num_layers=c["layers_per_block"],
                           groups=groups, add_downsample=i < len(channels) - 1, act=act, **kw)
        for i, n in enumerate(channels)])
    self.mid_block = UNetMidBlock2D(channels[-1], groups=groups, act=act, attention=attention,
                                    add_attention=c["mid_block_add_attention"], **kw)
    self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, dtype=dtype, param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[-1], 2 * c["latent_channels"], 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  """conv_in → mid_block → up_blocks (layers_per_block + 1 resnets each) → GroupNorm → SiLU →
  conv_out: [B, h, w, latent] -> [B, h·f, w·f, out]."""

  def __init__(self, c: Mapping[str, Any], *, dtype: Dtype, param_dtype: Dtype,
               attention: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels, groups, act = c["block_out_channels"][::-1], c["norm_num_groups"], c["act_fn"]
    self.conv_in = Conv2d(c["latent_channels"], channels[0], 3, padding=1, **kw)
    self.mid_block = UNetMidBlock2D(channels[0], groups=groups, act=act, attention=attention,
                                    add_attention=c["mid_block_add_attention"], **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], n, num_layers=c["layers_per_block"] + 1,
                         groups=groups, add_upsample=i < len(channels) - 1, act=act, **kw)
        for i, n in enumerate(channels)])
    self.conv_norm_out = GroupNorm(groups, channels[-1], eps=EPS, dtype=dtype, param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[-1], c["out_channels"], 3, padding=1, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder of SD / SDXL: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.

  `config`: the vae/config.json dict (validated by `vae_config`). `dtype`: the requested
  compute dtype; a 16-bit one becomes float32 when the config says force_upcast (see the
  module docstring). `param_dtype`: the dtype parameters are stored in. `attention`: the
  mid-blocks' attention implementation (latent.attention's ATTENTION_IMPLEMENTATIONS).
  """

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, attention: str = "auto", rngs: nnx.Rngs):
    c = vae_config(config)
    if c["force_upcast"] and jnp.dtype(dtype) in [jnp.dtype(d) for d in HALF]:
      dtype = jnp.float32
    self.dtype = dtype
    self.scaling_factor, self.shift_factor = float(c["scaling_factor"]), float(c["shift_factor"] or 0.0)
    self.latent_channels = c["latent_channels"]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    latent = c["latent_channels"]
    self.encoder = Encoder(c, attention=attention, **kw)
    self.decoder = Decoder(c, attention=attention, **kw)
    self.quant_conv = nnx.data(Conv2d(2 * latent, 2 * latent, 1, **kw) if c["use_quant_conv"] else None)
    self.post_quant_conv = nnx.data(Conv2d(latent, latent, 1, **kw) if c["use_post_quant_conv"] else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, in] in [-1, 1] -> posterior (mean, logvar), each [B, h, w, latent];
    logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  @staticmethod
  def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """mean + exp(logvar / 2) · ε with ε ~ N(0, I) from `key`: [B, h, w, latent]."""
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent] -> images [B, h·f, w·f, out] (about [-1, 1])."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def to_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images [B, H, W, in] -> the diffusion model's latents (sample − shift) · scaling_factor.

    `key`: draws the sample from the posterior (as diffusers' training scripts do);
    None takes the posterior mean (deterministic).
    """
    mean, logvar = self.encode(x)
    sample = mean if key is None else self.sample_posterior(mean, logvar, key)
    return (sample - self.shift_factor) * self.scaling_factor

  def from_latents(self, z: jax.Array) -> jax.Array:
    """The diffusion model's latents [B, h, w, latent] -> images: decode(z / scaling + shift)."""
    return self.decode(z.astype(self.dtype) / self.scaling_factor + self.shift_factor)


def load_vae(folder: str | os.PathLike, *, dtype: Dtype = None, shardings: Any = None,
             attention: str = "auto") -> tuple[AutoencoderKL, dict[str, Any]]:
  """A diffusers `vae/` folder -> (AutoencoderKL, its config.json dict).

  `dtype`: parameters are loaded straight into it and the model computes in it (float32
  when None, or when it is 16-bit and the config says force_upcast). `shardings`: as
  `weights.load_params` (a pytree or a callable on the abstract parameter state).
  Nothing is allocated before the weights are read (the module is built abstractly).
  `attention`: as AutoencoderKL's.
  """
  config = weights.read_config(folder)
  dtype = dtype or jnp.float32
  abstract = weights.build_abstract(
      lambda: AutoencoderKL(config, dtype=dtype, param_dtype=dtype, attention=attention,
                            rngs=nnx.Rngs(0)))
  module = weights.load_params(abstract, weights.open_checkpoint(folder), component=f"vae ({folder})",
                               dtype=dtype, shardings=shardings)
  return module, config


def save_vae(module: AutoencoderKL, config: Mapping[str, Any], folder: str | os.PathLike, *,
             dtype: Dtype = None) -> None:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` (parameters cast to
  `dtype` when given), a folder diffusers' AutoencoderKL.from_pretrained opens."""
  weights.save_component(module, folder, {**config, "_class_name": "AutoencoderKL"},
                         stem="diffusion_pytorch_model", dtype=dtype)
