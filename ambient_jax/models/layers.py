"""Building blocks shared by the U-Nets and the MLP, NHWC throughout.

Parameter layout follows NVlabs/edm `training/networks.py` one-to-one (same shapes up to
the NCHW -> NHWC / OIHW -> HWIO transposition, same init), so the parameter counts match
EDM's exactly. Resampling filters are compile-time constants (EDM: buffers), never params.

Mixed precision: every layer stores float32 parameters (`param_dtype`) and computes in
`dtype` (float32 or bfloat16); group-norm statistics and attention softmax run in float32.
Every parameter carries logical axis names (see `ambient_jax.models` docstring).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# Logical axis names (documented in ambient_jax/models/__init__.py).
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
DENSE_AXES = ("embed_in", "embed_out")
DENSE_BIAS_AXES = ("embed_out",)
NORM_AXES = ("norm",)

_NHWC = ("NHWC", "HWIO", "NHWC")


class Buffer(nnx.Variable):
  """Fixed, non-trainable state saved with the model (EDM's `register_buffer`)."""


class Init(NamedTuple):
  """Weight init as in EDM: `mode` scaled by `weight` (kernel) and `bias` (bias)."""
  mode: str = "kaiming_normal"
  weight: float = 1.0
  bias: float = 0.0


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  """A Param carrying logical axis names; sharding is applied later by the trainer."""
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


@functools.partial(jax.jit, static_argnames=("size", "normal", "dtype"))
def _draw_flat(key: jax.Array, size: int, normal: bool, dtype: Dtype) -> jax.Array:
  return (jax.random.normal(key, (size,), dtype) if normal
          else jax.random.uniform(key, (size,), dtype, -1.0, 1.0))


@functools.partial(jax.jit, static_argnames=("shape",))
def _scale_reshape(u: jax.Array, scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return (scale * u[:math.prod(shape)]).astype(u.dtype).reshape(shape)


def _draw(key: jax.Array, scale: float, shape: tuple[int, ...], normal: bool,
          dtype: Dtype) -> jax.Array:
  """scale · (N(0,1) or U(-1,1)) of `shape`.

  Drawn as a 1-D vector whose length is rounded up to a power of two (>= 1024), then
  cut and reshaped: eager construction then compiles the (slow-to-compile) threefry
  kernel once per size bucket instead of once per parameter shape (~4x faster on CPU).
  """
  bucket = max(1024, 1 << (math.prod(shape) - 1).bit_length())
  u = _draw_flat(key, bucket, normal, dtype)
  return _scale_reshape(u, jnp.asarray(scale, dtype), shape)


def init_array(key: jax.Array, shape: Sequence[int], mode: str, fan_in: int, fan_out: int,
               dtype: Dtype = jnp.float32, gain: float = 1.0) -> jax.Array:
  """EDM's `weight_init` times `gain`: xavier/kaiming, uniform/normal, explicit fans."""
  scales = {"xavier_uniform": math.sqrt(6 / (fan_in + fan_out)),
            "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
            "kaiming_uniform": math.sqrt(3 / fan_in),
            "kaiming_normal": math.sqrt(1 / fan_in)}
  if mode not in scales:
    raise ValueError(f"init mode must be one of {sorted(scales)}; got {mode!r}.")
  return _draw(key, scales[mode] * gain, tuple(shape), mode.endswith("normal"), jnp.dtype(dtype))


def _weight_and_bias(rngs: nnx.Rngs, w_shape, b_shape, init: Init, fan_in: int, fan_out: int,
                     w_axes, b_axes, use_bias: bool, param_dtype: Dtype):
  w = init_array(rngs.params(), w_shape, init.mode, fan_in, fan_out, param_dtype, init.weight)
  if not use_bias:
    return _param(w, w_axes), None
  if init.bias == 0:
    b = jnp.zeros(b_shape, param_dtype)
  else:
    b = init_array(rngs.params(), b_shape, init.mode, fan_in, fan_out, param_dtype, init.bias)
  return _param(w, w_axes), _param(b, b_axes)


def dropout_stream(rngs: nnx.Rngs) -> nnx.RngStream:
  """A new RNG stream tagged "dropout", seeded from `rngs`' dropout (or default) stream.

  The explicit tag makes `nnx.reseed(model, dropout=key)` reach every dropout layer even
  when the model was built with a plain `nnx.Rngs(seed)` (whose fallback stream is
  tagged "default").
  """
  if "dropout" not in rngs and "default" not in rngs:
    raise ValueError("dropout > 0 needs an nnx.Rngs with a 'dropout' (or default) stream, "
                     "e.g. nnx.Rngs(params=0, dropout=1) or nnx.Rngs(0).")
  return nnx.RngStream(rngs["dropout"](), tag="dropout")


def next_key(stream: nnx.RngStream) -> jax.Array:
  """`stream()`: the key fold_in(key, count), and count + 1, written without an index.

  flax's own `count[...] += 1` compares the new value's sharding with the old one; on a
  tracer that raises an AttributeError whose message walks the whole trace so far, so a
  traced step's cost grew with (dropout calls) × (trace length): 12 of 26 s of tracing
  ffhq64's smoke step (`benchmarks/trace_cost.py`). Same keys, same counts.
  """
  stream.count._check_can_update()  # pylint: disable=protected-access
  count = stream.count.get_value()
  key = jax.random.fold_in(stream.key.get_value(), count)
  stream.count.set_value(count + 1)
  return key


def dropout(layer: nnx.Dropout, x: jax.Array) -> jax.Array:
  """layer(x), its mask key drawn by `next_key` (no draw when the layer is off)."""
  if layer.deterministic or layer.rate == 0 or layer.rngs is None:
    return layer(x)
  return layer(x, rngs=next_key(layer.rngs))


# ----------------------------------------------------------------------------- resampling


def resample_kernel(resample_filter: Sequence[float]) -> np.ndarray:
  """Separable 2-D FIR filter f fᵀ / (Σf)², e.g. (1, 1) -> box, (1, 3, 3, 1) -> bilinear."""
  f = np.asarray(resample_filter, np.float32)
  return np.outer(f, f) / f.sum() ** 2


def _depthwise(x: jax.Array, kernel: np.ndarray, channels: int) -> jax.Array:
  return jnp.tile(jnp.asarray(kernel, x.dtype)[:, :, None, None], (1, 1, 1, channels))


def downsample2d(x: jax.Array, resample_filter: Sequence[float], padding: int) -> jax.Array:
  """Depthwise FIR filter + stride 2: [B, H, W, C] -> [B, H/2, W/2, C] (EDM's `down`)."""
  b, h, w, c = x.shape
  if tuple(resample_filter) == (1, 1) and padding == 0 and h % 2 == 0 and w % 2 == 0:
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)  # 2x2 box.
  k = resample_kernel(resample_filter)
  return jax.lax.conv_general_dilated(
      x, _depthwise(x, k, c), window_strides=(2, 2), padding=[(padding, padding)] * 2,
      dimension_numbers=_NHWC, feature_group_count=c)


def upsample2d(x: jax.Array, resample_filter: Sequence[float], padding: int) -> jax.Array:
  """Transposed depthwise FIR filter (gain 4), stride 2: [B, H, W, C] -> [B, 2H, 2W, C]."""
  b, h, w, c = x.shape
  if tuple(resample_filter) == (1, 1) and padding == 0:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour.
  k = resample_kernel(resample_filter) * 4
  pad = k.shape[0] - 1 - padding  # transposed conv == dilated input, flipped kernel.
  return jax.lax.conv_general_dilated(
      x, _depthwise(x, k[::-1, ::-1], c), window_strides=(1, 1), padding=[(pad, pad)] * 2,
      lhs_dilation=(2, 2), dimension_numbers=_NHWC, feature_group_count=c)


# ----------------------------------------------------------------------------- layers


class Linear(nnx.Module):
  """Dense layer: [..., in_features] -> [..., out_features]; kernel [in, out]."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
               init: Init = Init(), dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
    self.kernel, self.bias = _weight_and_bias(
        rngs, (in_features, out_features), (out_features,), init, in_features, out_features,
        DENSE_AXES, DENSE_BIAS_AXES, bias, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv2d(nnx.Module):
  """kxk convolution with optional 2x up/down FIR resampling: [B,H,W,Cin] -> [B,H',W',Cout].

  `kernel=0` gives a parameter-free resampler (EDM's ADM skip path). `fused_resample`
  reorders resampling and convolution around the kernel as EDM does (NCSN++ residual
  encoder). Kernel layout HWIO [k, k, in, out].
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True,
               up: bool = False, down: bool = False,
               resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
               init: Init = Init(), dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if up and down:
      raise ValueError("Conv2d: `up` and `down` are mutually exclusive.")
    self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
    self.up, self.down, self.fused_resample, self.dtype = up, down, fused_resample, dtype
    self.resample_filter = tuple(float(v) for v in resample_filter)
    weight = b = None
    if kernel:
      fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
      weight, b = _weight_and_bias(
          rngs, (kernel, kernel, in_channels, out_channels), (out_channels,), init, fan_in,
          fan_out, CONV_AXES, CONV_BIAS_AXES, bias, param_dtype)
    self.weight, self.bias = nnx.data(weight), nnx.data(b)

  def _conv(self, x: jax.Array, padding: int) -> jax.Array:
    w = self.weight[...].astype(self.dtype)
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=_NHWC)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    f = self.resample_filter
    w_pad = self.kernel_size // 2
    f_pad = (len(f) - 1) // 2 if (self.up or self.down) else 0
    if self.fused_resample and self.up and self.weight is not None:
      x = upsample2d(x, f, max(f_pad - w_pad, 0))
      x = self._conv(x, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and self.weight is not None:
      x = self._conv(x, w_pad + f_pad)
      x = downsample2d(x, f, 0)
    else:
      if self.up:
        x = upsample2d(x, f, f_pad)
      if self.down:
        x = downsample2d(x, f, f_pad)
      if self.weight is not None:
        x = self._conv(x, w_pad)
    if self.bias is not None:
      x = x + self.bias[...].astype(self.dtype)
    return x


class GroupNorm(nnx.Module):
  """Group normalisation over [B, ..., C]; statistics in float32, output in `dtype`.

  Uses min(num_groups, C // min_channels_per_group) groups, as EDM does.
  """

  def __init__(self, num_channels: int, *, num_groups: int = 32, min_channels_per_group: int = 4,
               eps: float = 1e-5, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.num_groups = min(num_groups, num_channels // min_channels_per_group)
    if self.num_groups < 1 or num_channels % self.num_groups:
      raise ValueError(
          f"GroupNorm: {num_channels} channels cannot be split into "
          f"min({num_groups}, {num_channels}//{min_channels_per_group}) equal groups; choose "
          f"model_channels / channel_mult so every width is a multiple of its group count.")
    self.eps, self.dtype = eps, dtype
    self.scale = _param(jnp.ones((num_channels,), param_dtype), NORM_AXES)
    self.bias = _param(jnp.zeros((num_channels,), param_dtype), NORM_AXES)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Per-channel means over positions first (a reduction along contiguous NHWC rows), then
    # over each group's channels; two passes (mean, then variance about it). XLA:CPU runs
    # this ~3-4x faster, forward and backward, than one reduction over (positions,
    # channels-in-group) of [B, N, groups, C/groups]. Then one fused multiply-add per element.
    shape, c = x.shape, x.shape[-1]
    xf = x.astype(jnp.float32).reshape(shape[0], -1, c)  # [B, N, C]
    mean = self._group_mean(xf.mean(axis=1))  # [B, C]: its group's mean, per channel
    var = self._group_mean(jnp.square(xf - mean[:, None, :]).mean(axis=1))
    scale = jax.lax.rsqrt(var + self.eps) * self.scale[...]
    shift = self.bias[...] - mean * scale
    return (xf * scale[:, None, :] + shift[:, None, :]).reshape(shape).astype(self.dtype)

  def _group_mean(self, per_channel: jax.Array) -> jax.Array:
    """[B, C] -> [B, C]: the mean over each group's channels, repeated for its channels."""
    b, c = per_channel.shape
    g = self.num_groups
    return jnp.repeat(per_channel.reshape(b, g, c // g).mean(axis=-1), c // g, axis=-1)


# ----------------------------------------------------------------------------- embeddings


class PositionalEmbedding(nnx.Module):
  """Sinusoidal embedding [B] -> [B, C] = [cos(x·f), sin(x·f)], f_i = max_positions^(-i/n)."""

  def __init__(self, num_channels: int, *, max_positions: int = 10000, endpoint: bool = False):
    self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

  def __call__(self, x: jax.Array) -> jax.Array:
    half = self.num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if self.endpoint else 0))
    freqs = (1.0 / self.max_positions) ** freqs
    x = x.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nnx.Module):
  """Random Fourier features [B] -> [B, C]; frequencies ~ N(0, scale²) are a Buffer."""

  def __init__(self, num_channels: int, *, scale: float = 16.0, rngs: nnx.Rngs):
    self.freqs = Buffer(jax.random.normal(rngs.params(), (num_channels // 2,)) * scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)[:, None] * (2 * np.pi * self.freqs[...])[None, :]
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class LabelDropout(nnx.Module):
  """Classifier-free-guidance label dropout: zeroes a whole label row with prob `rate`.

  Unlike `nnx.Dropout` it does not rescale. Active only in training mode
  (`deterministic=False`, toggled by `model.train()` / `model.eval()`); RNG stream "dropout".
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate, self.deterministic = rate, False
    self.rngs = dropout_stream(rngs) if rate > 0 else None

  def __call__(self, labels: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0:
      return labels
    keep = jax.random.uniform(next_key(self.rngs), (labels.shape[0], 1)) >= self.rate
    return labels * keep.astype(labels.dtype)

  def set_view(self, deterministic: bool | None = None):
    """Lets `nnx.view(model, deterministic=...)` switch this layer like `nnx.Dropout`."""
    if deterministic is not None:
      self.deterministic = deterministic


# ----------------------------------------------------------------------------- U-Net block


class Attention(nnx.Module):
  """Multi-head self-attention over all pixels, pre-norm: [B,H,W,C] -> [B,H,W,C] (no residual).

  Softmax in float32. The qkv channel layout matches EDM (head, channel, q/k/v).
  """

  def __init__(self, channels: int, num_heads: int, *, eps: float, init_qkv: Init,
               init_proj: Init, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f"Attention: {channels} channels not divisible by {num_heads} heads.")
    self.num_heads = num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = GroupNorm(channels, eps=eps, dtype=dtype, param_dtype=param_dtype)
    self.qkv = Conv2d(channels, channels * 3, kernel=1, init=init_qkv, **kw)
    self.proj = Conv2d(channels, channels, kernel=1, init=init_proj, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    n = self.num_heads
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, n, c // n, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, L, heads, d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    weights = jax.nn.softmax(logits / math.sqrt(c // n), axis=-1).astype(v.dtype)
    a = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h, w, c)
    return self.proj(a)


class UNetBlock(nnx.Module):
  """EDM's unified residual block (DDPM++, NCSN++ and ADM), optional up/down and attention.

  `__call__(x [B,H,W,Cin], emb [B,E]) -> [B,H',W',Cout]` with H' = 2H (up), H/2 (down) or H.
  Dropout (nnx.Dropout, stream "dropout") sits before the second conv.
  """

  def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
               up: bool = False, down: bool = False, attention: bool = False,
               num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
               skip_scale: float = 1.0, eps: float = 1e-5,
               resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
               adaptive_scale: bool = True, init: Init = Init(),
               init_zero: Init = Init(weight=0.0), init_attn: Init | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_channels, self.out_channels = in_channels, out_channels
    self.skip_scale, self.adaptive_scale, self.dtype = skip_scale, adaptive_scale, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    nkw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
    rs = dict(resample_filter=resample_filter)

    self.norm0 = GroupNorm(in_channels, **nkw)
    self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, init=init, **rs, **kw)
    self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init,
                         **kw)
    self.norm1 = GroupNorm(out_channels, **nkw)
    self.dropout = nnx.Dropout(dropout, rngs=dropout_stream(rngs) if dropout > 0 else None)
    self.conv1 = Conv2d(out_channels, out_channels, 3, init=init_zero, **kw)

    skip = None
    if out_channels != in_channels or up or down:
      kernel = 1 if resample_proj or out_channels != in_channels else 0
      skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, init=init,
                         **rs, **kw)
    self.skip = nnx.data(skip)

    heads = 0 if not attention else (
        num_heads if num_heads is not None else out_channels // channels_per_head)
    attn = None
    if heads:
      attn = Attention(out_channels, heads, eps=eps,
                       init_qkv=init_attn if init_attn is not None else init,
                       init_proj=init_zero, **kw)
    self.attn = nnx.data(attn)

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    orig = x
    x = self.conv0(jax.nn.silu(self.norm0(x)))
    params = self.affine(emb)[:, None, None, :].astype(self.dtype)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = jax.nn.silu(shift + self.norm1(x) * (scale + 1))
    else:
      x = jax.nn.silu(self.norm1(x + params))
    x = self.conv1(dropout(self.dropout, x))
    x = (x + (self.skip(orig) if self.skip is not None else orig.astype(self.dtype)))
    x = x * self.skip_scale
    if self.attn is not None:
      x = (self.attn(x) + x) * self.skip_scale
    return x
