"""Fixed per-example corruption: the noise is part of the dataset (METHOD.md §1).

Example i of the dataset is seen only as x_n[i] = x0[i] + σ_n[i] · z[i], where
- σ_n[i] comes from a table built once from (corruption seed, N, levels, fractions), and
- z[i] ~ N(0, I) is drawn from `fold_in(key(corruption_seed), i)`,
so every epoch, host, device count, batch composition and resume sees the same noisy
image. The table lives on the host (numpy); `corrupt` is a pure jax function that runs
inside the jitted train step on each device's own rows.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax.precond import expand

_LEVELS_SALT = 0x5EED1E7E  # keeps the level assignment independent of the noise draws


def sigma_n_table(num_examples: int, sigma_n: Union[float, Sequence[float]],
                  clean_fraction: float = 0.0, weights: Sequence[float] = (),
                  seed: int = 0) -> np.ndarray:
  """Per-example noise levels [N] float32: exactly round(clean_fraction·N) clean (0) examples,
  the rest split over the levels in `sigma_n` in proportion to `weights` (equal if empty).

  Which example gets which level is a fixed random permutation of (seed, N), so classes
  sorted in the source do not all land on the same level.
  """
  levels = np.atleast_1d(np.asarray(sigma_n, np.float64))
  weights = np.ones(len(levels)) if len(weights) == 0 else np.asarray(weights, np.float64)
  if len(weights) != len(levels):
    raise ValueError(f"sigma_n_weights has {len(weights)} entries for {len(levels)} levels.")
  num_clean = int(round(clean_fraction * num_examples))
  num_noisy = num_examples - num_clean
  bounds = np.rint(np.cumsum(weights) / weights.sum() * num_noisy).astype(np.int64)
  per_rank = np.zeros((num_examples,), np.float32)
  start = num_clean
  for level, stop in zip(levels, bounds + num_clean):
    per_rank[start:stop] = level
    start = stop
  key = jax.random.fold_in(jax.random.key(seed), _LEVELS_SALT)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    rank = np.asarray(jax.random.permutation(key, num_examples))
  return per_rank[rank]


def example_noise(indices: jax.Array, shape: Sequence[int], seed: Union[int, jax.Array],
                  dtype=jnp.float32) -> jax.Array:
  """z[i] ~ N(0, I) from fold_in(key(seed), i), for indices [B] -> [B, *shape]."""
  base = jax.random.key(seed) if not _is_key(seed) else seed
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(shape), dtype))(
      jnp.asarray(indices, jnp.uint32))


def corrupt(x0: jax.Array, indices: jax.Array, sigma_n: jax.Array,
            seed: Union[int, jax.Array]) -> jax.Array:
  """x_n = x0 + σ_n · z[index]: x0 [B, ...] in [-1, 1], indices [B], σ_n [B] -> [B, ...]."""
  z = example_noise(indices, x0.shape[1:], seed, x0.dtype)
  return x0 + expand(sigma_n.astype(x0.dtype), x0) * z


def uint8_to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
