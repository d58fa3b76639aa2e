"""Process set-up for CPU-only JAX runs: keep freed host memory, and turn off XLA:CPU's YNNPACK fusions.

Both were measured on the CPU benchmarks (docs/BENCHMARKS.md) and both must happen first thing in a process, before
JAX starts its backend and threads; `configure()` does them when JAX can only run on the CPU here, and leaves GPU/TPU
hosts alone (their large buffers live on the device, and one malloc arena could slow the input pipeline's threads).

* Freed memory: XLA:CPU allocates its large temporaries (activations, group sums: tens of MB) afresh in every step,
  from its worker threads. glibc hands such blocks out as new pages and gives them back on free, so every step pays
  a page fault per 4 KiB touched: ~25,000 faults and 2/3 of the time of the morphing benchmark, ~10% of the CPU
  train step. One malloc arena with high mmap/trim thresholds keeps the pages mapped and reused instead (the process
  keeps its peak host memory).
* YNNPACK fusions (jax 0.10's XLA:CPU): they reduce over a leading axis 60× slower than XLA's own loops (the
  gradient of an attention bias broadcast over the batch: 11.7 vs 0.2 ms for [16, 3, 197, 197]) and materialise
  broadcasts for their operands; without them the ViT-Tiny train step is ~10% faster and its student backward ~20%.
  A flag the user set in XLA_FLAGS wins. Applied with the jaxlib versions it was measured on (XLA rejects flags it
  does not know, so others are left alone).
"""
import ctypes
import glob
import importlib.metadata
import os
import pathlib

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_BELOW_BYTES = 1 << 30
_GPU_PACKAGES = ("jax-cuda", "jax-rocm")
_GOOGLE_PCI_VENDOR = "0x1ae0"
_YNN_FUSIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FLAG_JAXLIB_VERSIONS = ("0.10.",)


def cpu_only() -> bool:
  """JAX runs on the CPU only when JAX_PLATFORMS says so, or when no GPU plugin is installed and no TPU is attached.

  The TPU runtime (libtpu) alone does not make a TPU host: `--mode=compile` and the tests install it on machines
  without TPUs, to compile for TPU slices.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return {p.strip() for p in platforms.split(",")} == {"cpu"}
  installed = [(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()]
  if any(name.startswith(_GPU_PACKAGES) for name in installed):
    return False
  return not (any(name.startswith("libtpu") for name in installed) and tpu_attached())


def tpu_attached() -> bool:
  """Whether a Google TPU chip is on this machine's PCI bus (what JAX itself looks for on Cloud TPU VMs)."""
  return any(pathlib.Path(path).read_text().strip() == _GOOGLE_PCI_VENDOR
             for path in glob.glob("/sys/bus/pci/devices/*/vendor"))


def keep_freed_memory() -> bool:
  """One malloc arena, 1 GiB mmap and trim thresholds; False where malloc is not glibc's."""
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES),
              mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES)])


def turn_off_ynnpack_fusions() -> bool:
  """Adds the flag that turns YNNPACK fusions off to XLA_FLAGS, unless XLA_FLAGS already sets it or this jaxlib
  was not checked to have it."""
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if _YNN_FUSIONS_FLAG in flags or not jaxlib_version.startswith(_YNN_FLAG_JAXLIB_VERSIONS):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FUSIONS_FLAG}=".strip()
  return True


def configure() -> bool:
  """Applies both settings when JAX can only run on the CPU here; returns whether it did. Call it first.

  It also pins JAX_PLATFORMS=cpu there, so that an installed TPU runtime does not make JAX look for a TPU first
  (~10 s of errors at start-up).
  """
  if not cpu_only():
    return False
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  keep_freed_memory()
  turn_off_ynnpack_fusions()
  return True
