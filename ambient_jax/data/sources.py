"""Clean images by example index, from a tensorflow-datasets builder.

An `ImageSource` answers `get(indices) -> (images uint8 [b, H, W, C], labels int32 [b])`
for any example indices; the index of an example is its position in the split's
deterministic tfds read order (`shuffle_files=False`), the same on every host.
- `InMemorySource`: the whole split decoded, cropped and resized once (fine up to a few
  GB: MNIST, CIFAR-10, CelebA, FFHQ/AFHQ at 64x64).
- `RandomAccessSource`: tfds `data_source` over an array_record-prepared dataset
  (prepare with `--file_format=array_record`); decodes only the requested rows, so a
  host touches only its slice of each batch (ImageNet 64).
"""

from __future__ import annotations

from absl import logging
from typing import Any, Optional, Protocol

import numpy as np

from ambient_jax import errors
from ambient_jax.data import registry


class DatasetNotReadyError(errors.UserError, RuntimeError):
  """The dataset is not prepared in the data dir and cannot be prepared from here."""


class ImageSource(Protocol):
  num_examples: int
  resolution: int
  channels: int

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


def preprocess(images: np.ndarray, spec: registry.DatasetSpec, resolution: int) -> np.ndarray:
  """uint8 [b, h, w, c] -> uint8 [b, resolution, resolution, channels]: crop, then resize."""
  images = np.asarray(images, np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  if spec.center_crop:
    h, w = images.shape[1:3]
    c = spec.center_crop
    top, left = (h - c) // 2, (w - c) // 2
    images = images[:, top:top + c, left:left + c]
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"Images of {spec.tfds_name} are {images.shape[1]}x{images.shape[2]}, not "
                     "square; give the dataset a center_crop in ambient_jax/data/registry.py.")
  if images.shape[1] == resolution:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty((len(images), resolution, resolution, images.shape[-1]), np.uint8)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((resolution, resolution), Image.LANCZOS), np.uint8)
    out[i] = resized.reshape(out.shape[1:])
  return out


def _builder(data_config: Any, spec: registry.DatasetSpec):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from ambient_jax.data import builders  # pylint: disable=g-import-not-at-top,unused-import
  return tfds, tfds.builder(spec.tfds_name, data_dir=data_config.tfds_data_dir or None)


def prepare(data_config: Any) -> None:
  """Makes sure the dataset is prepared in its data dir, or raises DatasetNotReadyError."""
  spec = registry.get_spec(data_config.name)
  tfds, builder = _builder(data_config, spec)
  if builder.is_prepared():
    return
  where = f"{builder.data_dir_root}"
  if spec.source == "offline":
    logging.info("Preparing %s in %s (offline, once).", spec.tfds_name, where)
    builder.download_and_prepare(file_format=data_config.file_format)
    return
  if spec.source == "manual":
    if not data_config.manual_dir:
      raise DatasetNotReadyError(
          f"Dataset {data_config.name!r} (tfds {spec.tfds_name!r}) is not prepared in {where} "
          f"and config.data.manual_dir is empty. {spec.how_to_prepare}")
    builder.download_and_prepare(
        file_format=data_config.file_format,
        download_config=tfds.download.DownloadConfig(manual_dir=data_config.manual_dir))
    return
  if not data_config.download:
    raise DatasetNotReadyError(
        f"Dataset {data_config.name!r} (tfds {spec.tfds_name!r}) is not prepared in {where}, "
        "and config.data.download=False (runs are offline by default). "
        f"{spec.how_to_prepare} Then pass --config.data.tfds_data_dir=DIR, or set "
        "--config.data.download=True to let tfds download it now.")
  try:
    builder.download_and_prepare(file_format=data_config.file_format)
  except Exception as e:  # network errors come in many types
    raise DatasetNotReadyError(
        f"Dataset {data_config.name!r} (tfds {spec.tfds_name!r}) could not be downloaded into "
        f"{where}: {type(e).__name__}: {e}. {spec.how_to_prepare}") from e


def _split(spec: registry.DatasetSpec, max_examples: int) -> str:
  return f"{spec.split}[:{max_examples}]" if max_examples else spec.split


def _stack(rows: list) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class InMemorySource:
  """The whole split as one uint8 array, preprocessed once."""

  def __init__(self, data_config: Any):
    spec = registry.get_spec(data_config.name)
    tfds, builder = _builder(data_config, spec)
    split = _split(spec, data_config.max_examples)
    if getattr(builder.info.file_format, "value", None) == "array_record":  # no tf.data for it
      rows = builder.as_data_source(split=split)
      chunks = (_stack(rows.__getitems__(list(range(i, min(i + 1024, len(rows))))))
                for i in range(0, len(rows), 1024))
    else:
      chunks = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False,
                                                batch_size=1024))
    images, labels = [], []
    for batch in chunks:
      images.append(preprocess(batch[spec.image_key], spec, data_config.resolution))
      if spec.label_key:
        labels.append(np.asarray(batch[spec.label_key], np.int32))
    self.images = np.concatenate(images)
    self.labels = (np.concatenate(labels) if labels else
                   np.zeros((len(self.images),), np.int32))
    self.num_examples, self.resolution = len(self.images), data_config.resolution
    self.channels = self.images.shape[-1]

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class RandomAccessSource:
  """Rows decoded on demand from an array_record-prepared tfds dataset."""

  def __init__(self, data_config: Any):
    self.spec = spec = registry.get_spec(data_config.name)
    _, builder = _builder(data_config, spec)
    try:
      self.source = builder.as_data_source(split=_split(spec, data_config.max_examples))
    except NotImplementedError as e:
      raise DatasetNotReadyError(
          f"config.data.source='random_access' needs {spec.tfds_name!r} prepared as array_record "
          f"(`tfds build {spec.tfds_name} --file_format=array_record`): {e}") from e
    self.num_examples, self.resolution = len(self.source), data_config.resolution
    self.channels = spec.channels

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = self.source.__getitems__([int(i) for i in indices])
    images = preprocess(np.stack([r[self.spec.image_key] for r in rows]), self.spec,
                        self.resolution)
    if self.spec.label_key:
      labels = np.asarray([r[self.spec.label_key] for r in rows], np.int32)
    else:
      labels = np.zeros((len(rows),), np.int32)
    return images, labels


def open_source(data_config: Any, kind: Optional[str] = None) -> ImageSource:
  kind = kind or data_config.source
  if kind == "memory":
    return InMemorySource(data_config)
  if kind == "random_access":
    return RandomAccessSource(data_config)
  raise ValueError(f"config.data.source = {kind!r}; allowed: 'memory', 'random_access'.")
