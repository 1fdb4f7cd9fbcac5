"""Similarity of two images over a masked region only: DINOv2 patch tokens pooled under the mask.

The inpainting attack (METHOD.md §8) repaints a masked region of a training image and asks
whether the model put back what was there. The comparison, as the official
`eval_scripts/filter_results_masking.py` computes it:
  - both images go to 224² (`dinov2_features.preprocess`) and through DINOv2; the tokens are
    the last layer's output before the final LayerNorm ("pre-norm", `dinov2_tokens`);
  - the pixel mask goes to 224² by torch's nearest interpolation (`resize_mask`);
  - a 14×14 patch takes part when it overlaps the mask, i.e. holds at least one masked pixel
    (`patch_mask`); the CLS token never does;
  - the tokens of those patches are summed and L2-normalised (`pooled`), and the similarity
    is the inner product (cosine) of the two pooled vectors.
METHOD.md's "(mask ratio ≥ 0.1)" is, in that script, a filter on whole images
(`--min_mask_ratio=0.1`: an image whose mask covers less than 10 % of it is left out of the
statistics), not a per-patch threshold; `mask_ratio` gives the figure and the caller filters.
The paper reports the similarity with the nearest dataset image under the same mask
(`nearest_pooled_similarity`); the similarity with the attacked image itself
(`pooled_similarity`) is the lower bound of that and what a copy of the source shows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 14


def resize_mask(masks, size: int) -> np.ndarray:
  """Masks [B, H, W] -> [B, size, size] as torch's `F.interpolate(mode="nearest")`: output
  pixel i takes input pixel min(⌊i · (H / size)⌋, H − 1), the scale in float32."""
  masks = np.asarray(masks)
  rows = _nearest_index(masks.shape[1], size)
  cols = _nearest_index(masks.shape[2], size)
  return masks[:, rows][:, :, cols]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  scale = np.float32(n_in) / np.float32(n_out)
  return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def patch_mask(masks, patch: int = PATCH) -> np.ndarray:
  """Masks [B, S, S] at the network's input size (1 / ≥ 0.5 = masked) -> [B, N] bool with
  N = (S // patch)², row by row as DINOv2's patch tokens: whether the patch holds any
  masked pixel (a remainder below a multiple of `patch` is ignored, as the strided conv)."""
  masks = np.asarray(masks) >= 0.5
  b, h, w = masks.shape
  rows, cols = h // patch, w // patch
  blocks = masks[:, :rows * patch, :cols * patch].reshape(b, rows, patch, cols, patch)
  return blocks.any(axis=(2, 4)).reshape(b, rows * cols)


def mask_ratio(masks) -> np.ndarray:
  """Fraction of each image's pixels that are masked: [B, H, W] -> [B] float64."""
  return np.mean(np.asarray(masks) >= 0.5, axis=(1, 2))


def pooled(tokens, patches) -> jax.Array:
  """tokens [B, 1 + N, D] (CLS first), patches [B, N] bool -> the L2-normalised sum of the
  selected patch tokens [B, D] float32 (zeros for an empty selection)."""
  tokens = jnp.asarray(tokens, jnp.float32)[:, 1:]
  f = jnp.einsum("bn,bnd->bd", jnp.asarray(patches, jnp.float32), tokens,
                 precision=jax.lax.Precision.HIGHEST)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def pooled_similarity(tokens_a, tokens_b, patches) -> np.ndarray:
  """Cosine of the masked poolings of two images, pair by pair: [B] float32."""
  return np.asarray(jnp.sum(pooled(tokens_a, patches) * pooled(tokens_b, patches), axis=-1))


@jax.jit
def _block_best(query: jax.Array, patches: jax.Array, block: jax.Array):
  """Each query's best cosine over one block of dataset tokens [m, 1 + N, D], every dataset
  image pooled under the query's own mask: (max [B], argmax [B] within the block)."""
  refs = jnp.einsum("bn,mnd->bmd", patches, block[:, 1:].astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  refs = refs / jnp.maximum(jnp.linalg.norm(refs, axis=-1, keepdims=True), 1e-12)
  sims = jnp.einsum("bd,bmd->bm", query, refs, precision=jax.lax.Precision.HIGHEST)
  return sims.max(axis=1), sims.argmax(axis=1)


def nearest_pooled_similarity(tokens, dataset_tokens, patches, *, block_size: int = 256
                              ) -> tuple[np.ndarray, np.ndarray]:
  """For each image [B, 1 + N, D] with its patch selection [B, N], its best cosine with any
  dataset image [M, 1 + N, D] (numpy or a memory map) pooled under the same selection, and
  that image's index (the first on ties): (max [B] float32, argmax [B] int64). The dataset
  is read `block_size` images at a time (the last block padded, so one shape compiles)."""
  query = pooled(tokens, patches)
  patches = jnp.asarray(patches, jnp.float32)
  count = len(dataset_tokens)
  if not count:
    raise ValueError("nearest_pooled_similarity needs at least one dataset image.")
  block_size = min(block_size, count)
  best = np.full(len(query), -np.inf, np.float32)
  where = np.zeros(len(query), np.int64)
  for start in range(0, count, block_size):
    block = np.asarray(dataset_tokens[start:start + block_size])
    real = len(block)
    if real < block_size:  # repeat the last image: a repeat never wins over its original
      block = np.concatenate([block, np.repeat(block[-1:], block_size - real, axis=0)])
    sim, idx = (np.asarray(a) for a in _block_best(query, patches, jnp.asarray(block)))
    better = sim > best
    best = np.where(better, sim, best)
    where = np.where(better, start + np.minimum(idx, real - 1), where)
  return best, where
