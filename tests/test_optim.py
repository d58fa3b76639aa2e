"""dtm_jax.optim.weight_decay_mask: what docs/METHOD.md §6 says the released code decays."""
import jax
from flax import nnx

from dtm_jax import optim
from dtm_jax.models import functional, vit


def test_weight_decay_mask_follows_the_released_code():
  config = vit.get_config("test", image_size=32, patch_size=8, out_dim=16)
  _, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  mask = optim.weight_decay_mask(params, no_decay_names=("cls_token", "pos_embed"))
  decayed = {optim.path_name(path): value for path, value in jax.tree_util.tree_leaves_with_path(mask)}
  assert decayed["blocks/0/attn/rel_pos_bias"] and decayed["shared_rel_pos_bias"]  # tables are decayed
  assert decayed["mask_token"] and decayed["blocks/0/attn/qkv/kernel"] and decayed["patch_embed/kernel"]
  assert not decayed["cls_token"]
  assert not decayed["blocks/0/attn/q_bias"] and not decayed["blocks/0/mlp/fc1/bias"]
  assert not decayed["blocks/0/norm1/scale"] and not decayed["blocks/0/attn_layer_scale"]
