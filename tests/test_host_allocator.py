"""dtm_jax.host_allocator: XLA:CPU steps stop page-faulting once freed host memory is kept."""
import os
import subprocess
import sys
import textwrap

from dtm_jax import host_allocator

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# A jitted step with ~25 MB temporaries, timed after warm-up; prints the minor page faults per call.
_STEP = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    if sys.argv[1] == "keep":
      from dtm_jax import host_allocator
      assert host_allocator.keep_freed_memory_on_cpu_hosts()
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


def test_steps_stop_page_faulting():
  default, kept = _faults_per_step("default"), _faults_per_step("keep")
  assert default > 2000  # the step's fresh 25 MB buffers fault in every call by default...
  assert kept < default / 5  # ...and are reused once freed memory is kept (at most a stray step faults)


def test_only_cpu_only_jax_is_tuned(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_allocator.keep_freed_memory_on_cpu_hosts()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_allocator.keep_freed_memory_on_cpu_hosts()
