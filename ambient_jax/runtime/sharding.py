"""Mesh, shardings and multi-process start-up.

One mesh with two axes, both `AxisType.Auto` (jax 0.10's `jax.make_mesh` defaults to
explicit axes, which a plain data-parallel convolution net rejects):
  data  batch split; parameters replicated across it;
  fsdp  batch split too, and each large parameter sharded along its largest divisible
        dimension; gathered for use in the step (`gather_for_use`). fsdp = 1 (the
        default) is plain data parallelism.
The global batch is sharded over ("data", "fsdp"), so its size must be divisible by
data * fsdp. Gradients are averaged by the compiler (a mean over a sharded batch).
"""

from __future__ import annotations

from absl import logging
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           auto: bool = False) -> bool:
  """Starts `jax.distributed` when this process is one of several. Call before any jax op.

  - `coordinator_address` (host:port) with `num_processes` and `process_id`: explicit
    start, e.g. several CPU processes on one machine or a hand-rolled GPU cluster.
  - `auto=True`: `jax.distributed.initialize()` with no arguments, which detects
    Cloud TPU pod slices, SLURM and Open MPI by itself.
  - neither: single process, nothing to do.
  On the CPU platform the cross-process collectives go through gloo.
  Returns True when jax.distributed was initialised.
  """
  if not coordinator_address and not auto:
    return False
  # Only the CPU client reads this; on TPU/GPU it is a no-op.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("coordinator_address needs num_processes and process_id too; got "
                       f"num_processes={num_processes}, process_id={process_id}.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `config.mesh`; data = -1 takes all remaining devices."""
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if data == -1:
    data = num_devices // max(fsdp, 1)
  return data, fsdp


def make_mesh(mesh_config: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  if data * fsdp != len(devices):
    raise ValueError(f"config.mesh: data * fsdp = {data} * {fsdp} = {data * fsdp} must equal the "
                     f"number of devices ({len(devices)}); use data=-1 to take all of them.")
  return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


FSDP_MIN_SIZE = 2**14  # default config.mesh.fsdp_min_size


def param_sharding(mesh: Mesh, abstract_tree: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
  """Sharding for each parameter-like leaf: replicated, or FSDP-sharded when fsdp > 1.

  With fsdp > 1 a leaf of at least `min_size` elements is split along its largest
  dimension divisible by the fsdp size (big_vision's rule); smaller or indivisible
  leaves stay replicated. A rule by shape, not by the models' logical axis names, so that it
  covers any network and the optimizer state alike; the names stay available for users who
  want `nnx.logical_to_mesh_sharding`.
  """
  fsdp = mesh.shape["fsdp"]

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % fsdp == 0:
        spec = [None] * len(shape)
        spec[axis] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(one, abstract_tree)


def _gather_one(full: NamedSharding, home: NamedSharding) -> Callable[[jax.Array], jax.Array]:
  """x -> x replicated on `full`; its cotangent goes back to `home` (the FSDP layout).

  A plain with_sharding_constraint would transpose to the same (replicated) constraint on
  the gradient: one full all-reduce and a full-size gradient on every device. Constraining
  the cotangent to the parameter's own sharding lets XLA reduce-scatter it instead.
  """

  @jax.custom_vjp
  def gather(x):
    return jax.lax.with_sharding_constraint(x, full)

  def forward(x):
    return gather(x), None

  def backward(_, cotangent):
    return (jax.lax.with_sharding_constraint(cotangent, home),)

  gather.defvjp(forward, backward)
  return gather


def gather_for_use(param_shardings: Any = None) -> Callable[[Any], Any]:
  """params -> params replicated for the forward pass, when `param_shardings` shard them.

  Called inside the jitted step on the parameters just before the network uses them
  (ZeRO-3 style): one all-gather per FSDP-sharded parameter, and in the backward pass its
  gradient reduced straight into its shards (reduce-scatter), so gradients, optimizer
  update and EMAs stay sharded. Without it XLA keeps the weights sharded and reshards
  activations in every layer instead (measured 10-34x the parameter bytes per step;
  benchmarks/communication.py). The identity when nothing is sharded or no shardings given.
  """
  leaves = jax.tree.leaves(param_shardings)
  if not leaves or all(all(p is None for p in s.spec) for s in leaves):
    return lambda params: params
  full = replicated(leaves[0].mesh)
  gathers = jax.tree.map(lambda s: _gather_one(full, s), param_shardings)
  return lambda params: jax.tree.map(lambda g, p: g(p), gathers, params)


def replicate_for_use(param_shardings: Any = None) -> Callable[[Any], Any] | None:
  """tree -> the same tree replicated over the mesh, for weights gathered block by block.

  The per-block form of `gather_for_use` for weights that take no gradient (a frozen FSDP
  base): the UNet applies it to each block's weights right before the block runs, inside
  its rematerialized region (`latent.unet.BlockCall`), so that one block's gathered weights
  are live at a time, and the backward pass gathers them again instead of keeping the
  whole gathered model alive from the forward pass. A custom JVP passes tangents through
  unconstrained (forward mode, as in `posterior_cov` chains, and its transpose both work).
  None when `param_shardings` shard nothing (nothing to gather).
  """
  leaves = jax.tree.leaves(param_shardings)
  if not leaves or all(all(p is None for p in s.spec) for s in leaves):
    return None
  full = replicated(leaves[0].mesh)

  @jax.custom_jvp
  def gather(x):
    return jax.lax.with_sharding_constraint(x, full)

  gather.defjvp(lambda primals, tangents: (gather(primals[0]), tangents[0]))
  return lambda tree: jax.tree.map(gather, tree)


def host_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """[start, stop) rows of the global batch whose shards live on this process.

  Each process loads exactly these rows and assembles the global array with
  `jax.make_array_from_process_local_data`.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts, stops = [], []
  for index in index_map.values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_batch if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  covered = set()
  for a, b in zip(starts, stops):
    covered.update(range(a, b))
  if len(covered) != stop - start:
    raise ValueError("This process's batch shards are not contiguous; build the mesh with "
                     "sharding.make_mesh so that each process owns one block of rows.")
  return start, stop


def global_batch_from_host(sharding: NamedSharding, local: Any, global_batch: int) -> Any:
  """Host-local numpy rows (a pytree) -> global jax.Arrays sharded by `sharding`."""

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch,) + x.shape[1:])

  return jax.tree.map(one, local)
