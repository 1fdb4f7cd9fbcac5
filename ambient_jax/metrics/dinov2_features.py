"""DINOv2 image features as the paper takes them for memorization (METHOD.md §8).

    model, _ = dinov2.load_dinov2("dinov2-giant")
    feats = dinov2_features(model, images)           # [B, H, W, 1|3] in [-1, 1] -> [B, D]
    sim, idx = memorization.max_inner_product(feats_of_outputs, feats_of_dataset)

Preprocessing, as the official evaluation script (`eval_scripts/filter_results_noise.py`):
resize to 224×224 by `F.interpolate(mode="bilinear", align_corners=False)` (no
antialiasing; `inception.resize_bilinear` reproduces it), then the ImageNet mean/std
normalisation of [0, 1] pixels that METHOD.md §8 and DINOv2's own transforms use. Grey
images are repeated to RGB. Pooling: the CLS token after the final LayerNorm ("cls", the
paper's default) or the sum of the normalised patch tokens ("patch_sum", the script's
`--use_cls=False`). Features are L2-normalised float32, so an inner product is a cosine.
`dinov2_tokens` gives the unpooled pre-norm tokens (the last layer's output before the final
LayerNorm, the official code's `x_prenorm`) that the inpainting attack pools over its mask
(`metrics.masked_tokens`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ambient_jax.metrics.dinov2 import Dinov2Model
from ambient_jax.metrics.inception import resize_bilinear

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "patch_sum")


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Images [B, H, W, 1 or 3] in [-1, 1] -> DINOv2 input [B, size, size, 3] float32:
  grey repeated to RGB, bilinear resize (torch's, no antialias), ImageNet normalisation."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, 1 or 3] in [-1, 1]; got shape {x.shape}.")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = resize_bilinear(x, size)
  mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
  return ((x + 1.0) * 0.5 - mean) / std


def pool(last_hidden_state: jax.Array, pooling: str) -> jax.Array:
  """Tokens [B, 1 + N, D] -> L2-normalised float32 [B, D]: the CLS token or the patch sum."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}.")
  tokens = last_hidden_state.astype(jnp.float32)
  f = tokens[:, 0] if pooling == "cls" else jnp.sum(tokens[:, 1:], axis=1)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


PRENORM_TOKENS = "prenorm_tokens"  # `_features` option: the unpooled tokens before the LayerNorm


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "size"))
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, pooling: str,
              size: int) -> jax.Array:
  """One batch: preprocess, network, pool (or the pre-norm tokens [B, 1 + N, D]). Compiled
  once per (model, batch shape, options)."""
  model = nnx.merge(graphdef, state)
  out = model(preprocess(images, size))
  if pooling == PRENORM_TOKENS:
    return out.hidden_states[-1].astype(jnp.float32)
  return pool(out.last_hidden_state, pooling)


def _onto_mesh(leaf: jax.Array, mesh: Mesh) -> jax.Array:
  """A parameter already on the mesh's devices as it is; any other replicated over them."""
  if getattr(leaf, "sharding", None) is not None and leaf.sharding.device_set == set(
      mesh.devices.flat):
    return leaf
  return jax.device_put(leaf, NamedSharding(mesh, P()))


def dinov2_features(model: Dinov2Model, images, *, pooling: str = "cls", batch_size: int = 64,
                    size: int = INPUT_SIZE, mesh: Optional[Mesh] = None) -> np.ndarray:
  """Features [B, D] float32 (unit norm) of images [B, H, W, 1 or 3] in [-1, 1] (numpy or
  jax), computed `batch_size` at a time; the last batch is padded so one shape compiles.
  `mesh`: each batch split over all its axes (data parallel; `batch_size` a multiple of
  the mesh size), parameters already on its devices kept as placed, others replicated onto it."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}.")
  return _batched(model, images, pooling, batch_size, size, mesh, np.float32)


def dinov2_tokens(model: Dinov2Model, images, *, batch_size: int = 64, size: int = INPUT_SIZE,
                  mesh: Optional[Mesh] = None, dtype=np.float32) -> np.ndarray:
  """Pre-norm tokens [B, 1 + N, D] (CLS first, then the (size/14)² patches row by row) of
  images [B, H, W, 1 or 3] in [-1, 1], preprocessed as `dinov2_features`; stored as `dtype`
  (a dataset of 10k images under ViT-g/14 at 224² is 15.8 GB in float32, half in float16).
  Batching and `mesh` as `dinov2_features`."""
  return _batched(model, images, PRENORM_TOKENS, batch_size, size, mesh, dtype)


def _batched(model: Dinov2Model, images, pooling: str, batch_size: int, size: int,
             mesh: Optional[Mesh], dtype) -> np.ndarray:
  """`_features` over images `batch_size` at a time (see `dinov2_features`), as `dtype`."""
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the mesh's {mesh.size} "
                     "devices.")
  images = np.asarray(images, np.float32)
  graphdef, state = nnx.split(model)
  placement = None
  if mesh is not None:
    placement = NamedSharding(mesh, P(mesh.axis_names))
    state = jax.tree.map(functools.partial(_onto_mesh, mesh=mesh), state)
  multiple = mesh.size if mesh is not None else 1
  shape = batch_size if len(images) > batch_size else -(-len(images) // multiple) * multiple
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    batch = np.concatenate([batch, np.repeat(batch[-1:], shape - count, axis=0)])
    batch = jax.device_put(batch, placement) if placement is not None else batch
    out.append(np.asarray(_features(graphdef, state, batch, pooling, size), dtype)[:count])
  if not out:
    width = model.layernorm.weight.shape[0]
    tokens = (size // model.embeddings.patch_size) ** 2 + 1
    return np.zeros((0, width) if pooling != PRENORM_TOKENS else (0, tokens, width), dtype)
  return np.concatenate(out)
