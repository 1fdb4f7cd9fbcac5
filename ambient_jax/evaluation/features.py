"""The feature space of a memorization comparison, chosen by name (METHOD.md §8).

    space = feature_space("dinov2", gray=False, resolution=1024, dinov2="dinov2-giant/")
    index = memorization.NearestNeighbourIndex(images, space.fn, center=space.center)

  dinov2     the paper's: a transformers DINOv2 folder (--dinov2, e.g. ViT-g/14), 224²
             bilinear, ImageNet normalisation, CLS token or summed patch tokens (`pooling`),
             L2-normalised; compared by plain cosine (center=False), as the paper.
  inception  FID Inception pool features (--inception_weights file).
  digits     the offline digit classifier (`metrics.digit_features`): gray digits-like
             images only (R = G = B), else a one-line error.
  pixels     flattened pixels (fn None): small images only.
  auto       inception when its weights are given, else digits for gray images, else pixels.
Features other than DINOv2 are centred by the reference set's mean before the cosine (post-
ReLU features are all positive; without centring every pair of digits looks alike).
Shared by `evaluate`'s latent attack (`evaluation.latent`) and `python -m ambient_jax.attack`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from ambient_jax import errors
from ambient_jax.evaluation import common, run as run_lib

FEATURES = ("auto", "pixels", "digits", "inception", "dinov2")


class FeatureSpace(NamedTuple):
  """name; fn: images [n, H, W, 3] in [-1, 1] -> [n, F] (None: pixels); net: the digit
  classifier when used (else None); center: whether to centre before the cosine."""
  name: str
  fn: Optional[Callable[[np.ndarray], np.ndarray]]
  net: Any
  center: bool


def is_grayscale(images: np.ndarray) -> bool:
  """Whether RGB images [n, H, W, 3] are gray (R = G = B): digits-like data."""
  return bool(np.all(images[..., :1] == images))


def feature_space(name: str, *, gray: bool, resolution: int,
                  inception_weights: Optional[str] = None, dinov2: Optional[str] = None,
                  pooling: str = "cls", cache_dir: Optional[str] = None,
                  feature_steps: Optional[int] = None, flag: str = "--attack_features",
                  log=run_lib.log_message) -> FeatureSpace:
  """The FeatureSpace `name` (see the module docstring); `gray`: the reference images are
  R = G = B; `resolution`: their side (the digit classifier is trained at it). A missing
  folder or file, or digits on colour images, is one line naming `flag`."""
  if name not in FEATURES:
    raise errors.UsageError(f"{flag}={name!r}: expected one of {FEATURES}.")
  if name == "auto":
    name = "inception" if inception_weights else ("digits" if gray else "pixels")
  if name == "inception":
    if not inception_weights:
      raise errors.UsageError(f"{flag}=inception needs --inception_weights=FILE.")
    return FeatureSpace(name, common.inception_features(inception_weights, log=None), None, True)
  if name == "dinov2":
    if not dinov2:
      raise errors.UsageError(f"{flag}=dinov2 needs --dinov2=DIR (a transformers DINOv2 folder, "
                              "e.g. facebook/dinov2-giant).")
    from ambient_jax.metrics import dinov2 as dinov2_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax.metrics.dinov2_features import dinov2_features  # pylint: disable=g-import-not-at-top
    model, _ = dinov2_lib.load_dinov2(dinov2)
    return FeatureSpace(name, lambda x: dinov2_features(model, x, pooling=pooling), None, False)
  if name == "digits":
    if not gray:
      raise errors.UsageError("the digit feature network (fd, kid, --attack_features=digits) is "
                              "meaningful only for gray digits-like images; these images are "
                              "colour: use --metrics=fid --inception_weights=FILE, and "
                              f"{flag}=inception, dinov2 or pixels.")
    from ambient_jax.metrics import digit_features  # pylint: disable=g-import-not-at-top
    net = digit_features.get_digit_feature_net(resolution, cache_dir=cache_dir, log=log,
                                               steps=feature_steps)
    return FeatureSpace(name, lambda x: net.features(np.asarray(x)[..., :1]), net, True)
  return FeatureSpace("pixels", None, None, True)
