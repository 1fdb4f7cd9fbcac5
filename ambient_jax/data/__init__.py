"""Datasets (tfds builders), fixed per-example corruption and host-sharded batches.

    dataset = data.load_dataset(config.data)        # clean source + per-example σ_n table
    loader = data.GlobalBatchLoader(dataset, B, seed, sharding)
    batch = loader.batch(step)                      # global jax.Arrays, this host's rows read
    x_n = corruption.corrupt(uint8_to_float(batch["image"]), batch["index"],
                             batch["sigma_n"], config.data.corruption_seed)  # inside jit
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ambient_jax.data import corruption, registry, sources
from ambient_jax.data.loader import GlobalBatchLoader
from ambient_jax.data.registry import DATASETS, DatasetSpec, get_spec
from ambient_jax.data.sources import DatasetNotReadyError

__all__ = ["DATASETS", "DatasetNotReadyError", "DatasetSpec", "GlobalBatchLoader",
           "NoisyImageDataset", "corruption", "get_spec", "load_dataset", "registry", "sources"]


@dataclasses.dataclass
class NoisyImageDataset:
  """Clean images by index plus the fixed corruption that defines the training set."""
  source: sources.ImageSource
  sigma_n: np.ndarray          # [N] float32 per-example noise level (0 = clean)
  corruption_seed: int
  spec: DatasetSpec

  @property
  def num_examples(self) -> int:
    return self.source.num_examples

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.source.resolution, self.source.resolution, self.source.channels)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{"image": uint8 [b, H, W, C] (clean: the noise is added inside the step), "index",
    "label": int32 [b], "sigma_n": float32 [b]} of examples `indices` (the loader's protocol)."""
    images, labels = self.source.get(indices)
    return {"image": images, "index": np.asarray(indices, np.int32),
            "sigma_n": self.sigma_n[indices], "label": np.asarray(labels, np.int32)}


def sigma_n_levels(data_config: Any) -> tuple[float, ...]:
  """config.data.sigma_n as a tuple of levels (it may be a float or a sequence)."""
  return tuple(float(s) for s in np.atleast_1d(np.asarray(data_config.sigma_n, np.float64)))


def load_dataset(data_config: Any, barrier=None) -> NoisyImageDataset:
  """Prepares (if allowed) and opens `config.data.name`, and builds its σ_n table.

  `barrier`: called between process 0 preparing the dataset and the others opening it
  (multi-host runs pass a cross-process sync), so that they do not race on a shared dir.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    sources.prepare(data_config)
  if barrier is not None:
    barrier()
  if jax.process_index() != 0:
    sources.prepare(data_config)  # no-op on a shared data dir
  source = sources.open_source(data_config)
  table = corruption.sigma_n_table(source.num_examples, sigma_n_levels(data_config),
                                   data_config.clean_fraction, tuple(data_config.sigma_n_weights),
                                   data_config.corruption_seed)
  return NoisyImageDataset(source, table, int(data_config.corruption_seed),
                           registry.get_spec(data_config.name))
