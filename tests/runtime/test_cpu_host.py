"""dtm_jax.cpu_host: XLA:CPU steps stop page-faulting once freed host memory is kept; YNNPACK fusions go off."""
import os
import subprocess
import sys
import textwrap

import pytest
from train_testing import REPO

from dtm_jax.runtime import cpu_host

_ROOT = REPO  # the repository root

# A jitted step with ~25 MB temporaries, timed after warm-up; prints the minor page faults per call.
_STEP = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    if sys.argv[1] == "keep":
      from dtm_jax.runtime import cpu_host
      assert cpu_host.keep_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((64, 196, 512))
    step = jax.jit(lambda x: jnp.sum((x * 2.0).at[:, ::2].add(x[:, 1::2]) ** 2))
    for _ in range(20):  # warm-up: compilation, and the heap settling into a layout that fits every step
      step(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      step(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_step(mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _STEP.format(root=_ROOT), mode], env=env, check=True,
                       capture_output=True, text=True).stdout
  return float(out.split()[-1])


@pytest.mark.slow
def test_steps_stop_page_faulting():
  default, kept = _faults_per_step("default"), _faults_per_step("keep")
  assert default > 2000  # the step's fresh 25 MB buffers fault in every call by default...
  assert kept < default / 5  # ...and are reused once freed memory is kept (at most a stray step faults)


def test_only_cpu_only_jax_is_tuned(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not cpu_host.configure()
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_host.configure()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_the_tpu_runtime_alone_is_not_a_tpu_host(monkeypatch):
  """libtpu is installed for --mode=compile on machines without TPUs: those stay CPU hosts (and JAX is pinned to the
  CPU there, so it does not look for a TPU at start-up); a machine with a TPU chip on its PCI bus is a TPU host."""
  class Dist:
    def __init__(self, name):
      self.metadata = {"Name": name}

  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after the test
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(cpu_host.importlib.metadata, "distributions", lambda: [Dist("jax"), Dist("libtpu")])
  monkeypatch.setattr(cpu_host, "tpu_attached", lambda: False)
  assert cpu_host.cpu_only()
  assert cpu_host.configure() and os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(cpu_host, "tpu_attached", lambda: True)
  assert not cpu_host.cpu_only()
  monkeypatch.setattr(cpu_host.importlib.metadata, "distributions", lambda: [Dist("jax"), Dist("jax-cuda12-plugin")])
  monkeypatch.setattr(cpu_host, "tpu_attached", lambda: False)
  assert not cpu_host.cpu_only()


def test_a_flag_the_user_set_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
  assert not cpu_host.turn_off_ynnpack_fusions()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"


_COMPILED_FUSIONS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    if sys.argv[1] == "configure":
      from dtm_jax.runtime import cpu_host
      assert cpu_host.configure()
    import jax, jax.numpy as jnp
    x = jnp.ones((16, 3, 197, 197))
    print(jax.jit(lambda x: jnp.sum(x * 2.0, axis=0)).lower(x).compile().as_text().count("ynn_fusion"))
""")


@pytest.mark.slow
def test_configured_processes_compile_without_ynnpack_fusions():
  def ynn_fusions(mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _COMPILED_FUSIONS.format(root=_ROOT), mode], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])

  assert ynn_fusions("default") > 0  # this jaxlib fuses the reduction into YNNPACK by default...
  assert ynn_fusions("configure") == 0  # ...and the flag turns that off
