"""Image mosaics and titled PNG figures: the one place that turns arrays into pictures.

`tile` lays [n, H, W, C] images in [-1, 1] out as one uint8 mosaic; `save_png` writes
titled mosaics side by side (matplotlib, Agg) through `storage`, so local and gs://
paths work alike. Used by the training sample grids, evaluation and the benchmarks.
"""

from __future__ import annotations

import math

import numpy as np

from ambient_jax.runtime import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels (rounded, clipped): how images are saved."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]."""
  return np.asarray(pixels).astype(np.float32) / 127.5 - 1.0


def tile(images: np.ndarray, pad: int = 1, cols: int | None = None) -> np.ndarray:
  """[n, H, W, C] in [-1, 1] -> one uint8 [rows·(H+pad), cols·(W+pad), C] mosaic
  (square by default)."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  pixels = to_uint8(images)
  for k in range(n):
    r, q = divmod(k, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[k]
  return out


def save_png(path: str, panels: list[tuple[str, np.ndarray]], suptitle: str) -> None:
  """Side-by-side titled mosaics (uint8 [H, W, C]) -> PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  h, w = panels[0][1].shape[:2]
  scale = max(1.0, 300.0 / max(h, w))  # at least ~300 px a panel
  dpi = 100
  fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * w * scale / dpi + 0.4,
                                                    h * scale / dpi + 0.9), dpi=dpi)
  for ax, (title, mosaic) in zip(np.atleast_1d(axes), panels):
    ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.suptitle(suptitle, fontsize=10)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=dpi)
  plt.close(fig)
