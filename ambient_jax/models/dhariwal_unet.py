"""DhariwalUNet: EDM's re-implementation of ADM (Dhariwal & Nichol 2021), in Flax NNX.

Same blocks, names, parameter shapes and init as NVlabs/edm `training/networks.py`
`DhariwalUNet`, with NHWC activations: adaptive (scale, shift) group norm, 64 channels
per attention head, parameter-free box resampling on the skip path.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.models.layers import (Conv2d, Dtype, GroupNorm, Init, LabelDropout, Linear,
                                       PositionalEmbedding, UNetBlock)


class DhariwalUNet(nnx.Module):
  """ADM backbone F(x, c_noise, labels): [B,H,W,Cin], [B] -> [B,H,W,Cout] in `dtype`.

  img_resolution must be divisible by 2**(len(channel_mult)-1). Attention heads have
  `channels_per_head` channels (EDM: 64); a block narrower than that gets no attention,
  exactly as in EDM.
  """

  def __init__(self, img_resolution: int, in_channels: int, out_channels: int, *,
               label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
               channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
               num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
               dropout: float = 0.10, label_dropout: float = 0.0, channels_per_head: int = 64,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.label_dim, self.augment_dim, self.dtype = label_dim, augment_dim, dtype
    emb_channels = model_channels * channel_mult_emb
    init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
    init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_kw = dict(emb_channels=emb_channels, channels_per_head=channels_per_head,
                    dropout=dropout, init=init, init_zero=init_zero, **kw)

    # Mapping: c_noise [B] (+ augment labels, labels) -> emb [B, emb_channels].
    self.map_noise = PositionalEmbedding(model_channels)
    self.map_augment = (Linear(augment_dim, model_channels, bias=False, init=init_zero, **kw)
                        if augment_dim else None)
    self.map_layer0 = Linear(model_channels, emb_channels, init=init, **kw)
    self.map_layer1 = Linear(emb_channels, emb_channels, init=init, **kw)
    self.map_label = (Linear(label_dim, emb_channels, bias=False,
                             init=Init("kaiming_normal", weight=math.sqrt(label_dim)), **kw)
                      if label_dim else None)
    self.label_dropout = LabelDropout(label_dropout, rngs=rngs) if label_dim else None

    # Encoder.
    enc = {}
    cout = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels * mult
        enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, init=init, **kw)
      else:
        enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kw)
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        enc[f"{res}x{res}_block{idx}"] = UNetBlock(
            cin, cout, attention=(res in attn_resolutions), **block_kw)
    skips = [m.out_channels for m in enc.values()]

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
            cin, cout, attention=(res in attn_resolutions), **block_kw)
    self.enc, self.dec = nnx.Dict(enc), nnx.Dict(dec)
    self.enc_order, self.dec_order = tuple(enc), tuple(dec)  # static execution order.
    self.out_norm = GroupNorm(cout, dtype=dtype, param_dtype=param_dtype)
    self.out_conv = Conv2d(cout, out_channels, 3, init=init_zero, **kw)

  def embed(self, noise_labels: jax.Array, class_labels: jax.Array | None,
            augment_labels: jax.Array | None) -> jax.Array:
    """[B] noise labels (+ [B, augment_dim], [B, label_dim]) -> [B, emb_channels]."""
    emb = self.map_noise(noise_labels)
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = jax.nn.silu(self.map_layer0(emb))
    emb = self.map_layer1(emb)
    if self.map_label is not None:
      emb = emb + self.map_label(self.label_dropout(class_labels.astype(jnp.float32)))
    return jax.nn.silu(emb)

  def __call__(self, x: jax.Array, noise_labels: jax.Array,
               class_labels: jax.Array | None = None,
               augment_labels: jax.Array | None = None) -> jax.Array:
    emb = self.embed(noise_labels, class_labels, augment_labels)
    x = x.astype(self.dtype)
    skips = []
    for name in self.enc_order:
      block = self.enc[name]
      x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for name in self.dec_order:
      block = self.dec[name]
      if x.shape[-1] != block.in_channels:
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = block(x, emb)
    return self.out_conv(jax.nn.silu(self.out_norm(x)))
