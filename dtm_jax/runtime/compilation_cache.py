"""JAX's persistent compilation cache, on by default: a restarted or resumed run reuses the compiled step instead of
compiling it again (minutes for ViT-L on a pod).

Where: `--compilation_cache_dir` if given ("" turns the cache off), else $JAX_COMPILATION_CACHE_DIR if set, else
`~/.cache/dtm_jax/jax_compilation_cache` ($XDG_CACHE_HOME respected). A `gs://` folder works (JAX writes through
etils). Sharing is safe: JAX names entries by a hash of the program, the compile options, the devices and the
jax/jaxlib versions; only process 0 of a job writes; and with a size limit (MAX_BYTES, least recently used entries
evicted) every read and write holds the folder's lock file, so several jobs on one machine or bucket never see a
half-written entry (a damaged entry would only cost a warning and a fresh compilation). Only programs that took
≥ 1 s to compile are stored.
"""
from __future__ import annotations

import os

import jax
from absl import logging

MIN_COMPILE_SECONDS = 1.0
MAX_BYTES = 20 * 2 ** 30  # $JAX_COMPILATION_CACHE_MAX_SIZE overrides


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dtm_jax", "jax_compilation_cache")


def enable(directory: str | None = None) -> str | None:
  """Turns the cache on in `directory` (None: $JAX_COMPILATION_CACHE_DIR or default_dir(); "": off). Returns the
  folder used, or None when off. Call before the first compilation."""
  if directory is None:
    directory = jax.config.jax_compilation_cache_dir or default_dir()
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("Persistent compilation cache off.")
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  logging.info("Persistent compilation cache in %s.", directory)
  return directory
