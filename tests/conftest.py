"""Test set-up: 8 fake CPU devices, and TensorFlow kept off any GPU.

The XLA flag must be set before JAX initialises its backends, so it lives here at import time.
"""
import os
import signal
import sys

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The repository (dtm_jax, configs, tools) and the shared test helpers (train_testing, eval_testing, ...) import
# from every test folder.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from dtm_jax.runtime import cpu_host  # pylint: disable=g-import-not-at-top,wrong-import-position

cpu_host.configure()

# Many tests build the same tiny train step (in this process and in the main.py subprocesses they launch): a
# persistent compilation cache makes each program compile once per test session instead of once per test.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dtm_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def sigint_guard():
  """SIGINT sent by a test never reaches pytest's own handler (which would end the session)."""
  previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def torch():
  """torch, for the tests marked `torch` (imported here, not at module level, so the others run without it)."""
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def transformers():
  return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def ref(torch, transformers):
  """tests/torch_reference.py: PyTorch/transformers references of our models (imports both at its top)."""
  del torch, transformers  # imported (or skipped) first
  from tests import torch_reference  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return torch_reference


@pytest.fixture(scope="module")
def gcs():
  """A GCS emulator on 127.0.0.1 for one module's tests, with every client pointed at it (tests/gcs_emulator.py)."""
  emulator = gcs_emulator.Emulator().start()
  previous = gcs_emulator.set_env(emulator.env)
  undo = gcs_emulator.use_fsspec_for_gs()
  try:
    yield emulator
  finally:
    undo()
    gcs_emulator.restore_env(previous)
    emulator.stop()


@pytest.fixture(scope="session")
def mesh():
  """The (data=4, fsdp=2) mesh over the 8 fake CPU devices."""
  from dtm_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(data=4, fsdp=2)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` marker: tests that compare against PyTorch (and transformers/timm) references. They import torch
# inside the test, so a machine without torch still collects and runs everything else.

TORCH_MISSING = "torch is not installed (pip install -r requirements-test.txt)"


def _in_ci():
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _torch_import_error():
  """Why `import torch` fails here, or None. Any exception counts: a broken wheel raises OSError, not ImportError."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel  # noqa: F401
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `-m "not torch"` runs without torch, in CI too
def pytest_collection_modifyitems(config, items):
  """Skips the `torch` tests where torch cannot be imported; in CI (CI set) that is an error, not a skip."""
  del config
  marked = [item for item in items if item.get_closest_marker("torch") is not None]
  if not marked:
    return  # torch is imported only when a selected test needs it.
  error = _torch_import_error()
  if error is None:
    return
  if _in_ci():
    raise pytest.UsageError(
        f"CI is set but torch cannot be imported ({type(error).__name__}: {error}), so {len(marked)} tests marked "
        "`torch` would be skipped; skipped tests are not allowed in CI: pip install -r requirements-test.txt")
  skip = pytest.mark.skip(reason=TORCH_MISSING)
  for item in marked:
    item.add_marker(skip)
