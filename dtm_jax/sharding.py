"""Device mesh, parameter and batch shardings, and host-local → global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also split the large
parameters and optimizer moments). The batch is split over both axes. A parameter is sharded over `fsdp` along its
largest dimension that the axis divides, once it holds at least `min_fsdp_size` elements; smaller ones are replicated.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
  axis_types = (AxisType.Auto, AxisType.Auto)
  slices = len({getattr(d, "slice_index", 0) for d in (devices if devices is not None else jax.devices())})
  if slices > 1:  # multi-slice: data parallelism spans the slices (over DCN); FSDP stays inside a slice (ICI)
    if data % slices:
      raise ValueError(f"mesh data={data} must be a multiple of the {slices} slices: data parallelism spans the "
                       "slices and FSDP stays within one; set --config.mesh.fsdp to at most the devices of a slice.")
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices=devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, BATCH_AXES, axis_types=axis_types)
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)


def config_mesh(config) -> Mesh:
  """The mesh a run's `config.mesh` block asks for (data × fsdp over all devices)."""
  return make_mesh(config.mesh.data, config.mesh.fsdp)


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


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `abstract`'s leaves carrying the matching shardings (restore targets, AOT inputs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def put_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Identical host values on every process → global arrays with the given shardings (multi-host safe). Arrays that
  already have their sharding (e.g. a teacher restored onto the run's mesh) are kept as they are."""
  def put(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble one global jax.Array per key from each process's local slice of the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def varying_like(x, like):
  """Inside shard_map, marks x as varying over the mesh axes `like` varies over (a no-op elsewhere).

  shard_map types every value by the mesh axes it may differ over. Values made from constants (a loop's initial
  state) or returned by an FFI call carry none, so a while loop whose body mixes them with per-device data, or a
  gradient that must match its primal's type, needs them marked.
  """
  axes = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # releases before pcast


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier releases called it `vma`
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
