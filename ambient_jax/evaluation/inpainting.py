"""The inpainting attack of METHOD.md §8: repaint part of each training image, prompted with
its caption, and measure how close the repainted region comes to the original.

    result = attack_image_folder(pipe, folder, dinov2=model, seed=0)   # pipe: an inpainting
    result.summary     # {"source": {frac_sim_above_0.9, ...}, "nearest": {...}, ...}

Settings are the paper's (official `attack_scripts/attack_with_masking.py`): an SDXL
inpainting folder (`latent.inpainting`), guidance 8.0, 20 steps, strength 0.99, the caption
as the prompt. Masks: the user's mask folder (`read_masks`: one file per image, same name,
white = repaint, the images' size) or one random box per image (`random_box_masks`, the
paper's fallback without a detector: 1–50 % of the area, a pure function of (seed, image
index)). Randomness: image i's ε from fold_in(key(seed), i), so results do not depend on
the chunk or batch an image is in.

Similarity (`metrics.masked_tokens`, as the official `filter_results_masking.py`): DINOv2
pre-norm patch tokens at 224², summed over the 14×14 patches that overlap the mask, L2-
normalised, cosine. Two comparisons per image: "source", with the attacked image itself
under its mask, and, when the dataset's tokens are given, "nearest", the best over the
dataset under the same mask (what the paper reports, with the index found). Images whose
mask covers < 10 % of them (`min_mask_ratio`, the script's filter) are kept in the per-
image arrays but left out of the summary.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ambient_jax import errors
from ambient_jax.latent import inpainting
from ambient_jax.metrics import masked_tokens
from ambient_jax.metrics.dinov2_features import INPUT_SIZE, dinov2_tokens

MIN_AREA, MAX_AREA = 0.01, 0.5  # random boxes: fraction of the image
MAX_ASPECT = 3.0                 # random boxes: height / width within [1/3, 3]
MIN_MASK_RATIO = 0.1             # the official evaluation's filter on whole images
THRESHOLDS = (0.9, 0.95, 0.99)
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class MaskError(errors.UserError, ValueError):
  """A mask file that is missing, unreadable or of the wrong size (named, one line)."""


def random_box_mask(seed: int, index: int, size: tuple[int, int], min_area: float = MIN_AREA,
                    max_area: float = MAX_AREA) -> np.ndarray:
  """One axis-aligned box [H, W] float32 (1 inside) covering between `min_area` and
  `max_area` of the image, from numpy's generator seeded by (seed, index) alone: target
  area uniform in that range, log-uniform aspect in [1/3, 3], uniform position."""
  h_img, w_img = size
  total = h_img * w_img
  lo, hi = math.ceil(min_area * total), math.floor(max_area * total)
  if not 0 < min_area <= max_area <= 1 or lo > hi:
    raise ValueError(f"no box of {min_area}-{max_area} of a {h_img}x{w_img} image.")
  rng = np.random.default_rng([seed, index])
  for _ in range(100):
    area = rng.uniform(min_area, max_area) * total
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    h = int(np.clip(round(math.sqrt(area * aspect)), 1, h_img))
    w_lo, w_hi = max(1, math.ceil(lo / h)), min(w_img, hi // h)
    if w_lo <= w_hi:
      w = int(np.clip(round(area / h), w_lo, w_hi))
      break
  else:
    raise ValueError(f"no box of {min_area}-{max_area} of a {h_img}x{w_img} image found.")
  top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
  mask = np.zeros(size, np.float32)
  mask[top:top + h, left:left + w] = 1.0
  return mask


def random_box_masks(indices: Sequence[int], size: tuple[int, int], seed: int,
                     min_area: float = MIN_AREA, max_area: float = MAX_AREA) -> np.ndarray:
  """`random_box_mask` of each image index: [n, H, W] float32."""
  return np.stack([random_box_mask(seed, int(i), size, min_area, max_area) for i in indices]
                  ) if len(indices) else np.zeros((0, *size), np.float32)


def mask_path(folder: str, name: str) -> str:
  """The mask of image `name` (a path relative to the image folder): the same relative path
  under `folder`, or the same stem with another image extension (x.jpg's mask may be x.png)."""
  exact = os.path.join(folder, name)
  if os.path.isfile(exact):
    return exact
  stem = os.path.splitext(exact)[0]
  for ext in MASK_EXTENSIONS:
    if os.path.isfile(stem + ext):
      return stem + ext
  raise MaskError(f"mask folder {folder}: no mask for image {name} (expected {exact}, same "
                  f"name; white = inpaint).")


def read_masks(folder: str, names: Sequence[str], size: tuple[int, int]) -> np.ndarray:
  """Masks [n, H, W] float32 in {0, 1} (grey ≥ 128 = inpaint) of the images `names`, each
  file exactly `size` (H, W): the size the images are attacked at (after any resize and
  crop). A missing, unreadable or differently sized file is one line naming it."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise MaskError(f"mask folder {folder}: no such folder.")
  masks = []
  for name in names:
    path = mask_path(folder, name)
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
      raise MaskError(f"mask {path} cannot be read: {e}") from e
    if pixels.shape != tuple(size):
      raise MaskError(f"mask {path} is {pixels.shape[1]}x{pixels.shape[0]} (WxH); its image is "
                      f"attacked at {size[1]}x{size[0]}.")
    masks.append((pixels >= 128).astype(np.float32))
  return np.stack(masks) if masks else np.zeros((0, *size), np.float32)


@dataclasses.dataclass
class InpaintingAttackResult:
  """Per attacked image (n of them): dataset `indices` [n], `masks` [n, H, W], `inpainted`
  [n, H, W, 3] in [−1, 1] (or None when not kept), `mask_ratio` [n], `kept` [n] (ratio ≥
  min_mask_ratio), `source_similarity` [n] and, with dataset tokens, `nearest_similarity`
  [n] and `nearest_index` [n]."""
  indices: np.ndarray
  masks: np.ndarray
  inpainted: Optional[np.ndarray]
  mask_ratio: np.ndarray
  kept: np.ndarray
  source_similarity: np.ndarray
  nearest_similarity: Optional[np.ndarray] = None
  nearest_index: Optional[np.ndarray] = None

  @property
  def summary(self) -> dict:
    """{"count", "kept", "source": stats, "nearest": stats (+ self_match)}; stats over the
    kept images: frac_sim_above_{0.9, 0.95, 0.99}, mean and median similarity."""
    out: dict[str, Any] = dict(count=int(len(self.kept)), kept=int(self.kept.sum()),
                               source=similarity_stats(self.source_similarity[self.kept]))
    if self.nearest_similarity is not None:
      out["nearest"] = similarity_stats(self.nearest_similarity[self.kept])
      matches = self.nearest_index[self.kept] == self.indices[self.kept]
      out["nearest"]["self_match"] = float(matches.mean()) if matches.size else float("nan")
    return out


def similarity_stats(similarities: np.ndarray, thresholds=THRESHOLDS) -> dict:
  """Fractions above each threshold, mean and median of [n] similarities (NaN when n = 0)."""
  s = np.asarray(similarities, np.float64)
  nan = float("nan")
  out = {f"frac_sim_above_{t}": float(np.mean(s > t)) if s.size else nan for t in thresholds}
  out.update(mean_similarity=float(s.mean()) if s.size else nan,
             median_similarity=float(np.median(s)) if s.size else nan)
  return out


def concatenate(parts: Sequence[InpaintingAttackResult]) -> InpaintingAttackResult:
  """One result from the results of consecutive chunks (None fields stay None)."""
  fields = {}
  for f in dataclasses.fields(InpaintingAttackResult):
    values = [getattr(p, f.name) for p in parts]
    fields[f.name] = None if any(v is None for v in values) else np.concatenate(values)
  return InpaintingAttackResult(**fields)


def inpainting_attack(pipe, images, captions: Sequence[str], masks, *, dinov2, seed: int,
                      indices: Optional[Sequence[int]] = None, dataset_tokens=None,
                      num_steps: int = 20, guidance_scale: float = 8.0, strength: float = 0.99,
                      batch_size: int = 4, dinov2_batch_size: int = 16,
                      min_mask_ratio: float = MIN_MASK_RATIO,
                      keep_images: bool = True) -> InpaintingAttackResult:
  """Inpaints images [n, H, W, 3] in [−1, 1] under masks [n, H, W] (1 = repaint) prompted
  by `captions` [n], and compares each result with its source (and the dataset) by
  `metrics.masked_tokens`. pipe: an inpainting LatentPipeline; dinov2: a Dinov2Model;
  indices: the images' dataset indices (default 0..n−1), which pick their keys and the
  self-match; dataset_tokens: `dinov2_tokens` of the dataset [M, 1 + N, D] (or None: no
  nearest search). The UNet runs `batch_size` images at a time (last batch padded, so one
  shape compiles)."""
  images = np.asarray(images, np.float32)
  masks = np.asarray(masks, np.float32)
  n = len(images)
  indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
  if masks.shape != images.shape[:3] or len(captions) != n or len(indices) != n:
    raise ValueError(f"images [n, H, W, 3], masks [n, H, W], n captions and indices needed; got "
                     f"{images.shape}, {masks.shape}, {len(captions)}, {len(indices)}.")
  root = jax.random.key(seed)
  out = []
  for start in range(0, n, batch_size):
    take = np.arange(start, min(start + batch_size, n))
    take = np.concatenate([take, np.repeat(take[-1:], batch_size - len(take))])
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(indices[take])
    result = inpainting.inpaint(pipe, images[take], masks[take], [captions[i] for i in take],
                                keys, num_steps=num_steps, guidance_scale=guidance_scale,
                                strength=strength)
    out.append(np.asarray(result)[:min(batch_size, n - start)])
  inpainted = np.concatenate(out) if out else np.zeros_like(images)
  patches = masked_tokens.patch_mask(masked_tokens.resize_mask(masks, INPUT_SIZE))
  tokens = dinov2_tokens(dinov2, inpainted, batch_size=dinov2_batch_size)
  source = masked_tokens.pooled_similarity(
      tokens, dinov2_tokens(dinov2, images, batch_size=dinov2_batch_size), patches)
  nearest = (None, None)
  if dataset_tokens is not None:
    nearest = masked_tokens.nearest_pooled_similarity(tokens, dataset_tokens, patches)
  ratio = masked_tokens.mask_ratio(masks)
  return InpaintingAttackResult(indices, masks, inpainted if keep_images else None, ratio,
                                ratio >= min_mask_ratio, source, *nearest)


def attack_image_folder(pipe, folder, *, dinov2, seed: int = 0, mask_folder: Optional[str] = None,
                        num_images: Optional[int] = None, nearest: bool = True,
                        chunk_size: int = 16, grid_size: int = 8, log=print,
                        **options) -> tuple[InpaintingAttackResult, dict]:
  """The whole attack over an image folder (`data.image_folder.ImageFolder` or anything with
  its `names`, `captions`, `resolution` and `chunks(size, count)`): masks from `mask_folder`
  or random boxes, the first `num_images` images attacked `chunk_size` at a time, compared
  with their sources and (`nearest`) with every image of the folder, whose tokens are
  computed first (float16). `options` go to `inpainting_attack` (num_steps, guidance_scale,
  strength, batch_size, min_mask_ratio, ...).

  Returns (result without images, grid): grid = {"indices", "original", "masked",
  "inpainted"} ([k, R, R, 3] in [−1, 1]) of the `grid_size` kept images most similar to
  their source (nearest, when searched), for a picture original | masked | inpainted.
  """
  size = (folder.resolution, folder.resolution)
  dataset_tokens = None
  if nearest:
    dataset_tokens = np.concatenate([dinov2_tokens(dinov2, x, dtype=np.float16)
                                     for _, x in folder.chunks(chunk_size)])
    log(f"inpainting attack: DINOv2 tokens of {len(dataset_tokens)} dataset images")
  parts, best = [], []
  for idx, images in folder.chunks(chunk_size, num_images):
    masks = (read_masks(mask_folder, [folder.names[i] for i in idx], size) if mask_folder
             else random_box_masks(idx, size, seed))
    part = inpainting_attack(pipe, images, [folder.captions[i] for i in idx], masks,
                             dinov2=dinov2, seed=seed, indices=idx,
                             dataset_tokens=dataset_tokens, **options)
    score = part.nearest_similarity if nearest else part.source_similarity
    best += [(float(s), images[j], masks[j], part.inpainted[j], int(idx[j]))
             for j, s in enumerate(score) if part.kept[j]]
    best = sorted(best, key=lambda b: -b[0])[:grid_size]
    parts.append(dataclasses.replace(part, inpainted=None))
    log(f"inpainting attack: {idx[-1] + 1} images done")
  result = concatenate(parts)
  grid = dict(indices=np.array([b[4] for b in best], np.int64),
              original=np.array([b[1] for b in best]).reshape(-1, *size, 3),
              masked=np.array([inpainting.masked_image(b[1], b[2]) for b in best]).reshape(-1, *size, 3),
              inpainted=np.array([b[3] for b in best]).reshape(-1, *size, 3))
  return result, grid
