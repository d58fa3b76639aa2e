"""The MAE-style student: masking, the visible-token gather and order restoring against numpy, what the encoder
sees, which pixels each prediction depends on, and its fixed sin-cos tables."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtm_jax.models import functional, layers, mae, vit

N = 16  # a 4×4 grid


def tiny_config(**overrides):
  fields = dict(variant="test", image_size=16, patch_size=4, out_dim=8, dtype="float32", decoder_width=32,
                decoder_depth=1, decoder_num_heads=2)
  return mae.config_from_fields({**fields, **overrides})


@pytest.mark.parametrize("ratio, hidden", [(0.75, 12), (0.5, 8), (0.6, 10), (0.0, 0)])
def test_masking_hides_exactly_round_ratio_n_patches_per_image(ratio, hidden):
  config = tiny_config(mask_ratio=ratio)
  assert config.num_masked == hidden and config.num_visible == N - hidden
  ids_keep, ids_restore, mask = mae.random_masking(jax.random.key(0), 64, N, config.num_visible)
  assert ids_keep.shape == (64, N - hidden) and ids_restore.shape == (64, N)
  np.testing.assert_array_equal(np.sum(mask, axis=1), hidden)
  for b in range(64):  # the kept patches are exactly the visible ones, each once
    assert sorted(np.asarray(ids_keep[b])) == sorted(np.flatnonzero(~np.asarray(mask[b])))


def test_masks_differ_per_image_and_key_and_repeat_from_the_key():
  draw = lambda key: np.asarray(mae.random_masking(key, 32, N, 4)[2])
  first, again = draw(jax.random.key(3)), draw(jax.random.key(3))
  np.testing.assert_array_equal(first, again)
  assert len({row.tobytes() for row in first}) > 28  # C(16, 4) = 1820 masks: almost all images differ
  assert not np.array_equal(first, draw(jax.random.fold_in(jax.random.key(3), 1)))  # the next step's key


def test_gather_and_order_restoring_match_numpy():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(5, N, 3)).astype(np.float32)
  fill = rng.normal(size=(5, N - 6, 3)).astype(np.float32)
  ids_keep, ids_restore, mask = mae.random_masking(jax.random.key(1), 5, N, 6)
  ids_keep, ids_restore, mask = map(np.asarray, (ids_keep, ids_restore, mask))
  visible = np.asarray(mae.gather_visible(jnp.asarray(tokens), jnp.asarray(ids_keep)))
  restored = np.asarray(mae.restore_order(jnp.asarray(visible), jnp.asarray(fill), jnp.asarray(ids_restore)))
  for b in range(5):  # reference: the shuffled sequence is [visible..., hidden...]; scatter it back by patch id
    np.testing.assert_array_equal(visible[b], tokens[b][ids_keep[b]])
    hidden_ids = [i for i in range(N) if i not in set(ids_keep[b])]
    expected = np.zeros_like(tokens[b])
    shuffled = np.concatenate([visible[b], fill[b]])
    for position, patch in enumerate(list(ids_keep[b]) + sorted(hidden_ids, key=lambda i: ids_restore[b][i])):
      expected[patch] = shuffled[position]
    np.testing.assert_array_equal(restored[b], expected)
    np.testing.assert_array_equal(restored[b][~mask[b]], tokens[b][~mask[b]])  # every visible token back in place


def _model(config=None, seed=0):
  config = config or tiny_config()
  return functional.split_module(mae.MAEStudent(config, rngs=nnx.Rngs(seed)))


def test_the_encoder_sees_only_the_visible_tokens_and_the_decoder_all(monkeypatch):
  config = tiny_config()
  model, params = _model(config)
  lengths = []
  run_block = layers.run_block
  monkeypatch.setattr(layers, "run_block", lambda block, x, *a, **k: (lengths.append(x.shape[1]),
                                                                       run_block(block, x, *a, **k))[1])
  ids_keep, ids_restore, _ = mae.random_masking(jax.random.key(0), 2, N, config.num_visible)
  pred = model.apply(params, jnp.ones((2, 16, 16, 3)), ids_keep, ids_restore)
  assert pred.shape == (2, N, 8)
  assert lengths == [1 + 4] * config.depth + [1 + N] * config.decoder_depth


def _patch_pixels(mask_row, size=16, patch=4):
  """bool [size, size] pixel map of the patches flagged in mask_row [N] (row-major grid)."""
  grid = size // patch
  return np.kron(np.asarray(mask_row).reshape(grid, grid), np.ones((patch, patch), bool))


def test_predictions_ignore_hidden_pixels_and_hidden_positions_read_visible_ones():
  config = tiny_config()
  model, params = _model(config)
  ids_keep, ids_restore, mask = mae.random_masking(jax.random.key(2), 1, N, config.num_visible)
  images = jax.random.normal(jax.random.key(3), (1, 16, 16, 3))
  hidden_pixels = _patch_pixels(mask[0])
  hidden = int(np.flatnonzero(mask[0])[0])
  visible = int(np.flatnonzero(~np.asarray(mask[0]))[0])

  def grad_of(position):
    return np.abs(np.asarray(jax.grad(lambda x: model.apply(params, x, ids_keep, ids_restore)[0, position].sum())(
        images))[0]).sum(axis=-1)

  for position in (visible, hidden):
    g = grad_of(position)
    assert np.all(g[hidden_pixels] == 0.0), position  # no prediction reads a hidden pixel
    assert np.all(g[~hidden_pixels].reshape(-1) >= 0) and g[~hidden_pixels].sum() > 0
  # The prediction at a hidden position depends on every visible patch (through attention).
  g = grad_of(hidden)
  for patch in np.flatnonzero(~np.asarray(mask[0])):
    assert g[_patch_pixels(np.arange(N) == patch)].sum() > 0, patch


def test_encode_on_every_patch_equals_the_visible_path_with_nothing_hidden():
  config = tiny_config(mask_ratio=0.0)
  model, params = _model(config)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (2, N))
  np.testing.assert_allclose(model.apply(params, images, method="encode"),
                             model.apply(params, images, ids, method="encode_visible"), rtol=1e-5, atol=1e-6)


def test_position_tables_are_fixed_sincos_with_cls_at_zero():
  config = tiny_config()
  _, params = _model(config)
  table = mae.sincos_2d(32, 4)
  assert table.shape == (17, 32) and not table[0].any()
  np.testing.assert_allclose(np.abs(table[1:]).max(), 1.0)
  assert len({row.tobytes() for row in table[1:]}) == N  # every position distinct
  np.testing.assert_array_equal(params["pos_embed"][0], table)
  np.testing.assert_array_equal(params["decoder_pos_embed"][0], mae.sincos_2d(32, 4))
  # Pretraining never moves them: no gradient reaches the tables.
  model, _ = _model(config)
  ids_keep, ids_restore, _ = mae.random_masking(jax.random.key(0), 2, N, config.num_visible)
  grads = jax.grad(lambda p: model.apply(p, jnp.ones((2, 16, 16, 3)), ids_keep, ids_restore).sum())(params)
  assert not np.any(grads["pos_embed"]) and not np.any(grads["decoder_pos_embed"])
  assert np.any(grads["blocks"][0]["mlp"]["fc1"]["kernel"])


def test_encoder_parameters_have_the_trunk_names():
  _, params = _model()
  trunk_names = {"patch_embed", "cls_token", "pos_embed", "blocks", "norm"}
  assert trunk_names <= set(params)
  assert {k for k in params if k not in trunk_names} == {
      "decoder_embed", "decoder_mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "lm_head"}
  classifier = vit.ViTClassifier(vit.finetune_config(tiny_config().encoder), num_classes=3, rngs=nnx.Rngs(1))
  student = mae.MAEStudent(tiny_config(), rngs=nnx.Rngs(0))
  vit.init_classifier_from_pretrained(classifier, student)
  clf = nnx.state(classifier, nnx.Param).to_pure_dict()
  for name in ("patch_embed", "cls_token", "pos_embed", "blocks"):
    jax.tree.map(np.testing.assert_array_equal, clf[name], params[name])


@pytest.mark.parametrize("overrides, message", [
    ({"mask_ratio": 1.0}, "at least one"), ({"decoder_width": 30}, "divisible by 4"),
    ({"decoder_num_heads": 3}, "decoder_num_heads"), ({"block_rel_pos_bias": True}, "absolute sin-cos"),
])
def test_bad_configs_say_what_to_change(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**overrides)
