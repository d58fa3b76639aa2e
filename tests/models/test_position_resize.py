"""Position tables moved to another patch grid: parity with timm's BEiT resizing, exactness at the same or a smaller
grid, and a classifier built at another image size from a pretrained student."""
import importlib
import importlib.util
import pathlib
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune_demo, finetune_inat18, finetune_vit_b16_in1k_384
from dtm_jax import aot, registry, sharding
from dtm_jax.models import clip, layers, position_resize, vit


def _timm_pos_embed_rel():
  """timm's `layers/pos_embed_rel.py`, loaded without `timm/__init__` (which imports torchvision: not installed)."""
  spec = importlib.util.find_spec("timm")
  assert spec is not None, "timm is a test requirement: pip install --no-deps -r requirements-test-nodeps.txt"
  package = "_timm_layers_reference"
  if package not in sys.modules:
    module = types.ModuleType(package)
    module.__path__ = [str(pathlib.Path(spec.origin).parent / "layers")]
    sys.modules[package] = module
  return importlib.import_module(f"{package}.pos_embed_rel")


def _random_table(grid, heads=3, seed=0):
  rows = layers.num_relative_positions(grid)
  return np.random.default_rng(seed).normal(size=(rows, heads)).astype(np.float32)


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolation helper warns about PyTorch indexing
@pytest.mark.parametrize("old_grid, new_grid", [(3, 5), (14, 24), (14, 32), (7, 8)])
def test_rel_pos_table_resize_matches_timm(old_grid, new_grid):
  """timm's `resize_rel_pos_bias_table` (BEiT's geometric-progression offsets, linear interpolation), as timm's
  BEiT loads a checkpoint at another size: 224² → 384² (14 → 24) and 512² (14 → 32) among them."""
  torch = pytest.importorskip("torch")
  table = _random_table(old_grid)
  ours = position_resize.resize_rel_pos_table(jnp.asarray(table), old_grid, new_grid)
  rows = layers.num_relative_positions(new_grid)
  theirs = _timm_pos_embed_rel().resize_rel_pos_bias_table(
      torch.from_numpy(table), new_window_size=(new_grid, new_grid), new_bias_shape=(rows, table.shape[1]))
  assert ours.shape == (rows, table.shape[1])
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ours[-3:]), table[-3:])  # the CLS rows are kept


def test_same_grid_leaves_tables_and_embedding_unchanged():
  table = jnp.asarray(_random_table(4))
  assert position_resize.resize_rel_pos_table(table, 4, 4) is table
  params = {"pos_embed": jnp.ones((1, 17, 8)), "blocks": {0: {"attn": {"rel_pos_bias": table}}}}
  assert position_resize.resize_position_params(params, 4, 4) is params


def test_smaller_grid_keeps_the_bias_of_every_remaining_offset():
  """A 3×3 grid inside a 5×5 one: the attention bias among its patches (and with CLS) is exactly what it was."""
  table = _random_table(5)
  small = position_resize.resize_rel_pos_table(jnp.asarray(table), 5, 3)
  inside = [row * 5 + col for row in range(3) for col in range(3)]  # the top-left 3×3 patches, row-major
  tokens = np.array([0] + [1 + i for i in inside])  # CLS first
  expected = np.asarray(layers.relative_position_bias(jnp.asarray(table), 5))[:, :, tokens][:, :, :, tokens]
  np.testing.assert_array_equal(np.asarray(layers.relative_position_bias(small, 3)), expected)


def test_resize_position_params_resizes_only_position_tables():
  pos_embed = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1 + 9, 8)), jnp.float32)
  params = {"shared_rel_pos_bias": jnp.asarray(_random_table(3)), "pos_embed": pos_embed,
            "cls_token": jnp.ones((1, 1, 8)), "blocks": {0: {"attn": {"rel_pos_bias": jnp.asarray(_random_table(3)),
                                                                      "proj": {"kernel": jnp.ones((8, 8))}}}}}
  resized = position_resize.resize_position_params(params, 3, 5)
  assert resized["shared_rel_pos_bias"].shape == resized["blocks"][0]["attn"]["rel_pos_bias"].shape == (84, 3)
  np.testing.assert_array_equal(resized["pos_embed"], clip.resize_pos_embed(pos_embed, 5))
  assert resized["cls_token"] is params["cls_token"]
  assert resized["blocks"][0]["attn"]["proj"]["kernel"] is params["blocks"][0]["attn"]["proj"]["kernel"]


@pytest.mark.parametrize("abs_pos_emb", [False, True])
def test_classifier_at_a_larger_image_size_from_a_pretrained_student(abs_pos_emb):
  student_config = vit.get_config("test", image_size=16, patch_size=4, out_dim=8, abs_pos_emb=abs_pos_emb)
  pretrained = vit.PretrainViT(student_config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pretrained.shared_rel_pos_bias[...] = jnp.asarray(rng.normal(size=pretrained.shared_rel_pos_bias.shape),
                                                    jnp.float32)
  for block in pretrained.blocks:
    block.attn.rel_pos_bias[...] = jnp.asarray(rng.normal(size=block.attn.rel_pos_bias.shape), jnp.float32)

  classifier = vit.ViTClassifier(vit.finetune_config(student_config, image_size=24), 5, rngs=nnx.Rngs(1))
  vit.init_classifier_from_pretrained(classifier, pretrained)
  for block, source in zip(classifier.blocks, pretrained.blocks, strict=True):
    folded = source.attn.rel_pos_bias[...] + pretrained.shared_rel_pos_bias[...]  # fold, then resize
    np.testing.assert_allclose(block.attn.rel_pos_bias[...], position_resize.resize_rel_pos_table(folded, 4, 6),
                               rtol=1e-5, atol=1e-6)
  if abs_pos_emb:
    np.testing.assert_array_equal(classifier.pos_embed[...], clip.resize_pos_embed(pretrained.pos_embed[...], 6))
  np.testing.assert_array_equal(classifier.patch_embed.kernel[...], pretrained.patch_embed.kernel[...])
  logits = classifier(jnp.asarray(rng.normal(size=(2, 24, 24, 3)), jnp.float32))
  assert logits.shape == (2, 5) and np.all(np.isfinite(np.asarray(logits)))

  other_patch = vit.finetune_config(student_config, image_size=24, patch_size=8)
  with pytest.raises(ValueError, match="patch_size"):
    vit.init_classifier_from_pretrained(nnx.eval_shape(lambda: vit.ViTClassifier(other_patch, 5,
                                                                                 rngs=nnx.Rngs(0))), pretrained)


def test_compile_mode_builds_the_finetune_step_at_the_configured_image_size():
  """`--mode=compile` of a fine-tuning config with `model.image_size`: the step takes images of that size and the
  classifier's tables fit its patch grid (the demo student: 28², patch 4)."""
  config = aot.with_overrides(finetune_demo.get_config(), {"batch_size": 32, "model.image_size": 56})
  (program,) = aot.build_programs(config, sharding.make_mesh(config.mesh.data, config.mesh.fsdp))
  state, batch, _ = program.args
  assert batch["image"].shape[1:3] == (56, 56)
  assert state["params"]["blocks"][0]["attn"]["rel_pos_bias"].shape[0] == layers.num_relative_positions(56 // 4)


@pytest.mark.parametrize("get_config, arg, image_size, crop_pct", [
    (finetune_vit_b16_in1k_384.get_config, "", 384, 1.0),
    (finetune_inat18.get_config, "", 224, 0.875),
    (finetune_inat18.get_config, "384", 384, 1.0),
])
def test_higher_resolution_and_inaturalist_configs_are_valid(get_config, arg, image_size, crop_pct):
  config = get_config(arg)
  assert registry.problems("finetune", config, num_devices=64, check_paths=False) == []
  assert config.model.image_size == image_size and config.input.crop_pct == crop_pct
  if get_config is finetune_inat18.get_config:
    assert (config.input.dataset, config.num_classes) == ("i_naturalist2018", 8142)
  with pytest.raises(ValueError, match="224, 384"):
    finetune_inat18.get_config("512")
