"""The platform a program is built for, decided once from the devices it will run on.

Some choices depend on the hardware: the native CPU kernels (dtm_jax.kernels) exist only for CPUs, attention takes
cuDNN's fused kernel on GPUs, morphing avoids scatters on accelerators. They must follow the devices the program is
compiled for, not the process's default backend: `--mode=compile` builds TPU programs in a CPU-only process, and a
CPU custom call inside a TPU program fails to compile ("Custom emitter ... not found").

Every entry point (pretraining, evaluation, the compile mode, benchmarks) builds its programs inside
`building_for(mesh)`; models and morphing ask `current()` while they are traced. Outside any `building_for` (unit
tests, notebooks) the default backend's devices are assumed.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What a program is built for: the platform of its devices and how many devices the mesh has."""
  platform: str
  num_devices: int

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f"platform={self.platform!r} is not one of {PLATFORMS}.")

  @property
  def is_cpu(self) -> bool:
    return self.platform == "cpu"


_TARGET: contextvars.ContextVar[Hardware | None] = contextvars.ContextVar("dtm_jax_platform_target", default=None)


def platform_of(device) -> str:
  """"cpu", "gpu" or "tpu" for a jax Device (CUDA and ROCm devices report "gpu"; topology TPU devices "tpu")."""
  name = device.platform.lower()
  return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def of_mesh(mesh) -> Hardware:
  platforms = {platform_of(d) for d in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f"The mesh mixes devices of several platforms {sorted(platforms)}; use one kind.")
  return Hardware(platforms.pop(), mesh.devices.size)


@contextlib.contextmanager
def building_for(mesh=None, *, platform: str | None = None, num_devices: int | None = None):
  """Programs traced inside are built for the mesh's devices (or an explicit platform and device count, for
  lowering to a platform this process has no devices of, e.g. CUDA programs checked on a CPU host)."""
  target = of_mesh(mesh) if mesh is not None else None
  if platform is not None:
    target = Hardware(platform, num_devices if num_devices is not None else (target.num_devices if target else 1))
  if target is None:
    raise ValueError("building_for needs a mesh or a platform.")
  token = _TARGET.set(target)
  try:
    yield target
  finally:
    _TARGET.reset(token)


def current() -> Hardware:
  """The target of the program being built; outside `building_for`, the default backend's devices."""
  target = _TARGET.get()
  if target is None:
    devices = jax.devices()
    target = Hardware(platform_of(devices[0]), len(devices))
  return target
