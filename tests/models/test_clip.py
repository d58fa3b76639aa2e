"""CLIP vision tower: parity with Hugging Face CLIP (tiny and real ViT-B/16 shapes), OpenAI layout, resizing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtm_jax.models import clip, convert

# torch, transformers and tests/torch_reference are imported by the tests marked `torch`, through these fixtures, so
# the other tests run without them.
# pylint: disable=redefined-outer-name


@pytest.fixture(scope="module")
def hf_model(ref):
  return ref.hf_clip()


@pytest.mark.torch
def test_patch_tokens_match_hf_clip(hf_model, torch, ref):
  x, x_torch = ref.images(2, 32)
  converted = convert.convert_weights(ref.numpy_state(hf_model), "hf_clip", num_heads=4)
  assert converted.config.activation == "quick_gelu"
  teacher = convert.build_module(converted)
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x))), ref.hf_clip_patch_tokens(hf_model, x_torch),
                             atol=1e-4, rtol=0)

  with torch.no_grad():
    hidden = hf_model.vision_model(pixel_values=x_torch).last_hidden_state
    normed = hf_model.vision_model.post_layernorm(hidden)
    with_cls = hf_model.visual_projection(normed).numpy()
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x), include_cls=True)), with_cls, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x), project=False)), normed[:, 1:].numpy(),
                             atol=1e-4, rtol=0)


@pytest.mark.torch
def test_openai_layout_matches_hf_clip(hf_model, ref):
  x, x_torch = ref.images(2, 32, seed=1)
  want = ref.hf_clip_patch_tokens(hf_model, x_torch)
  weights = ref.clip_to_openai(ref.numpy_state(hf_model))
  teacher = convert.build_module(convert.convert_weights(weights, "openai_clip", num_heads=4))
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x))), want, atol=1e-4, rtol=0)
  # Heads are not visible in the shapes; OpenAI's width // 64 rule would be wrong for this toy tower.
  wrong = convert.build_module(convert.convert_weights(weights, "openai_clip", num_heads=2))
  assert np.abs(np.asarray(wrong(jnp.asarray(x))) - want).max() > 1e-2


@pytest.mark.torch
@pytest.mark.parametrize("new_grid", [4, 6, 3, (5, 8)])
def test_resize_pos_embed_matches_torch_bicubic(new_grid, torch):
  pos_embed = np.random.default_rng(0).normal(size=(1, 1 + 16, 8)).astype(np.float32)
  rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  resized = np.asarray(clip.resize_pos_embed(jnp.asarray(pos_embed), new_grid))
  assert resized.shape == (1, 1 + rows * cols, 8)
  np.testing.assert_array_equal(resized[0, 0], pos_embed[0, 0])
  grid = torch.from_numpy(pos_embed[0, 1:].reshape(4, 4, 8)).permute(2, 0, 1)[None]
  want = torch.nn.functional.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
  np.testing.assert_allclose(resized[0, 1:], want[0].permute(1, 2, 0).reshape(-1, 8).numpy(), atol=1e-5)


@pytest.mark.torch
def test_interpolated_positions_match_hf(hf_model, ref):
  x, x_torch = ref.images(1, 48, seed=2)
  teacher = convert.build_module(convert.convert_weights(ref.numpy_state(hf_model), "hf_clip", num_heads=4))
  with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
    teacher(jnp.asarray(x))
  want = ref.hf_clip_patch_tokens(hf_model, x_torch, interpolate_pos_encoding=True)
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x), interpolate_pos_encoding=True)), want,
                             atol=1e-4, rtol=0)


@pytest.mark.torch
def test_vit_b16_shapes_match_hf_clip(torch, transformers, ref):
  """The real teacher's shapes (768 wide, 12 blocks, 197 positions, 512-d projection) at random weights."""
  torch.manual_seed(0)
  hf_model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
      patch_size=16, projection_dim=512, attn_implementation="sdpa")).eval()
  x, x_torch = ref.images(1, 224, seed=3)
  want = ref.hf_clip_patch_tokens(hf_model, x_torch)
  converted = convert.convert_weights(ref.numpy_state(hf_model), "hf_clip")  # Heads by OpenAI's width // 64.
  assert converted.config == clip.get_config("B/16")
  teacher = convert.build_module(converted)
  graphdef, state = nnx.split(teacher)
  got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))
  assert got.shape == (1, 196, 512)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_parameter_count_matches_hf_clip(torch, transformers):
  config = clip.get_config("B/16")
  with torch.device("meta"):
    hf_model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=config.width, intermediate_size=config.mlp_dim, num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads, image_size=config.image_size, patch_size=config.patch_size,
        projection_dim=config.proj_dim))
  ours = nnx.state(nnx.eval_shape(lambda: clip.CLIPVision(config, rngs=nnx.Rngs(0))), nnx.Param)
  assert sum(math.prod(v.shape) for _, v in nnx.to_flat_state(ours)) == sum(p.numel() for p in hf_model.parameters())


def test_config_errors_say_what_to_do():
  with pytest.raises(ValueError, match="choose one of"):
    clip.get_config("H/14")
  with pytest.raises(ValueError, match="activation"):
    clip.get_config("test", activation="relu")
  with pytest.raises(ValueError, match="Unknown CLIPVisionConfig fields"):
    clip.get_config("test", proj=3)
