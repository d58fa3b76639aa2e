"""Host malloc settings for XLA:CPU runs: keep freed memory in the process.

XLA:CPU allocates its large temporaries (activations, group sums: tens of MB) afresh in every step, from its worker
threads. glibc hands such blocks out as new pages and gives them back on free, so every step pays a page fault per
4 KiB touched: ~25,000 faults and 2/3 of the time of the morphing benchmark, ~10% of the CPU train step. One malloc
arena with high mmap/trim thresholds keeps the pages mapped and reused instead (the process keeps its peak host
memory). Accelerator hosts are left alone: their large buffers live on the device, and one arena could slow the
input pipeline's many threads.
"""
import ctypes
import importlib.metadata
import os

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_BELOW_BYTES = 1 << 30
_ACCELERATOR_PACKAGES = ("jax-cuda", "jax-rocm", "libtpu")


def keep_freed_memory_on_cpu_hosts() -> bool:
  """Applies the settings when JAX can only run on the CPU here; returns whether they were applied.

  Call it first thing in a process (before computations start their threads). JAX runs on the CPU only when
  JAX_PLATFORMS says so or no GPU/TPU plugin is installed. Does nothing where malloc is not glibc's.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    cpu_only = {p.strip() for p in platforms.split(",")} == {"cpu"}
  else:
    installed = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    cpu_only = not any(name.lower().startswith(_ACCELERATOR_PACKAGES) for name in installed)
  if not cpu_only:
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES),
              mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES)])
