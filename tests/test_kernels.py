"""dtm_jax.kernels: the CPU kernels build here, agree with the XLA versions, work sharded and vmapped, and morphing
falls back with a clear message when they can't be built; the attention kernel matches JAX's attention and its
gradient, and the student uses it exactly where it should."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtm_jax import kernels, losses, morphing
from dtm_jax.models import layers, vit

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_kernels_build_and_morphing_uses_them_on_cpu():
  kernels.require()  # raises KernelUnavailableError with the compiler's message if the build fails
  assert morphing._resolve_implementation("auto") == "cpu_kernel"
  assert any(path.name.startswith("libdtm_kernels_") for path in kernels.cache_dir().iterdir())


def _random_groups(rng, num_schedules, batch, num_tokens):
  """Group ids with repeated and unused ids, like real morphing output."""
  return rng.integers(0, num_tokens // 3, size=(num_schedules, batch, num_tokens)).astype(np.int32)


def test_group_sums_match_scatter_add_and_its_gradient():
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.normal(size=(3, 20, 7)), jnp.float32)
  groups = jnp.asarray(_random_groups(rng, 2, 3, 20))
  expected = np.zeros((2, 3, 20, 7))
  for l in range(2):
    for b in range(3):
      np.add.at(expected[l, b], np.asarray(groups[l, b]), np.asarray(values[b], np.float64))
  np.testing.assert_allclose(jax.jit(kernels.group_sums)(values, groups), expected, rtol=1e-6, atol=1e-6)

  weights = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
  gradient = jax.grad(lambda v: jnp.sum(kernels.group_sums(v, groups) * weights))(values)
  # d/dv[b, i] = Σ_l weights[l, b, group of i]
  expected_gradient = sum(np.take_along_axis(np.asarray(weights[l]), np.asarray(groups[l])[..., None], axis=1)
                          for l in range(2))
  np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6, atol=1e-6)


def test_dtm_loss_same_with_kernel_and_scatter(monkeypatch):
  rng = np.random.default_rng(1)
  student = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)
  groups = jnp.asarray(_random_groups(rng, 2, 4, 16))
  loss_and_grad = lambda: jax.value_and_grad(losses.dtm_loss)(student, target, groups)
  with_kernel = loss_and_grad()
  monkeypatch.setattr(kernels, "available", lambda: False)  # "auto" then takes the XLA scatter
  assert morphing._resolve_implementation("auto") == "pairwise"
  with_scatter = loss_and_grad()
  np.testing.assert_allclose(with_kernel[0], with_scatter[0], rtol=1e-6)
  np.testing.assert_allclose(with_kernel[1], with_scatter[1], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_kernel_morphing_sharded_over_devices_and_vmapped():
  assert jax.device_count() == 8
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.normal(size=(8, 49, 16)), jnp.float32)
  num_merge = jnp.asarray(rng.integers(0, 50, size=(2, 8)), jnp.int32)
  num_iters = jnp.asarray(rng.integers(1, 15, size=(2, 8)), jnp.int32)
  expected = np.asarray(morphing.morph_schedules(tokens, num_merge, num_iters, implementation="pairwise"))

  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.jit(lambda t, m, k: morphing.morph_schedules(t, m, k, implementation="cpu_kernel"))(
      jax.device_put(tokens, NamedSharding(mesh, P("data"))),
      jax.device_put(num_merge, NamedSharding(mesh, P(None, "data"))),
      jax.device_put(num_iters, NamedSharding(mesh, P(None, "data"))))
  np.testing.assert_array_equal(sharded, expected)

  per_image = jax.vmap(lambda t, m, k: morphing.morph(t[None], m[None], k[None], implementation="cpu_kernel")[0])(
      tokens, num_merge[0], num_iters[0])
  np.testing.assert_array_equal(per_image, expected[0])


@pytest.mark.slow
def test_falls_back_to_xla_with_the_reason_when_no_compiler(tmp_path):
  script = """
import logging, sys
import jax.numpy as jnp, numpy as np
from dtm_jax import kernels, morphing
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 4)), jnp.float32)
groups = morphing.morph(tokens, 6, 2)  # auto: falls back to the XLA rounds
np.testing.assert_array_equal(groups, morphing.morph(tokens, 6, 2, implementation="pairwise"))
try:
  morphing.morph(tokens, 6, 2, implementation="cpu_kernel")
except kernels.KernelUnavailableError as error:
  print("RAISED", error)
import jax
from dtm_jax.models import layers
assert jax.device_count() == 1 and not layers.use_cpu_attention_kernel(jnp.float32, None)  # XLA's attention
"""
  env = dict(os.environ, CXX="no-such-compiler", DTM_JAX_KERNEL_CACHE=str(tmp_path), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert "No C++ compiler 'no-such-compiler'" in result.stdout  # the warning of the automatic fallback
  assert "RAISED No C++ compiler 'no-such-compiler'" in result.stdout  # an explicit request fails loudly
  assert not list(tmp_path.iterdir())


def test_token_gram_is_float32_exact_on_cpu():
  rng = np.random.default_rng(3)
  tokens = rng.normal(size=(12, 49, 64)).astype(np.float32)
  exact = np.einsum("bnd,bmd->bnm", tokens.astype(np.float64), tokens.astype(np.float64))
  gram = np.asarray(jax.jit(morphing.token_gram)(jnp.asarray(tokens)), np.float64)
  # float32 accumulation over 64 products: well within 1e-6 of the largest entry, far from TF32/bf16 (~1e-3).
  assert np.max(np.abs(gram - exact)) < 1e-6 * np.max(np.abs(exact))


@pytest.mark.slow
def test_unwritable_cache_folder_is_a_clear_fallback(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("")  # a file where the cache folder should go: mkdir fails
  script = """
import logging, sys
from dtm_jax import kernels, morphing
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
assert morphing._resolve_implementation("auto") == "pairwise"
"""
  env = dict(os.environ, DTM_JAX_KERNEL_CACHE=str(blocked / "kernels"), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert "set DTM_JAX_KERNEL_CACHE to one that is" in result.stdout


@pytest.mark.parametrize("batch, tokens, heads, head_dim", [(2, 19, 2, 12), (1, 50, 3, 64), (3, 5, 1, 3)])
def test_attention_kernel_matches_dot_product_attention_with_gradients(batch, tokens, heads, head_dim):
  """Token counts and head sizes off the kernel's 6-row, 16-column and 8-lane blocks exercise every edge path."""
  rng = np.random.default_rng(4)
  qkv = jnp.asarray(2 * rng.normal(size=(batch, tokens, 3, heads, head_dim)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(heads, tokens, tokens)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, tokens, heads, head_dim)), jnp.float32)

  def reference(qkv, bias):
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias[None],
                                        implementation="xla")

  def value_and_grads(fn):
    out, vjp = jax.vjp(fn, qkv, bias)
    return (out, *vjp(cotangent))

  kernel_run = jax.jit(lambda: value_and_grads(kernels.attention))
  for got, want in zip(kernel_run(), jax.jit(lambda: value_and_grads(reference))()):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  for first, again in zip(kernel_run(), kernel_run()):  # bitwise reproducible, whatever thread did which head
    np.testing.assert_array_equal(first, again)

  poisoned = bias.at[0, 1, 2].set(jnp.nan)  # a NaN score poisons its query's row, as in XLA: never hidden
  out = np.asarray(kernels.attention(qkv, poisoned))
  np.testing.assert_array_equal(np.isnan(out), np.isnan(np.asarray(reference(qkv, poisoned))))
  assert np.isnan(out[:, 1, 0]).all() and not np.isnan(np.delete(out, 1, axis=1)).any()


@pytest.mark.slow
def test_student_runs_the_attention_kernel_only_where_it_should(monkeypatch):
  # With 8 CPU devices (the test setting) the partitioner would gather the batch for a custom call: XLA's version.
  assert not layers.use_cpu_attention_kernel(jnp.float32, None)
  config = vit.get_config("test", image_size=32, patch_size=8, out_dim=16)
  student = vit.PretrainViT(config, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(6).random((2, 16)) < 0.4)

  def loss(model):
    return jnp.sum(model(images, mask, dropout_rng=jax.random.key(0)) ** 2)

  results, programs = {}, {}
  for use_kernel in (False, True):
    monkeypatch.setattr(layers, "use_cpu_attention_kernel", lambda dtype, bias, use=use_kernel: use)
    graph, state = nnx.split(student)
    run = jax.jit(lambda s: jax.value_and_grad(lambda s: loss(nnx.merge(graph, s)))(s))
    programs[use_kernel] = run.lower(state).as_text()
    results[use_kernel] = run(state)
  assert kernels.ATTENTION_FORWARD_TARGET in programs[True] and kernels.ATTENTION_BACKWARD_TARGET in programs[True]
  assert kernels.ATTENTION_FORWARD_TARGET not in programs[False]
  for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
