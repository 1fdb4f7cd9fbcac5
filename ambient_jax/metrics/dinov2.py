"""transformers' `Dinov2Model` in Flax NNX, loaded from a transformers folder: the feature
network of the paper's memorization measurements (METHOD.md §8: DINOv2 ViT-g/14).

    model, config = load_dinov2("dinov2-giant")   # config.json + model.safetensors
    out = model(pixels)          # pixels [B, H, W, 3], already ImageNet-normalised
    out.last_hidden_state        # [B, 1 + N, D]: CLS then the N = (H//14)(W//14) patch
                                 #   tokens (row-major), after the final LayerNorm
    out.pooler_output            # [B, D]: the CLS token of last_hidden_state
    out.hidden_states[-1]        # [B, 1 + N, D]: the same tokens *before* the LayerNorm

`dinov2_features` (the paper's preprocessing and pooling) lives in `dinov2_features`.

The network, as transformers 5.x computes it: a 14×14 stride-14 patch convolution, a
CLS token, learned position embeddings for the pre-training grid (`image_size` // 14
squared, 37² for the released models) resized to the input's grid by torch's bicubic
interpolation (`F.interpolate(size=..., mode="bicubic", align_corners=False)`, reproduced
exactly by `bicubic_matrix`), then pre-LayerNorm blocks x + γ₁·attn(norm1(x)),
x + γ₂·ffn(norm2(x)) with learned per-channel layer scales γ, the ffn an exact-GELU MLP
or, for ViT-g (`use_swiglu_ffn`), SwiGLU: fused `weights_in` [2h, D] split into gate and
up halves, silu(gate)·up, `weights_out`, with h = ⌈(⌊D·mlp_ratio·2/3⌋)/8⌉·8 (4096 for g).
Inference only: no mask token, dropout or drop path.

Parameters are named as the checkpoint names them (transformers writes the original
layout even in 5.x, whose in-memory modules rename q/k/v and split `weights_in`), so
loading is `latent.weights.load_params`' checked copy: every missing, unexpected or
misshapen tensor named in one error. The checkpoint's `mask_token` (pre-training only) is
skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax import errors
from ambient_jax.latent import weights
from ambient_jax.latent.attention import dot_product_attention
from ambient_jax.latent.clip import CLIPMLP
from ambient_jax.latent.layers import ACTIVATIONS, Conv2d, LayerNorm, Linear, param

Dtype = Any

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
            "patch_size", "image_size", "layer_norm_eps")
ARCHITECTURES = ("Dinov2Model",)
SKIPPED = ("embeddings.mask_token",)  # pre-training only (masked image modelling)
BICUBIC_A = -0.75  # torch's cubic convolution coefficient


class NotDinov2Error(errors.UserError, ValueError):
  """A folder or config that is not a transformers DINOv2 (`Dinov2Model`) one."""


class Dinov2WeightsError(errors.UserError, ValueError):
  """A DINOv2 folder whose tensors do not match its config (each problem named)."""


def check_config(config: Mapping[str, Any], where: str = "DINOv2 config") -> None:
  """Raises NotDinov2Error (one line) for a config this module does not implement: another
  model type, missing keys, non-square patches, registers, a hidden size that does not
  split into heads, an MLP activation that `latent.layers` does not have."""
  model_type = config.get("model_type")
  if model_type != "dinov2":
    raise NotDinov2Error(f"{where}: model_type {model_type!r} is not 'dinov2' (expected a "
                         "transformers Dinov2Model folder, e.g. facebook/dinov2-giant).")
  if missing := [k for k in REQUIRED if k not in config]:
    raise NotDinov2Error(f"{where}: missing key(s) {missing}.")
  architectures = config.get("architectures") or list(ARCHITECTURES)
  if architectures[0] not in ARCHITECTURES:
    raise NotDinov2Error(f"{where}: architectures {architectures} is not supported; expected "
                         f"{list(ARCHITECTURES)} (save the backbone alone: model.dinov2).")
  for key in ("patch_size", "image_size"):
    if not isinstance(config[key], int):
      raise NotDinov2Error(f"{where}: {key} {config[key]!r} is not supported (one int).")
  if config["hidden_size"] % config["num_attention_heads"]:
    raise NotDinov2Error(f"{where}: hidden_size {config['hidden_size']} does not split into "
                         f"num_attention_heads {config['num_attention_heads']} heads.")
  act = config.get("hidden_act", "gelu")
  if not config.get("use_swiglu_ffn", False) and act not in ACTIVATIONS:
    raise NotDinov2Error(f"{where}: hidden_act {act!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)}.")


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
  """Width h of Dinov2SwiGLUFFN's gate and up projections: 2/3 of hidden·mlp_ratio, rounded
  up to a multiple of 8 (transformers' and the original DINOv2's rule; ViT-g: 4096)."""
  return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize, `F.interpolate(size=n_out,
  mode="bicubic", align_corners=False)`: source x = (i + ½)·n_in/n_out − ½ (not clamped),
  the four taps ⌊x⌋−1 … ⌊x⌋+2 weighted by Keys' cubic with a = −0.75, taps beyond the edge
  clamped to it. jax.image.resize's "cubic" uses a = −0.5 and antialiases when shrinking,
  so it differs."""
  a = BICUBIC_A
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  floor = np.floor(src)
  t = src - floor
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1          # |d| <= 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a     # 1 < |d| < 2
  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [n_out, 4]
  w = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(floor.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(w, (np.arange(n_out), idx), taps[:, k])
  return w


def interpolate_position_embeddings(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Position embeddings [1, 1 + S², D] of an S×S pre-training grid -> [1, 1 + h·w, D] for
  an h×w patch grid (CLS position unchanged), as transformers' interpolate_pos_encoding:
  bicubic in float32, rows then columns (separable, so two small matrix products)."""
  side = int(round((pos.shape[1] - 1) ** 0.5))
  if grid == (side, side):
    return pos
  patch = pos[0, 1:].astype(jnp.float32).reshape(side, side, -1)
  wh = jnp.asarray(bicubic_matrix(side, grid[0]), jnp.float32)
  ww = jnp.asarray(bicubic_matrix(side, grid[1]), jnp.float32)
  patch = jnp.einsum("ys,stc,xt->yxc", wh, patch, ww, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:, :1], patch.reshape(1, -1, pos.shape[-1]).astype(pos.dtype)], 1)


class Dinov2Output(NamedTuple):
  """What Dinov2Model returns (a pytree, so it passes through jit)."""
  last_hidden_state: jax.Array          # [B, 1 + N, D] after the final LayerNorm
  pooler_output: jax.Array              # [B, D]: last_hidden_state[:, 0] (CLS)
  hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer's output (pre-norm)


class Dinov2PatchEmbeddings(nnx.Module):
  """`projection`: Conv2d(C, D, 14, stride 14): [B, H, W, C] -> [B, (H//14)(W//14), D]."""

  def __init__(self, config: Mapping[str, Any], **kw):
    p = config["patch_size"]
    self.projection = Conv2d(config.get("num_channels", 3), config["hidden_size"], p,
                             stride=p, **kw)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.projection(pixels)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Dinov2Embeddings(nnx.Module):
  """CLS token + patch embeddings + (interpolated) position embeddings: [B, 1 + N, D]."""

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    d, side = config["hidden_size"], config["image_size"] // config["patch_size"]
    self.patch_size, self.dtype = config["patch_size"], dtype
    self.cls_token = param(jnp.zeros((1, 1, d), param_dtype), (None, None, "norm"))
    self.position_embeddings = param(jnp.zeros((1, side * side + 1, d), param_dtype),
                                     (None, None, "norm"))
    self.patch_embeddings = Dinov2PatchEmbeddings(config, dtype=dtype, param_dtype=param_dtype,
                                                  rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    grid = (pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size)
    x = self.patch_embeddings(pixels)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    pos = interpolate_position_embeddings(self.position_embeddings[...], grid)
    return jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)


class Dinov2SelfAttention(nnx.Module):
  """`query`, `key`, `value` projections and softmax attention over all tokens."""

  def __init__(self, hidden: int, heads: int, bias: bool, **kw):
    self.heads = heads
    self.query = Linear(hidden, hidden, bias=bias, **kw)
    self.key = Linear(hidden, hidden, bias=bias, **kw)
    self.value = Linear(hidden, hidden, bias=bias, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # [B, T, D] -> [B, T, N, D/N]
    out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return out.reshape(x.shape)


class Dinov2SelfOutput(nnx.Module):
  """`dense`: the attention's output projection."""

  def __init__(self, hidden: int, **kw):
    self.dense = Linear(hidden, hidden, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(x)


class Dinov2Attention(nnx.Module):
  """`attention` (q/k/v) then `output` (dense): [B, T, D] -> [B, T, D]."""

  def __init__(self, config: Mapping[str, Any], **kw):
    hidden = config["hidden_size"]
    self.attention = Dinov2SelfAttention(hidden, config["num_attention_heads"],
                                         config.get("qkv_bias", True), **kw)
    self.output = Dinov2SelfOutput(hidden, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output(self.attention(x))


class Dinov2LayerScale(nnx.Module):
  """x · `lambda1` [D] (per-channel residual-branch scale)."""

  def __init__(self, hidden: int, param_dtype: Dtype):
    self.lambda1 = param(jnp.ones((hidden,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.lambda1[...].astype(x.dtype)


class Dinov2SwiGLUFFN(nnx.Module):
  """`weights_in` [2h, D] (gate rows, then up rows) -> silu(gate)·up -> `weights_out`."""

  def __init__(self, config: Mapping[str, Any], **kw):
    hidden = config["hidden_size"]
    inner = swiglu_hidden_size(hidden, config["mlp_ratio"])
    self.weights_in = Linear(hidden, 2 * inner, **kw)
    self.weights_out = Linear(inner, hidden, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
    return self.weights_out(jax.nn.silu(gate) * up)


class Dinov2Layer(nnx.Module):
  """Pre-norm block: x + γ₁·attention(norm1(x)), then x + γ₂·mlp(norm2(x))."""

  def __init__(self, config: Mapping[str, Any], **kw):
    hidden = config["hidden_size"]
    norm_kw = dict(eps=config["layer_norm_eps"], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.norm1 = LayerNorm(hidden, **norm_kw)
    self.attention = Dinov2Attention(config, **kw)
    self.layer_scale1 = Dinov2LayerScale(hidden, kw["param_dtype"])
    self.norm2 = LayerNorm(hidden, **norm_kw)
    if config.get("use_swiglu_ffn", False):
      self.mlp = Dinov2SwiGLUFFN(config, **kw)
    else:  # fc1 -> activation (exact GELU for the released models) -> fc2, as CLIP's
      self.mlp = CLIPMLP(hidden, int(hidden * config["mlp_ratio"]),
                         config.get("hidden_act", "gelu"), **kw)
    self.layer_scale2 = Dinov2LayerScale(hidden, kw["param_dtype"])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.layer_scale1(self.attention(self.norm1(x)))
    return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nnx.Module):
  """The stack of `num_hidden_layers` Dinov2Layers (`encoder.layer.{i}`)."""

  def __init__(self, config: Mapping[str, Any], **kw):
    self.layer = nnx.List([Dinov2Layer(config, **kw) for _ in range(config["num_hidden_layers"])])


class Dinov2Model(nnx.Module):
  """transformers' Dinov2Model: pixels [B, H, W, C] (ImageNet-normalised; H, W ≥ 14, a
  remainder below a multiple of 14 is ignored as by the strided conv) -> Dinov2Output."""

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    check_config(config)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Dinov2Embeddings(config, **kw)
    self.encoder = Dinov2Encoder(config, **kw)
    self.layernorm = LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"], dtype=dtype,
                               param_dtype=param_dtype)

  def __call__(self, pixels: jax.Array) -> Dinov2Output:
    x = self.embeddings(pixels)
    hidden_states = [x]
    for layer in self.encoder.layer:
      x = layer(x)
      hidden_states.append(x)
    last = self.layernorm(x)
    return Dinov2Output(last, last[:, 0], tuple(hidden_states))


def read_dinov2_config(folder: str | os.PathLike) -> dict[str, Any]:
  """`folder/config.json`, checked to describe a Dinov2Model; NotDinov2Error (one line) for
  a path that is not a folder, has no config.json or holds another model."""
  folder = os.fspath(folder)
  if not os.path.isfile(os.path.join(folder, "config.json")):
    what = "has no config.json" if os.path.isdir(folder) else "is not a directory"
    raise NotDinov2Error(f"{folder} {what}: expected a transformers DINOv2 folder "
                         "(config.json + model.safetensors, e.g. facebook/dinov2-giant).")
  config = weights.read_config(folder)
  check_config(config, where=f"{folder}/config.json")
  return config


def checkpoint_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpoint's tensors that the inference model has (drops `SKIPPED`); values are
  not read (memory-mapped views stay views)."""
  return {name: tensors[name] for name in tensors if name not in SKIPPED}


def build_abstract(config: Mapping[str, Any], dtype: Dtype = jnp.float32) -> Dinov2Model:
  """The model with shape-only parameters (nothing allocated): for loading and counting."""
  return weights.build_abstract(
      lambda: Dinov2Model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def load_dinov2(folder: str | os.PathLike, *, dtype: Dtype = None,
                shardings: Any = None) -> tuple[Dinov2Model, dict[str, Any]]:
  """A transformers DINOv2 folder (config.json + model.safetensors, or shards) ->
  (model, config dict). `dtype`: parameters and compute (float32 when None; LayerNorm
  statistics and softmax stay float32). `shardings`: as `latent.weights.load_params`.
  Raises NotDinov2Error for a folder that is not DINOv2, Dinov2WeightsError naming every
  missing, unexpected or misshapen tensor."""
  config = read_dinov2_config(folder)
  dtype = dtype or jnp.float32
  try:
    tensors = checkpoint_names(weights.open_checkpoint(folder))
  except (FileNotFoundError, ValueError) as e:
    raise Dinov2WeightsError(str(e)) from None
  try:
    model = weights.load_params(build_abstract(config, dtype), tensors,
                                component=f"DINOv2 ({os.fspath(folder)})", dtype=dtype,
                                shardings=shardings)
  except ValueError as e:
    raise Dinov2WeightsError(str(e)) from None
  return model, config
