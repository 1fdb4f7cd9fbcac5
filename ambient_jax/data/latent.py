"""A prepared noisy-latent dataset: its on-disk format and its reader.

`python -m ambient_jax.prepare_latents` writes it once per (images, pretrained model,
resolution, corruption level, seed); the trainer reads it with `open_latent_dataset`.
Clean latents are never written: example i is stored only as

    x_n[i] = √(1 − σ_n²) · z0[i] + σ_n · ε[i]                       (VP, METHOD.md §4)

with z0[i] = vae.to_latents(image_i, fold_in(key(corruption_seed ^ 0x5A17), i)) (one
posterior sample × scaling factor) and ε[i] ~ N(0, I) from fold_in(key(corruption_seed), i)
(`data.corruption.example_noise`), i = the image's index in the sorted file list. So any
host, batch size, resume or re-run writes the same numbers.

A directory of numpy files (memory-mapped on read) and `meta.json`:
  latents.npy         [N, h, w, C] float16   the noisy latents x_n
  sigma_n.npy         [N] float32            VP σ_n of each example (0: clean)
  prompt_index.npy    [N] int32              row of the example's caption in the prompt tables
  context.npy         [P, 77, D] float16     per unique caption: SD last_hidden_state; SDXL
                                             both encoders' penultimate states side by side
  text_embeds.npy     [P, Dp] float32        SDXL only: pooled projection of the 2nd encoder
  time_ids.npy        [N, 6] float32         SDXL only: original (H, W) before the resize,
                                             crop (top, left) after it, target (R, R)
  uncond_context.npy  [77, D] float16        classifier-free-guidance dropout's prompt:
  uncond_text_embeds.npy [Dp] float32        zeros for SDXL base (force_zeros_for_empty_prompt),
                                             else the encoding of ""
  meta.json           how it was made (see `prepare_latents.build_meta`), the image folder and
                      the ordered file names + captions (evaluation re-reads the clean images)
  progress*.json      finished chunks while (and after) it is prepared; `meta["complete"]`
                      turns true when every chunk is done.
"""

from __future__ import annotations

import glob
import json
import os

from collections.abc import Sequence
from typing import Optional

import numpy as np

from ambient_jax import errors

FORMAT = "ambient_jax.latent_dataset"
VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
POSTERIOR_SALT = 0x5A17  # VAE posterior keys: fold_in(key(corruption_seed ^ POSTERIOR_SALT), i)
META = "meta.json"
CAPTIONS_FILE = "metadata.jsonl"  # Hugging Face imagefolder captions: {"file_name", "text"} lines
# name -> (dtype, shape in terms of meta: N examples, P prompts, latent shape, widths)
ARRAYS = {
    "latents": np.float16, "sigma_n": np.float32, "prompt_index": np.int32,
    "context": np.float16, "text_embeds": np.float32, "time_ids": np.float32,
    "uncond_context": np.float16, "uncond_text_embeds": np.float32,
}
SDXL_ONLY = ("text_embeds", "time_ids", "uncond_text_embeds")


class DatasetNotFoundError(errors.UserError, FileNotFoundError):
  """No prepared dataset (or one of its files) where one was named."""


class DatasetError(errors.UserError, ValueError):
  """A prepared dataset that cannot be used: unfinished, another format, inconsistent."""


def array_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
  """The shape of every array file of a dataset described by `meta` (SDXL adds three)."""
  n, p, d = meta["num_examples"], meta["num_prompts"], meta["context_dim"]
  shapes = {"latents": (n, *meta["latent_shape"]), "sigma_n": (n,), "prompt_index": (n,),
            "context": (p, 77, d), "uncond_context": (77, d)}
  if meta["family"] == "sdxl":
    dp = meta["pooled_dim"]
    shapes.update(text_embeds=(p, dp), time_ids=(n, 6), uncond_text_embeds=(dp,))
  return shapes


def list_images(folder: str) -> list[str]:
  """Image files under `folder` (recursively), as sorted '/'-separated relative paths: the
  order that defines each example's index."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
        found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
  return sorted(found)


def read_captions(images: str, file_names: Sequence[str], captions_file: Optional[str],
                  flag: str = "--captions_file") -> tuple[list[str], Optional[str]]:
  """Each image's caption ("" without one) from a Hugging Face imagefolder metadata.jsonl
  (relative paths are under IMAGES); returns (captions, the file read or None)."""
  path = os.path.join(images, captions_file or CAPTIONS_FILE)
  if not os.path.isfile(path):
    if captions_file:
      raise errors.UserError(f"{flag}={captions_file}: {path} does not exist.")
    return [""] * len(file_names), None
  by_name = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        by_name[os.path.normpath(record["file_name"]).replace(os.sep, "/")] = str(
            record.get("text") or "")
      except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{path}, line {number}: expected a JSON object with \"file_name\" "
                            f"and \"text\" ({type(e).__name__}: {e}).") from e
  return [by_name.get(n, "") for n in file_names], os.path.abspath(path)


def resize_and_crop(image: "PIL.Image.Image", resolution: int
                    ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """As diffusers' SDXL fine-tuning scripts: the shorter side resized to `resolution`
  (bilinear, the longer side truncated like torchvision's Resize), then a center crop.

  Returns (uint8 [R, R, 3], original (H, W), crop top-left (top, left) after the resize).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert("RGB")
  w, h = image.size
  if h <= w:
    size = (int(resolution * w / h), resolution)
  else:
    size = (resolution, int(resolution * h / w))
  resized = image.resize(size, Image.BILINEAR) if size != (w, h) else image
  top = max(0, int(round((size[1] - resolution) / 2.0)))
  left = max(0, int(round((size[0] - resolution) / 2.0)))
  crop = resized.crop((left, top, left + resolution, top + resolution))
  return np.asarray(crop, np.uint8), (h, w), (top, left)


def load_image(path: str, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """`resize_and_crop` of the image file at `path`; a file PIL cannot read is named."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      return resize_and_crop(image, resolution)
  except FileNotFoundError as e:
    raise DatasetNotFoundError(f"image {path} does not exist.") from e
  except (UnidentifiedImageError, OSError) as e:
    raise DatasetError(f"image {path} cannot be read: {e}") from e


def progress_files(path: str) -> list[str]:
  """progress.json (one process) or progress.K.json (process K of several)."""
  return sorted(glob.glob(os.path.join(path, "progress*.json")))


def read_progress(path: str) -> dict[str, set[int]]:
  """The chunks finished so far, from every process's progress file:
  {"latent_chunks": {c, ...}, "prompt_chunks": {c, ...}}."""
  done = {"latent_chunks": set(), "prompt_chunks": set()}
  for name in progress_files(path):
    try:
      with open(name) as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue  # a progress file caught mid-replace: its chunks are redone
    for kind in done:
      done[kind].update(int(c) for c in record.get(kind, ()))
  return done


def examples_done(meta: dict, done_chunks: set[int]) -> int:
  """How many examples the finished latent chunks hold (the last chunk may be short)."""
  n, size = meta["num_examples"], meta["chunk_size"]
  return sum(min(size, n - c * size) for c in done_chunks if c * size < n)


def read_meta(path: str) -> dict:
  """meta.json of a prepared dataset, checked to be this format and version."""
  name = os.path.join(path, META)
  if not os.path.isdir(path):
    raise DatasetNotFoundError(f"no prepared latent dataset at {path}: the folder does not exist "
                               "(make one with python -m ambient_jax.prepare_latents).")
  if not os.path.isfile(name):
    raise DatasetNotFoundError(f"{name} does not exist: {path} is not a prepared latent dataset "
                               "(make one with python -m ambient_jax.prepare_latents).")
  try:
    with open(name) as f:
      meta = json.load(f)
  except ValueError as e:
    raise DatasetError(f"{name} is not valid JSON ({e}).") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise DatasetError(f"{name}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                       f"this reader reads {FORMAT!r} version {VERSION} (prepare it again).")
  return meta


class LatentDataset:
  """A prepared dataset, memory-mapped: batches are read by example index.

  num_examples: N; sigma_n: [N] float32 VP noise levels; latent_shape: (h, w, C);
  meta: the whole meta.json (captions, file names, scheduler config, ...).
  """

  def __init__(self, path: str, meta: dict, arrays: dict[str, np.ndarray]):
    self.path, self.meta, self._arrays = path, meta, arrays
    self.sigma_n = np.asarray(arrays["sigma_n"], np.float32)
    self._prompt_index = np.asarray(arrays["prompt_index"], np.int32)

  @property
  def num_examples(self) -> int:
    return int(self.meta["num_examples"])

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(self.meta["latent_shape"])

  @property
  def is_sdxl(self) -> bool:
    return self.meta["family"] == "sdxl"

  def __len__(self) -> int:
    return self.num_examples

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` [b] (any order, repeats allowed) as float32 arrays:
    latent [b, h, w, C], sigma_n [b], index [b] int32, context [b, 77, D] and, for SDXL,
    text_embeds [b, Dp], time_ids [b, 6]."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"{self.path}: example indices must be in [0, {self.num_examples}); got "
                       f"{indices.min()}..{indices.max()}.")
    rows = self._prompt_index[indices]
    a = self._arrays
    batch = {"latent": np.asarray(a["latents"][indices], np.float32),
             "sigma_n": self.sigma_n[indices], "index": indices.astype(np.int32),
             "context": np.asarray(a["context"][rows], np.float32)}
    if self.is_sdxl:
      batch["text_embeds"] = np.asarray(a["text_embeds"][rows], np.float32)
      batch["time_ids"] = np.asarray(a["time_ids"][indices], np.float32)
    return batch

  def uncond(self) -> dict[str, np.ndarray]:
    """The dropped prompt of classifier-free guidance: context [77, D] (+ text_embeds [Dp])."""
    out = {"context": np.asarray(self._arrays["uncond_context"], np.float32)}
    if self.is_sdxl:
      out["text_embeds"] = np.asarray(self._arrays["uncond_text_embeds"], np.float32)
    return out

  def image_path(self, i: int) -> str:
    return os.path.join(self.meta["image_folder"], self.meta["file_names"][i])

  def caption(self, i: int) -> str:
    return self.meta["captions"][i]

  def clean_image(self, i: int) -> np.ndarray:
    """Example i's clean image, uint8 [R, R, 3], re-read from the image folder with the
    same resize and crop as preparation (the clean latents are not stored)."""
    if not 0 <= i < self.num_examples:
      raise IndexError(f"{self.path}: example {i} is not in [0, {self.num_examples}).")
    return load_image(self.image_path(i), int(self.meta["resolution"]))[0]


def open_latent_dataset(path: str | os.PathLike) -> LatentDataset:
  """Opens a dataset `prepare_latents` finished. A missing folder or file is a
  DatasetNotFoundError, an unfinished or inconsistent one a DatasetError (ValueError),
  each naming the file (and, when unfinished, how far it got and the command to resume)."""
  path = os.path.abspath(os.fspath(path))
  meta = read_meta(path)
  if not meta.get("complete"):
    done = examples_done(meta, read_progress(path)["latent_chunks"])
    raise DatasetError(f"{path}: preparation is not finished ({done} of {meta['num_examples']} "
                       f"examples done); resume it with the same command: {meta.get('command')}")
  arrays = {}
  for name, shape in array_shapes(meta).items():
    file = os.path.join(path, name + ".npy")
    if not os.path.isfile(file):
      raise DatasetNotFoundError(f"{file} is missing from the prepared dataset {path}.")
    try:
      arrays[name] = np.load(file, mmap_mode="r")
    except ValueError as e:
      raise DatasetError(f"{file} is not a readable .npy file ({e}).") from e
    if arrays[name].shape != shape or arrays[name].dtype != ARRAYS[name]:
      raise DatasetError(f"{file}: {arrays[name].dtype} {arrays[name].shape}, but {META} says "
                         f"{np.dtype(ARRAYS[name])} {shape}.")
  return LatentDataset(path, meta, arrays)
