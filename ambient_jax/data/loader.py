"""Host-sharded global batches whose order is a pure function of (seed, epoch).

Step s of training uses epoch e = s // steps_per_epoch and the rows
[(s mod steps_per_epoch)·B, ... + B) of the permutation of (seed, e); the last partial
batch of an epoch is dropped. So the step number is the whole loader state: resuming
needs nothing else, and any host can compute any batch. Each process reads only the
rows its devices own and assembles the global arrays with
`jax.make_array_from_process_local_data`.

With gradient accumulation (k micro-batches a step) the batch's rows are written in
`physical_order`, so that the step can cut it into micro-batches without moving rows
between devices (`training.step.micro_batches` undoes the order); k = 1 is the plain order.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Iterator, Optional, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

from ambient_jax import errors
from ambient_jax.runtime import sharding as sharding_lib

_ORDER_SALT = 0x0DE7  # data order stream, independent of every other use of the seed


class ExampleSource(Protocol):
  """What the loader reads: `num_examples`, and `get_batch(indices [b]) -> {name: [b, ...]}`
  (numpy arrays, one row per index). Pixel datasets (`data.NoisyImageDataset`) and
  prepared latent datasets (`data.latent.LatentDataset`) both are one."""
  num_examples: int

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    ...


def physical_order(logical: np.ndarray, num_micro: int, num_shards: int) -> np.ndarray:
  """The batch's rows as written for a step that splits it into `num_micro` micro-batches
  over `num_shards` devices: logical [B] (position p = m·b + r: micro m, row r; b = B/k)
  -> [B] with position p at row (r // c)·(B/N) + m·c + r % c, c = b/N.

  Device d holds rows d·B/N .. (d+1)·B/N − 1 of the sharded batch: rows m·c .. (m+1)·c − 1
  of its block are its share of micro-batch m. [k, N, c] -> [N, k, c]; the identity for k = 1.
  """
  logical = np.asarray(logical)
  total = logical.shape[0]
  if total % (num_micro * num_shards):
    raise ValueError(f"a batch of {total} does not split into {num_micro} micro-batches over "
                     f"{num_shards} devices.")
  per = total // (num_micro * num_shards)
  return logical.reshape((num_micro, num_shards, per) + logical.shape[1:]).swapaxes(0, 1).reshape(
      logical.shape)


class GlobalBatchLoader:
  """batch(step) -> the source's `get_batch` fields for the global batch of that step, as
  global jax.Arrays sharded by `sharding` (or, through `host_batch`, this host's numpy rows).

  micro_batches: k of a step with gradient accumulation; the rows are then written in
  `physical_order` over the devices of `sharding` (`num_shards`: their count when there is
  no sharding). The "index" field is always the example's dataset index.
  """

  def __init__(self, source: ExampleSource, global_batch: int, seed: int,
               sharding: Optional[NamedSharding] = None,
               rows: Optional[tuple[int, int]] = None, micro_batches: int = 1,
               num_shards: Optional[int] = None):
    if global_batch > source.num_examples:
      raise errors.UsageError(f"config.batch_size = {global_batch} is larger than the dataset "
                              f"({source.num_examples} examples): lower it, or raise "
                              "config.data.max_examples.")
    self.source = source
    self.global_batch, self.seed, self.sharding = global_batch, seed, sharding
    self.steps_per_epoch = source.num_examples // global_batch
    if rows is None:
      rows = (sharding_lib.host_rows(sharding, global_batch) if sharding is not None
              else (0, global_batch))
    self.rows = rows
    if num_shards is None:
      num_shards = 1 if sharding is None else sharding_lib.data_parallel_size(sharding.mesh)
    self.micro_batches, self.num_shards = int(micro_batches), int(num_shards)
    physical_order(np.arange(global_batch), self.micro_batches, self.num_shards)  # checks the split
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  def permutation(self, epoch: int) -> np.ndarray:
    """The data order of `epoch`: a permutation of all example indices."""
    if epoch not in self._perms:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _ORDER_SALT), epoch)
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        self._perms[epoch] = np.asarray(jax.random.permutation(key, self.source.num_examples))
      while len(self._perms) > 2:
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def global_indices(self, step: int) -> np.ndarray:
    """Example indices [B] of the global batch used by training step `step` (0-based), in
    logical order: entry p is the example at position p (its keys are fold_in(·, p))."""
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    return self.permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]

  def physical_indices(self, step: int) -> np.ndarray:
    """Example indices [B] of batch `step` in the order its rows are written (`physical_order`)."""
    return physical_order(self.global_indices(step), self.micro_batches, self.num_shards)

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of batch `step`, as numpy arrays."""
    start, stop = self.rows
    return self.source.get_batch(self.physical_indices(step)[start:stop])

  def batch(self, step: int) -> dict[str, jax.Array]:
    """Global batch `step` as sharded jax.Arrays."""
    return sharding_lib.global_batch_from_host(self.sharding, self.host_batch(step),
                                               self.global_batch)

  def iterate(self, start_step: int, stop_step: int, prefetch: int = 2
              ) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """(step, global batch) for start_step <= step < stop_step; host reads run ahead in a thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = collections.deque()
      step = start_step
      while step < stop_step or pending:
        while step < stop_step and len(pending) < max(prefetch, 1):
          pending.append((step, pool.submit(self.host_batch, step)))
          step += 1
        s, future = pending.popleft()
        yield s, sharding_lib.global_batch_from_host(self.sharding, future.result(),
                                                     self.global_batch)
