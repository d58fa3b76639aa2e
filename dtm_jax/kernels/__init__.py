"""Native CPU kernels: compiled on first use with the host's C++ compiler, registered as XLA FFI custom calls.

morphing_cpu.cc holds the rounds of dynamic token morphing and the group sums of the DTM loss, two jobs that
XLA:CPU does with many small gathers and scatters (see dtm_jax.morphing). The shared library is built once per
source, compiler and jax version into a cache folder ($DTM_JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/dtm_jax/kernels
or ~/.cache/dtm_jax/kernels) and reused by later processes; building takes a few seconds. Without a working
compiler (`c++`, or $CXX) morphing falls back to its XLA implementation and logs why.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from dtm_jax import sharding

MORPH_TARGET = "dtm_morph_gram"
GROUP_SUMS_TARGET = "dtm_group_sums"
_SOURCE = pathlib.Path(__file__).with_name("morphing_cpu.cc")
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-w")


class KernelUnavailableError(RuntimeError):
  """The CPU kernels could not be built or loaded; the message says why and what to do."""


def cache_dir() -> pathlib.Path:
  if os.environ.get("DTM_JAX_KERNEL_CACHE"):
    return pathlib.Path(os.environ["DTM_JAX_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "dtm_jax" / "kernels"


def _compiler() -> str:
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise KernelUnavailableError(
        f"No C++ compiler {compiler!r} on PATH to build dtm_jax's CPU morphing kernels; install one (e.g. "
        "`apt-get install g++`) or set CXX. Morphing works without them, several times slower on CPUs.")
  return compiler


def _build(compiler: str) -> pathlib.Path:
  """Compiles morphing_cpu.cc into the cache (once per source, compiler and jax version); returns the library."""
  key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), compiler.encode(), jax.__version__.encode(),
                                   " ".join(_FLAGS).encode()])).hexdigest()[:16]
  library = cache_dir() / f"libdtm_morphing_{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:
    built = pathlib.Path(build_dir) / library.name
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
    logging.info("Building dtm_jax's CPU morphing kernels: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise KernelUnavailableError(f"Building dtm_jax's CPU morphing kernels failed ({' '.join(command)}):\n"
                                   f"{result.stderr}")
    os.replace(built, library)  # atomic: concurrent builders each install a complete file
  return library


@functools.cache
def _load() -> None:
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
  except OSError as error:  # an unwritable cache folder, a compiler that vanished, a library that won't load
    raise KernelUnavailableError(
        f"Building or loading dtm_jax's CPU morphing kernels failed: {error}. If the cache folder {cache_dir()} is "
        "not writable, set DTM_JAX_KERNEL_CACHE to one that is.") from error
  jax.ffi.register_ffi_target(MORPH_TARGET, jax.ffi.pycapsule(library.DtmMorphGram), platform="cpu")
  jax.ffi.register_ffi_target(GROUP_SUMS_TARGET, jax.ffi.pycapsule(library.DtmGroupSums), platform="cpu")


def require() -> None:
  """Builds and registers the kernels if needed; raises KernelUnavailableError (with the reason) if they can't be."""
  _load()


@functools.cache
def available() -> bool:
  """Whether the kernels can be used here; logs the reason once when not."""
  try:
    _load()
    return True
  except KernelUnavailableError as error:
    logging.warning("%s", error)
    return False


def morph_gram(gram, num_merge, num_iters, protected, *, max_iters):
  """Group ids int32 [L, B, N] of L schedules (num_merge, num_iters int32 [L, B]) from the Gram f32 [B, N, N]."""
  require()
  num_schedules, (batch, num_tokens, _) = num_merge.shape[0], gram.shape
  call = jax.ffi.ffi_call(MORPH_TARGET, jax.ShapeDtypeStruct((num_schedules, batch, num_tokens), jnp.int32),
                          vmap_method="sequential")
  return sharding.varying_like(call(gram, num_merge, num_iters, protected, max_iters=max_iters), gram)


@jax.custom_vjp
def group_sums(values, groups):
  """Sums of values f32 [B, N, C] per group id, for each of L partitions groups int32 [L, B, N] → f32 [L, B, N, C].

  Differentiable in values: the gradient of a token is the gradient of its group's sum, a gather done by XLA.
  """
  require()
  call = jax.ffi.ffi_call(GROUP_SUMS_TARGET, jax.ShapeDtypeStruct(groups.shape + values.shape[-1:], jnp.float32),
                          vmap_method="sequential")
  return sharding.varying_like(call(values, groups), values)


def _group_sums_forward(values, groups):
  return group_sums(values, groups), groups


def _group_sums_backward(groups, sums_gradient):
  token_gradients = jnp.take_along_axis(sums_gradient, groups[..., None], axis=-2)  # [L, B, N, C]
  return jnp.sum(token_gradients, axis=0), None


group_sums.defvjp(_group_sums_forward, _group_sums_backward)
