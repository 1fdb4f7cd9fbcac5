"""A folder of images read by index at one resolution, with optional captions.

    folder = ImageFolder("laion_10k/", 1024, flag="--images", captions=True)
    x = folder.read([0, 1, 2])      # [3, 1024, 1024, 3] float32 in [-1, 1]
    folder.captions                 # ["a cat on ...", ...] ("" for every image by default)

The images are png/jpg/jpeg/webp files under the folder (recursively), in sorted path order:
an image's index is its position there (`data.latent.list_images`, as `prepare_latents`
numbers a fine-tuning set). Each is resized (shorter side) and centre-cropped as for
fine-tuning (`data.latent.load_image`). Captions come from the folder's Hugging Face
imagefolder metadata.jsonl when asked for; otherwise every caption is "" (the paper's null
captions). Nothing is held in memory but the file list: 10k images at 1024² are read a
chunk at a time. A missing or empty folder, or an unreadable image, is one line naming it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ambient_jax import errors
from ambient_jax.data import latent as dataset_lib


class ImageFolder:
  """The image files of `folder` (see the module docstring); `flag` names the folder in
  error messages (e.g. "--images")."""

  def __init__(self, folder: str, resolution: int, *, flag: str = "--images",
               captions: bool = False):
    if not os.path.isdir(folder):
      raise errors.UserError(f"{flag}={folder}: no such folder.")
    self.folder, self.resolution = folder, int(resolution)
    self.names = dataset_lib.list_images(folder)
    if not self.names:
      raise errors.UserError(f"{flag}={folder}: no images in it "
                             f"({', '.join(dataset_lib.IMAGE_EXTENSIONS)}).")
    self.captions, self.captions_path = [""] * len(self.names), None
    if captions:
      path = os.path.join(folder, dataset_lib.CAPTIONS_FILE)
      if not os.path.isfile(path):
        raise errors.UserError(f"--captions: {path} does not exist (captions are read from the "
                               "image folder's metadata.jsonl, lines {\"file_name\", \"text\"}).")
      self.captions, self.captions_path = dataset_lib.read_captions(folder, self.names, None)

  def __len__(self) -> int:
    return len(self.names)

  def path(self, i: int) -> str:
    return os.path.join(self.folder, self.names[int(i)])

  def read(self, indices: Sequence[int]) -> np.ndarray:
    """Images `indices` [n] as float32 [n, R, R, 3] in [-1, 1]; an unreadable file is named."""
    pixels = [dataset_lib.load_image(self.path(i), self.resolution)[0] for i in indices]
    return np.stack(pixels).astype(np.float32) / 127.5 - 1.0 if pixels else np.zeros(
        (0, self.resolution, self.resolution, 3), np.float32)

  def chunks(self, size: int, count: int | None = None):
    """(indices [k], images [k, R, R, 3]) for the first `count` images (all by default),
    `size` at a time."""
    count = len(self) if count is None else min(count, len(self))
    for start in range(0, count, size):
      idx = np.arange(start, min(start + size, count))
      yield idx, self.read(idx)
