"""Test set-up: 8 fake CPU devices, and TensorFlow kept off any GPU.

The XLA flag must be set before JAX initialises its backends, so it lives here at import time.
"""
import os
import sys

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from dtm_jax.runtime import cpu_host  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_host.configure()

# Many tests build the same tiny train step (in this process and in the main.py subprocesses they launch): a
# persistent compilation cache makes each program compile once per test session instead of once per test.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dtm_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
