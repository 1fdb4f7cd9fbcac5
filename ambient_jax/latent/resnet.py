"""diffusers' ResnetBlock2D, Downsample2D and Upsample2D, shared by the VAE and the UNet.

Parameter names as diffusers (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
`conv_shortcut`; the resamplers' `conv`), so a block's NNX paths are its checkpoint names.
Activations are NHWC [B, H, W, C]; the time embedding is [B, temb_channels].
Only what SD / SDXL use is built: pre-norm GroupNorm, time_embedding_norm="default" (the
projected embedding is added after conv1), conv resamplers (no FIR / avg-pool variants).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax.latent.layers import Conv2d, GroupNorm, Linear, activation

Dtype = Any


class ResnetBlock2D(nnx.Module):
  """GroupNorm → act → conv3x3 (+ temb) → GroupNorm → act → conv3x3, plus the shortcut.

  `temb_channels` set: `time_emb_proj` Linear(temb_channels, out) on act(temb), added to the
  conv1 output (the UNet); None: no time embedding (the VAE). A 1x1 `conv_shortcut` maps
  the input when in != out channels. The sum is divided by `output_scale_factor`.
  Dropout (diffusers' `dropout`, 0 in SD / SDXL) holds no parameters and is not built.
  """

  def __init__(self, in_channels: int, out_channels: int | None = None, *,
               temb_channels: int | None = None, groups: int = 32, eps: float = 1e-6,
               output_scale_factor: float = 1.0, act: str = "silu", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    out_channels = out_channels or in_channels
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.in_channels, self.out_channels = in_channels, out_channels
    self.output_scale_factor = output_scale_factor
    self.act = activation(act)
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
    self.time_emb_proj = nnx.data(Linear(temb_channels, out_channels, rngs=rngs, **kw)
                                  if temb_channels is not None else None)
    self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
    self.conv_shortcut = nnx.data(Conv2d(in_channels, out_channels, 1, rngs=rngs, **kw)
                                  if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, in], temb [B, temb_channels] or None -> [B, H, W, out]."""
    h = self.conv1(self.act(self.norm1(x)))
    if self.time_emb_proj is not None:
      if temb is None:
        raise ValueError("ResnetBlock2D was built with temb_channels but called without temb.")
      h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
    h = self.conv2(self.act(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
    out = shortcut + h
    return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nnx.Module):
  """Conv 3x3 with stride 2, [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, out] (`conv`).

  `padding=1`: symmetric padding (the UNet). `padding=0`: diffusers pads (0, 1, 0, 1),
  i.e. one zero row at the bottom and one column at the right, then convolves unpadded
  (the VAE encoder).
  """

  def __init__(self, channels: int, *, out_channels: int | None = None, padding: int = 1,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if padding == 0 else padding
    self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=pad,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """torch's F.interpolate(mode="nearest") on [B, H, W, C]: ×2, or to `size` (H', W').

  Source index floor(i · H / H'), as torch computes it (it matters only for sizes that
  are not multiples, which the UNet asks for when its input is not divisible).
  """
  if size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  index = lambda n_in, n_out: np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * np.float32(
      n_in / n_out)).astype(np.int32), n_in - 1)  # float32 scale, as torch's kernel
  return x[:, index(x.shape[1], size[0])][:, :, index(x.shape[2], size[1])]


class Upsample2D(nnx.Module):
  """Nearest ×2 (or to `output_size`), then conv 3x3 padding 1 (`conv`):
  [B, H, W, C] -> [B, 2H, 2W, out]."""

  def __init__(self, channels: int, *, out_channels: int | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, out_channels or channels, 3, padding=1, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    return self.conv(upsample_nearest(x, output_size))
