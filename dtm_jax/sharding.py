"""Device mesh, parameter and batch shardings, and host-local → global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split the large
parameters and optimizer moments). The batch is split over both axes. A parameter is sharded over `fsdp` along its
largest dimension that the axis divides, once it holds at least `min_fsdp_size` elements; smaller ones are replicated.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes); -1 takes the remaining devices."""
  num_devices = len(devices) if devices is not None else jax.device_count()
  if data == -1 and fsdp == -1:
    raise ValueError("At most one of mesh.data and mesh.fsdp may be -1.")
  if data == -1:
    data = num_devices // max(fsdp, 1)
  if fsdp == -1:
    fsdp = num_devices // max(data, 1)
  if data * fsdp != num_devices:
    raise ValueError(f"mesh data={data} × fsdp={fsdp} = {data * fsdp} must equal the {num_devices} devices; "
                     "set --config.mesh.data=-1 to use all devices for data parallelism.")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_fsdp_size: int) -> P:
  """Shard the largest dimension divisible by the fsdp axis; replicate small or indivisible tensors."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(abstract_tree: PyTree, mesh: Mesh, min_fsdp_size: int = 2 ** 18) -> PyTree:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (parameters, optimizer state, teacher)."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_fsdp_size)), abstract_tree)


def host_batch_size(global_batch_size: int) -> int:
  """Examples each process loads per step; checks that every device gets the same number."""
  if global_batch_size % jax.device_count():
    raise ValueError(f"The global batch size {global_batch_size} must be divisible by the {jax.device_count()} "
                     "devices; change config.batch_size.")
  return global_batch_size // jax.process_count()


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble one global jax.Array per key from each process's local slice of the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}
