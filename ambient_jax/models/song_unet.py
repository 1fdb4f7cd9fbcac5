"""SongUNet: EDM's re-implementation of DDPM++ and NCSN++ (Song et al. 2021), in Flax NNX.

Same blocks, names, parameter shapes and init as NVlabs/edm `training/networks.py`
`SongUNet`, with NHWC activations. DDPM++ = positional noise embedding, standard encoder,
box (1,1) resampling; NCSN++ = Fourier embedding (channel_mult_noise 2), residual encoder,
(1,3,3,1) resampling (see `registry.ARCH_PRESETS`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.models.layers import (Conv2d, Dtype, FourierEmbedding, GroupNorm, Init,
                                       LabelDropout, Linear, PositionalEmbedding, UNetBlock)


class SongUNet(nnx.Module):
  """U-Net backbone F(x, c_noise, labels): [B,H,W,Cin], [B] -> [B,H,W,Cout] in `dtype`.

  Every level halves the resolution (img_resolution >> level), so img_resolution must be
  divisible by 2**(len(channel_mult)-1). Attention runs at resolutions in
  `attn_resolutions` (encoder blocks, last decoder block of a level) and always in the
  first decoder block at the lowest resolution, as in EDM.
  """

  def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *,
               label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
               channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
               num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
               dropout: float = 0.10, label_dropout: float = 0.0,
               embedding_type: str = "positional", channel_mult_noise: int = 1,
               encoder_type: str = "standard", decoder_type: str = "standard",
               resample_filter: Sequence[float] = (1, 1), dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if embedding_type not in ("fourier", "positional"):
      raise ValueError(f"embedding_type must be 'fourier' or 'positional'; got {embedding_type!r}")
    if encoder_type not in ("standard", "skip", "residual"):
      raise ValueError(f"encoder_type must be standard|skip|residual; got {encoder_type!r}")
    if decoder_type not in ("standard", "skip"):
      raise ValueError(f"decoder_type must be standard|skip; got {decoder_type!r}")
    self.label_dim, self.augment_dim, self.dtype = label_dim, augment_dim, dtype
    emb_channels = model_channels * channel_mult_emb
    noise_channels = model_channels * channel_mult_noise
    init = Init("xavier_uniform")
    init_zero = Init("xavier_uniform", weight=1e-5)
    init_attn = Init("xavier_uniform", weight=math.sqrt(0.2))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_kw = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                    skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                    resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
                    init_attn=init_attn, **kw)

    # Mapping: c_noise [B] (+ labels, augment labels) -> emb [B, emb_channels].
    if embedding_type == "positional":
      self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
    else:
      self.map_noise = FourierEmbedding(noise_channels, rngs=rngs)
    self.map_label = Linear(label_dim, noise_channels, init=init, **kw) if label_dim else None
    self.label_dropout = LabelDropout(label_dropout, rngs=rngs) if label_dim else None
    self.map_augment = (Linear(augment_dim, noise_channels, bias=False, init=init, **kw)
                        if augment_dim else None)
    self.map_layer0 = Linear(noise_channels, emb_channels, init=init, **kw)
    self.map_layer1 = Linear(emb_channels, emb_channels, init=init, **kw)

    # Encoder. Names follow EDM; `aux` entries act on the input-image pyramid.
    enc = {}
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels
        enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, init=init, **kw)
      else:
        enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kw)
        if encoder_type == "skip":
          enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                resample_filter=resample_filter, **kw)
          enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, init=init, **kw)
        if encoder_type == "residual":
          enc[f"{res}x{res}_aux_residual"] = Conv2d(
              caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True,
              init=init, **kw)
          caux = cout
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        enc[f"{res}x{res}_block{idx}"] = UNetBlock(
            cin, cout, attention=(res in attn_resolutions), **block_kw)
    skips = [m.out_channels for name, m in enc.items() if "aux" not in name]

    # Decoder.
    dec = {}
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kw)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kw)
      else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kw)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(
            cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kw)
      if decoder_type == "skip" or level == 0:
        if decoder_type == "skip" and level < len(channel_mult) - 1:
          dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                              resample_filter=resample_filter, **kw)
        dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6, dtype=dtype,
                                                 param_dtype=param_dtype)
        dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init=init_zero, **kw)

    self.enc, self.dec = nnx.Dict(enc), nnx.Dict(dec)
    self.enc_order, self.dec_order = tuple(enc), tuple(dec)  # static execution order.

  def embed(self, noise_labels: jax.Array, class_labels: jax.Array | None,
            augment_labels: jax.Array | None) -> jax.Array:
    """[B] noise labels (+ [B, label_dim], [B, augment_dim]) -> [B, emb_channels]."""
    emb = self.map_noise(noise_labels)
    cos, sin = jnp.split(emb, 2, axis=1)
    emb = jnp.concatenate([sin, cos], axis=1)  # EDM swaps sin/cos for SongUNet.
    if self.map_label is not None:
      labels = self.label_dropout(class_labels.astype(jnp.float32))
      emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = jax.nn.silu(self.map_layer0(emb))
    return jax.nn.silu(self.map_layer1(emb))

  def __call__(self, x: jax.Array, noise_labels: jax.Array,
               class_labels: jax.Array | None = None,
               augment_labels: jax.Array | None = None) -> jax.Array:
    emb = self.embed(noise_labels, class_labels, augment_labels)
    x = x.astype(self.dtype)

    skips, aux = [], x
    for name in self.enc_order:
      block = self.enc[name]
      if "aux_down" in name:
        aux = block(aux)
      elif "aux_skip" in name:
        x = skips[-1] = x + block(aux)
      elif "aux_residual" in name:
        x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
      else:
        x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        skips.append(x)

    aux, tmp = None, None
    for name in self.dec_order:
      block = self.dec[name]
      if "aux_up" in name:
        aux = block(aux)
      elif "aux_norm" in name:
        tmp = block(x)
      elif "aux_conv" in name:
        tmp = block(jax.nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[-1] != block.in_channels:
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(x, emb)
    return aux
