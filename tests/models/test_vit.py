"""Student ViT: parity with Hugging Face BEiT, initialisation, masking, drop path, shapes and parameter counts."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtm_jax import platform
from dtm_jax.models import convert, functional, layers, vit

# One small geometry for every test: JAX compiles each initialiser and op once per shape, so sharing it keeps the
# file fast. It matches tests/torch_reference.TINY_BEIT.
SMALL = dict(image_size=32, patch_size=8, out_dim=16)
CONFIG = vit.get_config("test", **SMALL)


@pytest.fixture(scope="module")
def model():
  return vit.PretrainViT(CONFIG, rngs=nnx.Rngs(0))


# torch, transformers and tests/torch_reference are imported by the tests marked `torch`, through these fixtures, so
# the other tests run without them.
# pylint: disable=redefined-outer-name


def _images(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _abstract(variant, kind):
  """Shapes-only model of a named size (no memory, no compilation); cached across the shape and count tests."""
  if kind == "pretrain":
    return nnx.eval_shape(lambda: vit.PretrainViT(vit.get_config(variant), rngs=nnx.Rngs(0)))
  config = vit.get_config(variant, shared_rel_pos_bias=False)
  return nnx.eval_shape(lambda: vit.ViTClassifier(config, 1000, rngs=nnx.Rngs(0)))


def _param_count(module):
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _masked(batch=2, num_patches=16, positions=(1, 5, 6, 11)):
  mask = np.zeros((batch, num_patches), bool)
  mask[:, list(positions)] = True
  return mask


@pytest.mark.torch
@pytest.mark.parametrize("overrides", [
    {},  # DTM default: per-block + shared relative bias, layer scale.
    dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=False,
         layer_scale_init_value=0.0),
])
def test_student_matches_hf_beit(overrides, torch, ref):
  torch_model = ref.hf_beit(**overrides)
  x, x_torch = ref.images(2, 32)
  mask = _masked()
  with torch.no_grad():
    want = torch_model(x_torch, bool_masked_pos=torch.from_numpy(mask)).last_hidden_state.numpy()
  weights = ref.beit_to_unilm(ref.numpy_state(torch_model))
  rng = np.random.default_rng(1)
  weights["lm_head.weight"] = rng.normal(size=(16, 32)).astype(np.float32)
  weights["lm_head.bias"] = rng.normal(size=(16,)).astype(np.float32)
  converted = convert.convert_weights(weights, "beit")
  model = convert.build_module(converted)
  assert isinstance(model, vit.PretrainViT)
  assert converted.config.abs_pos_emb == overrides.get("use_absolute_position_embeddings", False)

  features = np.asarray(model.encode(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_allclose(features, want, atol=1e-4, rtol=0)
  predictions = np.asarray(model(jnp.asarray(x), jnp.asarray(mask)))
  expected = want[:, 1:] @ weights["lm_head.weight"].T + weights["lm_head.bias"]
  np.testing.assert_allclose(predictions, expected, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_classifier_matches_hf_beit_mean_pooling(torch, ref):
  torch_model = ref.hf_beit_classifier(num_labels=16)
  x, x_torch = ref.images(3, 32, seed=2)
  with torch.no_grad():
    want = torch_model(x_torch).logits.numpy()
  converted = convert.convert_weights(ref.beit_to_unilm(ref.numpy_state(torch_model)), "beit")
  assert (converted.kind, converted.module_kwargs) == ("vit_classifier", dict(num_classes=16, pooling="mean"))
  np.testing.assert_allclose(np.asarray(convert.build_module(converted)(jnp.asarray(x))), want, atol=1e-4, rtol=0)


def test_initialisation_follows_beit(model):
  std = 0.02
  # N(0, 1) restricted to [-1, 1] has standard deviation sqrt(1 - 2φ(1) / (2Φ(1) - 1)) ≈ 0.54.
  phi1, cdf1 = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
  unit_std = math.sqrt(1 - 2 * phi1 / (2 * cdf1 - 1))

  def check_trunc_normal(array, bound):
    array = np.asarray(array).ravel()
    assert np.abs(array).max() <= bound * (1 + 1e-6)
    assert np.abs(array).max() >= 0.97 * bound  # The cut is at ±1σ, not further out.
    assert abs(array.std() / (unit_std * bound) - 1) < 0.1
    assert abs(array.mean()) < 0.1 * bound

  for w in (model.patch_embed.kernel, model.lm_head.kernel, model.blocks[0].attn.qkv.kernel,
            model.blocks[1].mlp.fc1.kernel):
    check_trunc_normal(w[...], std)
  for token in (model.cls_token, model.mask_token):  # Too few values for statistics: check the cut only.
    assert 0 < np.abs(np.asarray(token[...])).max() <= std
  for layer_id, block in enumerate(model.blocks, start=1):
    check_trunc_normal(block.attn.proj.kernel[...], std / math.sqrt(2 * layer_id))
    check_trunc_normal(block.mlp.fc2.kernel[...], std / math.sqrt(2 * layer_id))
    np.testing.assert_allclose(block.attn_layer_scale[...], 0.1)
    np.testing.assert_allclose(block.mlp_layer_scale[...], 0.1)
    for zero in (block.attn.q_bias, block.attn.v_bias, block.attn.rel_pos_bias, block.attn.proj.bias,
                 block.mlp.fc2.bias, block.norm1.bias):
      np.testing.assert_array_equal(zero[...], 0.0)
    np.testing.assert_array_equal(block.norm1.scale[...], 1.0)
  np.testing.assert_array_equal(model.shared_rel_pos_bias[...], 0.0)
  assert model.shared_rel_pos_bias.shape == (layers.num_relative_positions(4), 2)

  classifier = vit.ViTClassifier(CONFIG, num_classes=16, rngs=nnx.Rngs(1))
  head = np.asarray(classifier.head.kernel[...])
  assert 0 < np.abs(head).max() <= std * 1e-3


def test_relative_position_table_size_and_index():
  assert layers.num_relative_positions(14) == 732
  index = layers.relative_position_index(3)
  assert index.shape == (10, 10) and index.max() == layers.num_relative_positions(3) - 1
  # Patches with the same offset share a table row; different offsets do not.
  assert index[1 + 0, 1 + 4] == index[1 + 4, 1 + 8]  # (0,0)→(1,1) and (1,1)→(2,2).
  assert index[1 + 0, 1 + 1] != index[1 + 0, 1 + 3]  # right vs down.
  assert len(np.unique(index[1:, 1:])) == (2 * 3 - 1) ** 2


def test_masked_patches_are_replaced_by_the_mask_token(model):
  x = np.asarray(_images())
  mask = _masked(positions=(0, 5))  # Patch 5 is row 1, column 1 of the 4×4 grid.
  base = np.asarray(model(jnp.asarray(x), jnp.asarray(mask)))

  in_masked_patch = x.copy()
  in_masked_patch[:, 8:16, 8:16] += 5.0
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(in_masked_patch), jnp.asarray(mask))), base, atol=1e-6)
  in_visible_patch = x.copy()
  in_visible_patch[:, 0:8, 8:16] += 5.0  # Patch 1.
  assert np.abs(np.asarray(model(jnp.asarray(in_visible_patch), jnp.asarray(mask))) - base).max() > 1e-3

  no_mask = np.zeros((2, 16), bool)
  np.testing.assert_allclose(np.asarray(model.encode(jnp.asarray(x), jnp.asarray(no_mask))),
                             np.asarray(model.encode(jnp.asarray(x))), atol=1e-6)
  all_masked = np.asarray(model(jnp.asarray(x), jnp.ones((2, 16), bool)))
  np.testing.assert_allclose(all_masked[0], all_masked[1], atol=1e-6)  # Nothing of the image is left.


def test_drop_path_uses_explicit_keys(model):
  dropping = vit.PretrainViT(dataclasses.replace(CONFIG, drop_path_rate=0.5), rngs=nnx.Rngs(0))  # Same weights.
  x, mask = _images(), jnp.asarray(_masked())
  deterministic = np.asarray(model(x, mask))
  np.testing.assert_array_equal(np.asarray(dropping(x, mask)), deterministic)
  key_a = np.asarray(dropping(x, mask, jax.random.key(0)))
  np.testing.assert_array_equal(np.asarray(dropping(x, mask, jax.random.key(0))), key_a)
  assert np.abs(key_a - deterministic).max() > 1e-3
  assert np.abs(np.asarray(dropping(x, mask, jax.random.key(1))) - key_a).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(model(x, mask, jax.random.key(0))), deterministic)  # Rate 0.

  dropped = np.asarray(layers.drop_path(jnp.ones((4000, 3, 2)), 0.25, jax.random.key(0)))
  assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.75)}
  assert (dropped == dropped[:, :1, :1]).all()  # Whole samples are dropped.
  assert abs(dropped.mean() - 1.0) < 0.05


def test_split_state_holds_only_params_and_jits():
  model = vit.PretrainViT(dataclasses.replace(CONFIG, drop_path_rate=0.1), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  assert {type(v) for _, v in nnx.to_flat_state(state)} == {nnx.Param}
  x, mask = _images(), jnp.asarray(_masked())

  @jax.jit
  def step(state, x, mask, rng):
    return nnx.merge(graphdef, state)(x, mask, rng)

  np.testing.assert_allclose(np.asarray(step(state, x, mask, jax.random.key(3))),
                             np.asarray(model(x, mask, jax.random.key(3))), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(vit.VARIANTS))
def test_variant_shapes(variant):
  config = vit.get_config(variant)
  width, depth, heads = vit.VARIANTS[variant]
  assert (config.width, config.depth, config.num_heads, config.num_patches) == (width, depth, heads, 196)
  graphdef, state = nnx.split(_abstract(variant, "pretrain"))
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((2, 196), jnp.bool_)
  out = jax.eval_shape(lambda s, x, m: nnx.merge(graphdef, s)(x, m), state, images, mask)
  tokens = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, images)
  assert out.shape == (2, 196, 512) and tokens.shape == (2, 197, width)
  assert len(state["blocks"]) == depth
  assert state["blocks"][0]["attn"]["rel_pos_bias"].shape == (732, heads)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["small", "base", "large"])
def test_parameter_counts_match_beit(variant, torch, transformers):
  width, depth, heads = vit.VARIANTS[variant]
  hf = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * width,
            layer_scale_init_value=0.1, use_relative_position_bias=True)
  with torch.device("meta"):  # Counts only; nothing is allocated.
    torch_trunk = transformers.BeitModel(transformers.BeitConfig(
        **hf, use_shared_relative_position_bias=True, use_mask_token=True, use_mean_pooling=False),
        add_pooling_layer=False)
    torch_classifier = transformers.BeitForImageClassification(transformers.BeitConfig(
        **hf, use_shared_relative_position_bias=False, use_mean_pooling=True, num_labels=1000))
  torch_count = lambda m: sum(p.numel() for p in m.parameters())
  lm_head = width * 512 + 512
  assert _param_count(_abstract(variant, "pretrain")) == torch_count(torch_trunk) + lm_head
  # Known BEiT sizes with a 1000-class head (timm/unilm): S 22.0M, B/16 86.5M, L/16 304.4M. The classifier is
  # counted for B only, to keep the file fast (a shapes-only L/16 takes seconds to trace).
  known = {"small": 22.0, "base": 86.5, "large": 304.4}[variant]
  assert round(torch_count(torch_classifier) / 1e6, 1) == known
  if variant == "base":
    assert _param_count(_abstract(variant, "classifier")) == torch_count(torch_classifier)


def test_classifier_from_pretrained_keeps_the_function():
  pretrained = vit.PretrainViT(CONFIG, rngs=nnx.Rngs(0))
  # Non-zero relative tables, so folding the shared one into each block is visible.
  rng = np.random.default_rng(0)
  pretrained.shared_rel_pos_bias[...] = jnp.asarray(rng.normal(size=pretrained.shared_rel_pos_bias.shape),
                                                    jnp.float32)
  for block in pretrained.blocks:
    block.attn.rel_pos_bias[...] = jnp.asarray(rng.normal(size=block.attn.rel_pos_bias.shape), jnp.float32)

  classifier = vit.ViTClassifier(vit.finetune_config(CONFIG, drop_path_rate=0.1), 16, pooling="cls",
                                 rngs=nnx.Rngs(1))
  assert classifier.shared_rel_pos_bias is None and classifier.fc_norm is None and classifier.mask_token is None
  vit.init_classifier_from_pretrained(classifier, pretrained)
  np.testing.assert_allclose(classifier.blocks[1].attn.rel_pos_bias[...],
                             pretrained.blocks[1].attn.rel_pos_bias[...] + pretrained.shared_rel_pos_bias[...])
  x = _images()
  logits = np.asarray(classifier(x))
  assert logits.shape == (2, 16)
  np.testing.assert_allclose(logits, np.asarray(classifier.head(pretrained.encode(x)[:, 0])), atol=1e-5)

  mean_pool = vit.ViTClassifier(vit.finetune_config(CONFIG), 16, rngs=nnx.Rngs(1))
  fresh_fc_norm = np.asarray(mean_pool.fc_norm.scale[...])
  vit.init_classifier_from_pretrained(mean_pool, pretrained)
  np.testing.assert_array_equal(mean_pool.patch_embed.kernel[...], pretrained.patch_embed.kernel[...])
  np.testing.assert_array_equal(mean_pool.fc_norm.scale[...], fresh_fc_norm)

  wider = nnx.eval_shape(lambda: vit.ViTClassifier(vit.get_config("test", width=64, **SMALL), 16, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="width"):
    vit.init_classifier_from_pretrained(wider, pretrained)
  no_tables = dataclasses.replace(CONFIG, block_rel_pos_bias=False, shared_rel_pos_bias=False)
  with pytest.raises(ValueError, match="block_rel_pos_bias=True"):
    vit.init_classifier_from_pretrained(vit.ViTClassifier(no_tables, 16, rngs=nnx.Rngs(0)), pretrained)


def test_config_errors_say_what_to_do(model):
  with pytest.raises(ValueError, match="choose one of"):
    vit.get_config("huge")
  with pytest.raises(ValueError, match="Unknown ViTConfig fields"):
    vit.get_config("test", widht=3)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    vit.get_config("test", image_size=30, patch_size=8)
  with pytest.raises(ValueError, match="attention_impl"):
    vit.get_config("test", attention_impl="flash")
  with pytest.raises(ValueError, match="image_size"):
    model(jnp.zeros((1, 28, 28, 3)), jnp.zeros((1, 16), bool))
  with pytest.raises(ValueError, match="mask must be bool"):
    model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 15), bool))


@pytest.mark.slow
@pytest.mark.parametrize("bias_shape", [None, (1, 3, 7, 7), (2, 3, 7, 7), (2, 1, 7, 7)])
def test_cpu_attention_matches_dot_product_attention_with_gradients(bias_shape):
  """The CPU default (head-major, unnormalised probabilities, hand-written gradient) against JAX's reference."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(2 * rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
  bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def value_and_grads(fn):
    out, vjp = jax.vjp(lambda *args: fn(*args), q, k, v, bias)
    return out, vjp(cotangent)

  ours = value_and_grads(lambda *args: layers.attention(*args))
  reference = value_and_grads(lambda *args: jax.nn.dot_product_attention(*args, implementation="xla"))
  assert jax.tree.structure(ours) == jax.tree.structure(reference)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_gelu_is_exact_gelu_with_its_gradient(torch):
  """The erf formula loses digits to cancellation (< 1e-6 absolute) only where GELU is ~0."""
  x = jnp.linspace(-9.0, 9.0, 1001)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x),
                             jax.vmap(jax.grad(functools.partial(jax.nn.gelu, approximate=False)))(x),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layers.gelu(x), torch.nn.functional.gelu(torch.tensor(np.asarray(x))).numpy(),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["dots", "full"])
def test_remat_gradients_equal_gradients_without_remat(policy):
  """Rematerialised blocks recompute what they do not keep: same loss and gradients (with drop path active), and
  the backward pass of the rematerialised program really recomputes (it holds more dot products)."""
  config = dataclasses.replace(CONFIG, drop_path_rate=0.2)
  fm, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  remat_fm, _ = functional.split_module(vit.PretrainViT(dataclasses.replace(config, remat=policy),
                                                        rngs=nnx.Rngs(0)))
  images, mask = _images(), jnp.asarray(_masked())

  def loss(module, p):
    return jnp.mean(module.apply(p, images, mask, dropout_rng=jax.random.key(3)) ** 2)

  plain = jax.jit(jax.value_and_grad(functools.partial(loss, fm)))
  remat = jax.jit(jax.value_and_grad(functools.partial(loss, remat_fm)))
  (plain_loss, plain_grads), (remat_loss, remat_grads) = plain(params), remat(params)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, plain_grads)
  count_dots = lambda f: str(jax.make_jaxpr(f)(params)).count("dot_general")
  assert count_dots(remat) > count_dots(plain)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat='some'"):
    vit.get_config("test", remat="some")


def _block_outputs(module, images):
  """The residual stream after every block of a student (via nnx.capture), in order."""
  _, intermediates = nnx.capture(module.encode, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
  blocks = nnx.to_pure_dict(intermediates)["blocks"]
  return [blocks[i]["__call__"][0] for i in range(len(blocks))]


def test_bf16_blocks_keep_tiny_layer_scaled_updates_in_float32():
  """With bf16 compute and ViT-L's γ = 1e-5, the residual stream stays float32 and each block changes it by what
  the same block computes in float32 from the same input (to bf16 matmul accuracy). Images are scaled down so the
  stream (|x| ≲ 0.02, float32 step ~2e-9) resolves the ~1e-7 updates; a bf16 stream (step ~1e-4 there) would
  round them away."""
  config = dataclasses.replace(CONFIG, layer_scale_init=1e-5)
  fm32, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  fm16, _ = functional.split_module(vit.PretrainViT(dataclasses.replace(config, dtype=jnp.bfloat16),
                                                    rngs=nnx.Rngs(0)))
  images = 0.01 * _images()
  model16, model32 = fm16.bind(params), fm32.bind(params)
  outputs = _block_outputs(model16, images)
  stream = model16.patch_embed(images.astype(jnp.bfloat16)).reshape(2, -1, config.width).astype(jnp.float32)
  stream = jnp.concatenate([jnp.broadcast_to(params["cls_token"], (2, 1, config.width)), stream], axis=1)
  bias = layers.relative_position_bias(params["shared_rel_pos_bias"], config.grid_size)
  for block16, block32, output in zip(model16.blocks, model32.blocks, [*outputs]):
    assert output.dtype == jnp.float32
    update, reference = output - stream, block32(stream, bias) - stream
    assert float(jnp.max(jnp.abs(reference))) < 1e-4  # the updates really are tiny
    np.testing.assert_allclose(update, reference, rtol=0.05, atol=0.02 * float(jnp.max(jnp.abs(reference))))
    np.testing.assert_array_equal(output, block16(stream, bias))
    stream = output


@pytest.mark.slow
def test_bf16_forward_of_vit_b16_stays_close_to_float32():
  """ViT-B/16 (DTM's defaults) on random images: bf16 compute is within 2% (relative, max-norm) of float32."""
  config = vit.get_config("base", out_dim=512)
  fm32, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  fm16, _ = functional.split_module(vit.PretrainViT(dataclasses.replace(config, dtype=jnp.bfloat16),
                                                    rngs=nnx.Rngs(0)))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(1).random((1, 196)) < 0.4)
  out32 = jax.jit(fm32.apply)(params, images, mask)
  out16 = jax.jit(fm16.apply)(params, images, mask).astype(jnp.float32)
  error = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert error < 0.02, error


@pytest.mark.parametrize("grid_size", [2, 4, 14])
def test_relative_position_bias_by_matmul_equals_the_gather_with_gradients(grid_size):
  """Accelerators look the bias up with one-hot matmuls (no scatter in the gradient): same values and gradients."""
  table = jnp.asarray(np.random.default_rng(grid_size).normal(size=(layers.num_relative_positions(grid_size), 3)),
                      jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, grid_size ** 2 + 1, grid_size ** 2 + 1)),
                          jnp.float32)

  def value_and_grad(build_for):
    with platform.building_for(platform=build_for, num_devices=1):
      fn = lambda t: jnp.sum(layers.relative_position_bias(t, grid_size) * cotangent)
      return jax.jit(jax.value_and_grad(fn))(table), jax.jit(layers.relative_position_bias,
                                                               static_argnums=1)(table, grid_size)

  (loss_cpu, grad_cpu), bias_cpu = value_and_grad("cpu")
  (loss_tpu, grad_tpu), bias_tpu = value_and_grad("tpu")
  np.testing.assert_array_equal(bias_tpu, bias_cpu)
  np.testing.assert_allclose(loss_tpu, loss_cpu, rtol=1e-6)
  np.testing.assert_allclose(grad_tpu, grad_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [5, 6])
def test_padded_attention_equals_attention_with_gradients(tokens):
  """cuDNN's training kernel needs an even token count with a bias: odd T is padded by one token whose key is masked
  through the bias and whose query is dropped. Same values and gradients (q, k, v and bias) as plain attention."""
  rng = np.random.default_rng(tokens)
  q, k, v = (jnp.asarray(rng.normal(size=(2, tokens, 3, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(1, 3, tokens, tokens)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, tokens, 3, 8)), jnp.float32)

  def value_and_grads(fn):
    return jax.value_and_grad(lambda *args: jnp.sum(fn(*args) * cotangent), argnums=(0, 1, 2, 3))(q, k, v, bias)

  padded = value_and_grads(functools.partial(layers.padded_attention, implementation="xla"))
  plain = value_and_grads(functools.partial(jax.nn.dot_product_attention, implementation="xla"))
  np.testing.assert_allclose(padded[0], plain[0], rtol=1e-5)
  for got, want in zip(padded[1], plain[1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_default_attention_follows_the_platform_and_dtype():
  for build_for, dtype, expected in [("cpu", jnp.float32, "cpu"), ("tpu", jnp.bfloat16, "xla"),
                                     ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla")]:
    with platform.building_for(platform=build_for, num_devices=8):
      assert layers.default_attention_impl(dtype) == expected, (build_for, dtype)
