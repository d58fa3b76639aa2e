"""Mixup/CutMix on device: targets are distributions with the right mixing weight, images mix as claimed."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtm_jax import mixup

NUM_CLASSES = 10
NUM_DRAWS = 12
SMOOTHING = 0.1


@functools.lru_cache(maxsize=None)
def mix_draws(config):
  """NUM_DRAWS independent mixes of one batch, compiled once per config."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(6, 12, 16, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 6).astype(np.int32))
  mix = jax.jit(jax.vmap(lambda key: mixup.mix_batch(key, images, labels, num_classes=NUM_CLASSES, config=config)))
  mixed, targets, lam = mix(jax.random.split(jax.random.key(0), NUM_DRAWS))
  return np.asarray(images), np.asarray(labels), np.asarray(mixed), np.asarray(targets), np.asarray(lam)


def recipe_draws():
  """The fine-tuning recipe: mixup 0.8 or CutMix 1.0 (half each), label smoothing 0.1."""
  return mix_draws(mixup.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=SMOOTHING))


def is_cutmix(mixed, images):
  """CutMix only copies pixels; mixup blends them."""
  return np.all((mixed == images) | (mixed == images[::-1]))


def test_targets_sum_to_one_and_weigh_labels_by_lam():
  _, labels, _, targets, lam = recipe_draws()
  np.testing.assert_allclose(np.sum(targets, axis=-1), 1.0, rtol=1e-6)
  smooth = np.eye(NUM_CLASSES) * (1 - SMOOTHING) + SMOOTHING / NUM_CLASSES
  lam = lam[:, None, None]
  np.testing.assert_allclose(targets, lam * smooth[labels] + (1 - lam) * smooth[labels[::-1]], rtol=1e-5, atol=1e-7)
  assert np.all((lam >= 0) & (lam <= 1)) and np.any(lam < 1)


def test_both_kinds_are_drawn():
  images, _, mixed, _, _ = recipe_draws()
  kinds = [is_cutmix(mixed[d], images) for d in range(NUM_DRAWS)]
  assert any(kinds) and not all(kinds)


def test_mixup_blends_whole_images_with_lam():
  images, _, mixed, _, lam = recipe_draws()
  for draw in range(NUM_DRAWS):
    if not is_cutmix(mixed[draw], images):
      expected = lam[draw] * images + (1 - lam[draw]) * images[::-1]
      np.testing.assert_allclose(mixed[draw], expected, rtol=1e-5, atol=1e-5)


def test_cutmix_lam_is_the_fraction_of_own_pixels():
  images, _, mixed, _, lam = recipe_draws()
  for draw in range(NUM_DRAWS):
    if is_cutmix(mixed[draw], images):
      own = np.all(mixed[draw] == images, axis=-1)
      np.testing.assert_array_equal(own[0], own[1])  # one box for the whole batch
      assert np.mean(own[0]) == pytest.approx(lam[draw], abs=1e-6)


def test_prob_zero_only_smooths_labels():
  images, labels, mixed, targets, _ = mix_draws(mixup.MixConfig(prob=0.0, label_smoothing=0.2))
  np.testing.assert_array_equal(mixed[0], images)
  np.testing.assert_allclose(targets[0], 0.8 * np.eye(NUM_CLASSES)[labels] + 0.02, rtol=1e-6)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="switch_prob"):
    mixup.MixConfig(switch_prob=1.5)


# ---------------------------------------------------------------------------------------------------------------------
# Pairs within each device's shard of the batch: no images cross devices.
# ---------------------------------------------------------------------------------------------------------------------
def shard_mirror(x, num_shards):
  return x.reshape((num_shards, -1) + x.shape[1:])[:, ::-1].reshape(x.shape)


def test_mirror_within_shards_is_the_plain_mirror_for_one_shard():
  x = np.arange(12)
  np.testing.assert_array_equal(np.asarray(mixup.mirror(jnp.asarray(x), 1)), x[::-1])
  np.testing.assert_array_equal(np.asarray(mixup.mirror(jnp.asarray(x), 3)), [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8])
  with pytest.raises(ValueError, match="divisible"):
    mixup.mirror(jnp.asarray(x), 5)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_sharded_batch_mixes_within_each_device_shard(kind):
  from dtm_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=4, fsdp=2)
  rows = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, 32).astype(np.int32)
  config = mixup.MixConfig(mixup_alpha=0.8 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
                           label_smoothing=SMOOTHING)
  mix = jax.jit(lambda key, x, y: mixup.mix_batch(key, x, y, num_classes=NUM_CLASSES, config=config,
                                                 num_shards=mesh.size),
                in_shardings=(sharding.replicated(mesh), rows, rows), out_shardings=(rows, rows, None))
  args = (jax.random.key(3), jax.device_put(images, rows), jax.device_put(labels, rows))
  compiled = mix.lower(*args).compile().as_text()
  for collective in ("collective-permute", "all-gather", "all-to-all"):
    assert collective not in compiled, collective
  mixed, targets, lam = (np.asarray(x) for x in mix(*args))
  partner = shard_mirror(images, mesh.size)
  assert 0.0 < lam < 1.0
  if kind == "mixup":
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, rtol=1e-5, atol=1e-5)
  else:
    assert np.all((mixed == images) | (mixed == partner)) and np.any(mixed != images)
  np.testing.assert_allclose(np.sum(targets, axis=-1), 1.0, rtol=1e-6)
  smooth = np.eye(NUM_CLASSES) * (1 - SMOOTHING) + SMOOTHING / NUM_CLASSES
  np.testing.assert_allclose(targets, lam * smooth[labels] + (1 - lam) * smooth[shard_mirror(labels, mesh.size)],
                             rtol=1e-5, atol=1e-7)
