"""The persistent compilation cache that main.py turns on: a second process reuses what the first compiled."""
import os
import subprocess
import sys

import pytest
from train_testing import REPO

ROOT = REPO  # the repository root
_PROGRAM = """
import sys, time, jax, jax.numpy as jnp
from dtm_jax.runtime import compilation_cache
compilation_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 0.5)
f.lower(jnp.ones((64, 64))).compile()
print(jax.config.jax_compilation_cache_dir)
"""


def _run(cache_dir, extra_env=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(extra_env or {})
  return subprocess.run([sys.executable, "-c", _PROGRAM, cache_dir], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=True)


@pytest.mark.slow
def test_programs_are_cached_across_processes_and_reused(tmp_path):
  cache = tmp_path / "cache"
  _run(str(cache))
  entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
  assert any(name.endswith("-cache") for name in entries), entries
  assert (cache / ".lockfile").exists()  # reads and writes hold the folder's lock (size limit on)
  _run(str(cache), {"JAX_EXPLAIN_CACHE_MISSES": "1"})
  assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == entries  # a hit, not a new entry


@pytest.mark.slow
def test_empty_directory_turns_the_cache_off(tmp_path):
  cache = tmp_path / "cache"
  _run("", {"JAX_COMPILATION_CACHE_DIR": str(cache)})  # even where the environment names a folder
  assert not cache.exists() or not [p for p in cache.iterdir() if p.name.endswith("-cache")]
