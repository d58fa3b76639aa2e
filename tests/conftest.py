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
