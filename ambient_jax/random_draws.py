"""Random draws from one PRNG key or from one key per example. Pure jax.

Every function takes `key`: either one key (a typed key of shape [] or a raw uint32 key
[2]), and then it is exactly today's `jax.random` call, bit for bit; or [B] keys (typed
[B] or raw [B, 2]), one per example, and then example i's draws come from keys[i] alone
(`jax.vmap` over the examples), so they do not depend on the batch the example is in: not
on the batch size, its order, the device count or how a step splits the batch into
micro-batches (gradient accumulation). Per-example draws need `shape[0] == B`.

The losses, `precond.sample_sigma` and `sampling.reverse_chain` draw through this module,
so a caller picks the behaviour by the key it passes. Training steps pass
`example_keys(step_key, positions)`: one key per example's position in the global batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def per_example(key: jax.Array) -> bool:
  """Whether `key` is [B] keys (typed [B] or raw uint32 [B, 2]) rather than one key."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  ndim = key.ndim if typed else key.ndim - 1
  if ndim not in (0, 1):
    raise ValueError(f"`key` must be one PRNG key or one per example ([B]); got shape {key.shape}.")
  return ndim == 1


def num_keys(key: jax.Array) -> int:
  """B of [B] per-example keys."""
  return key.shape[0]


def example_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per example: fold_in(key, p) for each position p in `positions` [B] -> [B] keys.

  Training steps pass the example's position in the global batch (0..B-1), so its draws
  are the same however the step splits the batch."""
  return jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.asarray(positions))


def _check_shape(key: jax.Array, shape: Sequence[int]) -> tuple:
  shape = tuple(shape)
  if not shape or shape[0] != num_keys(key):
    raise ValueError(f"per-example keys [{num_keys(key)}] draw an array whose first axis is the "
                     f"batch; got shape {shape}.")
  return shape


def split(key: jax.Array, num: int = 2) -> jax.Array:
  """`num` new keys: [num] from one key; [num, B] (each a set of per-example keys) from [B]."""
  if not per_example(key):
    return jax.random.split(key, num)
  return jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(key)


def fold_in(key: jax.Array, data: int | jax.Array) -> jax.Array:
  """jax.random.fold_in of one key, or of each of [B] keys with the same `data`."""
  if not per_example(key):
    return jax.random.fold_in(key, data)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def repeat(key: jax.Array, num: int) -> jax.Array:
  """Keys for `num` independent copies of a batch stacked as [num·B, ...] (e.g. the M
  chains of the consistency loss): one key is returned as it is (it draws the whole
  stacked array); [B] keys become [num·B], copy m's keys fold_in(keys, m)."""
  if not per_example(key):
    return key
  return jnp.concatenate([fold_in(key, m) for m in range(num)], axis=0)


def _per_example_draw(draw, key, shape, *bounds):
  """vmap of `draw(k, shape[1:], *bounds_i)` over [B] keys, bounds broadcast to `shape`."""
  shape = _check_shape(key, shape)
  bounds = [jnp.broadcast_to(jnp.asarray(b), shape) for b in bounds]
  return jax.vmap(lambda k, *b: draw(k, shape[1:], *b))(key, *bounds)


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of `shape` (jax.random.normal; per example: [B, ...])."""
  if not per_example(key):
    return jax.random.normal(key, shape, dtype)
  return _per_example_draw(lambda k, s: jax.random.normal(k, s, dtype), key, shape)


def uniform(key: jax.Array, shape: Sequence[int] = (), dtype=jnp.float32,
            minval: float | jax.Array = 0.0, maxval: float | jax.Array = 1.0) -> jax.Array:
  """Uniform draws in [minval, maxval) of `shape` (jax.random.uniform; bounds broadcast)."""
  if not per_example(key):
    return jax.random.uniform(key, shape, dtype, minval, maxval)
  return _per_example_draw(lambda k, s, lo, hi: jax.random.uniform(k, s, dtype, lo, hi),
                           key, shape, minval, maxval)


def randint(key: jax.Array, shape: Sequence[int], minval: int | jax.Array,
            maxval: int | jax.Array, dtype=jnp.int32) -> jax.Array:
  """Integers in [minval, maxval) of `shape` (jax.random.randint; bounds broadcast)."""
  if not per_example(key):
    return jax.random.randint(key, shape, minval, maxval, dtype)
  return _per_example_draw(lambda k, s, lo, hi: jax.random.randint(k, s, lo, hi, dtype),
                           key, shape, minval, maxval)


def rademacher(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """±1 with probability ½ each, of `shape` (jax.random.rademacher)."""
  if not per_example(key):
    return jax.random.rademacher(key, shape, dtype)
  return _per_example_draw(lambda k, s: jax.random.rademacher(k, s, dtype), key, shape)
