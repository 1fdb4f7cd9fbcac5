"""Primitive layers of the latent models, with PyTorch's parameter names and layouts.

Every parameter is stored exactly as the diffusers / transformers checkpoint stores it
(Linear `weight` [out, in], Conv2d `weight` [out, in, kh, kw], Embedding `weight`
[num, dim], norms `weight` / `bias` [C]), and modules are named as the PyTorch modules
are, so a parameter's NNX path joined by "." *is* its checkpoint name
("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight"). Loading and
saving are therefore pure renames-free copies (`ambient_jax.latent.weights`). The
kernels are consumed in that layout by `dot_general` / `conv_general_dilated`; XLA picks
the physical layout, so this costs nothing at run time.

Activations are NHWC ([B, H, W, C]) and token sequences [B, T, C]. Parameters are
stored in `param_dtype` and computed in `dtype`; normalisation statistics and attention
softmax run in float32. Every parameter carries logical axis names (the EDM models'
names, `ambient_jax.models.LOGICAL_AXES`), so FSDP sharding rules serve both families.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.models.layers import init_array

Dtype = Any

LINEAR_AXES = ("embed_out", "embed_in")
CONV_AXES = ("conv_out", "conv_in", "conv_h", "conv_w")
EMBEDDING_AXES = ("embed_in", "embed_out")
BIAS_AXES = {"linear": ("embed_out",), "conv": ("conv_out",)}
NORM_AXES = ("norm",)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  """A Param with logical axis names; sharding is applied by whoever places it."""
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
  """Inside, layers skip their random initial values (zeros of the right shape instead).

  For building abstract modules (`weights.build_abstract`) whose values are never used:
  under `nnx.eval_shape` every `rngs.params()` call costs ~30 ms of tracing bookkeeping,
  70 s for the SDXL UNet's 2,500 parameters; without the draws it takes a few seconds.
  """
  token = _SHAPES_ONLY.set(True)
  try:
    yield
  finally:
    _SHAPES_ONLY.reset(token)


def random_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype, draw) -> jax.Array:
  """draw(key) -> array of `shape`, or zeros inside `shapes_only()`."""
  if _SHAPES_ONLY.get():
    return jnp.zeros(shape, dtype)
  return draw(rngs.params())


def _torch_default(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype: Dtype):
  """PyTorch's default Linear/Conv init, U(−1/√fan_in, 1/√fan_in), for weights and biases."""
  return random_init(rngs, shape, dtype, lambda key: init_array(
      key, shape, "kaiming_uniform", fan_in, 0, dtype, gain=1.0 / math.sqrt(3.0)))


class Linear(nnx.Module):
  """Dense layer [..., in] -> [..., out]; `weight` [out, in] as torch.nn.Linear.

  Optionally a LoRA adapter (`ambient_jax.latent.lora` attaches it): `lora_A` [r, in] and
  `lora_B` [out, r], variables of their own type so they form a separate trainable tree,
  and a static `lora_scale` (α / r); then y = x Wᵀ + b + lora_scale · (x Aᵀ) Bᵀ, computed
  unmerged in the compute dtype (no [out, in] temporary). Without one, nothing is added.
  """

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
    self.weight = param(_torch_default(rngs, (out_features, in_features), in_features,
                                       param_dtype), LINEAR_AXES)
    self.bias = nnx.data(param(_torch_default(rngs, (out_features,), in_features, param_dtype),
                               BIAS_AXES["linear"]) if bias else None)
    self.lora_A, self.lora_B, self.lora_scale = nnx.data(None), nnx.data(None), 1.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = _contract_last(x, self.weight[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_A is not None:
      h = _contract_last(x, self.lora_A[...].astype(self.dtype)) * self.lora_scale  # [..., r]
      y = y + _contract_last(h, self.lora_B[...].astype(self.dtype))
    return y


def _contract_last(x: jax.Array, w: jax.Array) -> jax.Array:
  """[..., in] · [out, in]ᵀ -> [..., out]."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


class Conv2d(nnx.Module):
  """2-D convolution on NHWC input; `weight` [out, in, kh, kw] as torch.nn.Conv2d.

  `padding` is symmetric (an int, as torch), or explicit ((top, bottom), (left, right)).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int | tuple[tuple[int, int], tuple[int, int]] = 0, bias: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
    self.stride, self.dtype = stride, dtype
    self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else (
        tuple(tuple(p) for p in padding))
    fan_in = in_channels * kernel_size * kernel_size
    self.weight = param(_torch_default(
        rngs, (out_channels, in_channels, kernel_size, kernel_size), fan_in, param_dtype),
        CONV_AXES)
    self.bias = nnx.data(param(_torch_default(rngs, (out_channels,), fan_in, param_dtype),
                               BIAS_AXES["conv"]) if bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in] -> [B, H', W', out]."""
    w = self.weight[...].astype(self.dtype)
    if self.kernel_size == 1 and self.stride == 1 and self.padding == ((0, 0), (0, 0)):
      y = jax.lax.dot_general(x.astype(self.dtype), w[:, :, 0, 0], (((3,), (1,)), ((), ())))
    else:
      y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (self.stride, self.stride),
                                       self.padding, dimension_numbers=("NHWC", "OIHW", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-last input [B, ..., C]; statistics in float32."""

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} "
                       "equal groups (norm_num_groups must divide every block's channels).")
    self.num_groups, self.num_channels, self.eps, self.dtype = num_groups, num_channels, eps, dtype
    self.weight = param(jnp.ones((num_channels,), param_dtype), NORM_AXES)
    self.bias = param(jnp.zeros((num_channels,), param_dtype), NORM_AXES)

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis [..., C]; statistics in float32."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.weight = param(jnp.ones((num_features,), param_dtype), NORM_AXES)
    self.bias = param(jnp.zeros((num_features,), param_dtype), NORM_AXES)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embedding(nnx.Module):
  """Lookup table; `weight` [num_embeddings, dim] as torch.nn.Embedding."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    shape = (num_embeddings, features)
    self.weight = param(random_init(rngs, shape, param_dtype, lambda key: init_array(
        key, shape, "kaiming_normal", 1, 0, param_dtype)), EMBEDDING_AXES)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int ids [...] -> [..., dim]."""
    return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class Placeholder(nnx.Module):
  """A parameter-free slot that keeps list indices equal to PyTorch's (a Dropout there)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, torch's default."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's x · sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# Module-level functions, not lambdas: a module stores its activation, and NNX puts it in
# the GraphDef, so two builds of one config must hold the same function object (equal
# GraphDefs hit the same jit cache entries).
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu, "quick_gelu": quick_gelu}


def activation(name: str):
  """The activation functions that diffusers / transformers configs name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]
