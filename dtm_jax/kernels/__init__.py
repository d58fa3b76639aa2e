"""Native CPU kernels: compiled on first use with the host's C++ compiler, registered as XLA FFI custom calls.

morphing_cpu.cc holds the rounds of dynamic token morphing and the group sums of the DTM loss, two jobs that
XLA:CPU does with many small gathers and scatters (see dtm_jax.morphing); attention_cpu.cc holds multi-head softmax
attention, forward and backward, one (image, head) per thread (see dtm_jax.models.layers.Attention). The shared
library is built once per source, compiler and jax version into a cache folder ($DTM_JAX_KERNEL_CACHE, else
$XDG_CACHE_HOME/dtm_jax/kernels or ~/.cache/dtm_jax/kernels) and reused by later processes; building takes a few
seconds. Without a working compiler (`c++`, or $CXX) morphing and attention fall back to their XLA versions and the
reason is logged once.
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
ATTENTION_FORWARD_TARGET = "dtm_attention_fwd"
ATTENTION_BACKWARD_TARGET = "dtm_attention_bwd"
_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "morphing_cpu.cc", _HERE / "attention_cpu.cc")
_HEADERS = (_HERE / "parallel_for.h",)
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
        f"No C++ compiler {compiler!r} on PATH to build dtm_jax's CPU kernels; install one (e.g. "
        "`apt-get install g++`) or set CXX. Morphing and attention work without them (XLA versions), several times "
        "slower on CPUs.")
  return compiler


def _build(compiler: str) -> pathlib.Path:
  """Compiles the sources into the cache (once per source, compiler and jax version); returns the library."""
  key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in _SOURCES + _HEADERS), compiler.encode(),
                                   jax.__version__.encode(), " ".join(_FLAGS).encode()])).hexdigest()[:16]
  library = cache_dir() / f"libdtm_kernels_{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:
    built = pathlib.Path(build_dir) / library.name
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(built)]
    logging.info("Building dtm_jax's CPU kernels: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise KernelUnavailableError(f"Building dtm_jax's CPU kernels failed ({' '.join(command)}):\n"
                                   f"{result.stderr}")
    os.replace(built, library)  # atomic: concurrent builders each install a complete file
  return library


@functools.cache
def _load() -> None:
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
  except OSError as error:  # an unwritable cache folder, a compiler that vanished, a library that won't load
    raise KernelUnavailableError(
        f"Building or loading dtm_jax's CPU kernels failed: {error}. If the cache folder {cache_dir()} is "
        "not writable, set DTM_JAX_KERNEL_CACHE to one that is.") from error
  jax.ffi.register_ffi_target(MORPH_TARGET, jax.ffi.pycapsule(library.DtmMorphGram), platform="cpu")
  jax.ffi.register_ffi_target(GROUP_SUMS_TARGET, jax.ffi.pycapsule(library.DtmGroupSums), platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_FORWARD_TARGET, jax.ffi.pycapsule(library.DtmAttentionForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_BACKWARD_TARGET, jax.ffi.pycapsule(library.DtmAttentionBackward),
                              platform="cpu")


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


@jax.custom_vjp
def attention(qkv, bias):
  """softmax(q·kᵀ/√d + bias)·v per head: qkv f32 [B, T, 3, H, d] (q, k, v in token-major layout), bias f32 [H, T, T]
  (shared by the batch) → f32 [B, T, H, d]. Differentiable in qkv and bias."""
  return _attention_forward(qkv, bias)[0]


def _attention_forward(qkv, bias):
  require()
  batch, tokens, _, heads, head_dim = qkv.shape
  call = jax.ffi.ffi_call(ATTENTION_FORWARD_TARGET,
                          (jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32),
                           jax.ShapeDtypeStruct((batch, heads, tokens, tokens), jnp.float32)),
                          vmap_method="sequential")
  out, probabilities = call(qkv, bias)
  out, probabilities = (sharding.varying_like(x, qkv) for x in (out, probabilities))
  return out, (qkv, probabilities, out)


def _attention_backward(residuals, d_out):
  qkv, probabilities, out = residuals
  call = jax.ffi.ffi_call(ATTENTION_BACKWARD_TARGET,
                          (jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                           jax.ShapeDtypeStruct(probabilities.shape, jnp.float32)),
                          vmap_method="sequential")
  d_qkv, d_scores = call(qkv, probabilities, out, d_out.astype(jnp.float32))
  return sharding.varying_like(d_qkv, qkv), jnp.sum(d_scores, axis=0)


attention.defvjp(_attention_forward, _attention_backward)
